// Fused base-plus-LoRA forward on tensor cores (mma.sync m16n8k16, f16/bf16
// in, f32 accumulate), one launch, y written once:
//
//   y[m,n] = x[m,k] w[n,k]^T + scale * (x a[r,k]^T)[m,r] b[n,r]^T  (+ beta * y)
//
// A block owns p.col_tiles BM x BN tiles of y side by side (lk_tile_gemm.cuh),
// one after another. Its k-loop streams tiles of x and w through a cp.async
// pipeline; the rows of `a` ride along in the same stages as extra B-operand
// rows, so the shrink t = x a^T (f32 accumulators) costs no extra pass over
// x. The first tile computes t and the block's other tiles reuse it from
// registers (ranks up to RC; above, every tile recomputes it): at prefill the
// shrink's MMAs and a's loads are spent once per col_tiles tiles instead of
// once per tile. After the k-loop, scale * t goes
// to shared memory as a hi/lo pair of storage-type values and the expand
// t b^T runs as extra k-steps over the rank into the same accumulator as the
// base product; b's tile is prefetched into L2 while the k-loop runs. Ranks
// above RC = 64 take extra passes over k, one per chunk of 64 (x is re-read,
// w is not). lk::expand keeps f16's hi finite for any
// finite scale * t and gives Inf and NaN weights their exact products.
// Prefill launches and decode launches of up to 64 tokens at ranks up to 64
// normally run on the multi-adapter kernel instead, which computes t once
// for the launch (src/ops/fused_forward.rs); this kernel serves them when
// asked, and while a stream is captured before it has its workspace.
#include "lk_tile_gemm.cuh"

namespace {

// TILES: whether p.col_tiles is read (prefill); decode blocks own one tile.
template <class T, class C, bool ALIGNED, bool TILES>
__device__ void fused_forward_mma(const FusedForwardParams& p) {
    const T* __restrict__ x = reinterpret_cast<const T*>(p.x);
    const T* __restrict__ w = reinterpret_cast<const T*>(p.w);
    const T* __restrict__ a = reinterpret_cast<const T*>(p.a);
    const T* __restrict__ b = reinterpret_cast<const T*>(p.b);
    LK_DYNAMIC_SHARED(T, smem);

    const int lane = threadIdx.x % 32;
    const lk::WarpPlace<C> at;
    const int wm = at.wm, wn = at.wn;
    const int lrow = lane / 4, quad = lane % 4;
    // The block's row tile and its group of col_tiles column tiles.
    int tm, tgroup;
    lk::grouped_tile(tm, tgroup);
    const int row0 = tm * C::BM;

    LK_SHARED(int, guard_state, [C::BM + 2]);
    lk::ExpandGuard<C> guard(guard_state);
    lk::Accumulators<C> r;
    // Split-K (decode blocks, p.k_splits > 1, ranks of one chunk): block z of
    // a tile runs the k-loop over split z of the k-tiles, and the tile's last
    // block to finish adds the splits' sums up (lk::gather_k_splits) and runs
    // the expand and the store.
    const int splits = TILES ? 1 : p.k_splits;
    const int split = TILES ? 0 : (int)blockIdx.z;
    const int ktiles = (p.k + C::BK - 1) / C::BK;
    const int kt_begin = (int)((int64_t)split * ktiles / splits);
    const int kt_end = (int)((int64_t)(split + 1) * ktiles / splits);
    const int64_t tile_id = (int64_t)tm * gridDim.x + tgroup;
    // The tile at col0; shrink: compute t (else the owner warps' r.tacc
    // still holds it from the block's previous tile, one chunk of ranks).
    auto run_tile = [&](int col0, bool shrink) {
        // x's copy state is the same for every tile of the block: rebuilt
        // per tile, not held in registers across them (40 more at prefill).
        const T* xt = x;
        if constexpr (TILES) lk::opaque(xt);
        lk::zero<C>(r.acc);
        for (int r0 = 0; r0 < p.r; r0 += lk::RC) {
            const int rc = p.r - r0 < lk::RC ? p.r - r0 : lk::RC;
            const int rp = (rc + 15) / 16 * 16;
            if (shrink) lk::zero<C>(r.tacc);
            // b's tile for this chunk goes to L2 while the k-loop runs.
            auto prefetch_b = [&] {
                const int rows = lk::min_int(C::BN, p.n - col0);
                for (int i = threadIdx.x; i < rows; i += C::THREADS)
                    lk::prefetch_span(b + (size_t)(col0 + i) * p.r + r0, rc);
            };
            // The first pass also computes the base product x w^T; a tile
            // that reuses t loads no rows of a.
            lk::mainloop<T, C, ALIGNED>(smem, xt, r0 == 0 ? w : nullptr, a + (size_t)r0 * p.k, p.m, p.n, p.k,
                                        shrink ? rc : 0, shrink ? rp : 0, row0, col0, r, prefetch_b, kt_begin,
                                        kt_end);
            if (splits > 1 && !lk::gather_k_splits<C>(reinterpret_cast<float*>(p.partials),
                                                      reinterpret_cast<unsigned*>(p.counters) + tile_id, tile_id, split,
                                                      splits, p.m - row0, shrink, rp, r))
                return;
            // f(row, col, t) for each element of t this thread holds (the
            // owner warps hold the sums, see lk::sum_k_slices): rank columns
            // rc..rp are exact zeros (never x * 0: an Inf in x would give NaN).
            auto each_t = [&](auto&& f) {
                if (!at.owner()) return;
                for (int i = 0; i < C::MT; ++i)
                    for (int j = 0; j < C::TNT; ++j) {
                        int tile = j * C::WN + wn;
                        if (tile * 8 >= rp) break;
                        for (int q = 0; q < 4; ++q) {
                            int row = wm * C::WTM + i * 16 + lrow + 8 * (q >> 1);
                            int col = tile * 8 + 2 * quad + (q & 1);
                            f(row, col, col < rc ? r.tacc[i][j][q] : 0.f);
                        }
                    }
            };
            auto values = [&](auto&& f) { each_t([&](int row, int col, float t) { f(row, col, p.scale * t); }); };
            // b[col0 + col, r0 + j]: rows of b are r long (rarely 16-byte aligned).
            auto weight = [&](int, int col, int j) {
                return col0 + col < p.n ? lk::to_f32(b[(size_t)(col0 + col) * p.r + r0 + j]) : 0.f;
            };

            lk::ExpandTiles<T, C> e(smem);
            guard.next();
            values([&](int row, int col, float v) { lk::store_split(e, guard, row, col, v); });
            // The first column of tiles also saves t for the backward pass.
            if (p.t_out && col0 == 0)
                each_t([&](int row, int col, float t) {
                    if (col < rc && row0 + row < p.m)
                        reinterpret_cast<float*>(p.t_out)[(size_t)(row0 + row) * p.r + r0 + col] = t;
                });
            lk::load_b_rows(e, guard, b, p.r, p.n, col0, r0, rc, rp);
            // Ends with a barrier: the next tile's k-loop may refill shared memory.
            lk::expand(e, guard, rc, rp, values, weight, r);
        }
        lk::store_y<T, C>(reinterpret_cast<T*>(p.y), p.m, p.n, row0, col0, p.beta, r);
    };
    if (!TILES) {
        run_tile(tgroup * C::BN, true);
        return;
    }
    // A block's tiles side by side: t from the first serves them all when
    // the rank is one chunk (r.tacc is untouched by base-only k-loops).
    const int tiles_n = (p.n + C::BN - 1) / C::BN;
    const int first = tgroup * p.col_tiles, last = first + lk::min_int(p.col_tiles, tiles_n - first);
    for (int tn = first; tn < last; ++tn) run_tile(tn * C::BN, tn == first || p.r > lk::RC);
}

}  // namespace

// Entry points: <regime>_<type>_<aligned|any>. "aligned": k % 8 == 0 and x, w, a
// 16-byte aligned (16-byte cp.async); "any": element loads, every shape.
// Prefill blocks take p.col_tiles tiles; decode blocks one (n / BN blocks
// are about the SM count there). decode_deep and decode_wide_deep: the
// decode tiles with deeper pipelines (more bytes of w in flight per SM).
#define LK_FUSED_MMA(regime, Cfg, tiles, tname, T)                                                          \
    LK_KERNEL(lk_fused_forward_##regime##_##tname##_aligned, FusedForwardParams,                            \
              (fused_forward_mma<T, Cfg, true, tiles>))                                                     \
    LK_KERNEL(lk_fused_forward_##regime##_##tname##_any, FusedForwardParams, (fused_forward_mma<T, Cfg, false, tiles>))
LK_FUSED_MMA(decode, lk::DecodeTiles, false, f16, __half)
LK_FUSED_MMA(decode, lk::DecodeTiles, false, bf16, __nv_bfloat16)
LK_FUSED_MMA(decode_wide, lk::DecodeWideTiles, false, f16, __half)
LK_FUSED_MMA(decode_wide, lk::DecodeWideTiles, false, bf16, __nv_bfloat16)
LK_FUSED_MMA(decode_deep, lk::DecodeDeepTiles, false, f16, __half)
LK_FUSED_MMA(decode_deep, lk::DecodeDeepTiles, false, bf16, __nv_bfloat16)
LK_FUSED_MMA(decode_wide_deep, lk::DecodeWideDeepTiles, false, f16, __half)
LK_FUSED_MMA(decode_wide_deep, lk::DecodeWideDeepTiles, false, bf16, __nv_bfloat16)
LK_FUSED_MMA(prefill, lk::FusedPrefillTiles, true, f16, __half)
LK_FUSED_MMA(prefill, lk::FusedPrefillTiles, true, bf16, __nv_bfloat16)
