// Merge / unmerge an adapter into the base weight: w <- w +/- scale * b a,
// the product accumulated in f32 and the sum rounded once to the storage
// type (MergeParams in lk_params.h).
//
// A block owns ROWS rows of w (grid.x, up to 2^31 - 1 blocks: any n, an
// lm_head's included) and a chunk of blockDim.x columns (grid.y, striding
// when k needs more than grid.y's 65535 chunks); a thread owns one column q
// of those rows, so threads of a warp take consecutive columns (coalesced w
// and a). The rows' b values go through shared memory, RCHUNK ranks at a
// time, stored rank-major so a thread reads one rank's ROWS values as two
// 16-byte loads; each a[j, q] loaded from global memory then feeds ROWS
// FMAs (the one-row-per-block kernel paid two global loads per FMA and read
// a once per row). Each element's sum runs over j in order, as before.
// Offsets are 64-bit: n * k may exceed 2^31.
#include "lk_runtime.cuh"

namespace {

constexpr int ROWS = 8;
constexpr int RCHUNK = 64;

template <class T>
__device__ void merge(const MergeParams& p) {
    LK_SHARED(float, bs, [RCHUNK][ROWS]);
    T* w = reinterpret_cast<T*>(p.w);
    const T* a = reinterpret_cast<const T*>(p.a);
    const T* b = reinterpret_cast<const T*>(p.b);
    const int64_t c0 = (int64_t)blockIdx.x * ROWS;
    const int rows = p.n - c0 < ROWS ? (int)(p.n - c0) : ROWS;
    const int64_t stride = (int64_t)gridDim.y * blockDim.x;
    // q0 is the same for the whole block: the barriers below see every thread.
    for (int64_t q0 = (int64_t)blockIdx.y * blockDim.x; q0 < p.k; q0 += stride) {
        const int64_t q = q0 + threadIdx.x;
        float acc[ROWS];
        for (int i = 0; i < ROWS; ++i) acc[i] = 0.f;
        for (int r0 = 0; r0 < p.r; r0 += RCHUNK) {
            const int rc = p.r - r0 < RCHUNK ? p.r - r0 : RCHUNK;
            __syncthreads();  // the previous chunk's b is consumed
            for (int e = threadIdx.x; e < RCHUNK * ROWS; e += blockDim.x) {
                const int j = e / ROWS, i = e % ROWS;
                bs[j][i] = (j < rc && i < rows) ? lk::to_f32(b[(c0 + i) * p.r + r0 + j]) : 0.f;
            }
            __syncthreads();
            if (q < p.k) {
                const T* aq = a + (int64_t)r0 * p.k + q;
                for (int j = 0; j < rc; ++j) {  // sass-loop: merge
                    const float av = lk::to_f32(aq[(int64_t)j * p.k]);
                    for (int i = 0; i < ROWS; ++i) acc[i] += bs[j][i] * av;
                }
            }
        }
        if (q < p.k)
            for (int i = 0; i < ROWS; ++i)
                if (i < rows) {
                    const int64_t idx = (c0 + i) * p.k + q;
                    w[idx] = lk::from_f32<T>(lk::to_f32(w[idx]) + p.sign * p.scale * acc[i]);
                }
    }
}

}  // namespace

LK_KERNEL(lk_merge_f32, MergeParams, merge<float>)
LK_KERNEL(lk_merge_f16, MergeParams, merge<__half>)
LK_KERNEL(lk_merge_bf16, MergeParams, merge<__nv_bfloat16>)
