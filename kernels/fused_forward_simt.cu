// Fused base-plus-LoRA forward, plain SIMT (no tensor cores): the reference
// kernel every faster kernel is compared with, and the one that proves the
// host runtime and the launch path. Any m, n, k, r; f32 accumulation.
//
//   y[m,n] = x[m,k] w[n,k]^T + scale * (x a[r,k]^T)[m,r] b[n,r]^T  (+ beta * y)
//
// A block owns a BM x BN tile of y. It accumulates the base product over k in
// shared-memory tiles, then walks the rank in chunks of RC: the shrink
// t = x a^T for its BM rows (f32, never rounded to the storage type) goes to
// shared memory and the expand adds scale * t b^T into the same accumulator, so
// y is written once. The shrink is recomputed by every column block of a row
// band: r/BN extra work, small at LoRA ranks; the tensor-core kernels avoid it.
#include "lk_runtime.cuh"

namespace {

constexpr int BM = 32, BN = 64, BK = 32, RC = 32;
constexpr int THREADS = 256;
constexpr int TM = 2, TN = 4;  // outputs per thread: rows ty*TM.., cols tx + 16 j
static_assert(BM * BN == THREADS * TM * TN, "tile must cover the block");

template <class T>
__device__ void fused_forward_simt(const FusedForwardParams& p) {
    const T* __restrict__ x = reinterpret_cast<const T*>(p.x);
    const T* __restrict__ w = reinterpret_cast<const T*>(p.w);
    const T* __restrict__ a = reinterpret_cast<const T*>(p.a);
    const T* __restrict__ b = reinterpret_cast<const T*>(p.b);
    T* __restrict__ y = reinterpret_cast<T*>(p.y);

    // +1 column of padding: threads of a warp read different rows of a tile.
    LK_SHARED(float, xs, [BM][BK + 1]);
    LK_SHARED(float, ws, [BN][BK + 1]);
    LK_SHARED(float, ts, [BM][RC + 1]);
    LK_SHARED(float, bs, [BN][RC + 1]);

    const int tid = threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;
    const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;

    float acc[TM][TN];
    for (int i = 0; i < TM; ++i)
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

    // Base product, k in tiles of BK; out-of-range elements load as zero.
    for (int k0 = 0; k0 < p.k; k0 += BK) {
        for (int e = tid; e < BM * BK; e += THREADS) {
            int r = e / BK, c = e % BK;
            int gr = row0 + r, gc = k0 + c;
            xs[r][c] = (gr < p.m && gc < p.k) ? lk::to_f32(x[(size_t)gr * p.k + gc]) : 0.f;
        }
        for (int e = tid; e < BN * BK; e += THREADS) {
            int r = e / BK, c = e % BK;
            int gr = col0 + r, gc = k0 + c;
            ws[r][c] = (gr < p.n && gc < p.k) ? lk::to_f32(w[(size_t)gr * p.k + gc]) : 0.f;
        }
        __syncthreads();
        for (int kk = 0; kk < BK; ++kk)
            for (int i = 0; i < TM; ++i)
                for (int j = 0; j < TN; ++j) acc[i][j] += xs[ty * TM + i][kk] * ws[tx + 16 * j][kk];
        __syncthreads();
    }

    // Low-rank term, rank in chunks of RC.
    for (int r0 = 0; r0 < p.r; r0 += RC) {
        // Shrink: t[i][j] = sum_k x[row0+i, k] a[r0+j, k], one dot product per entry.
        for (int e = tid; e < BM * RC; e += THREADS) {
            int i = e / RC, j = e % RC;
            int gr = row0 + i, gj = r0 + j;
            float t = 0.f;
            if (gr < p.m && gj < p.r) {
                const T* xr = x + (size_t)gr * p.k;
                const T* ar = a + (size_t)gj * p.k;
                for (int kk = 0; kk < p.k; ++kk) t += lk::to_f32(xr[kk]) * lk::to_f32(ar[kk]);
            }
            ts[i][j] = t * p.scale;
            // The first column of blocks also saves t for the backward pass.
            if (p.t_out && blockIdx.x == 0 && gr < p.m && gj < p.r) reinterpret_cast<float*>(p.t_out)[(size_t)gr * p.r + gj] = t;
        }
        for (int e = tid; e < BN * RC; e += THREADS) {
            int i = e / RC, j = e % RC;
            int gn = col0 + i, gj = r0 + j;
            bs[i][j] = (gn < p.n && gj < p.r) ? lk::to_f32(b[(size_t)gn * p.r + gj]) : 0.f;
        }
        __syncthreads();
        for (int jj = 0; jj < RC; ++jj)
            for (int i = 0; i < TM; ++i)
                for (int j = 0; j < TN; ++j) acc[i][j] += ts[ty * TM + i][jj] * bs[tx + 16 * j][jj];
        __syncthreads();
    }

    for (int i = 0; i < TM; ++i) {
        int gr = row0 + ty * TM + i;
        if (gr >= p.m) continue;
        for (int j = 0; j < TN; ++j) {
            int gc = col0 + tx + 16 * j;
            if (gc >= p.n) continue;
            size_t idx = (size_t)gr * p.n + gc;
            float v = acc[i][j];
            // beta = 0 never reads y, so garbage (even NaN) in y does not leak in.
            if (p.beta != 0.f) v += p.beta * lk::to_f32(y[idx]);
            y[idx] = lk::from_f32<T>(v);
        }
    }
}

}  // namespace

LK_KERNEL(lk_fused_forward_simt_f32, FusedForwardParams, fused_forward_simt<float>)
LK_KERNEL(lk_fused_forward_simt_f16, FusedForwardParams, fused_forward_simt<__half>)
LK_KERNEL(lk_fused_forward_simt_bf16, FusedForwardParams, fused_forward_simt<__nv_bfloat16>)
