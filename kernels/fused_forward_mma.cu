// Fused base-plus-LoRA forward on tensor cores (mma.sync m16n8k16, f16/bf16
// in, f32 accumulate), one launch, y written once:
//
//   y[m,n] = x[m,k] w[n,k]^T + scale * (x a[r,k]^T)[m,r] b[n,r]^T  (+ beta * y)
//
// A block owns a BM x BN tile of y. Its k-loop streams tiles of x and w
// through a STAGES-deep cp.async pipeline; the rows of `a` ride along in the
// same stages as extra B-operand rows, so the shrink t = x a^T (f32
// accumulators) costs no extra pass over x. After the k-loop, scale * t goes
// to shared memory as a hi/lo pair of storage-type values (t = hi + lo to
// about 16 significant bits, so the expand loses nothing to rounding t, the
// known precision bug of f16 intermediates) and the expand t b^T runs as extra
// k-steps over the rank into the same accumulator as the base product.
// (With f16 storage, |scale * t| beyond 65504 becomes Inf in that split: the
// f16 range limit of the storage type.)
// Ranks above RC = 64 take extra passes over k, one per chunk of 64 (x is
// re-read, w is not). Two tile shapes are instantiated: decode (BM = 16, small
// m: bandwidth-bound, many blocks streaming w) and prefill (BM = 128).
#include "lk_mma.cuh"

namespace {

constexpr int RC = 64;  // rank handled per pass over k

template <int BM_, int BN_, int BK_, int WM_, int WN_, int STAGES_>
struct Config {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, WM = WM_, WN = WN_, STAGES = STAGES_;
    static constexpr int THREADS = 32 * WM * WN;
    static constexpr int WTM = BM / WM, WTN = BN / WN;  // warp tile
    static constexpr int MT = WTM / 16, NT = WTN / 8;   // mma tiles per warp
    static constexpr int TNT = (RC / 8 + WN - 1) / WN;  // t n8-tiles per warp (max)
    static constexpr int LDS = BK + 8;                   // smem row stride: 16B rows, no ldmatrix conflicts
    static constexpr int LDT = RC + 8;                   // row stride of the t and b tiles
    static_assert(WTM % 16 == 0 && WTN % 8 == 0 && BK % 16 == 0, "tile shape");
};

using Decode = Config<16, 32, 64, 1, 2, 6>;
using Prefill = Config<128, 128, 32, 2, 4, 4>;

// Shared-memory bytes of a launch: the pipeline, or the expand's tiles, which
// reuse the pipeline's space after the k-loop. `rpmax` = min(64, r rounded up to 16).
template <class C>
__host__ __device__ constexpr int smem_elems(int rpmax) {
    int pipeline = C::STAGES * (C::BM + C::BN + rpmax) * C::LDS;
    int expand = (2 * C::BM + C::BN) * C::LDT;
    return pipeline > expand ? pipeline : expand;
}

// Copies rows [row0, row0 + rows) x columns [col0, col0 + BK) of a row-major
// [nrows, ncols] matrix into smem (row stride LDS). Out-of-range elements are
// zero. ALIGNED: 16-byte cp.async (ncols % 8 == 0 and a 16-byte aligned base);
// otherwise element by element (the tail path for unaligned k).
template <class T, class C, bool ALIGNED>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int nrows, int ncols, int row0, int rows, int col0) {
    constexpr int CHUNKS = C::BK / 8;  // 16-byte chunks per row
    for (int e = threadIdx.x; e < rows * CHUNKS; e += C::THREADS) {
        int r = e / CHUNKS, c = (e % CHUNKS) * 8;
        int gr = row0 + r, gc = col0 + c;
        T* dst = smem + r * C::LDS + c;
        if (ALIGNED) {
            int valid = (gr < nrows) ? ncols - gc : 0;
            valid = valid < 0 ? 0 : (valid > 8 ? 8 : valid);
            // A chunk that reads nothing still needs a valid address.
            const T* src = valid > 0 ? g + (size_t)gr * ncols + gc : g;
            lk::cp_async_16(dst, src, 2u * valid);
        } else {
            for (int i = 0; i < 8; ++i)
                dst[i] = (gr < nrows && gc + i < ncols) ? g[(size_t)gr * ncols + gc + i] : lk::from_f32<T>(0.f);
        }
    }
}

template <class T, class C, bool ALIGNED>
__device__ void fused_forward_mma(const FusedForwardParams& p) {
    const T* __restrict__ x = reinterpret_cast<const T*>(p.x);
    const T* __restrict__ w = reinterpret_cast<const T*>(p.w);
    const T* __restrict__ a = reinterpret_cast<const T*>(p.a);
    const T* __restrict__ b = reinterpret_cast<const T*>(p.b);
    T* __restrict__ y = reinterpret_cast<T*>(p.y);
    LK_DYNAMIC_SHARED(T, smem);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp / C::WN, wn = warp % C::WN;
    const int group = lane / 4, quad = lane % 4;
    const int row0 = blockIdx.y * C::BM, col0 = blockIdx.x * C::BN;
    const int rp_all = (p.r + 15) / 16 * 16;
    const int rpmax = rp_all < RC ? rp_all : RC;
    const int stage_elems = (C::BM + C::BN + rpmax) * C::LDS;
    const int ktiles = (p.k + C::BK - 1) / C::BK;

    float acc[C::MT][C::NT][4];
    for (int i = 0; i < C::MT; ++i)
        for (int j = 0; j < C::NT; ++j)
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

    for (int r0 = 0; r0 < p.r; r0 += RC) {
        const bool base = r0 == 0;  // the first pass also computes x w^T
        const int rc = p.r - r0 < RC ? p.r - r0 : RC;
        const int rp = (rc + 15) / 16 * 16;
        const T* a_chunk = a + (size_t)r0 * p.k;

        float tacc[C::MT][C::TNT][4];
        for (int i = 0; i < C::MT; ++i)
            for (int j = 0; j < C::TNT; ++j)
                for (int q = 0; q < 4; ++q) tacc[i][j][q] = 0.f;

        auto load_stage = [&](int stage, int kt) {
            T* xs = smem + stage * stage_elems;
            T* ws = xs + C::BM * C::LDS;
            T* as = ws + C::BN * C::LDS;
            int kc = kt * C::BK;
            load_tile<T, C, ALIGNED>(xs, x, p.m, p.k, row0, C::BM, kc);
            if (base) load_tile<T, C, ALIGNED>(ws, w, p.n, p.k, col0, C::BN, kc);
            load_tile<T, C, ALIGNED>(as, a_chunk, rc, p.k, 0, rp, kc);
        };

        for (int s = 0; s < C::STAGES - 1; ++s) {
            if (s < ktiles) load_stage(s, s);
            lk::cp_async_commit();
        }
        for (int kt = 0; kt < ktiles; ++kt) {
            lk::cp_async_wait<C::STAGES - 2>();
            __syncthreads();  // tile kt landed for all threads; stage (kt-1) is free
            int next = kt + C::STAGES - 1;
            if (next < ktiles) load_stage(next % C::STAGES, next);
            lk::cp_async_commit();

            const T* xs = smem + (kt % C::STAGES) * stage_elems;
            const T* ws = xs + C::BM * C::LDS;
            const T* as = ws + C::BN * C::LDS;
            for (int kk = 0; kk < C::BK; kk += 16) {
                uint32_t af[C::MT][4];
                for (int i = 0; i < C::MT; ++i)
                    lk::ldmatrix_x4(af[i], xs + (wm * C::WTM + i * 16 + lane % 16) * C::LDS + kk + (lane / 16) * 8,
                                    false);
                if (base) {
                    for (int j = 0; j < C::NT; ++j) {
                        uint32_t bf[2];
                        lk::ldmatrix_x2(bf, ws + (wn * C::WTN + j * 8 + lane % 8) * C::LDS + kk + ((lane / 8) & 1) * 8,
                                        false);
                        for (int i = 0; i < C::MT; ++i) lk::mma_m16n8k16(acc[i][j], af[i], bf, acc[i][j], T());
                    }
                }
                for (int j = 0; j < C::TNT; ++j) {
                    int tile = j * C::WN + wn;  // t n8-tiles are dealt round-robin to the warps of a row
                    if (tile * 8 >= rp) break;
                    uint32_t bf[2];
                    lk::ldmatrix_x2(bf, as + (tile * 8 + lane % 8) * C::LDS + kk + ((lane / 8) & 1) * 8, false);
                    for (int i = 0; i < C::MT; ++i) lk::mma_m16n8k16(tacc[i][j], af[i], bf, tacc[i][j], T());
                }
            }
        }
        lk::cp_async_wait<0>();
        __syncthreads();  // the pipeline's space is reused below

        // scale * t as hi + lo in storage type; columns >= rc are exact zeros
        // (never x * 0, which would turn an Inf in x into NaN).
        T* th = smem;
        T* tl = th + C::BM * C::LDT;
        T* bs = tl + C::BM * C::LDT;
        for (int i = 0; i < C::MT; ++i)
            for (int j = 0; j < C::TNT; ++j) {
                int tile = j * C::WN + wn;
                if (tile * 8 >= rp) break;
                for (int q = 0; q < 4; ++q) {
                    int r = wm * C::WTM + i * 16 + group + 8 * (q >> 1);
                    int c = tile * 8 + 2 * quad + (q & 1);
                    float v = c < rc ? p.scale * tacc[i][j][q] : 0.f;
                    T hi = lk::from_f32<T>(v);
                    float hv = lk::to_f32(hi);
                    th[r * C::LDT + c] = hi;
                    // Inf - Inf would make lo NaN where t is infinite: keep lo 0 there.
                    tl[r * C::LDT + c] = lk::from_f32<T>(isinf(hv) ? 0.f : v - hv);
                }
            }
        // b[col0 .. col0+BN, r0 .. r0+rp): rows of b are r long (rarely 16-byte aligned).
        for (int e = threadIdx.x; e < C::BN * rp; e += C::THREADS) {
            int rr = e / rp, c = e % rp;
            int gn = col0 + rr;
            bs[rr * C::LDT + c] = (gn < p.n && c < rc) ? b[(size_t)gn * p.r + r0 + c] : lk::from_f32<T>(0.f);
        }
        __syncthreads();
        // Expand: acc += t_hi b^T + t_lo b^T, k-steps of 16 over the rank.
        for (int kk = 0; kk < rp; kk += 16) {
            uint32_t hf[C::MT][4], lf[C::MT][4];
            for (int i = 0; i < C::MT; ++i) {
                int off = (wm * C::WTM + i * 16 + lane % 16) * C::LDT + kk + (lane / 16) * 8;
                lk::ldmatrix_x4(hf[i], th + off, false);
                lk::ldmatrix_x4(lf[i], tl + off, false);
            }
            for (int j = 0; j < C::NT; ++j) {
                uint32_t bf[2];
                lk::ldmatrix_x2(bf, bs + (wn * C::WTN + j * 8 + lane % 8) * C::LDT + kk + ((lane / 8) & 1) * 8, false);
                for (int i = 0; i < C::MT; ++i) {
                    lk::mma_m16n8k16(acc[i][j], hf[i], bf, acc[i][j], T());
                    lk::mma_m16n8k16(acc[i][j], lf[i], bf, acc[i][j], T());
                }
            }
        }
        __syncthreads();  // before the next chunk's loads overwrite th/tl/bs
    }

    for (int i = 0; i < C::MT; ++i)
        for (int j = 0; j < C::NT; ++j)
            for (int q = 0; q < 4; ++q) {
                int r = row0 + wm * C::WTM + i * 16 + group + 8 * (q >> 1);
                int c = col0 + wn * C::WTN + j * 8 + 2 * quad + (q & 1);
                if (r >= p.m || c >= p.n) continue;
                size_t idx = (size_t)r * p.n + c;
                float v = acc[i][j][q];
                // beta = 0 never reads y, so garbage (even NaN) in y does not leak in.
                if (p.beta != 0.f) v += p.beta * lk::to_f32(y[idx]);
                y[idx] = lk::from_f32<T>(v);
            }
}

}  // namespace

// Entry points: <regime>_<type>_<aligned|any>. "aligned": k % 8 == 0 and x, w, a
// 16-byte aligned (16-byte cp.async); "any": element loads, every shape.
#define LK_FUSED_MMA(regime, Cfg, tname, T)                                                                     \
    LK_KERNEL(lk_fused_forward_##regime##_##tname##_aligned, FusedForwardParams, (fused_forward_mma<T, Cfg, true>)) \
    LK_KERNEL(lk_fused_forward_##regime##_##tname##_any, FusedForwardParams, (fused_forward_mma<T, Cfg, false>))
LK_FUSED_MMA(decode, Decode, f16, __half)
LK_FUSED_MMA(decode, Decode, bf16, __nv_bfloat16)
LK_FUSED_MMA(prefill, Prefill, f16, __half)
LK_FUSED_MMA(prefill, Prefill, bf16, __nv_bfloat16)
