// lk-targets: sm_90a
// The fused forward on Hopper's own instructions (wgmma, TMA, mbarrier):
//
//   y[m,n] = x[m,k] w[n,k]^T + scale * (x a[r,k]^T)[m,r] b[n,r]^T  (+ beta * y),  r <= 64
//
// A block of three warpgroups takes work units, each a row tile by
// p.col_tiles 128 x 128 tiles of y side by side, one after another: units
// blockIdx.x, blockIdx.x + gridDim.x, ... of the grouped (L2-friendly)
// order, on a grid of at most one block per SM (persistent). Warpgroup 0 is
// the producer: one thread streams 64-wide k-tiles of x (128 rows) and w
// (128 rows), and on a unit's first tile the 64 rows of a, through TMA
// (128-byte swizzle, zeros past every edge) into a ring of stages, each with
// a `full` mbarrier (the loads' bytes) and an `empty` one (both consumers
// done with it); it runs ahead across tiles and units. Warpgroups 1 and 2
// are the consumers, 64 rows of the tile each: per k-tile, four wgmma k-steps
// of x w^T (N = 128) and on a unit's first tile of x a^T (N = 64) into t,
// straight from the stage. The unit's other tiles reuse t from registers.
// After a tile's k-loop the consumers run the expand steps of
// kernels/fused_forward_mma.cu (scale * t split as hi/lo, its f16 range
// scaling and exact non-finite products) with the finite products as wgmma
// k-steps into the same accumulators (the hi/lo split from registers, b's
// tile from shared memory): the accumulators of a wgmma warp are laid out as
// a 16 x 128 mma.sync tile, so the expand continues them where the k-loop
// left them. Then the tile is stored through shared memory, 16 bytes a store.
#include "lk_wgmma_tiles.cuh"

namespace {

using C = lk::wgmma_tiles::Tiles<3>;
using lk::wgmma_tiles::k_major_desc;

constexpr unsigned kTileBytes = C::BM * C::BK * 2;    // x's or w's box: 128 rows of 128 bytes
constexpr unsigned kATileBytes = lk::RC * C::BK * 2;  // a's box: 64 rows
constexpr unsigned kStageBytes = 2 * kTileBytes + kATileBytes;
static_assert(C::BM == C::BN && C::BK * 2 == 128, "boxes of 128-byte rows, x's and w's alike");
static_assert(lk::expand_elems<C, false>() * 2 >= lk::wgmma_tiles::staged_tile_bytes<C>(),
              "y staged in the expand's tiles");

template <class T>
__device__ void fused_forward_wgmma(const FusedWgmmaParams& p) {
    // The stages from the first 1024-byte boundary of the shared window
    // (128-byte swizzle atoms), the expand's tiles after them.
    LK_DYNAMIC_SHARED(unsigned char, dynamic);
    unsigned char* ring = lk::wgmma_tiles::ring_start(dynamic);
    T* expand_smem = reinterpret_cast<T*>(ring + C::STAGES * kStageBytes);
    LK_SHARED(uint64_t, full, [C::STAGES]);
    LK_SHARED(uint64_t, empty, [C::STAGES]);
    LK_SHARED(int, guard_state, [C::BM + 2]);
    auto x_tile = [&](int s) { return ring + s * kStageBytes; };
    auto w_tile = [&](int s) { return ring + s * kStageBytes + kTileBytes; };
    auto a_tile = [&](int s) { return ring + s * kStageBytes + 2 * kTileBytes; };

    // Work units: a row tile by a group of col_tiles column tiles, in the
    // grouped (L2-friendly) order; block b takes units b, b + gridDim.x, ...
    const int tiles_m = (p.m + C::BM - 1) / C::BM, tiles_n = (p.n + C::BN - 1) / C::BN;
    const int groups = (tiles_n + p.col_tiles - 1) / p.col_tiles;
    const int64_t units = (int64_t)tiles_m * groups;
    const int ktiles = (p.k + C::BK - 1) / C::BK;
    // Unit u's first row and its column tiles [first, last).
    auto unit_at = [&](int64_t u, int& row0, int& first, int& last) {
        int tm, tgroup;
        lk::grouped_tile(u, tiles_m, groups, tm, tgroup);
        row0 = tm * C::BM;
        first = tgroup * p.col_tiles;
        last = first + lk::min_int(p.col_tiles, tiles_n - first);
    };

    const lk::wgmma_tiles::StageRing<C::STAGES> stages{full, empty};
    stages.init();
    // The producer runs ahead across units: the next unit's first stages
    // load while the consumers expand and store the last tile of this one.
    // A unit's first tile also brings a's rows.
    if (lk::wgmma_tiles::producer_role([&] {
            int it = 0;
            for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
                int row0, first, last;
                unit_at(u, row0, first, last);
                for (int tn = first; tn < last; ++tn)
                    for (int kt = 0; kt < ktiles; ++kt, ++it) {
                        const int s = stages.acquire(it, tn == first ? kStageBytes : 2 * kTileBytes);
                        lk::tma_load_2d(x_tile(s), &p.x_map, kt * C::BK, row0, &full[s]);
                        lk::tma_load_2d(w_tile(s), &p.w_map, kt * C::BK, tn * C::BN, &full[s]);
                        if (tn == first) lk::tma_load_2d(a_tile(s), &p.a_map, kt * C::BK, 0, &full[s]);
                    }
            }
        }))
        return;

    const T* __restrict__ b = reinterpret_cast<const T*>(p.b);
    const lk::WarpPlace<C> at;
    const int wm = at.wm, lane = threadIdx.x % 32, lrow = lane / 4, quad = lane % 4;
    // This warpgroup's 64 rows of x's box: 64 rows of 128 bytes in.
    const unsigned x_rows = (unsigned)(wm / 4) * 64 * 128;
    lk::ExpandGuard<C> guard(guard_state);
    lk::Accumulators<C> r;
    // The wgmma views of the accumulators: a warp's d[4 j + q] is acc[0][j][q].
    static_assert(C::MT == 1 && C::TNT * 8 == lk::RC, "one 16-row mma tile per warp; t of RC columns");
    float(&acc)[C::BN / 2] = *reinterpret_cast<float(*)[C::BN / 2]>(&r.acc[0][0][0]);
    float(&tacc)[lk::RC / 2] = *reinterpret_cast<float(*)[lk::RC / 2]>(&r.tacc[0][0][0]);
    const int rc = p.r, rp = (rc + 15) / 16 * 16;
    int it = 0;
    for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
        int row0, first, last;
        unit_at(u, row0, first, last);
        for (int tn = first; tn < last; ++tn) {
            const int col0 = tn * C::BN;
            const bool shrink = tn == first;
            // The k-loop with the shrink's wgmma (the block's first tile) or
            // without: two loops, as a wgmma under a branch makes ptxas fence
            // every wgmma of the loop.
            auto k_loop = [&](auto with_shrink) {
                constexpr bool SHRINK = decltype(with_shrink)::value;
                for (int kt = 0; kt < ktiles; ++kt, ++it) {  // sass-loop: wgmma_k
                    const int s = stages.wait_loaded(it);
                    lk::wgmma_fence();
                    lk::wgmma_fence_operands(acc);
                    if (SHRINK) lk::wgmma_fence_operands(tacc);
                    const unsigned xs = lk::smem_address(x_tile(s)) + x_rows;
                    const unsigned ws = lk::smem_address(w_tile(s)), as = lk::smem_address(a_tile(s));
                    for (int kk = 0; kk < C::BK / 16; ++kk) {
                        const uint64_t dx = k_major_desc(xs, kk);
                        const bool more = kt > 0 || kk > 0;
                        lk::wgmma_ss<C::BN, T>(acc, dx, k_major_desc(ws, kk), more);
                        if constexpr (SHRINK) lk::wgmma_ss<lk::RC, T>(tacc, dx, k_major_desc(as, kk), more);
                    }
                    lk::wgmma_commit();
                    // Waits for this k-tile's group. Keeping one in flight (wait<1>,
                    // the stage released a k-tile later) made ptxas serialize every
                    // wgmma (C7515: it moves accumulator registers while a group is
                    // in flight); the next stages are loaded meanwhile either way.
                    lk::wgmma_wait<0>();
                    lk::wgmma_fence_operands(acc);
                    if (SHRINK) lk::wgmma_fence_operands(tacc);
                    stages.release(s);
                }
            };
            if (shrink)
                k_loop(std::true_type());
            else
                k_loop(std::false_type());
            // The expand of kernels/fused_forward_mma.cu's run_tile, for its one
            // chunk of ranks (a helper both kernels called moved the mma decode
            // kernels' registers and main loops past their SASS budgets).
            // f(row, col, t) for each element of t this thread holds: rank
            // columns rc..rp are exact zeros (never x * 0: an Inf in x would give NaN).
            auto each_t = [&](auto&& f) {
                for (int j = 0; j < C::TNT; ++j) {
                    if (j * 8 >= rp) break;
                    for (int q = 0; q < 4; ++q) {
                        const int row = wm * C::WTM + lrow + 8 * (q >> 1), col = j * 8 + 2 * quad + (q & 1);
                        f(row, col, col < rc ? r.tacc[0][j][q] : 0.f);
                    }
                }
            };
            auto values = [&](auto&& f) { each_t([&](int row, int col, float t) { f(row, col, p.scale * t); }); };
            auto weight = [&](int, int col, int j) {
                return col0 + col < p.n ? lk::to_f32(b[(size_t)(col0 + col) * p.r + j]) : 0.f;
            };
            lk::ExpandTiles<T, C> e(expand_smem);
            guard.next();
            values([&](int row, int col, float v) { lk::store_split(e, guard, row, col, v); });
            if (p.t_out && col0 == 0)
                each_t([&](int row, int col, float t) {
                    if (col < rc && row0 + row < p.m)
                        reinterpret_cast<float*>(p.t_out)[(size_t)(row0 + row) * p.r + col] = t;
                });
            lk::wgmma_tiles::load_b_canonical(e.ws, guard, b, p.r, p.n, col0, rc, rp);
            // Starts and ends with the consumers' barrier: the expand tiles are
            // free again for the next tile. The finite hi/lo products as wgmma
            // k-steps into the same accumulators.
            lk::expand_with(e, guard, rc, rp, values, weight, r,
                            [&](int ranks) { lk::wgmma_tiles::expand_wgmma<T, C>(e, ranks, r); });
            lk::wgmma_tiles::store_tile<T, C>(reinterpret_cast<T*>(p.y), p.m, p.n, row0, col0, p.beta, r,
                                              reinterpret_cast<unsigned char*>(expand_smem));
        }
    }
}

}  // namespace

LK_KERNEL_TMA_BOUNDED(lk_fused_forward_wgmma_f16, FusedWgmmaParams, fused_forward_wgmma<__half>, 384, 1)
LK_KERNEL_TMA_BOUNDED(lk_fused_forward_wgmma_bf16, FusedWgmmaParams, fused_forward_wgmma<__nv_bfloat16>, 384, 1)
