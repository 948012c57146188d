/* Kernel parameter structs, declared once for the kernels and for Rust.
 * scripts/gen-params generates their Rust mirrors (src/params_bindings.rs)
 * from this header with bindgen: run it after any change here (CI checks the
 * committed file is current). The layout test in src/params.rs compares every
 * size and field offset against this header compiled by the host C++
 * compiler (kernels/host/lk_params_layout.cpp lists every field).
 * Pointers travel as uint64_t device (or, on the host runtime, host) addresses.
 * Plain C: no C++ in this file. */
#pragma once
#include <stdint.h>

/* y[m,n] = x[m,k] w[n,k]^T + scale * (x a[r,k]^T) b[n,r]^T  (+ beta * y) */
typedef struct FusedForwardParams {
    uint64_t x, w, a, b, y;
    uint64_t t_out; /* optional [m][r] f32: saves t = x a^T (unscaled) for the backward pass */
    int32_t m, n, k, r;
    float scale;
    float beta; /* 0: y is written without being read */
    int32_t col_tiles; /* prefill: column tiles per block, side by side (t computed once for them) */
    int32_t k_splits;  /* decode: blocks per tile, each over its range of k (split-K; 1: none) */
    /* split-K only: f32 partial sums, [tiles][k_splits][values per block], and one
     * u32 counter per tile, 0 between launches (the last block of a tile resets it) */
    uint64_t partials, counters;
} FusedForwardParams;

/* Multi-adapter forward (kernels/multi_adapter_forward.cu): token i uses
 * adapter slot slot(i) of a pool, or none:
 *   y[i,:] = x[i,:] w^T + scale[s] (x[i,:] a[s]^T) b[s]^T  (+ beta * y)
 * slot(i) = token_slots[i] (segments == 0), or seg_slots[j] for the segment j
 * with seg_offsets[j] <= i < seg_offsets[j + 1]. Ids outside -1..slots-1 are
 * treated as -1 and counted in *bad_ids. a_pool is [slots][max_rank][k],
 * b_pool [slots][n][max_rank]; slot s uses its first slot_rank[s] ranks
 * (0 = empty slot). t is a [m][max_rank] f32 workspace, counters five u32
 * that are 0 before and after every launch (shrink items claimed, shrink
 * items done, malformed-segment-table flag, bad ids seen, blocks finished).
 * A segment table that is not non-decreasing from 0 to m is caught on the
 * device: every token is then served as -1 and m tokens are counted in
 * *bad_ids. bad_ids == 0: not counted.
 * One adapter for every token (slot_rank == 0: the fused forward's prefill
 * and small decode, which run on this kernel to compute t once, not in every
 * column tile):
 * a_pool and b_pool hold the one adapter, every token uses slot 0 with
 * uniform_rank and uniform_scale, and no ids are read (slots = 1,
 * segments = 0, max_rank = uniform_rank). */
typedef struct MultiAdapterParams {
    uint64_t x, w, a_pool, b_pool, slot_rank, slot_scale;
    uint64_t token_slots, seg_offsets, seg_slots;
    uint64_t t, counters, bad_ids, y;
    int32_t m, n, k, max_rank, slots, segments;
    int32_t shrink_blocks; /* the first shrink_blocks blocks work on t */
    float beta;
    int32_t k_splits; /* decode and mma.sync prefill: tile blocks per tile, each over its range of k (split-K; 1: none) */
    int32_t shrink_chunks; /* items per shrink unit: a SIMT unit's chunks of k, a tensor-core unit's shares of its passes */
    /* split-K only, as in FusedForwardParams: f32 partial sums and a u32 counter per tile */
    uint64_t partials, split_counters;
    /* SIMT units with shrink_chunks > 1 only: [units][shrink_chunks][4] f32 sums and a
     * u32 counter per unit, 0 between launches (the unit's last chunk resets it) */
    uint64_t unit_partials, unit_counters;
    int32_t uniform_rank; /* slot_rank == 0 only */
    float uniform_scale;
} MultiAdapterParams;

/* Adapter backward (kernels/lora_backward.cu), for a pool of adapters laid
 * out as in MultiAdapterParams; a single adapter is a pool of one slot with
 * max_rank = r. With g = dL/dy, t = x a^T saved by the forward pass:
 *   u  = s g b           [m][max_rank] f32 (scratch)
 *   dx = g w + u a       [m][k]       (storage type)
 *   db = s g^T t         [slots][n][max_rank] f32
 *   da = u^T x           [slots][max_rank][k] f32
 * dx, da, db are optional (0 = skip). token_slots == 0: every token uses slot
 * 0 with uniform_rank and uniform_scale. The token reductions of da/db run in
 * `splits` ranges of tokens_per_split tokens; with splits > 1 each writes f32
 * partials ([splits][len]) that lk_backward_reduce sums in a fixed order, or
 * (deterministic == 0) adds them with atomics. The grid of u, da and db has a
 * layer (z) per slot, or, when first_token != 0 (a pool larger than the
 * batch), a layer per token: layer i works for token i's slot when i is that
 * slot's first token (first_token: m - the first token of each
 * slot, 0 for none, from lk_backward_first_tokens; i32 [slots]). */
typedef struct BackwardParams {
    uint64_t g, x, w, a_pool, b_pool, slot_rank, slot_scale, token_slots, t;
    uint64_t u, dx, da, db, partials, first_token;
    int32_t m, n, k, max_rank, slots;
    int32_t uniform_rank;
    float uniform_scale;
    int32_t splits, tokens_per_split;
    int32_t accumulate;    /* add to dx/da/db instead of overwriting */
    int32_t deterministic; /* no float atomics: partials + fixed-order reduction */
    int64_t reduce_len;    /* lk_backward_reduce: elements per partial (may pass 2^31) */
    uint64_t reduce_out;   /* lk_backward_reduce: da or db */
    /* The gradient's statistics, for an optimizer that then reads it once
     * (0 = none wanted): per (slot, column tile) of the da or db a launch
     * writes, f64 [2] = the sum of squares and the largest magnitude (Inf for
     * a non-finite value) of the slot's entries below its rank, written by
     * whoever finishes the tile (lk_backward_reduce when it sums partials). */
    uint64_t grad_stats;
    uint64_t tile_counters; /* u32 per (slot, column tile): token ranges done (atomic mode); 0 at launch */
    int32_t tile_cols;      /* columns of n (db) or k (da) per tile: the db/da kernel's per block */
    int32_t reduce_db;      /* lk_backward_reduce: the gradient is db (else da) */
} BackwardParams;

/* Merge / unmerge (kernels/merge.cu): w[n][k] <- w + sign * scale * b a,
 * accumulated in f32 and rounded once to the storage type. */
typedef struct MergeParams {
    uint64_t w, a, b;
    int32_t n, k, r;
    float scale;
    float sign; /* +1 merge, -1 unmerge */
} MergeParams;

/* Loading an adapter that lies in device memory into a pool slot
 * (kernels/pool_load.cu). The check pass counts the non-finite values of a
 * ([rank, k], a_len elements) and b ([n, rank]) into stats (u64[4]: per
 * operand the count and the bitwise NOT of the first index, so that
 * atomicMax finds the first); the write pass copies b into the slot's rows
 * of max_rank (pool_b), zero past rank. */
typedef struct PoolLoadParams {
    uint64_t a, b, pool_b, stats;
    int64_t a_len;
    int32_t n, rank, max_rank, pad;
} PoolLoadParams;

/* Per-slot optimizer settings (kernels/adamw.cu). */
typedef struct SlotOptim {
    float lr;
    float weight_decay;
    float max_grad_norm; /* clip the slot's gradient to this L2 norm; 0 = no clipping */
    float anchor_pull;   /* lambda of the pull lambda * (p - anchor); 0 = none */
    int32_t active;      /* 0: the slot is not stepped */
    int32_t pad;
} SlotOptim;

/* AdamW over every slot of a pool in one launch (a block per slot). All f32
 * tensors use the pool layout (a: [slots][max_rank][k], b: [slots][n][max_rank]);
 * a slot's parameters are its first rank rows of a and columns of b. */
typedef struct AdamWParams {
    uint64_t master_a, master_b, m1_a, m1_b, m2_a, m2_b;
    uint64_t anchor_a, anchor_b; /* 0 = no anchors */
    uint64_t grad_a, grad_b;
    uint64_t work_a, work_b; /* the pool's storage-type copy, refreshed from master */
    uint64_t slot_rank, hyper, step, status, grad_norm;
    /* Per slot, upper bounds over its elements (f32; Inf = unknown):
     * state_bound 3 a slot (|master|, |m2|, and q >= |m1| /
     * (sqrt(m2) + e), kernels/adamw.cu),
     * anchor_bound 1 (|anchor|). */
    uint64_t state_bound, anchor_bound;
    /* The gradients' statistics from the backward pass (BackwardParams'
     * grad_stats: f64 [2] per slot and column tile, tiles_a / tiles_b a
     * slot), or 0: the step then reads the gradient once more for its norm. */
    uint64_t grad_stats_a, grad_stats_b;
    int32_t tiles_a, tiles_b;
    int32_t n, k, max_rank, slots;
    float beta1, beta2, eps;
    int32_t pad;
} AdamWParams;

/* Runtime self-test kernels (kernels/runtime_selftest.cu). */
typedef struct SelftestParams {
    uint64_t input, input2, out;
    int32_t n;
    int32_t variant; /* which planted bug to run; 0 = correct */
} SelftestParams;

/* A TMA tensor map. On a GPU, the driver's CUtensorMap (cuTensorMapEncodeTiled:
 * 128 opaque bytes, 64-byte aligned); on the host runtime the same bytes hold
 * its mirror, lk_host::TensorMapMirror (kernels/host/lk_host_hopper.h).
 * Kernels take its address, so they receive their parameters as
 * __grid_constant__ (LK_KERNEL_TMA). */
typedef struct __attribute__((aligned(64))) LkTensorMap {
    uint64_t opaque[16];
} LkTensorMap;

/* The fused forward on Hopper's wgmma and TMA (kernels/fused_forward_wgmma.cu):
 * FusedForwardParams' operation, x, w and a through tensor maps (boxes of
 * 64 k: 128 rows of x and w, 64 of a; 128-byte swizzle), rank <= 64. */
typedef struct FusedWgmmaParams {
    LkTensorMap x_map, w_map, a_map;
    uint64_t b, y;
    uint64_t t_out; /* optional [m][r] f32: t = x a^T (unscaled) */
    int32_t m, n, k, r;
    float scale;
    float beta;      /* 0: y is written without being read */
    int32_t col_tiles; /* column tiles per block, side by side (t computed once for them) */
    int32_t pad;
} FusedWgmmaParams;

/* The multi-adapter forward's prefill on Hopper
 * (kernels/multi_adapter_forward_wgmma.cu, sm_90a): x and w through tensor
 * maps (boxes of 64 k by 128 rows; 128-byte swizzle), everything else as the
 * other multi-adapter kernels read it from `p`. */
typedef struct MultiAdapterWgmmaParams {
    LkTensorMap x_map, w_map;
    MultiAdapterParams p;
} MultiAdapterWgmmaParams;

/* The backward's dx = g w + u a on Hopper (kernels/lora_backward_wgmma.cu,
 * sm_90a): g and w through tensor maps (boxes of 64 n: 128 rows of g; 64
 * rows of w by 64 of its k columns; 128-byte swizzle), everything else as
 * the other dx kernels read it from `p`. */
typedef struct BackwardWgmmaParams {
    LkTensorMap g_map, w_map;
    BackwardParams p;
} BackwardWgmmaParams;

/* Hopper self-test kernels (kernels/hopper_selftest.cu), one warpgroup:
 *   out[64][n] = A[64][k] B[b_rows][k]^T, A and B 16-bit (f16 or bf16), out
 * f32; the kernels run over k = 128 and B over n rows, reading zeros past k
 * and past b_rows (TMA's out-of-bounds fill, or the threads' own). */
typedef struct HopperSelftestParams {
    LkTensorMap a_map; /* A [64][k] row-major, with the box the kernel loads */
    LkTensorMap b_map; /* B [n][k] row-major, or [k][n] when b_mn_major, likewise */
    uint64_t a;        /* A itself, for the kernels that stage it by hand */
    uint64_t b;        /* B itself, likewise */
    uint64_t out;      /* f32 [64][n] */
    int32_t n, k, b_rows;
    int32_t swizzle; /* the layout TMA writes and wgmma reads: 0 (none), 32, 64 or 128 bytes */
    int32_t variant; /* which planted bug to run; 0 = correct */
    int32_t b_mn_major; /* TMA kernel: B from b_map as [k][n] (N contiguous), read MN-major */
} HopperSelftestParams;
