// Building blocks of the SIMT (no tensor core) tile kernels
// (fused_forward_simt.cu, and multi_adapter_forward.cu's f32 tiles): a block
// of THREADS owns a BM x BN tile of y, each thread TM x TN outputs (rows
// ty*TM.., columns tx + TX*j) accumulated in f32 registers from f32
// shared-memory tiles. The same two tiles carry x and w during the base
// product and then t and b during the expand, so both steps share one inner
// product (fma_tiles) and the kernels' shared memory stays small.
#pragma once
#include "lk_runtime.cuh"

namespace lk {
namespace simt {

struct Tiles {
    static constexpr int BM = 32, BN = 64, BK = 32;
    static constexpr int THREADS = 256;
    static constexpr int TM = 2, TN = 4, TX = 16;
    static constexpr int LD = BK + 1;  // +1: threads of a warp read different rows of a tile
    static_assert(BM * BN == THREADS * TM * TN && THREADS == TX * (BM / TM), "tile must cover the block");
};

// The two shared-memory tiles, BK (or a rank chunk of up to BK) columns wide:
// rows of the left operand (x, then t) and of the right one (w, then b).
template <class C>
struct Smem {
    float* lhs;  // [BM][LD]
    float* rhs;  // [BN][LD]
};

template <class C>
struct Acc {
    float v[C::TM][C::TN];
};

template <class C>
__device__ __forceinline__ void zero(Acc<C>& acc) {
    for (int i = 0; i < C::TM; ++i)
        for (int j = 0; j < C::TN; ++j) acc.v[i][j] = 0.f;
}

// acc += lhs[rows][0..len) rhs[cols][0..len)^T. Synchronize around it.
template <class C>
__device__ __forceinline__ void fma_tiles(const Smem<C>& s, int len, Acc<C>& acc) {
    const int tx = threadIdx.x % C::TX, ty = threadIdx.x / C::TX;
    for (int kk = 0; kk < len; ++kk)
        for (int i = 0; i < C::TM; ++i)
            for (int j = 0; j < C::TN; ++j)
                acc.v[i][j] += s.lhs[(ty * C::TM + i) * C::LD + kk] * s.rhs[(tx + C::TX * j) * C::LD + kk];
}

// acc += x[row0.., :] w[col0.., :]^T over all of k, in tiles of BK;
// out-of-range elements load as zero. Ends after a barrier, so the caller
// may reuse the tiles.
template <class T, class C>
__device__ void base_product(const Smem<C>& s, const T* __restrict__ x, const T* __restrict__ w, int m, int n,
                             int k, int row0, int col0, Acc<C>& acc) {
    for (int k0 = 0; k0 < k; k0 += C::BK) {  // sass-loop: simt_mainloop
        for (int e = threadIdx.x; e < C::BM * C::BK; e += C::THREADS) {
            int r = e / C::BK, c = e % C::BK, gr = row0 + r, gc = k0 + c;
            s.lhs[r * C::LD + c] = (gr < m && gc < k) ? to_f32(x[(size_t)gr * k + gc]) : 0.f;
        }
        for (int e = threadIdx.x; e < C::BN * C::BK; e += C::THREADS) {
            int r = e / C::BK, c = e % C::BK, gr = col0 + r, gc = k0 + c;
            s.rhs[r * C::LD + c] = (gr < n && gc < k) ? to_f32(w[(size_t)gr * k + gc]) : 0.f;
        }
        __syncthreads();
        fma_tiles<C>(s, C::BK, acc);
        __syncthreads();
    }
}

// y[row0.., col0..] = acc (+ beta y); beta = 0 never reads y, so garbage
// (even NaN) in y does not leak in.
template <class T, class C>
__device__ void store_y(T* y, int m, int n, int row0, int col0, float beta, const Acc<C>& acc) {
    const int tx = threadIdx.x % C::TX, ty = threadIdx.x / C::TX;
    for (int i = 0; i < C::TM; ++i) {
        int gr = row0 + ty * C::TM + i;
        if (gr >= m) continue;
        for (int j = 0; j < C::TN; ++j) {
            int gc = col0 + tx + C::TX * j;
            if (gc >= n) continue;
            size_t idx = (size_t)gr * n + gc;
            float v = acc.v[i][j];
            if (beta != 0.f) v += beta * to_f32(y[idx]);
            y[idx] = from_f32<T>(v);
        }
    }
}

}  // namespace simt
}  // namespace lk
