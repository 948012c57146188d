// The backward's u = s g b on tensor cores (lora_backward.cu): a list of
// tokens' rows of a 16-bit A times a 16-bit k-major B,
//
//     D[pos, j] = sum over c of A[token_at(pos), c] * B[c, r0 + j]
//
// over c in [c0, c1), with A = g ([m, lda], lda = n) and B = one slot's b
// ([n, ldb], ldb = max_rank). A tile is BM = 32 tokens of the list (M) times a RANKS =
// 64 chunk of b's columns (N); the reduction over c (K) runs BK = 64 at a
// time through a STAGES-deep cp.async pipeline, and each of the four warps
// takes its own 16-wide slice of every stage (split-K inside the block), so
// a tile of a single token still keeps all warps and a whole stage of b in
// flight. The warps' sums are added in a fixed order at the end (reduce), so
// results are the same bit for bit run to run.
//
// Precision: the operands are the storage type's own values and the MMAs
// take them natively, so every product is exact in f32 and the only rounding
// is the f32 accumulation, as in the reference (DESIGN.md section 3). A
// non-finite operand gives what IEEE products give: Inf * 0 = NaN where
// the reference forms it too; padding (rows past the list, columns past b's
// width, c past c1) is zero-filled and only ever meets its own discarded
// outputs or other zeros.
#pragma once
#include "lk_tile_gemm.cuh"

namespace lk {
namespace gather {

constexpr int THREADS = 128, WARPS = THREADS / 32;
constexpr int BM = 32, MT = BM / 16;          // tokens per tile, m16 tiles
constexpr int RANKS = 64, NT = RANKS / 8;     // columns of b per pass, n8 tiles
constexpr int BK = 64, STAGES = 4;            // reduction per stage (16 per warp), pipeline depth
constexpr int LDA = BK + 8, LDB = RANKS + 8;  // smem row strides (16-byte rows, no ldmatrix conflicts)
constexpr int STAGE_ELEMS = BM * LDA + BK * LDB;
constexpr int SMEM_BYTES = STAGES * STAGE_ELEMS * 2;  // 54 KiB; src/ops mirrors it
static_assert(BK == 16 * WARPS, "a 16-wide k slice per warp");
static_assert(WARPS * MT * NT * 4 * 32 * 4 <= SMEM_BYTES, "the warps' partial sums fit in the pipeline's space");

using Tile = float[MT][NT][4];

// One thread's 16-byte chunks of a stage: A rows `arow + 16 i` (2), B rows
// `brow + 16 i` (4), both at column `col` of their tile.
constexpr int A_CHUNKS = BM * BK / 8 / THREADS, B_CHUNKS = BK * RANKS / 8 / THREADS;

// acc = this warp's share of the tile D[0 .. count, 0 .. rp) (count <= BM
// tokens, rp = the chunk's rc columns rounded up to 16; columns past rc are
// read but their sums are never used), over the reduction's [c0, c1): the
// columns of A's rows (lda apart) and rows of B. Ends drained and after a
// barrier.
template <class T, bool ALIGNED, class TokenAt>
__device__ void tile(T* smem, const T* a, int lda, int c0, int c1, const T* b, int ldb, int r0, int rp, int count,
                     TokenAt token_at, Tile& acc) {
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int ktiles = (c1 - c0 + BK - 1) / BK;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

    // The thread's chunk addresses, as integers (an operand may be null on
    // the host, where pointer arithmetic on null is undefined), computed
    // once and moved by BK columns of A and BK rows of B per stage.
    const int col = tid % 8 * 8, row = tid / 8;
    const int bcols = ldb - r0;  // b's columns from r0 on; those past rp are never read
    uintptr_t asrc[A_CHUNKS];
    bool aok[A_CHUNKS];
#pragma unroll
    for (int i = 0; i < A_CHUNKS; ++i) {
        const int r = row + 16 * i;
        aok[i] = r < count;
        asrc[i] = reinterpret_cast<uintptr_t>(a) + (aok[i] ? ((size_t)token_at(r) * lda + col) * sizeof(T) : 0);
    }
    const uintptr_t bsrc = reinterpret_cast<uintptr_t>(b) + ((size_t)row * ldb + r0 + col) * sizeof(T);
    const size_t bstep = (size_t)16 * ldb * sizeof(T);  // 16 rows of b: between a thread's B chunks
    const bool bread = col < rp, bcol_ok = col < bcols;

    auto load_stage = [&](int stage, int kt) {
        T* as = smem + stage * STAGE_ELEMS;
        T* bs = as + BM * LDA;
        const int kc = c0 + kt * BK;
        if constexpr (ALIGNED) {
            const bool acol_ok = kc + col < c1;
#pragma unroll
            for (int i = 0; i < A_CHUNKS; ++i) {
                const bool ok = aok[i] && acol_ok;
                const T* src = ok ? reinterpret_cast<const T*>(asrc[i] + (size_t)kc * sizeof(T)) : a;
                cp_async_16(as + (row + 16 * i) * LDA + col, src, ok ? 16u : 0u);
            }
            if (bread) {
                const uintptr_t p = bsrc + (size_t)kc * ldb * sizeof(T);
#pragma unroll
                for (int i = 0; i < B_CHUNKS; ++i) {
                    const bool ok = bcol_ok && kc + row + 16 * i < c1;
                    const T* src = ok ? reinterpret_cast<const T*>(p + i * bstep) : b;
                    cp_async_16(bs + (row + 16 * i) * LDB + col, src, ok ? 16u : 0u);
                }
            }
        } else {
            for (int e = tid; e < BM * BK; e += THREADS) {
                const int r = e / BK, c = e % BK;
                as[r * LDA + c] = r < count && kc + c < c1 ? a[(size_t)token_at(r) * lda + kc + c] : from_f32<T>(0.f);
            }
            for (int e = tid; e < BK * rp; e += THREADS) {
                const int r = e / rp, c = e % rp;
                bs[r * LDB + c] = kc + r < c1 && c < bcols ? b[(size_t)(kc + r) * ldb + r0 + c] : from_f32<T>(0.f);
            }
        }
    };

    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) load_stage(s, s);
        cp_async_commit();
    }
    const int kk = warp * 16;  // this warp's slice of every stage
    for (int kt = 0; kt < ktiles; ++kt) {  // sass-loop: gather_gemm
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage kt landed for all threads; stage (kt - 1) is free
        const int next = kt + STAGES - 1;
        if (next < ktiles) load_stage(next % STAGES, next);
        cp_async_commit();

        const T* as = smem + (kt % STAGES) * STAGE_ELEMS;
        const T* bs = as + BM * LDA;
        uint32_t af[MT][4];
#pragma unroll
        for (int i = 0; i < MT; ++i)
            if (i * 16 < count) ldmatrix_x4(af[i], as + (i * 16 + lane % 16) * LDA + kk + lane / 16 * 8, false);
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
            if (j * 8 >= rp) continue;  // rp is a multiple of 16: n8 tiles come in pairs
            // Lanes 0-7 / 8-15 give rows kk.. / kk+8.. of n8 tile j, lanes 16-31 the same of tile j + 1.
            uint32_t r[4];
            ldmatrix_x4(r, bs + (kk + lane % 8 + (lane / 8 & 1) * 8) * LDB + j * 8 + lane / 16 * 8, true);
            const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                if (i * 16 >= count) continue;
                mma_m16n8k16(acc[i][j], af[i], b0, acc[i][j], T());
                mma_m16n8k16(acc[i][j + 1], af[i], b1, acc[i][j + 1], T());
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();
}

// Adds the warps' shares in warp order and calls out(pos, j, sum) for every
// row pos < count and column j < rp of the tile. Uses smem (after tile's
// final barrier) and ends with a barrier, so the next tile may reuse it.
template <class Out>
__device__ void reduce(void* smem, const Tile& acc, int count, int rp, Out out) {
    constexpr int PER_WARP = MT * NT * 4 * 32;  // laid out [i][j][q][lane]: no bank conflicts
    float* partial = static_cast<float*>(smem);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) partial[warp * PER_WARP + ((i * NT + j) * 4 + q) * 32 + lane] = acc[i][j][q];
    __syncthreads();
    for (int e = threadIdx.x; e < PER_WARP; e += THREADS) {
        const int l = e % 32, q = e / 32 % 4, j = e / 128 % NT, i = e / (128 * NT);
        const int pos = i * 16 + l / 4 + 8 * (q >> 1), col = j * 8 + 2 * (l % 4) + (q & 1);
        if (pos >= count || col >= rp) continue;
        float sum = 0.f;
        for (int w = 0; w < WARPS; ++w) sum += partial[w * PER_WARP + e];
        out(pos, col, sum);
    }
    __syncthreads();
}

}  // namespace gather
}  // namespace lk
