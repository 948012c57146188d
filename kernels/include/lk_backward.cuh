// The backward's pieces that its two dx kernels share: kernels/lora_backward.cu
// (mma.sync, every target) and kernels/lora_backward_wgmma.cu (sm_90a): which
// slot a token trains, a slot's rank and scale, and the u a expand of dx.
#pragma once
#include "lk_tile_gemm.cuh"

namespace lk {
namespace backward {

// The slot token i trains, or -1 (no adapter, an empty slot or a bad id).
__device__ __forceinline__ int token_slot(const BackwardParams& p, int i) {
    if (!p.token_slots) return 0;
    int id = reinterpret_cast<const int*>(p.token_slots)[i];
    if (id < 0 || id >= p.slots) return -1;
    return reinterpret_cast<const int*>(p.slot_rank)[id] > 0 ? id : -1;
}
__device__ __forceinline__ int slot_rank(const BackwardParams& p, int s) {
    return p.token_slots ? reinterpret_cast<const int*>(p.slot_rank)[s] : p.uniform_rank;
}
__device__ __forceinline__ float slot_scale(const BackwardParams& p, int s) {
    return p.token_slots ? reinterpret_cast<const float*>(p.slot_scale)[s] : p.uniform_scale;
}

// The u a expand of E's team (the block, or one warp of a 64-row tile): rows
// row0 .. row0 + E::BM - 1 of dx (row_slot[E::BM]: their slots) by column
// tile col0, one step per distinct adapter among them and per RC of its
// ranks; rows of other adapters and padding ranks are exact zeros. smem:
// the team's expand tiles; distinct (E::BM + 1 ints) its scratch; guard
// constructed before the k-loop.
template <class T, class E>
__device__ void dx_expand_rows(const BackwardParams& p, T* smem, const int* row_slot, int* distinct,
                               lk::ExpandGuard<E>& guard, int row0, int col0, lk::Accumulators<E>& r) {
    using Team = typename E::Team;
    constexpr int LDB = E::BN + 8;
    const T* a_pool = reinterpret_cast<const T*>(p.a_pool);
    const float* u = reinterpret_cast<const float*>(p.u);
    lk::collect_distinct<E::BM, Team>(row_slot, distinct);
    lk::ExpandTiles<T, E, true> e(smem);
    for (int d = 1; d <= distinct[0]; ++d) {
        const int s = distinct[d], rank = slot_rank(p, s);
        for (int r0 = 0; r0 < rank; r0 += lk::RC) {
            const int rc = rank - r0 < lk::RC ? rank - r0 : lk::RC;
            const int rp = (rc + 15) / 16 * 16;
            // Rows of other adapters and padding ranks are exact zeros.
            auto values = [&](auto&& f) {
                for (int i = Team::tid(); i < E::BM * rp; i += E::THREADS) {
                    int row = i / rp, col = i % rp;
                    f(row, col, (row_slot[row] == s && col < rc) ? u[(size_t)(row0 + row) * p.max_rank + r0 + col] : 0.f);
                }
            };
            // a[s] row r0 + j, column col0 + col (recomputed where used: a
            // pointer held across the expand costs the wgmma kernel a spill).
            auto a_at = [&](int j, int col) { return a_pool[((size_t)s * p.max_rank + r0 + j) * p.k + col0 + col]; };
            auto weight = [&](int row, int col, int j) {
                return row_slot[row] == s && col0 + col < p.k ? lk::to_f32(a_at(j, col)) : 0.f;
            };
            guard.next();
            values([&](int row, int col, float v) { lk::store_split(e, guard, row, col, v); });
            // a rows r0.. of this slot, columns col0..: rank x BN, k-major.
            for (int i = Team::tid(); i < rp * E::BN; i += E::THREADS) {
                int j = i / E::BN, q = i % E::BN;
                T v = (j < rc && col0 + q < p.k) ? a_at(j, q) : lk::from_f32<T>(0.f);
                e.ws[j * LDB + q] = lk::finite_weight(v, guard);
            }
            lk::expand(e, guard, rc, rp, values, weight, r);
        }
    }
}

}  // namespace backward
}  // namespace lk
