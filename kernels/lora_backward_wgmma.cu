// lk-targets: sm_90a
// The backward's dx on Hopper's own instructions (wgmma, TMA, mbarrier):
//
//   dx[m,k] = g[m,n] w[n,k] + u[m,r] a[s_i][r,k]   (+ dx when accumulating)
//
// for one adapter or a pool (u = s g b, from lk_backward_u*; each row's slot
// from BackwardParams, as in kernels/lora_backward.cu). A block of three
// warpgroups owns one 128 x 128 tile of dx (lk_wgmma_tiles.cuh). Warpgroup 0
// is the producer: one thread streams 64-wide tiles of the reduction over n
// through TMA (128-byte swizzle, zeros past every edge): g's 128 rows (K-major:
// n is g's contiguous dimension) and w's 64 rows n by the tile's 128 columns
// k as two boxes of 64 columns. w is MN-major for this product (k, the
// output's dimension, is contiguous), which wgmma reads as it is
// (imm-trans-b): no transpose through registers. Warpgroups 1 and 2 are the
// consumers, 64 rows of the tile each, four wgmma k-steps per n-tile. Then
// they run the u a expand of the mma.sync kernel (lk::backward::dx_expand_rows:
// one step per distinct adapter among the rows, u as hi + lo with range
// scaling and exact non-finite products) into the same accumulators, and
// store the tile.
#include "lk_backward.cuh"
#include "lk_wgmma_tiles.cuh"

namespace {

using C = lk::wgmma_tiles::Tiles<4>;

constexpr unsigned kGBytes = C::BM * C::BK * 2;     // g's box: 128 rows of 64 n (128 bytes)
constexpr unsigned kWBoxBytes = C::BK * 64 * 2;     // a w box: 64 rows n of 64 columns (128 bytes)
constexpr unsigned kStageBytes = kGBytes + 2 * kWBoxBytes;
static_assert(C::BN == 2 * 64 && C::BK * 2 == 128, "w's tile as two boxes of 128-byte rows");
static_assert(lk::expand_elems<C, true>() * 2 >= lk::wgmma_tiles::staged_tile_bytes<C>(),
              "dx staged in the expand's tiles");

template <class T>
__device__ void backward_dx_wgmma(const BackwardWgmmaParams& params) {
    const BackwardParams& p = params.p;
    LK_DYNAMIC_SHARED(unsigned char, dynamic);
    unsigned char* ring = lk::wgmma_tiles::ring_start(dynamic);
    T* expand_smem = reinterpret_cast<T*>(ring + C::STAGES * kStageBytes);
    LK_SHARED(uint64_t, full, [C::STAGES]);
    LK_SHARED(uint64_t, empty, [C::STAGES]);
    LK_SHARED(int, row_slot, [C::BM]);
    LK_SHARED(int, distinct, [C::BM + 1]);
    LK_SHARED(int, guard_state, [C::BM + 2]);
    auto g_tile = [&](int s) { return ring + s * kStageBytes; };
    auto w_tile = [&](int s) { return ring + s * kStageBytes + kGBytes; };

    int tm, tn;
    lk::grouped_tile(tm, tn);
    const int row0 = tm * C::BM, col0 = tn * C::BN;
    const int ntiles = (p.n + C::BK - 1) / C::BK;

    for (int i = threadIdx.x; i < C::BM; i += lk::wgmma_tiles::kThreads)
        row_slot[i] = row0 + i < p.m ? lk::backward::token_slot(p, row0 + i) : -1;
    const lk::wgmma_tiles::StageRing<C::STAGES> stages{full, empty};
    stages.init();  // its barrier also publishes row_slot
    if (lk::wgmma_tiles::produce(
            stages, ntiles, [](int) { return kStageBytes; },
            [&](int nt, int s) {
                lk::tma_load_2d(g_tile(s), &params.g_map, nt * C::BK, row0, &full[s]);
                lk::tma_load_2d(w_tile(s), &params.w_map, col0, nt * C::BK, &full[s]);
                lk::tma_load_2d(w_tile(s) + kWBoxBytes, &params.w_map, col0 + 64, nt * C::BK, &full[s]);
            }))
        return;

    const lk::WarpPlace<C> at;
    // This warpgroup's 64 rows of g's box: 64 rows of 128 bytes in.
    const unsigned g_rows = (unsigned)(at.wm / 4) * 64 * 128;
    lk::ExpandGuard<C> guard(guard_state);
    lk::Accumulators<C> r;
    static_assert(C::MT == 1, "one 16-row mma tile per warp");
    float(&acc)[C::BN / 2] = *reinterpret_cast<float(*)[C::BN / 2]>(&r.acc[0][0][0]);
    // Zero, then always accumulate: n may be 0 (dx = u a alone).
    lk::zero<C>(r.acc);
    for (int nt = 0; nt < ntiles; ++nt)  // sass-loop: wgmma_n
        lk::wgmma_tiles::consume(stages, nt, acc, [&](int s) {
            const unsigned gs = lk::smem_address(g_tile(s)) + g_rows, ws = lk::smem_address(w_tile(s));
            for (int kk = 0; kk < C::BK / 16; ++kk) {
                // w MN-major: k-step kk is rows 16 kk.. (two 1024-byte atoms
                // each); the 8-row groups 1024 bytes apart (sbo), the second 64
                // columns one box on (lbo).
                const uint64_t dw = lk::wgmma_desc(ws + kk * 16 * 128, kWBoxBytes, 1024, 128);
                lk::wgmma_ss_b_mn<C::BN, T>(acc, lk::wgmma_tiles::k_major_desc(gs, kk), dw, true);
            }
        });
    // Starts and ends with the consumers' barrier.
    lk::backward::dx_expand_rows<T, C>(p, expand_smem, row_slot, distinct, guard, row0, col0, r);
    lk::wgmma_tiles::store_tile<T, C>(reinterpret_cast<T*>(p.dx), p.m, p.k, row0, col0, p.accumulate ? 1.f : 0.f, r,
                                      reinterpret_cast<unsigned char*>(expand_smem));
}

}  // namespace

LK_KERNEL_TMA_BOUNDED(lk_backward_dx_wgmma_f16, BackwardWgmmaParams, backward_dx_wgmma<__half>, 384, 1)
LK_KERNEL_TMA_BOUNDED(lk_backward_dx_wgmma_bf16, BackwardWgmmaParams, backward_dx_wgmma<__nv_bfloat16>, 384, 1)
