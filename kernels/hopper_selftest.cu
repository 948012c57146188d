// lk-targets: sm_90a
// Kernels that test the emulation of Hopper's asynchronous instructions
// (lk_hopper.cuh, kernels/host/lk_host_hopper.h) rather than LoRA math: one
// warpgroup computes out[64][N] = A[64][128] B[N][128]^T (f32 out, f16 or
// bf16 operands) with wgmma, A and B zero past p.k and B past p.b_rows rows. Each has a correct form (variant 0) and planted
// bugs (HopperVariant); src/hopper_selftest/tests.rs requires every planted
// bug to give a wrong answer or a failed launch on the host runtime, on every
// run and under every schedule. On a Hopper GPU the correct forms check the
// emulated layouts against the hardware.
#include "lk_mma.cuh"

namespace {

constexpr int kRows = 64, kN = 64, kK = 128;  // kN: the TMA kernels' N

enum HopperVariant {
    kCorrect = 0,
    kWrongSwizzle = 1,            // descriptors name another swizzle than TMA wrote
    kAccumulatorsBeforeWait = 2,  // the result stored before wgmma.wait_group
    kWrongParity = 3,             // mbarrier waits on the other phase parity
    kExpectTxShort = 4,           // expect_tx announces 16 bytes too few
    kExpectTxLong = 5,            // ... 16 bytes too many
    kMissingProxyFence = 6,       // generic stores, no fence.proxy.async before wgmma
    kMissingWgmmaFence = 7,       // no wgmma.fence before the first wgmma (host runtime only)
    kWrongFragmentIndex = 8,      // A registers a[1] and a[2] swapped
    kSwappedStrides = 9,          // MN-major B: the descriptor's lbo and sbo swapped
    kWrongMajor = 10,             // MN-major B read as K-major (no imm-trans-b)
};

// The accumulators' layout: thread t's d[i] is out[row][col] of out[64][N].
template <int N>
__device__ void store_accumulators(const HopperSelftestParams& p, const float (&d)[N / 2]) {
    float* out = reinterpret_cast<float*>(p.out);
    const int t = threadIdx.x, w = t / 32, group = t % 32 / 4, quad = t % 4;
    for (int i = 0; i < N / 2; ++i) {
        const int row = 16 * w + group + 8 * (i / 2 % 2), col = 8 * (i / 4) + 2 * quad + i % 2;
        out[row * N + col] = d[i];
    }
}

// Shared memory for the kernels below: the dynamic allocation, rounded up
// to the next 1024-byte boundary of the shared window (swizzled atoms need
// it; the launch adds 1024 bytes for this).
__device__ unsigned char* aligned_dynamic_smem() {
    LK_DYNAMIC_SHARED(unsigned char, smem);
    return smem + (1024 - lk::smem_address(smem) % 1024) % 1024;
}

// A and B through TMA in stages of S / 2 k (S = p.swizzle; 16 k as two
// 8-wide boxes without swizzle), double-buffered on two mbarriers, thread 0
// issuing the loads; wgmma reads them through descriptors of the same swizzle.
// The tensor maps end at k and b_rows: TMA fills the rest of the boxes with zeros.
// With p.b_mn_major, B comes from a [k][n] matrix: boxes of S / 2 n (8
// without swizzle) by the stage's k rows, side by side, read MN-major.
template <class T>
__device__ void tma_wgmma(const HopperSelftestParams& p) {
    LK_SHARED(uint64_t, full, [2]);
    unsigned char* base = aligned_dynamic_smem();
    const int t = threadIdx.x, swizzle = p.swizzle;
    const int stage_k = swizzle == 0 ? 16 : swizzle / 2, stages = kK / stage_k;
    const unsigned operand_bytes = kRows * stage_k * 2, stage_bytes = 2 * operand_bytes;
    auto tile = [&](int buf, int operand) { return base + buf * stage_bytes + operand * operand_bytes; };
    if (t == 0) {
        lk::mbarrier_init(&full[0], 1);
        lk::mbarrier_init(&full[1], 1);
        lk::fence_mbarrier_init();
    }
    __syncthreads();
    auto issue = [&](int stage) {
        const int buf = stage % 2;
        unsigned bytes = stage_bytes;
        if (p.variant == kExpectTxShort) bytes -= 16;
        if (p.variant == kExpectTxLong) bytes += 16;
        lk::mbarrier_arrive_expect_tx(&full[buf], bytes);
        for (int operand = 0; operand < 2; ++operand) {
            const LkTensorMap* map = operand == 0 ? &p.a_map : &p.b_map;
            if (operand == 1 && p.b_mn_major) {
                const int span = swizzle == 0 ? 8 : swizzle / 2;  // n per box
                for (int n0 = 0; n0 < kN; n0 += span)
                    lk::tma_load_2d(tile(buf, 1) + n0 * stage_k * 2, map, n0, stage * stage_k, &full[buf]);
            } else if (swizzle == 0) {
                lk::tma_load_2d(tile(buf, operand), map, stage * 16, 0, &full[buf]);
                lk::tma_load_2d(tile(buf, operand) + kRows * 16, map, stage * 16 + 8, 0, &full[buf]);
            } else {
                lk::tma_load_2d(tile(buf, operand), map, stage * stage_k, 0, &full[buf]);
            }
        }
    };
    if (t == 0) {
        issue(0);
        if (stages > 1) issue(1);
    }
    // The planted bug: the next smaller swizzle (none -> 32 bytes).
    const int desc_swizzle = p.variant != kWrongSwizzle ? swizzle : swizzle == 0 ? 32 : swizzle / 2 == 16 ? 0 : swizzle / 2;
    float d[kN / 2];
    for (int i = 0; i < kN / 2; ++i) d[i] = 0.f;
    for (int stage = 0; stage < stages; ++stage) {
        const int buf = stage % 2;
        lk::mbarrier_wait(&full[buf], (unsigned)(stage / 2 % 2) ^ (p.variant == kWrongParity ? 1u : 0u));
        lk::wgmma_fence();
        lk::wgmma_fence_operands(d);
        for (int step = 0; step < stage_k / 16; ++step) {
            uint64_t desc[2];
            for (int operand = 0; operand < 2; ++operand) {
                const unsigned start = lk::smem_address(tile(buf, operand)) + 32 * step;
                // Without swizzle: k-adjacent core matrices one box (64 rows x 16 bytes) apart.
                desc[operand] = swizzle == 0 ? lk::wgmma_desc(start, kRows * 16, 128, desc_swizzle)
                                             : lk::wgmma_desc(start, 16, 8 * swizzle, desc_swizzle);
            }
            const bool more = stage > 0 || step > 0;
            if (p.b_mn_major) {
                // k steps of 16 rows; the boxes (groups of n) one box apart, and
                // 8-row groups of k one core matrix (none) or atom (swizzled) apart.
                const unsigned start = lk::smem_address(tile(buf, 1)) + step * 16 * (swizzle == 0 ? 16 : swizzle);
                unsigned lbo = swizzle == 0 ? 128 : swizzle * stage_k, sbo = swizzle == 0 ? stage_k * 16 : 8 * swizzle;
                if (p.variant == kSwappedStrides) {
                    const unsigned swap = lbo;
                    lbo = sbo;
                    sbo = swap;
                }
                const uint64_t desc_b = lk::wgmma_desc(start, lbo, sbo, desc_swizzle);
                if (p.variant == kWrongMajor)
                    lk::wgmma_ss<kN, T>(d, desc[0], desc_b, more);
                else
                    lk::wgmma_ss_b_mn<kN, T>(d, desc[0], desc_b, more);
                continue;
            }
            lk::wgmma_ss<kN, T>(d, desc[0], desc[1], more);
        }
        lk::wgmma_commit();
        if (stage + 1 == stages && p.variant == kAccumulatorsBeforeWait) store_accumulators<kN>(p, d);
        lk::wgmma_wait<0>();
        lk::wgmma_fence_operands(d);
        // The warpgroup's wgmma has read the buffer: refill it.
        if (t == 0 && stage + 2 < stages) issue(stage + 2);
    }
    if (p.variant != kAccumulatorsBeforeWait) store_accumulators<kN>(p, d);
}

// A and B ([N][k]) stored by the threads (generic stores) in the no-swizzle
// layout over all of k (core matrix (row group g, k group c) at g 2048 + c 128),
// then fence.proxy.async and a barrier before wgmma reads them. With
// RegisterA, A comes from registers instead (mma's A fragment straight from
// global memory). Instantiated for every N the wgmma forms have.
template <class T, bool RegisterA, int N>
__device__ void staged_wgmma(const HopperSelftestParams& p) {
    unsigned char* a_tile = aligned_dynamic_smem();
    unsigned char* b_tile = a_tile + kRows * kK * 2;
    const unsigned short* a = reinterpret_cast<const unsigned short*>(p.a);
    const unsigned short* b = reinterpret_cast<const unsigned short*>(p.b);
    const int t = threadIdx.x;
    // Element (row, k) of A or of B ([b_rows][k]): zero past k and past B's rows.
    auto a_at = [&](int row, int k) { return k < p.k ? a[row * p.k + k] : (unsigned short)0; };
    auto b_at = [&](int row, int k) { return k < p.k && row < p.b_rows ? b[row * p.k + k] : (unsigned short)0; };
    auto put = [](unsigned char* tile, int row, int k, unsigned short v) {
        *reinterpret_cast<unsigned short*>(tile + row / 8 * 2048 + k / 8 * 128 + row % 8 * 16 + k % 8 * 2) = v;
    };
    if (!RegisterA)
        for (int e = t; e < kRows * kK; e += 128) put(a_tile, e / kK, e % kK, a_at(e / kK, e % kK));
    for (int e = t; e < N * kK; e += 128) put(b_tile, e / kK, e % kK, b_at(e / kK, e % kK));
    if (p.variant != kMissingProxyFence) lk::fence_proxy_async();
    __syncthreads();
    float d[N / 2];
    for (int i = 0; i < N / 2; ++i) d[i] = 0.f;
    // With RegisterA, every k-step's A fragment is loaded before the first
    // wgmma, each into registers of its own: a wgmma in flight may still be
    // reading its A registers until wgmma.wait_group, so they are not reused
    // for the next step (which, under compute-sanitizer, gave another step's
    // A). The fence below orders all of these writes before the wgmmas.
    const int w = t / 32, group = t % 32 / 4, quad = t % 4;
    uint32_t regs[RegisterA ? kK / 16 : 1][4];
#pragma unroll
    for (int step = 0; step < (RegisterA ? kK / 16 : 0); ++step) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = 16 * w + group + 8 * (i % 2), k = 16 * step + 8 * (i / 2) + 2 * quad;
            regs[step][i] = (uint32_t)a_at(row, k) | (uint32_t)a_at(row, k + 1) << 16;
        }
        if (p.variant == kWrongFragmentIndex) {
            const uint32_t swap = regs[step][1];
            regs[step][1] = regs[step][2];
            regs[step][2] = swap;
        }
    }
    if (p.variant != kMissingWgmmaFence) lk::wgmma_fence();
    lk::wgmma_fence_operands(d);
#pragma unroll
    for (int step = 0; step < kK / 16; ++step) {
        const uint64_t desc_b = lk::wgmma_desc(lk::smem_address(b_tile) + 256 * step, 128, 2048, 0);
        if (RegisterA) {
            lk::wgmma_rs<N, T>(d, regs[step], desc_b, step > 0);
        } else {
            const uint64_t desc_a = lk::wgmma_desc(lk::smem_address(a_tile) + 256 * step, 128, 2048, 0);
            lk::wgmma_ss<N, T>(d, desc_a, desc_b, step > 0);
        }
    }
    lk::wgmma_commit();
    lk::wgmma_wait<0>();
    lk::wgmma_fence_operands(d);
    store_accumulators<N>(p, d);
}

}  // namespace

LK_KERNEL_TMA(lk_hopper_selftest_tma_wgmma_f16, HopperSelftestParams, tma_wgmma<__half>)
LK_KERNEL_TMA(lk_hopper_selftest_tma_wgmma_bf16, HopperSelftestParams, tma_wgmma<__nv_bfloat16>)
// Every wgmma form: staged (A from shared memory) and register_a, both types, N 8 to 256.
#define LK_STAGED_KERNELS(N)                                                                                  \
    LK_KERNEL(lk_hopper_selftest_staged_f16_n##N, HopperSelftestParams, (staged_wgmma<__half, false, N>))       \
    LK_KERNEL(lk_hopper_selftest_staged_bf16_n##N, HopperSelftestParams, (staged_wgmma<__nv_bfloat16, false, N>)) \
    LK_KERNEL(lk_hopper_selftest_register_a_f16_n##N, HopperSelftestParams, (staged_wgmma<__half, true, N>))    \
    LK_KERNEL(lk_hopper_selftest_register_a_bf16_n##N, HopperSelftestParams, (staged_wgmma<__nv_bfloat16, true, N>))
LK_STAGED_KERNELS(8)
LK_STAGED_KERNELS(16)
LK_STAGED_KERNELS(32)
LK_STAGED_KERNELS(64)
LK_STAGED_KERNELS(128)
LK_STAGED_KERNELS(256)
