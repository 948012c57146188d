// Fused base-plus-LoRA forward, plain SIMT (no tensor cores): the reference
// kernel every faster kernel is compared with, and the one that proves the
// host runtime and the launch path. Any m, n, k, r; f32 accumulation.
//
//   y[m,n] = x[m,k] w[n,k]^T + scale * (x a[r,k]^T)[m,r] b[n,r]^T  (+ beta * y)
//
// A block owns a BM x BN tile of y. It accumulates the base product over k in
// shared-memory tiles (lk_simt_tile.cuh), then walks the rank in chunks of
// RC: the shrink t = x a^T for its BM rows (f32, never rounded to the storage
// type) goes to shared memory and the expand adds scale * t b^T into the same
// accumulator, so y is written once. The shrink is recomputed by every column
// block of a row band: r/BN extra work, small at LoRA ranks; the tensor-core
// kernels avoid it.
#include "lk_simt_tile.cuh"

namespace {

using C = lk::simt::Tiles;
constexpr int RC = C::BK;  // rank chunk: t and b reuse the x and w tiles

template <class T>
__device__ void fused_forward_simt(const FusedForwardParams& p) {
    const T* __restrict__ x = reinterpret_cast<const T*>(p.x);
    const T* __restrict__ a = reinterpret_cast<const T*>(p.a);
    const T* __restrict__ b = reinterpret_cast<const T*>(p.b);

    // x tile, then scale * t; w tile, then b.
    LK_SHARED(float, lhs, [C::BM * C::LD]);
    LK_SHARED(float, rhs, [C::BN * C::LD]);
    const lk::simt::Smem<C> s{lhs, rhs};

    const int tid = threadIdx.x;
    const int row0 = blockIdx.y * C::BM, col0 = blockIdx.x * C::BN;

    lk::simt::Acc<C> acc;
    lk::simt::zero(acc);
    lk::simt::base_product<T, C>(s, x, reinterpret_cast<const T*>(p.w), p.m, p.n, p.k, row0, col0, acc);

    // Low-rank term, rank in chunks of RC.
    for (int r0 = 0; r0 < p.r; r0 += RC) {
        // Shrink: t[i][j] = sum_k x[row0+i, k] a[r0+j, k], one dot product per entry.
        for (int e = tid; e < C::BM * RC; e += C::THREADS) {
            int i = e / RC, j = e % RC;
            int gr = row0 + i, gj = r0 + j;
            float t = 0.f;
            if (gr < p.m && gj < p.r) {
                const T* xr = x + (size_t)gr * p.k;
                const T* ar = a + (size_t)gj * p.k;
                for (int kk = 0; kk < p.k; ++kk) t += lk::to_f32(xr[kk]) * lk::to_f32(ar[kk]);
            }
            lhs[i * C::LD + j] = t * p.scale;
            // The first column of blocks also saves t for the backward pass.
            if (p.t_out && blockIdx.x == 0 && gr < p.m && gj < p.r) reinterpret_cast<float*>(p.t_out)[(size_t)gr * p.r + gj] = t;
        }
        for (int e = tid; e < C::BN * RC; e += C::THREADS) {
            int i = e / RC, j = e % RC;
            int gn = col0 + i, gj = r0 + j;
            rhs[i * C::LD + j] = (gn < p.n && gj < p.r) ? lk::to_f32(b[(size_t)gn * p.r + gj]) : 0.f;
        }
        __syncthreads();
        lk::simt::fma_tiles<C>(s, p.r - r0 < RC ? p.r - r0 : RC, acc);
        __syncthreads();
    }

    lk::simt::store_y<T, C>(reinterpret_cast<T*>(p.y), p.m, p.n, row0, col0, p.beta, acc);
}

}  // namespace

LK_KERNEL(lk_fused_forward_simt_f32, FusedForwardParams, fused_forward_simt<float>)
LK_KERNEL(lk_fused_forward_simt_f16, FusedForwardParams, fused_forward_simt<__half>)
LK_KERNEL(lk_fused_forward_simt_bf16, FusedForwardParams, fused_forward_simt<__nv_bfloat16>)
