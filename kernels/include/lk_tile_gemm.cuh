// Building blocks of the tensor-core kernels (fused_forward_mma.cu,
// multi_adapter_forward.cu): a block owns a BM x BN tile of y = x w^T, its
// warps a WTM x WTN piece each, accumulated with mma.sync m16n8k16 from
// shared-memory tiles fed by a STAGES-deep cp.async pipeline.
#pragma once
#include "lk_mma.cuh"

namespace lk {

constexpr int RC = 64;  // rank handled per pass (shrink rows per stage, expand k-steps)

template <int BM_, int BN_, int BK_, int WM_, int WN_, int STAGES_>
struct TileConfig {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, WM = WM_, WN = WN_, STAGES = STAGES_;
    static constexpr int THREADS = 32 * WM * WN;
    static constexpr int WTM = BM / WM, WTN = BN / WN;  // warp tile
    static constexpr int MT = WTM / 16, NT = WTN / 8;   // mma tiles per warp
    static constexpr int TNT = (RC / 8 + WN - 1) / WN;  // t n8-tiles per warp (max)
    static constexpr int LDS = BK + 8;                   // smem row stride: 16B rows, no ldmatrix conflicts
    static constexpr int LDT = RC + 8;                   // row stride of the t and b tiles
    static_assert(WTM % 16 == 0 && WTN % 8 == 0 && BK % 16 == 0, "tile shape");
};

using DecodeTiles = TileConfig<16, 32, 64, 1, 2, 6>;
using PrefillTiles = TileConfig<128, 128, 32, 2, 4, 4>;

// The same for a kernel whose B operand is stored k-major ([reduction][N],
// loaded with ldmatrix.trans): the backward's dx = g w + u a. src/ops mirrors it.
template <class C>
__host__ __device__ constexpr int smem_elems_bt() {
    int pipeline = C::STAGES * (C::BM * C::LDS + C::BK * (C::BN + 8));
    int expand = 2 * C::BM * C::LDT + RC * (C::BN + 8);
    return pipeline > expand ? pipeline : expand;
}

// Elements of dynamic shared memory a launch needs: the pipeline (x, w and
// `shrink_rows` rows of a per stage) or the expand's tiles, which reuse the
// pipeline's space after the k-loop. src/ops mirrors this.
template <class C>
__host__ __device__ constexpr int smem_elems(int shrink_rows) {
    int pipeline = C::STAGES * (C::BM + C::BN + shrink_rows) * C::LDS;
    int expand = (2 * C::BM + C::BN) * C::LDT;
    return pipeline > expand ? pipeline : expand;
}

// Copies rows [row0, row0 + rows) x columns [col0, col0 + WIDTH) of a
// row-major [nrows, ncols] matrix into smem (row stride LD). Out-of-range
// elements are zero. ALIGNED: 16-byte cp.async (ncols % 8 == 0 and a 16-byte
// aligned base); otherwise element by element (the tail path for unaligned k).
template <class T, int THREADS, int WIDTH, int LD, bool ALIGNED>
__device__ __forceinline__ void load_rows(T* smem, const T* g, int nrows, int ncols, int row0, int rows, int col0) {
    constexpr int CHUNKS = WIDTH / 8;  // 16-byte chunks per row
    for (int e = threadIdx.x; e < rows * CHUNKS; e += THREADS) {
        int r = e / CHUNKS, c = (e % CHUNKS) * 8;
        int gr = row0 + r, gc = col0 + c;
        T* dst = smem + r * LD + c;
        if (ALIGNED) {
            int valid = (gr < nrows) ? ncols - gc : 0;
            valid = valid < 0 ? 0 : (valid > 8 ? 8 : valid);
            // A chunk that reads nothing still needs a valid address.
            const T* src = valid > 0 ? g + (size_t)gr * ncols + gc : g;
            cp_async_16(dst, src, 2u * valid);
        } else {
            for (int i = 0; i < 8; ++i)
                dst[i] = (gr < nrows && gc + i < ncols) ? g[(size_t)gr * ncols + gc + i] : from_f32<T>(0.f);
        }
    }
}

// The pipeline's tiles: BK columns wide, row stride LDS.
template <class T, class C, bool ALIGNED>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int nrows, int ncols, int row0, int rows, int col0) {
    load_rows<T, C::THREADS, C::BK, C::LDS, ALIGNED>(smem, g, nrows, ncols, row0, rows, col0);
}

// Which adapters a block's rows use: row_slot[BM] (filled by the caller, -1 =
// none) becomes distinct[1..distinct[0]], each slot once, in row order.
// Call from every thread; it synchronizes before and after.
template <int BM>
__device__ void collect_distinct(const int* row_slot, int* distinct) {
    __syncthreads();
    if (threadIdx.x == 0) {
        int count = 0;
        for (int i = 0; i < BM; ++i) {
            int s = row_slot[i];
            bool seen = s < 0;
            for (int d = 1; d <= count && !seen; ++d) seen = distinct[d] == s;
            if (!seen) distinct[++count] = s;
        }
        distinct[0] = count;
    }
    __syncthreads();
}

// Per-warp accumulators: acc for the y tile, tacc for up to RC columns of t.
template <class C>
struct Accumulators {
    float acc[C::MT][C::NT][4];
    float tacc[C::MT][C::TNT][4];
};

template <class C, int N>
__device__ __forceinline__ void zero(float (&v)[C::MT][N][4]) {
    for (int i = 0; i < C::MT; ++i)
        for (int j = 0; j < N; ++j)
            for (int q = 0; q < 4; ++q) v[i][j][q] = 0.f;
}

// One pass over k for the block's rows [row0, row0 + BM):
//   w != nullptr: acc  += x w[col0 .. col0 + BN)^T
//   rp > 0:       tacc += x a^T for the first rp rows of `a` (rc of them real)
// The t n8-tiles are dealt round-robin to the warps of a block row. Ends with
// the pipeline drained and a barrier, so the caller may reuse shared memory.
template <class T, class C, bool ALIGNED>
__device__ void mainloop(T* smem, const T* x, const T* w, const T* a, int m, int n, int k, int rc, int rp,
                         int row0, int col0, Accumulators<C>& r) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp / C::WN, wn = warp % C::WN;
    const int stage_elems = (C::BM + C::BN + rp) * C::LDS;
    const int ktiles = (k + C::BK - 1) / C::BK;

    auto load_stage = [&](int stage, int kt) {
        T* xs = smem + stage * stage_elems;
        T* ws = xs + C::BM * C::LDS;
        T* as = ws + C::BN * C::LDS;
        int kc = kt * C::BK;
        load_tile<T, C, ALIGNED>(xs, x, m, k, row0, C::BM, kc);
        if (w) load_tile<T, C, ALIGNED>(ws, w, n, k, col0, C::BN, kc);
        if (rp) load_tile<T, C, ALIGNED>(as, a, rc, k, 0, rp, kc);
    };

    for (int s = 0; s < C::STAGES - 1; ++s) {
        if (s < ktiles) load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<C::STAGES - 2>();
        __syncthreads();  // tile kt landed for all threads; stage (kt-1) is free
        int next = kt + C::STAGES - 1;
        if (next < ktiles) load_stage(next % C::STAGES, next);
        cp_async_commit();

        const T* xs = smem + (kt % C::STAGES) * stage_elems;
        const T* ws = xs + C::BM * C::LDS;
        const T* as = ws + C::BN * C::LDS;
        for (int kk = 0; kk < C::BK; kk += 16) {
            uint32_t af[C::MT][4];
            for (int i = 0; i < C::MT; ++i)
                ldmatrix_x4(af[i], xs + (wm * C::WTM + i * 16 + lane % 16) * C::LDS + kk + (lane / 16) * 8, false);
            if (w) {
                for (int j = 0; j < C::NT; ++j) {
                    uint32_t bf[2];
                    ldmatrix_x2(bf, ws + (wn * C::WTN + j * 8 + lane % 8) * C::LDS + kk + ((lane / 8) & 1) * 8, false);
                    for (int i = 0; i < C::MT; ++i) mma_m16n8k16(r.acc[i][j], af[i], bf, r.acc[i][j], T());
                }
            }
            for (int j = 0; j < C::TNT; ++j) {
                int tile = j * C::WN + wn;
                if (tile * 8 >= rp) break;
                uint32_t bf[2];
                ldmatrix_x2(bf, as + (tile * 8 + lane % 8) * C::LDS + kk + ((lane / 8) & 1) * 8, false);
                for (int i = 0; i < C::MT; ++i) mma_m16n8k16(r.tacc[i][j], af[i], bf, r.tacc[i][j], T());
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();
}

// acc += A B over a k-major B: A = a [m, kdim] row-major (tokens x reduction),
// B = b [kdim, n] row-major (reduction x columns), the block's tile at rows
// row0.., columns col0.. (the backward's dx = g w). Same pipeline as mainloop;
// B fragments come from ldmatrix.trans of [BK][BN + 8] tiles. Ends drained
// and after a barrier.
template <class T, class C, bool ALIGNED>
__device__ void mainloop_bt(T* smem, const T* a, const T* b, int m, int n, int kdim, int row0, int col0,
                            Accumulators<C>& r) {
    constexpr int LDB = C::BN + 8;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp / C::WN, wn = warp % C::WN;
    const int stage_elems = C::BM * C::LDS + C::BK * LDB;
    const int ktiles = (kdim + C::BK - 1) / C::BK;
    auto load_stage = [&](int stage, int kt) {
        T* as = smem + stage * stage_elems;
        T* bs = as + C::BM * C::LDS;
        load_tile<T, C, ALIGNED>(as, a, m, kdim, row0, C::BM, kt * C::BK);
        load_rows<T, C::THREADS, C::BN, LDB, ALIGNED>(bs, b, kdim, n, kt * C::BK, C::BK, col0);
    };
    for (int s = 0; s < C::STAGES - 1; ++s) {
        if (s < ktiles) load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<C::STAGES - 2>();
        __syncthreads();
        int next = kt + C::STAGES - 1;
        if (next < ktiles) load_stage(next % C::STAGES, next);
        cp_async_commit();
        const T* as = smem + (kt % C::STAGES) * stage_elems;
        const T* bs = as + C::BM * C::LDS;
        for (int kk = 0; kk < C::BK; kk += 16) {
            uint32_t af[C::MT][4];
            for (int i = 0; i < C::MT; ++i)
                ldmatrix_x4(af[i], as + (wm * C::WTM + i * 16 + lane % 16) * C::LDS + kk + (lane / 16) * 8, false);
            for (int j = 0; j < C::NT; ++j) {
                // Lanes 0-7 give rows kk..kk+7 of the n8 column block, lanes 8-15 rows kk+8..kk+15.
                uint32_t bf[2];
                ldmatrix_x2(bf, bs + (kk + lane % 16) * LDB + wn * C::WTN + j * 8, true);
                for (int i = 0; i < C::MT; ++i) mma_m16n8k16(r.acc[i][j], af[i], bf, r.acc[i][j], T());
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();
}

// acc += t_hi B + t_lo B with B = bt [rp][BN + 8] (k-major), t in th/tl [BM][LDT].
template <class T, class C>
__device__ void expand_bt(const T* th, const T* tl, const T* bt, int rp, Accumulators<C>& r) {
    constexpr int LDB = C::BN + 8;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp / C::WN, wn = warp % C::WN;
    for (int kk = 0; kk < rp; kk += 16) {
        uint32_t hf[C::MT][4], lf[C::MT][4];
        for (int i = 0; i < C::MT; ++i) {
            int off = (wm * C::WTM + i * 16 + lane % 16) * C::LDT + kk + (lane / 16) * 8;
            ldmatrix_x4(hf[i], th + off, false);
            ldmatrix_x4(lf[i], tl + off, false);
        }
        for (int j = 0; j < C::NT; ++j) {
            uint32_t bf[2];
            ldmatrix_x2(bf, bt + (kk + lane % 16) * LDB + wn * C::WTN + j * 8, true);
            for (int i = 0; i < C::MT; ++i) {
                mma_m16n8k16(r.acc[i][j], hf[i], bf, r.acc[i][j], T());
                mma_m16n8k16(r.acc[i][j], lf[i], bf, r.acc[i][j], T());
            }
        }
    }
}

// Shared-memory tiles of one expand step: t as hi + lo in the storage type
// ([BM][LDT] each) and b ([BN][LDT]), carved from the start of smem.
template <class T, class C>
struct ExpandTiles {
    T* th;
    T* tl;
    T* bs;
    __device__ explicit ExpandTiles(T* smem) : th(smem), tl(smem + C::BM * C::LDT), bs(smem + 2 * C::BM * C::LDT) {}
};

// Stores v as hi + lo at [row][col] of th and tl (row stride LDT): v = hi +
// lo to about 16 significant bits, so the expand loses nothing to rounding t
// (the known precision bug of f16 intermediates). Where hi is infinite lo is 0
// (Inf - Inf would be NaN).
template <class T, class C>
__device__ __forceinline__ void store_split(T* th, T* tl, int row, int col, float v) {
    T hi = from_f32<T>(v);
    float hv = to_f32(hi);
    th[row * C::LDT + col] = hi;
    tl[row * C::LDT + col] = from_f32<T>(isinf(hv) ? 0.f : v - hv);
}

// acc += t_hi b^T + t_lo b^T over rank columns [0, rp) of the expand tiles.
template <class T, class C>
__device__ void expand(const ExpandTiles<T, C>& e, int rp, Accumulators<C>& r) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp / C::WN, wn = warp % C::WN;
    for (int kk = 0; kk < rp; kk += 16) {
        uint32_t hf[C::MT][4], lf[C::MT][4];
        for (int i = 0; i < C::MT; ++i) {
            int off = (wm * C::WTM + i * 16 + lane % 16) * C::LDT + kk + (lane / 16) * 8;
            ldmatrix_x4(hf[i], e.th + off, false);
            ldmatrix_x4(lf[i], e.tl + off, false);
        }
        for (int j = 0; j < C::NT; ++j) {
            uint32_t bf[2];
            ldmatrix_x2(bf, e.bs + (wn * C::WTN + j * 8 + lane % 8) * C::LDT + kk + ((lane / 8) & 1) * 8, false);
            for (int i = 0; i < C::MT; ++i) {
                mma_m16n8k16(r.acc[i][j], hf[i], bf, r.acc[i][j], T());
                mma_m16n8k16(r.acc[i][j], lf[i], bf, r.acc[i][j], T());
            }
        }
    }
}

// y[row0.., col0..] = acc (+ beta y); beta = 0 never reads y, so garbage
// (even NaN) in y does not leak in.
template <class T, class C>
__device__ void store_y(T* y, int m, int n, int row0, int col0, float beta, const Accumulators<C>& r) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp / C::WN, wn = warp % C::WN;
    const int group = lane / 4, quad = lane % 4;
    for (int i = 0; i < C::MT; ++i)
        for (int j = 0; j < C::NT; ++j)
            for (int q = 0; q < 4; ++q) {
                int row = row0 + wm * C::WTM + i * 16 + group + 8 * (q >> 1);
                int col = col0 + wn * C::WTN + j * 8 + 2 * quad + (q & 1);
                if (row >= m || col >= n) continue;
                size_t idx = (size_t)row * n + col;
                float v = r.acc[i][j][q];
                if (beta != 0.f) v += beta * to_f32(y[idx]);
                y[idx] = from_f32<T>(v);
            }
}

}  // namespace lk
