// Kernels that test the execution environment itself, not LoRA math. Each has
// a correct form (variant 0) and planted bugs (variant > 0). src/runtime_selftest/tests.rs
// requires every planted bug to produce a wrong answer on the host runtime, on
// every run and under every schedule; on a GPU the correct forms check that
// the host emulation of mma/ldmatrix agrees with the hardware.
#include "lk_mma.cuh"

namespace {

// out[i] = in[i] + in[(i + 1) % 64] through shared memory, twice (two chunks
// reuse the same buffer). Variant 1 drops the barrier between store and load;
// variant 2 drops the barrier that protects the buffer before its reuse.
__device__ void selftest_smem_neighbors(const SelftestParams& p) {
    const float* in = reinterpret_cast<const float*>(p.input);
    float* out = reinterpret_cast<float*>(p.out);
    LK_SHARED(float, buf, [64]);
    const int t = threadIdx.x;
    for (int chunk = 0; chunk < 2; ++chunk) {
        buf[t] = in[chunk * 64 + t];
        if (p.variant != 1) __syncthreads();
        out[chunk * 64 + t] = buf[t] + buf[(t + 1) % 64];
        if (p.variant != 2) __syncthreads();
    }
}

// Each warp on its own: its lane 0 publishes its warp's value in shared
// memory, __syncwarp, and every lane adds it to its own input: out[t] =
// in[t] + in[32 * warp]. Four warps, no block barrier (as a warp expanding its
// own rows of a tile does). Variant 7 gives all warps one slot: on a GPU
// they race, on the host runtime the interleaved schedule shows it.
__device__ void selftest_warp_slots(const SelftestParams& p) {
    const float* in = reinterpret_cast<const float*>(p.input);
    float* out = reinterpret_cast<float*>(p.out);
    LK_SHARED(float, slot, [4]);
    const int t = threadIdx.x, warp = t / 32;
    const int mine = p.variant == 7 ? 0 : warp;
    if (t % 32 == 0) slot[mine] = in[t];
    __syncwarp();
    out[t] = in[t] + slot[mine];
}

// One warp: D[16x8] = A[16x16] B[16x8] with A row-major and B given as
// bt[8][16] (n x k, the layout of w). Fragments are filled straight from
// global memory by the documented layout. Variant 3 swaps a[1] and a[2], the
// classic misreading of the A fragment order.
template <class T>
__device__ void selftest_mma(const SelftestParams& p) {
    const unsigned short* A = reinterpret_cast<const unsigned short*>(p.input);
    const unsigned short* Bt = reinterpret_cast<const unsigned short*>(p.input2);
    float* D = reinterpret_cast<float*>(p.out);
    const int lane = threadIdx.x, group = lane / 4, quad = lane % 4;
    auto pack = [](unsigned short lo, unsigned short hi) { return (uint32_t)lo | ((uint32_t)hi << 16); };
    uint32_t a[4], b[2];
    for (int i = 0; i < 4; ++i) {
        int row = group + 8 * (i & 1), col = 8 * (i >> 1) + 2 * quad;
        a[i] = pack(A[row * 16 + col], A[row * 16 + col + 1]);
    }
    if (p.variant == 3) {
        uint32_t tmp = a[1];
        a[1] = a[2];
        a[2] = tmp;
    }
    for (int i = 0; i < 2; ++i) {
        int k = 8 * i + 2 * quad;
        b[i] = pack(Bt[group * 16 + k], Bt[group * 16 + k + 1]);
    }
    float c[4] = {0.f, 0.f, 0.f, 0.f}, d[4];
    lk::mma_m16n8k16(d, a, b, c, T());
    for (int i = 0; i < 4; ++i) D[(group + 8 * (i >> 1)) * 8 + 2 * quad + (i & 1)] = d[i];
}

// The same product with operands staged through shared memory and loaded
// with ldmatrix (A: x4; B: x2 from the n x k rows). Variant 4 gives ldmatrix
// the rows of the wrong 8x8 matrices (lane / 8 and lane % 8 mixed up).
template <class T>
__device__ void selftest_ldmatrix(const SelftestParams& p) {
    const unsigned short* A = reinterpret_cast<const unsigned short*>(p.input);
    const unsigned short* Bt = reinterpret_cast<const unsigned short*>(p.input2);
    float* D = reinterpret_cast<float*>(p.out);
    LK_SHARED(unsigned short, as, [16][16]);
    LK_SHARED(unsigned short, bs, [8][16]);
    const int lane = threadIdx.x, group = lane / 4, quad = lane % 4;
    for (int e = lane; e < 256; e += 32) as[e / 16][e % 16] = A[e];
    for (int e = lane; e < 128; e += 32) bs[e / 16][e % 16] = Bt[e];
    __syncwarp();
    // Matrices of A in fragment order: (rows 0-7, k 0-7), (rows 8-15, k 0-7),
    // (rows 0-7, k 8-15), (rows 8-15, k 8-15).
    int mat = lane / 8, row = lane % 8;
    if (p.variant == 4) {
        mat = lane % 4;
        row = lane / 4;
    }
    uint32_t a[4], b[2];
    lk::ldmatrix_x4(a, &as[row + 8 * (mat & 1)][8 * (mat >> 1)], false);
    // B: matrix 0 is k 0-7, matrix 1 is k 8-15; lanes 16-31 addresses are ignored.
    lk::ldmatrix_x2(b, &bs[lane % 8][8 * ((lane / 8) & 1)], false);
    float c[4] = {0.f, 0.f, 0.f, 0.f}, d[4];
    lk::mma_m16n8k16(d, a, b, c, T());
    for (int i = 0; i < 4; ++i) D[(group + 8 * (i >> 1)) * 8 + 2 * quad + (i & 1)] = d[i];
}

// Warp collectives: out[w] = sum of in over warp w (xor butterfly), and
// out[nwarps + w] = number of positive inputs in warp w (ballot). Variant 6
// lets half of each warp skip the first shuffle: undefined behaviour on a GPU,
// a reported deadlock on the host runtime (host only).
__device__ void selftest_warp_reduce(const SelftestParams& p) {
    const float* in = reinterpret_cast<const float*>(p.input);
    float* out = reinterpret_cast<float*>(p.out);
    const int t = threadIdx.x, lane = t % 32, warp = t / 32, nwarps = blockDim.x / 32;
    float v = in[t];
    if (p.variant == 6 && lane >= 16) return;
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
    unsigned positive = __ballot_sync(0xFFFFFFFFu, in[t] > 0.f);
    float from_lane0 = __shfl_sync(0xFFFFFFFFu, v, 0);
    if (lane == 0) {
        out[warp] = from_lane0;
        out[nwarps + warp] = (float)__builtin_popcount(positive);
    }
}

// cp.async staging: each thread copies 16 bytes (4 floats) into shared memory,
// the last thread's copy zero-fills past p.n, and every eighth thread (t % 8
// == 7) issues its copy through cp_async_16_if with issue = false, so its
// chunk keeps the -1s stored before. Variant 5 forgets the wait.
__device__ void selftest_cp_async(const SelftestParams& p) {
    const float* in = reinterpret_cast<const float*>(p.input);
    float* out = reinterpret_cast<float*>(p.out);
    LK_SHARED(float, buf, [128]);
    const int t = threadIdx.x;  // 32 threads x 4 floats
    for (int i = 0; i < 4; ++i) buf[4 * t + i] = -1.f;
    __syncthreads();
    int valid = p.n - 4 * t;
    valid = valid < 0 ? 0 : (valid > 4 ? 4 : valid);
    const float* src = in + 4 * (valid > 0 ? t : 0);
    if (t % 2 == 0) lk::cp_async_16(&buf[4 * t], src, 4u * valid);
    else lk::cp_async_16_if(t % 8 != 7, &buf[4 * t], src, 4u * valid);
    lk::cp_async_commit();
    if (p.variant != 5) lk::cp_async_wait<0>();
    __syncthreads();
    for (int i = 0; i < 4; ++i) out[4 * t + i] = buf[(4 * t + 4 + i) % 128];
}

// out[i] = to_f32(from_f32<T>(in[i])): the storage-type conversions (on the
// host runtime these are the stand-ins of lk_types.cuh, compared bit for bit
// with the `half` crate).
template <class T>
__device__ void selftest_round_trip(const SelftestParams& p) {
    const float* in = reinterpret_cast<const float*>(p.input);
    float* out = reinterpret_cast<float*>(p.out);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += gridDim.x * blockDim.x)
        out[i] = lk::to_f32(lk::from_f32<T>(in[i]));
}

}  // namespace

LK_KERNEL(lk_selftest_round_trip_f16, SelftestParams, selftest_round_trip<__half>)
LK_KERNEL(lk_selftest_round_trip_bf16, SelftestParams, selftest_round_trip<__nv_bfloat16>)
LK_KERNEL(lk_selftest_smem_neighbors, SelftestParams, selftest_smem_neighbors)
LK_KERNEL(lk_selftest_warp_slots, SelftestParams, selftest_warp_slots)
LK_KERNEL(lk_selftest_mma_f16, SelftestParams, selftest_mma<__half>)
LK_KERNEL(lk_selftest_mma_bf16, SelftestParams, selftest_mma<__nv_bfloat16>)
LK_KERNEL(lk_selftest_ldmatrix_f16, SelftestParams, selftest_ldmatrix<__half>)
LK_KERNEL(lk_selftest_warp_reduce, SelftestParams, selftest_warp_reduce)
LK_KERNEL(lk_selftest_cp_async, SelftestParams, selftest_cp_async)
