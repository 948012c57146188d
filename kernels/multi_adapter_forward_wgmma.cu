// lk-targets: sm_90a
// The multi-adapter forward's prefill on Hopper's own instructions (wgmma,
// TMA, mbarrier): every token with its own adapter of a pool, as
// kernels/multi_adapter_forward.cu computes it,
//
//   y[i,:] = x[i,:] w^T + scale[s_i] (x[i,:] a[s_i]^T) b[s_i]^T  (+ beta * y),
//
// with its scheme: the first p.shrink_blocks blocks do the shrink work (t
// on tensor cores, the segment table checked), claimed item by item; the
// others each own a 128 x 128 tile of y. A tile block here is the wgmma
// prefill's block (lk_wgmma_tiles.cuh): warpgroup 0 the producer, one thread
// streaming 64-wide k-tiles of x and w through TMA (128-byte swizzle, zeros
// past every edge) into 4 stages; warpgroups 1 and 2 the consumers, 64 rows
// each, four wgmma k-steps of x w^T per k-tile. Then the consumers alone
// (named barrier 1) take any shrink work still unclaimed, wait until it is
// all done, expand the tile's adapters packed into steps of 64 ranks (hi/lo
// t, f16 range scaling, exact non-finite products) into the same
// accumulators, store y, and count the block in for the launch's
// bookkeeping (the last block adds the bad ids and resets the counters).
#include "lk_multi_adapter.cuh"
#include "lk_wgmma_tiles.cuh"

namespace {

using namespace lk::multi_adapter;
using C = lk::wgmma_tiles::Tiles<4>;
using Consumers = lk::wgmma_tiles::ConsumerTeam;

constexpr unsigned kTileBytes = C::BM * C::BK * 2;  // x's or w's box: 128 rows of 128 bytes
constexpr unsigned kStageBytes = 2 * kTileBytes;
static_assert(C::BM == C::BN && C::BK * 2 == 128, "boxes of 128-byte rows, x's and w's alike");
static_assert(lk::expand_elems<C, false>() * 2 >= lk::wgmma_tiles::staged_tile_bytes<C>(),
              "y staged in the expand's tiles");

template <class T>
__device__ void tile_block(const MultiAdapterWgmmaParams& params) {
    const MultiAdapterParams& p = params.p;
    LK_DYNAMIC_SHARED(unsigned char, dynamic);
    unsigned char* ring = lk::wgmma_tiles::ring_start(dynamic);
    T* expand_smem = reinterpret_cast<T*>(ring + C::STAGES * kStageBytes);
    LK_SHARED(uint64_t, full, [C::STAGES]);
    LK_SHARED(uint64_t, empty, [C::STAGES]);
    LK_SHARED(int, row_slot, [C::BM]);
    LK_SHARED(int, distinct, [C::BM + 1]);
    LK_SHARED(int, guard_state, [C::BM + 2]);
    LK_SHARED(int, step_state, [3 * lk::GROUPS + 3]);
    auto x_tile = [&](int s) { return ring + s * kStageBytes; };
    auto w_tile = [&](int s) { return ring + s * kStageBytes + kTileBytes; };

    const int tiles_m = (p.m + C::BM - 1) / C::BM, tiles_n = (p.n + C::BN - 1) / C::BN;
    int tm, tn;
    lk::grouped_tile((int64_t)blockIdx.x - p.shrink_blocks, tiles_m, tiles_n, tm, tn);
    const int row0 = tm * C::BM, col0 = tn * C::BN;
    const int ktiles = (p.k + C::BK - 1) / C::BK;

    const lk::wgmma_tiles::StageRing<C::STAGES> stages{full, empty};
    stages.init();
    if (lk::wgmma_tiles::produce(
            stages, ktiles, [](int) { return kStageBytes; },
            [&](int kt, int s) {
                lk::tma_load_2d(x_tile(s), &params.x_map, kt * C::BK, row0, &full[s]);
                lk::tma_load_2d(w_tile(s), &params.w_map, kt * C::BK, col0, &full[s]);
            }))
        return;

    const lk::WarpPlace<C> at;
    // This warpgroup's 64 rows of x's box: 64 rows of 128 bytes in.
    const unsigned x_rows = (unsigned)(at.wm / 4) * 64 * 128;
    lk::ExpandGuard<C> guard(guard_state);
    lk::Accumulators<C> r;
    static_assert(C::MT == 1, "one 16-row mma tile per warp");
    float(&acc)[C::BN / 2] = *reinterpret_cast<float(*)[C::BN / 2]>(&r.acc[0][0][0]);
    for (int kt = 0; kt < ktiles; ++kt)  // sass-loop: wgmma_k
        lk::wgmma_tiles::consume(stages, kt, acc, [&](int s) {
            const unsigned xs = lk::smem_address(x_tile(s)) + x_rows, ws = lk::smem_address(w_tile(s));
            for (int kk = 0; kk < C::BK / 16; ++kk)
                lk::wgmma_ss<C::BN, T>(acc, lk::wgmma_tiles::k_major_desc(xs, kk),
                                       lk::wgmma_tiles::k_major_desc(ws, kk), kt > 0 || kk > 0);
        });
    // Ends with the consumers' barrier: row_slot holds the rows' slots.
    wait_for_shrink<T, MmaShrink, true, C::BM, C::THREADS, Consumers>(p, row0, row_slot);
    expand_rows<T, C>(p, expand_smem, row_slot, distinct, step_state, guard, row0, col0, r);
    lk::wgmma_tiles::store_tile<T, C>(reinterpret_cast<T*>(p.y), p.m, p.n, row0, col0, p.beta, r,
                                      reinterpret_cast<unsigned char*>(expand_smem));
    finish_block<Consumers>(p);
}

// Shrink blocks take items with all 12 warps. The 16-byte shrink path:
// the launch requires k % 8 == 0 and 16-byte aligned x and a (TMA needs them too).
template <class T>
__device__ void multi_adapter_forward_wgmma(const MultiAdapterWgmmaParams& params) {
    if ((int)blockIdx.x < params.p.shrink_blocks) {
        shrink_work<T, MmaShrink, true, false>(params.p);
        finish_block(params.p);
    } else {
        tile_block<T>(params);
    }
}

}  // namespace

LK_KERNEL_TMA_BOUNDED(lk_multi_adapter_wgmma_f16, MultiAdapterWgmmaParams, multi_adapter_forward_wgmma<__half>, 384,
                      1)
LK_KERNEL_TMA_BOUNDED(lk_multi_adapter_wgmma_bf16, MultiAdapterWgmmaParams,
                      multi_adapter_forward_wgmma<__nv_bfloat16>, 384, 1)
