// Multi-adapter forward: one launch for a batch in which every token has its
// own adapter (slot of a device pool, mixed ranks) or none, fused with the
// base product (MultiAdapterParams in lk_params.h):
//
//   y[i,:] = x[i,:] w^T + scale[s_i] (x[i,:] a[s_i]^T) b[s_i]^T  (+ beta * y)
//
// The grid has two kinds of block, and the launch shape depends only on m, n,
// k and the pool's shape, never on the ids (CUDA-graph capture stays valid):
// - the first `shrink_blocks` blocks do shrink work: t[i, :rank] =
//   x[i,:] a[s_i]^T (f32), a warp per unit, a token costing its own rank,
//   and check the segment table. Decode (few tokens, often as many adapters):
//   a unit is one token and 4 rank rows on SIMT lanes, so a handful of tokens
//   still spread over many warps (and over chunks of k, when the units alone
//   are too few: shrink_unit). Prefill: a unit is 16 tokens and 32 rank
//   rows on tensor cores, one pass per distinct adapter among the 16, so x is
//   read once per 32 ranks, not once per 4;
// - the other blocks each own a BM x BN tile of y: they run the base product
//   (f16/bf16 on tensor cores, lk_tile_gemm.cuh; f32 on SIMT tiles,
//   lk_simt_tile.cuh, as tensor cores take no f32), then wait until all
//   shrink work is done (by then it usually is: the shrink is a small
//   fraction of the work) and expand: tokens of the same adapter share each
//   load of its b tile, and the distinct adapters among the rows are packed
//   side by side into steps of 64 ranks (lk::PackedSteps: tensor cores; the
//   f32 SIMT tiles take them one by one). At decode of 17 to 64 tokens a
//   tile has 64 rows, and each of its 4 warps packs and expands its own 16
//   (lk::WarpTiles): 4 short sequences of steps that overlap, not one long
//   one. The b tiles are prefetched into L2 while the base product runs.
//   A tile may be split along k over p.k_splits blocks (split-K, where the
//   tiles alone would leave SMs idle: a small n at decode, a few hundred
//   tokens at prefill); its last block expands.
// Shrink work is claimed, not assigned: warps take items from a counter
// (counters[0]) and count the items they finish (counters[1]), and a tile
// block takes what is left unclaimed before it waits. CUDA does not promise that
// blocks start in index order, so a tile block must never wait for work
// assigned to a block that has not started (it may hold the SM that block
// needs); a claimed item is held by a running warp, so a tile block waits
// only for work in progress. The last block to finish (counters[4]) resets
// the counters to 0.
// An id outside -1..slots-1 never reads outside the pool: it is treated as -1
// and counted (by the shrink, once per token, in counters[3]; the last block
// adds the launch's count to *bad_ids).
// The segment table lives on the device and is checked there, without a host
// round trip (CUDA-graph capture stays valid): shrink item e also checks
// entry e (offsets[0] == 0, offsets[segments] == m, non-decreasing) and
// raises counters[2] before the item counts as done; tile blocks read the
// flag after their wait and then serve every token as -1 (base model only),
// and the launch counts all m tokens as bad. The t rows the shrink wrote with
// such a table are unspecified (routing by a binary search of a malformed
// table stays inside the table and the pool, but names arbitrary segments).
// The counters make the pool's launches one at a time: use a pool from one stream.
// The fused forward's prefill and small decode (one adapter for every
// token) run here too, in the uniform mode of MultiAdapterParams: t is then
// computed once for the launch instead of in every column tile.
// Counts that can pass 2^31 (shrink units, table entries) are 64-bit.
#include "lk_direct_decode.cuh"
#include "lk_mma.cuh"
#include "lk_multi_adapter.cuh"
#include "lk_simt_tile.cuh"
#include "lk_tile_gemm.cuh"

namespace {

using namespace lk::multi_adapter;

// SPLITK: whether p.k_splits is read (decode, and the mma.sync prefill: a
// batch of a few hundred tokens has fewer 128 x 128 tiles than SMs).
// Split-K: the k_splits blocks of a tile (adjacent block indices) each run
// the base product over their range of k-tiles, and the tile's last block
// to finish adds their sums up (lk::gather_k_splits) and alone waits for the
// shrink, expands and stores; the others are done once their sums are in. A
// tile's wait thus never depends on a block that has not started either.
template <class T, class C, class S, bool ALIGNED, bool SPLITK>
__device__ void base_block(const MultiAdapterParams& p) {
    const T* b_pool = reinterpret_cast<const T*>(p.b_pool);
    // Who expands: the block, or each warp its own rows (teams of E).
    using E = lk::ExpandTeam<C>;
    constexpr int TEAMS = C::THREADS / E::THREADS;
    static_assert(TEAMS * lk::expand_elems<E, false>() <= lk::smem_elems<C>(0), "the teams' expand tiles fit");
    LK_DYNAMIC_SHARED(T, smem);
    LK_SHARED(int, row_slot, [C::BM]);
    LK_SHARED(int, distinct, [TEAMS * (E::BM + 1)]);  // per team: distinct[0] = count
    LK_SHARED(int, guard_state, [TEAMS * (E::BM + 2)]);
    LK_SHARED(int, step_state, [TEAMS * (3 * lk::GROUPS + 3)]);
    const int team = lk::expand_team<C>();

    const int tiles_m = (p.m + C::BM - 1) / C::BM, tiles_n = (p.n + C::BN - 1) / C::BN;
    const int splits = SPLITK ? p.k_splits : 1;
    const int64_t block = (int64_t)blockIdx.x - p.shrink_blocks;
    const int64_t tile_id = block / splits;
    const int split = (int)(block % splits);
    const int ktiles = (p.k + C::BK - 1) / C::BK;
    const int kt_begin = (int)((int64_t)split * ktiles / splits);
    const int kt_end = (int)((int64_t)(split + 1) * ktiles / splits);
    int tm, tn;
    lk::grouped_tile(tile_id, tiles_m, tiles_n, tm, tn);
    const int row0 = tm * C::BM, col0 = tn * C::BN;

    lk::ExpandGuard<E> guard(guard_state + team * (E::BM + 2));
    lk::Accumulators<C> r;
    lk::zero<C>(r.acc);
    // Once the first k-tiles are on their way: the b tiles of the adapters
    // among the block's rows go to L2 for the expand, a run of rows with the
    // same adapter asking once (a malformed segment table still names slots
    // of the pool, and wait_for_shrink sets row_slot again). One
    // block of a split tile asks: the tiles land in L2, which every SM reads.
    auto prefetch_b = [&] {
        if (split != 0) return;
        for (int i = threadIdx.x; i < C::BM; i += C::THREADS)
            row_slot[i] = row0 + i < p.m ? token_slot(p, row0 + i) : -1;
        __syncthreads();
        const int rows = lk::min_int(C::BN, p.n - col0);
        for (int e = threadIdx.x; e < C::BM * rows; e += C::THREADS) {
            const int i = e / rows, j = e % rows, s = row_slot[i];
            if (s < 0 || (i > 0 && row_slot[i - 1] == s)) continue;
            const int rank = rank_of(p, s);
            lk::prefetch_span(b_pool + ((size_t)s * p.n + col0 + j) * p.max_rank, rank);
        }
    };
    if constexpr (lk::loads_direct<C>::value) {
        static_assert(ALIGNED, "w goes straight into registers by 16-byte loads");
        lk::direct_mainloop<T, C>(smem, reinterpret_cast<const T*>(p.x), reinterpret_cast<const T*>(p.w), p.m, p.n,
                                  p.k, row0, col0, r, prefetch_b, kt_begin, kt_end);
    } else {
        lk::mainloop<T, C, ALIGNED>(smem, reinterpret_cast<const T*>(p.x), reinterpret_cast<const T*>(p.w),
                                    nullptr, p.m, p.n, p.k, 0, 0, row0, col0, r, prefetch_b, kt_begin, kt_end);
    }
    if (splits > 1 && !lk::gather_k_splits<C>(reinterpret_cast<float*>(p.partials),
                                              reinterpret_cast<unsigned*>(p.split_counters) + tile_id, tile_id,
                                              split, splits, p.m - row0, false, 0, r))
        return;

    wait_for_shrink<T, S, ALIGNED, C::BM, C::THREADS>(p, row0, row_slot);
    if constexpr (TEAMS == 1) {
        expand_rows<T, E>(p, smem, row_slot, distinct, step_state, guard, row0, col0, r);
    } else {
        const int rows = team * E::BM;  // the warp's first row in the tile
        lk::with_warp_accumulators(r, [&](lk::Accumulators<E>& acc) {
            expand_rows<T, E>(p, smem + team * lk::expand_elems<E, false>(), row_slot + rows,
                              distinct + team * (E::BM + 1), step_state + team * (3 * lk::GROUPS + 3), guard,
                              row0 + rows, col0, acc);
        });
    }
    lk::store_y<T, C>(reinterpret_cast<T*>(p.y), p.m, p.n, row0, col0, p.beta, r);
}

// The f32 tile block: as base_block, on SIMT tiles. The x and w tiles of
// the base product are reused for scale * t and b in the expand; ranks are
// taken in chunks of the tile width, only as far as each adapter's rank.
template <class T>
__device__ void simt_tile_block(const MultiAdapterParams& p) {
    using C = lk::simt::Tiles;
    const T* b_pool = reinterpret_cast<const T*>(p.b_pool);
    const float* t = reinterpret_cast<const float*>(p.t);
    LK_SHARED(float, lhs, [C::BM * C::LD]);
    LK_SHARED(float, rhs, [C::BN * C::LD]);
    LK_SHARED(int, row_slot, [C::BM]);
    LK_SHARED(int, distinct, [C::BM + 1]);  // distinct[0] = count
    const lk::simt::Smem<C> sm{lhs, rhs};

    const int tiles_n = (p.n + C::BN - 1) / C::BN;
    const int tile = blockIdx.x - p.shrink_blocks;
    const int row0 = (tile / tiles_n) * C::BM, col0 = (tile % tiles_n) * C::BN;

    lk::simt::Acc<C> acc;
    lk::simt::zero(acc);
    lk::simt::base_product<T, C>(sm, reinterpret_cast<const T*>(p.x), reinterpret_cast<const T*>(p.w), p.m, p.n,
                                 p.k, row0, col0, acc);

    wait_for_shrink<T, SimtShrink, false, C::BM, C::THREADS>(p, row0, row_slot);
    lk::collect_distinct<C::BM>(row_slot, distinct);

    for (int d = 1; d <= distinct[0]; ++d) {
        const int s = distinct[d];
        const int rank = rank_of(p, s);
        const float scale = scale_of(p, s);
        for (int r0 = 0; r0 < rank; r0 += C::BK) {
            const int rc = rank - r0 < C::BK ? rank - r0 : C::BK;
            for (int i = threadIdx.x; i < C::BM * rc; i += C::THREADS) {
                int row = i / rc, col = i % rc;
                // Rows of other adapters are exact zeros: they add nothing.
                lhs[row * C::LD + col] =
                    row_slot[row] == s ? scale * lk::load_cg(t + (size_t)(row0 + row) * p.max_rank + r0 + col) : 0.f;
            }
            for (int i = threadIdx.x; i < C::BN * rc; i += C::THREADS) {
                int row = i / rc, col = i % rc, gn = col0 + row;
                rhs[row * C::LD + col] =
                    gn < p.n ? lk::to_f32(b_pool[((size_t)s * p.n + gn) * p.max_rank + r0 + col]) : 0.f;
            }
            __syncthreads();
            lk::simt::fma_tiles<C>(sm, rc, acc);
            __syncthreads();  // before the next chunk or adapter overwrites the tiles
        }
    }
    lk::simt::store_y<T, C>(reinterpret_cast<T*>(p.y), p.m, p.n, row0, col0, p.beta, acc);
}

template <class T, class C, class S, bool ALIGNED, bool SPLITK>
__device__ void multi_adapter_forward(const MultiAdapterParams& p) {
    if ((int)blockIdx.x < p.shrink_blocks) shrink_work<T, S, ALIGNED, false>(p);
    else base_block<T, C, S, ALIGNED, SPLITK>(p);
    finish_block(p);
}

// f32: shrink blocks of the SIMT tile's block size (element loads), then
// SIMT tile blocks.
template <class T>
__device__ void multi_adapter_forward_simt(const MultiAdapterParams& p) {
    if ((int)blockIdx.x < p.shrink_blocks) shrink_work<T, SimtShrink, false, false>(p);
    else simt_tile_block<T>(p);
    finish_block(p);
}

}  // namespace

// Entry points as in fused_forward_mma.cu: <regime>_<type>_<aligned|any>.
// Decode and prefill tiles may be split along k (split-K: a small n, or a
// prefill of a few hundred tokens, leaves SMs idle).
#define LK_MULTI(regime, Cfg, Shrink, splitk, tname, T)                                                         \
    LK_KERNEL(lk_multi_adapter_##regime##_##tname##_aligned, MultiAdapterParams,                               \
              (multi_adapter_forward<T, Cfg, Shrink, true, splitk>))                                            \
    LK_KERNEL(lk_multi_adapter_##regime##_##tname##_any, MultiAdapterParams,                                   \
              (multi_adapter_forward<T, Cfg, Shrink, false, splitk>))
LK_MULTI(decode, lk::DecodeTiles, SimtShrink, true, f16, __half)
LK_MULTI(decode, lk::DecodeTiles, SimtShrink, true, bf16, __nv_bfloat16)
// A batch of up to 16 tokens has one row of tile blocks, about one per SM:
// the deep pipeline keeps twice the bytes of w in flight (81 KiB of shared
// memory: every GPU from sm_80 fits it).
LK_MULTI(decode_deep, lk::DecodeDeepTiles, SimtShrink, true, f16, __half)
LK_MULTI(decode_deep, lk::DecodeDeepTiles, SimtShrink, true, bf16, __nv_bfloat16)
// The same 16-row tiles with w loaded straight into the MMAs' registers
// (lk_direct_decode.cuh: no shared-memory pipeline, 8 warps a block): 16-byte
// loads only, so aligned operands only.
#define LK_MULTI_DIRECT(tname, T)                                                                       \
    LK_KERNEL_BOUNDED(lk_multi_adapter_decode_direct_##tname##_aligned, MultiAdapterParams,            \
                      (multi_adapter_forward<T, lk::DecodeDirectTiles, SimtShrink, true, true>),       \
                      lk::DecodeDirectTiles::THREADS, 2)
LK_MULTI_DIRECT(f16, __half)
LK_MULTI_DIRECT(bf16, __nv_bfloat16)
// 17 to 64 tokens: one block covers every row, so each column tile of w is
// read once, not once per 16 rows; each warp expands its own 16 rows.
LK_MULTI(decode_wide, lk::DecodeWideTiles, SimtShrink, true, f16, __half)
LK_MULTI(decode_wide, lk::DecodeWideTiles, SimtShrink, true, bf16, __nv_bfloat16)
LK_MULTI(decode_wide_deep, lk::DecodeWideDeepTiles, SimtShrink, true, f16, __half)
LK_MULTI(decode_wide_deep, lk::DecodeWideDeepTiles, SimtShrink, true, bf16, __nv_bfloat16)
LK_MULTI(prefill, lk::PrefillTiles, MmaShrink, true, f16, __half)
LK_MULTI(prefill, lk::PrefillTiles, MmaShrink, true, bf16, __nv_bfloat16)
LK_KERNEL(lk_multi_adapter_simt_f32, MultiAdapterParams, multi_adapter_forward_simt<float>)
