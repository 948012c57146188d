// The backward's reductions over tokens on tensor cores (lora_backward.cu):
//
//     D[j, col] = sum over a list of tokens i of L[i, j] * B[i, col]
//
// L is an f32 intermediate ([m, ldl]: t for db, u for da), B a 16-bit
// operand ([m, ncols]: g for db, x for da). A block owns the ranks of one
// 32-rank chunk (M, up to 2 m16 tiles) times BN = 128 columns (N, 32 per
// warp), and walks its tokens (K) BK = 32 at a time: the rows of B through a
// STAGES-deep cp.async pipeline (gathered by token, so a pool's tokens of one
// slot need not be contiguous), the rows of L through registers one tile
// ahead.
//
// The gradients are f32, so nothing may be lost on the way in: f32 L is
// split into three bf16 parts by truncation (hi = the top 16 bits of v, mid
// the top 16 of v - hi, lo = v - hi - mid, which has at most 8 significant
// bits and is exactly a bf16), so hi + mid + lo = v exactly. bf16 B goes in
// as it is; f16 B as two bf16 parts (11 significant bits: the top 8 and the
// rest), so every product the MMAs form is exact in f32 and the only
// rounding is the f32 accumulation. That accumulation is split in two, so a
// sum of m tokens costs about what a plain f32 loop over them does, not three
// or six times as many roundings: hi L x hi B goes into `big`, every other
// product (at most 2^-8 of it) into `small`, and the two are added at the end
// (`total`). Non-finite values take the block's slow
// path: a non-finite L value is stored as 0 and flags the block, and a
// non-finite B value makes some accumulator non-finite (Inf times any part is
// Inf or NaN), which the caller checks; a flagged block recomputes its tile
// in plain f32 (`recompute`), product by product as the reference forms them.
#pragma once
#include <type_traits>

#include "lk_tile_gemm.cuh"

namespace lk {
namespace tok {

constexpr int THREADS = 128, WARPS = THREADS / 32;
constexpr int BN = 128, WTN = BN / WARPS, NT = WTN / 8;  // columns: per block, per warp, n8 tiles per warp
constexpr int BK = 32, STAGES = 4;                       // tokens per tile, pipeline depth
constexpr int RANKS = 32, RT = RANKS / 16;               // ranks per pass, m16 rank tiles
constexpr int PARTS = 3;                                 // bf16 parts of an f32 L value
constexpr int LDB = BN + 8, LDL = BK + 8;                // smem row strides (16-byte rows, no ldmatrix conflicts)
constexpr int LTOK = BK / (THREADS / RANKS);              // tokens of L per thread per tile (8)
constexpr int WINDOW = 512;                              // a pool block's token list, built this many at a time
constexpr int BIG_BYTES = STAGES * BK * LDB * 2;
constexpr int L_BUF = PARTS * RANKS * LDL;               // 16-bit elements of one L tile (3 parts)
constexpr int SMEM_BYTES = BIG_BYTES + 2 * L_BUF * 2;    // B stages + two L tiles: 49 KiB; src/ops mirrors it
static_assert(THREADS % RANKS == 0 && BK % (THREADS / RANKS) == 0 && LTOK % 8 == 0, "L tile per thread");
static_assert(THREADS % (BN / 8) == 0 && BK % (THREADS / (BN / 8)) == 0, "B tile copies: whole rows per thread group");

// f16 B enters as two bf16 parts (bf16 B as it is).
template <class T>
constexpr bool two_b_parts = std::is_same<T, __half>::value;

using Tile = float[RT][NT][4];

// A thread's accumulators: see the top of the file.
struct Acc {
    Tile big, small;
    __device__ void clear() {
#pragma unroll
        for (int i = 0; i < RT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int q = 0; q < 4; ++q) big[i][j][q] = small[i][j][q] = 0.f;
    }
    __device__ float total(int i, int j, int q) const { return big[i][j][q] + small[i][j][q]; }
};

// The f16 pair in a 32-bit register as two floats (lower half first).
__device__ __forceinline__ void half2_to_floats(uint32_t r, float& f0, float& f1) {
#ifdef LK_HOST
    __half h0{(unsigned short)(r & 0xFFFFu)}, h1{(unsigned short)(r >> 16)};
    f0 = __half2float(h0);
    f1 = __half2float(h1);
#else
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&r));
    f0 = f.x;
    f1 = f.y;
#endif
}

// Two floats whose low 16 bits are zero, as a bf16 pair (f0 in the lower half).
__device__ __forceinline__ uint32_t pack_bf16_bits(float f0, float f1) {
    return (__float_as_uint(f0) >> 16) | (__float_as_uint(f1) & 0xFFFF0000u);
}
__device__ __forceinline__ float truncate_to_bf16(float v) { return __uint_as_float(__float_as_uint(v) & 0xFFFF0000u); }

// An f16 pair as its exact bf16 hi and lo pairs.
__device__ __forceinline__ void split_f16_pair(uint32_t r, uint32_t& hi, uint32_t& lo) {
    float f0, f1;
    half2_to_floats(r, f0, f1);
    const float h0 = truncate_to_bf16(f0), h1 = truncate_to_bf16(f1);
    hi = pack_bf16_bits(h0, h1);
    lo = pack_bf16_bits(f0 - h0, f1 - h1);  // at most 3 significant bits: exact
}

// Two f32 values as their exact bf16 hi, mid and lo pairs (v0 in the lower
// halves). A non-finite value goes in as 0 and sets `bad`.
__device__ __forceinline__ void split_f32_pair(float v0, float v1, uint32_t (&parts)[PARTS], bool& bad) {
    if (!isfinite(v0)) bad = true, v0 = 0.f;
    if (!isfinite(v1)) bad = true, v1 = 0.f;
    const float h0 = truncate_to_bf16(v0), h1 = truncate_to_bf16(v1);
    const float r0 = v0 - h0, r1 = v1 - h1;  // exact: at most 16 significant bits
    const float m0 = truncate_to_bf16(r0), m1 = truncate_to_bf16(r1);
    parts[0] = pack_bf16_bits(h0, h1);
    parts[1] = pack_bf16_bits(m0, m1);
    parts[2] = pack_bf16_bits(r0 - m0, r1 - m1);  // at most 8 significant bits: exact
}

// Row `row` (a rank within the chunk) and column `col` of the block's tile
// that accumulator element acc[i][j][q] of this thread holds.
__device__ __forceinline__ int acc_row(int i, int q) { return i * 16 + threadIdx.x % 32 / 4 + 8 * (q >> 1); }
__device__ __forceinline__ int acc_col(int j, int q) {
    return threadIdx.x / 32 * WTN + j * 8 + 2 * (threadIdx.x % 4) + (q & 1);
}

// acc += the block's tile over `count` tokens, token_at(pos) the token at
// list position pos: L columns r0 .. r0 + rc (rp = rc rounded up to 16; rows
// past rc are zeros) and B columns col0 .. col0 + BN. Returns whether this
// thread met a non-finite L value. Ends drained and after a barrier.
template <class T, bool ALIGNED, class TokenAt>
__device__ bool pass(unsigned char* smem, const float* L, int ldl, int r0, int rc, int rp, const T* big, int ncols,
                     int col0, int count, TokenAt token_at, Acc& acc) {
    T* bigs = reinterpret_cast<T*>(smem);
    unsigned short* ls = reinterpret_cast<unsigned short*>(smem + BIG_BYTES);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int ktiles = (count + BK - 1) / BK;
    bool bad = false;

    // B rows: 16-byte chunks dealt row-major, a thread keeps one column.
    constexpr int CHUNKS = BN / 8, RSTEP = THREADS / CHUNKS;
    const int ccol = tid % CHUNKS * 8, crow = tid / CHUNKS;
    const bool col_ok = col0 + ccol < ncols;
    auto load_big = [&](int stage, int kt) {
        T* dst = bigs + stage * BK * LDB;
        if constexpr (ALIGNED) {
            for (int i = 0; i < BK / RSTEP; ++i) {
                const int r = crow + i * RSTEP, pos = kt * BK + r;
                const bool ok = col_ok && pos < count;
                const T* src = ok ? big + (size_t)token_at(pos) * ncols + col0 + ccol : big;
                cp_async_16(dst + r * LDB + ccol, src, ok ? 16u : 0u);
            }
        } else {
            for (int e = tid; e < BK * BN; e += THREADS) {
                const int r = e / BN, c = e % BN, pos = kt * BK + r;
                dst[r * LDB + c] = pos < count && col0 + c < ncols ? big[(size_t)token_at(pos) * ncols + col0 + c]
                                                                   : from_f32<T>(0.f);
            }
        }
    };
    // L values: rank row lj, tokens lt .. lt + LTOK of the tile (a warp reads
    // 32 consecutive ranks of a token: one L row piece).
    const int lj = tid % RANKS, lt = tid / RANKS * LTOK;
    float lv[LTOK];
    auto fetch_l = [&](int kt) {
#pragma unroll
        for (int q = 0; q < LTOK; ++q) {
            const int pos = kt * BK + lt + q;
            lv[q] = lj < rc && pos < count ? L[(size_t)token_at(pos) * ldl + r0 + lj] : 0.f;
        }
    };
    auto store_l = [&](int buf) {
        if (lj >= rp) return;  // rows past the padded rank are never read
        unsigned short* dst = ls + buf * L_BUF + lj * LDL + lt;
#pragma unroll
        for (int q = 0; q < LTOK; q += 8) {
            uint32_t p[4][PARTS];
#pragma unroll
            for (int e = 0; e < 4; ++e) split_f32_pair(lv[q + 2 * e], lv[q + 2 * e + 1], p[e], bad);
#pragma unroll
            for (int part = 0; part < PARTS; ++part) {
                const uint32_t v[4] = {p[0][part], p[1][part], p[2][part], p[3][part]};
                store16(dst + part * RANKS * LDL + q, v);
            }
        }
    };

    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) load_big(s, s);
        cp_async_commit();
    }
    if (ktiles > 0) fetch_l(0);
    for (int kt = 0; kt < ktiles; ++kt) {  // sass-loop: token_gemm
        store_l(kt & 1);  // L buffer kt & 1 was last read at tile kt - 2, before the last barrier
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // B tile kt landed and L tile kt is stored; stage (kt - 1) is free
        const int next = kt + STAGES - 1;
        if (next < ktiles) load_big(next % STAGES, next);
        cp_async_commit();
        if (kt + 1 < ktiles) fetch_l(kt + 1);  // in flight during this tile's MMAs

        const T* bs = bigs + (kt % STAGES) * BK * LDB;
        const unsigned short* lsb = ls + (kt & 1) * L_BUF;
#pragma unroll 1  // unrolled, the two k-steps' fragments crowd the registers (f16 spilled)
        for (int kk = 0; kk < BK; kk += 16) {
            // B fragments of the warp's n8 tiles, two per ldmatrix.x4.trans:
            // lanes 0-7 / 8-15 give tokens kk.. / kk+8.. of the first n8
            // tile, lanes 16-31 the same of the next.
            uint32_t bh[NT][2], bl[NT][2];
#pragma unroll
            for (int j = 0; j < NT; j += 2) {
                uint32_t r[4];
                ldmatrix_x4(r, bs + (kk + lane % 8 + (lane / 8 & 1) * 8) * LDB + warp * WTN + j * 8 + lane / 16 * 8,
                            true);
#pragma unroll
                for (int h = 0; h < 4; ++h) {
                    if constexpr (two_b_parts<T>)  // exact bf16 hi + lo
                        split_f16_pair(r[h], bh[j + h / 2][h % 2], bl[j + h / 2][h % 2]);
                    else
                        bh[j + h / 2][h % 2] = r[h];
                }
            }
#pragma unroll
            for (int i = 0; i < RT; ++i) {
                if (i * 16 >= rp) continue;  // ranks past the chunk (the indices stay compile-time)
#pragma unroll
                for (int part = 0; part < PARTS; ++part) {
                    uint32_t af[4];
                    ldmatrix_x4(af, lsb + part * RANKS * LDL + (i * 16 + lane % 16) * LDL + kk + lane / 16 * 8,
                                false);
                    Tile& hi_part = part == 0 ? acc.big : acc.small;
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
                        mma_m16n8k16(hi_part[i][j], af, bh[j], hi_part[i][j], __nv_bfloat16());
                        if constexpr (two_b_parts<T>)
                            mma_m16n8k16(acc.small[i][j], af, bl[j], acc.small[i][j], __nv_bfloat16());
                    }
                }
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();
    return bad;
}

// Whether any of this thread's accumulators is Inf or NaN.
__device__ __forceinline__ bool any_nonfinite(const Acc& acc) {
    bool bad = false;
#pragma unroll
    for (int i = 0; i < RT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) bad |= !isfinite(acc.big[i][j][q]) || !isfinite(acc.small[i][j][q]);
    return bad;
}

// The slow path of a flagged block: acc += the same sums in plain f32, each
// product formed as the reference forms it (0 * Inf = NaN, Inf + -Inf = NaN).
template <class T, class TokenAt>
__device__ void recompute(const float* L, int ldl, int r0, int rc, const T* big, int ncols, int col0, int count,
                          TokenAt token_at, Acc& acc) {
    for (int pos = 0; pos < count; ++pos) {
        const size_t i = (size_t)token_at(pos);
#pragma unroll
        for (int ti = 0; ti < RT; ++ti)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int row = acc_row(ti, q);
                if (row >= rc) continue;
                const float l = L[i * ldl + r0 + row];
#pragma unroll
                for (int j = 0; j < NT; ++j) {
                    const int col = col0 + acc_col(j, q);
                    if (col < ncols) acc.big[ti][j][q] += l * to_f32(big[i * ncols + col]);
                }
            }
    }
}

}  // namespace tok
}  // namespace lk
