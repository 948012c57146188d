// The layout of every struct in lk_params.h (and of the host launch
// configuration) as this compiler sees it, for the layout test in
// src/params.rs to compare with the Rust structs.
#include <cstddef>
#include <cstring>

#include "../include/lk_params.h"
#include "lk_host_runtime.h"

namespace {
struct FieldLayout {
    const char* type;
    const char* field;  // "" = the whole struct
    size_t offset, size;
};
#define LK_STRUCT(S) {#S, "", 0, sizeof(S)}
#define LK_FIELD(S, f) {#S, #f, offsetof(S, f), sizeof(((S*)nullptr)->f)}
const FieldLayout kLayouts[] = {
    LK_STRUCT(FusedForwardParams), LK_FIELD(FusedForwardParams, x), LK_FIELD(FusedForwardParams, w),
    LK_FIELD(FusedForwardParams, a), LK_FIELD(FusedForwardParams, b), LK_FIELD(FusedForwardParams, y),
    LK_FIELD(FusedForwardParams, m), LK_FIELD(FusedForwardParams, n), LK_FIELD(FusedForwardParams, k),
    LK_FIELD(FusedForwardParams, t_out), LK_FIELD(FusedForwardParams, r), LK_FIELD(FusedForwardParams, scale),
    LK_FIELD(FusedForwardParams, beta), LK_FIELD(FusedForwardParams, col_tiles),
    LK_FIELD(FusedForwardParams, k_splits), LK_FIELD(FusedForwardParams, partials),
    LK_FIELD(FusedForwardParams, counters),
    LK_STRUCT(BackwardParams), LK_FIELD(BackwardParams, g), LK_FIELD(BackwardParams, x), LK_FIELD(BackwardParams, w),
    LK_FIELD(BackwardParams, a_pool), LK_FIELD(BackwardParams, b_pool), LK_FIELD(BackwardParams, slot_rank),
    LK_FIELD(BackwardParams, slot_scale), LK_FIELD(BackwardParams, token_slots), LK_FIELD(BackwardParams, t),
    LK_FIELD(BackwardParams, u), LK_FIELD(BackwardParams, dx), LK_FIELD(BackwardParams, da),
    LK_FIELD(BackwardParams, db), LK_FIELD(BackwardParams, partials),
    LK_FIELD(BackwardParams, first_token), LK_FIELD(BackwardParams, m),
    LK_FIELD(BackwardParams, n), LK_FIELD(BackwardParams, k), LK_FIELD(BackwardParams, max_rank),
    LK_FIELD(BackwardParams, slots), LK_FIELD(BackwardParams, uniform_rank), LK_FIELD(BackwardParams, uniform_scale),
    LK_FIELD(BackwardParams, splits), LK_FIELD(BackwardParams, tokens_per_split),
    LK_FIELD(BackwardParams, accumulate), LK_FIELD(BackwardParams, deterministic),
    LK_FIELD(BackwardParams, reduce_len), LK_FIELD(BackwardParams, reduce_out),
    LK_FIELD(BackwardParams, grad_stats), LK_FIELD(BackwardParams, tile_counters), LK_FIELD(BackwardParams, tile_cols),
    LK_FIELD(BackwardParams, reduce_db),
    LK_STRUCT(SelftestParams), LK_FIELD(SelftestParams, input), LK_FIELD(SelftestParams, input2),
    LK_FIELD(SelftestParams, out), LK_FIELD(SelftestParams, n), LK_FIELD(SelftestParams, variant),
    LK_STRUCT(LkTensorMap), LK_FIELD(LkTensorMap, opaque),
    LK_STRUCT(MultiAdapterWgmmaParams), LK_FIELD(MultiAdapterWgmmaParams, x_map),
    LK_FIELD(MultiAdapterWgmmaParams, w_map), LK_FIELD(MultiAdapterWgmmaParams, p),
    LK_STRUCT(BackwardWgmmaParams), LK_FIELD(BackwardWgmmaParams, g_map), LK_FIELD(BackwardWgmmaParams, w_map),
    LK_FIELD(BackwardWgmmaParams, p),
    LK_STRUCT(FusedWgmmaParams), LK_FIELD(FusedWgmmaParams, x_map), LK_FIELD(FusedWgmmaParams, w_map),
    LK_FIELD(FusedWgmmaParams, a_map), LK_FIELD(FusedWgmmaParams, b), LK_FIELD(FusedWgmmaParams, y),
    LK_FIELD(FusedWgmmaParams, t_out), LK_FIELD(FusedWgmmaParams, m), LK_FIELD(FusedWgmmaParams, n),
    LK_FIELD(FusedWgmmaParams, k), LK_FIELD(FusedWgmmaParams, r), LK_FIELD(FusedWgmmaParams, scale),
    LK_FIELD(FusedWgmmaParams, beta), LK_FIELD(FusedWgmmaParams, col_tiles), LK_FIELD(FusedWgmmaParams, pad),
    LK_STRUCT(HopperSelftestParams), LK_FIELD(HopperSelftestParams, a_map), LK_FIELD(HopperSelftestParams, b_map),
    LK_FIELD(HopperSelftestParams, a), LK_FIELD(HopperSelftestParams, b), LK_FIELD(HopperSelftestParams, out),
    LK_FIELD(HopperSelftestParams, n), LK_FIELD(HopperSelftestParams, k), LK_FIELD(HopperSelftestParams, b_rows),
    LK_FIELD(HopperSelftestParams, swizzle), LK_FIELD(HopperSelftestParams, variant), LK_FIELD(HopperSelftestParams, b_mn_major),
    LK_STRUCT(MultiAdapterParams), LK_FIELD(MultiAdapterParams, x), LK_FIELD(MultiAdapterParams, w),
    LK_FIELD(MultiAdapterParams, a_pool), LK_FIELD(MultiAdapterParams, b_pool), LK_FIELD(MultiAdapterParams, slot_rank),
    LK_FIELD(MultiAdapterParams, slot_scale), LK_FIELD(MultiAdapterParams, token_slots),
    LK_FIELD(MultiAdapterParams, seg_offsets), LK_FIELD(MultiAdapterParams, seg_slots), LK_FIELD(MultiAdapterParams, t),
    LK_FIELD(MultiAdapterParams, counters), LK_FIELD(MultiAdapterParams, bad_ids), LK_FIELD(MultiAdapterParams, y),
    LK_FIELD(MultiAdapterParams, m), LK_FIELD(MultiAdapterParams, n), LK_FIELD(MultiAdapterParams, k),
    LK_FIELD(MultiAdapterParams, max_rank), LK_FIELD(MultiAdapterParams, slots), LK_FIELD(MultiAdapterParams, segments),
    LK_FIELD(MultiAdapterParams, shrink_blocks), LK_FIELD(MultiAdapterParams, beta),
    LK_FIELD(MultiAdapterParams, k_splits), LK_FIELD(MultiAdapterParams, shrink_chunks),
    LK_FIELD(MultiAdapterParams, partials), LK_FIELD(MultiAdapterParams, split_counters),
    LK_FIELD(MultiAdapterParams, unit_partials), LK_FIELD(MultiAdapterParams, unit_counters),
    LK_FIELD(MultiAdapterParams, uniform_rank), LK_FIELD(MultiAdapterParams, uniform_scale),
    LK_STRUCT(MergeParams), LK_FIELD(MergeParams, w), LK_FIELD(MergeParams, a), LK_FIELD(MergeParams, b), LK_FIELD(MergeParams, n), LK_FIELD(MergeParams, k), LK_FIELD(MergeParams, r), LK_FIELD(MergeParams, scale), LK_FIELD(MergeParams, sign),
    LK_STRUCT(PoolLoadParams), LK_FIELD(PoolLoadParams, a), LK_FIELD(PoolLoadParams, b),
    LK_FIELD(PoolLoadParams, pool_b), LK_FIELD(PoolLoadParams, stats), LK_FIELD(PoolLoadParams, a_len),
    LK_FIELD(PoolLoadParams, n), LK_FIELD(PoolLoadParams, rank), LK_FIELD(PoolLoadParams, max_rank),
    LK_FIELD(PoolLoadParams, pad),
    LK_STRUCT(SlotOptim), LK_FIELD(SlotOptim, lr), LK_FIELD(SlotOptim, weight_decay), LK_FIELD(SlotOptim, max_grad_norm), LK_FIELD(SlotOptim, anchor_pull), LK_FIELD(SlotOptim, active), LK_FIELD(SlotOptim, pad),
    LK_STRUCT(AdamWParams), LK_FIELD(AdamWParams, master_a), LK_FIELD(AdamWParams, master_b), LK_FIELD(AdamWParams, m1_a), LK_FIELD(AdamWParams, m1_b), LK_FIELD(AdamWParams, m2_a), LK_FIELD(AdamWParams, m2_b), LK_FIELD(AdamWParams, anchor_a), LK_FIELD(AdamWParams, anchor_b), LK_FIELD(AdamWParams, grad_a), LK_FIELD(AdamWParams, grad_b), LK_FIELD(AdamWParams, work_a), LK_FIELD(AdamWParams, work_b), LK_FIELD(AdamWParams, slot_rank), LK_FIELD(AdamWParams, hyper), LK_FIELD(AdamWParams, step), LK_FIELD(AdamWParams, status), LK_FIELD(AdamWParams, grad_norm), LK_FIELD(AdamWParams, state_bound), LK_FIELD(AdamWParams, anchor_bound), LK_FIELD(AdamWParams, grad_stats_a), LK_FIELD(AdamWParams, grad_stats_b), LK_FIELD(AdamWParams, tiles_a), LK_FIELD(AdamWParams, tiles_b), LK_FIELD(AdamWParams, n), LK_FIELD(AdamWParams, k), LK_FIELD(AdamWParams, max_rank), LK_FIELD(AdamWParams, slots), LK_FIELD(AdamWParams, beta1), LK_FIELD(AdamWParams, beta2), LK_FIELD(AdamWParams, eps), LK_FIELD(AdamWParams, pad),
    LK_STRUCT(LkHostLaunch), LK_FIELD(LkHostLaunch, grid), LK_FIELD(LkHostLaunch, block),
    LK_FIELD(LkHostLaunch, dynamic_smem_bytes),
};
}  // namespace

// Returns 1 and fills offset/size if `type`.`field` exists ("" = the struct), else 0.
extern "C" int lk_params_layout(const char* type, const char* field, size_t* offset, size_t* size) {
    for (const FieldLayout& l : kLayouts) {
        if (std::strcmp(l.type, type) == 0 && std::strcmp(l.field, field) == 0) {
            *offset = l.offset;
            *size = l.size;
            return 1;
        }
    }
    return 0;
}
// Number of fields (not structs) the table lists for `type`.
extern "C" size_t lk_params_field_count(const char* type) {
    size_t n = 0;
    for (const FieldLayout& l : kLayouts) n += std::strcmp(l.type, type) == 0 && l.field[0] != '\0';
    return n;
}
// Number of structs the table lists.
extern "C" size_t lk_params_struct_count() {
    size_t n = 0;
    for (const FieldLayout& l : kLayouts) n += l.field[0] == '\0';
    return n;
}
