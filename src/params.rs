//! Kernel parameter structs: Rust mirrors of `kernels/include/lk_params.h`.
//! `tests/params_layout.rs` checks every size and field offset against the C
//! header as compiled by the host C++ compiler, so the two cannot drift.
use cudarc::driver::DeviceRepr;

macro_rules! params_struct {
    ($(#[$doc:meta])* $name:ident { $($field:ident : $ty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy, Default, PartialEq)]
        pub struct $name { $(pub $field: $ty),* }

        // SAFETY: a #[repr(C)] struct of plain integers and floats, laid out
        // exactly as the C struct the kernel takes by value (checked by
        // tests/params_layout.rs).
        unsafe impl DeviceRepr for $name {}

        impl $name {
            /// (field name, offset, size) of every field, for the layout test.
            pub const FIELDS: &'static [(&'static str, usize, usize)] = &[
                $((stringify!($field), std::mem::offset_of!($name, $field), std::mem::size_of::<$ty>())),*
            ];
        }
    };
}

params_struct!(
    /// `y = x w^T + scale (x a^T) b^T (+ beta y)`; see `FusedForwardParams` in lk_params.h.
    FusedForwardParams {
        x: u64, w: u64, a: u64, b: u64, y: u64,
        t_out: u64,
        m: i32, n: i32, k: i32, r: i32,
        scale: f32, beta: f32,
    }
);

params_struct!(
    /// Multi-adapter forward; see `MultiAdapterParams` in lk_params.h.
    MultiAdapterParams {
        x: u64, w: u64, a_pool: u64, b_pool: u64, slot_rank: u64, slot_scale: u64,
        token_slots: u64, seg_offsets: u64, seg_slots: u64,
        t: u64, counters: u64, bad_ids: u64, y: u64,
        m: i32, n: i32, k: i32, max_rank: i32, slots: i32, segments: i32,
        shrink_blocks: i32,
        beta: f32,
    }
);

params_struct!(
    /// Adapter backward; see `BackwardParams` in lk_params.h.
    BackwardParams {
        g: u64, x: u64, w: u64, a_pool: u64, b_pool: u64, slot_rank: u64, slot_scale: u64, token_slots: u64, t: u64,
        u: u64, dx: u64, da: u64, db: u64, partials: u64,
        m: i32, n: i32, k: i32, max_rank: i32, slots: i32,
        uniform_rank: i32,
        uniform_scale: f32,
        splits: i32, tokens_per_split: i32,
        accumulate: i32,
        deterministic: i32,
        reduce_len: i32,
        reduce_out: u64,
    }
);

params_struct!(
    /// Merge / unmerge; see `MergeParams` in lk_params.h.
    MergeParams {
        w: u64, a: u64, b: u64,
        n: i32, k: i32, r: i32,
        scale: f32,
        sign: f32,
    }
);

params_struct!(
    /// Per-slot optimizer settings; see `SlotOptim` in lk_params.h.
    SlotOptim {
        lr: f32,
        weight_decay: f32,
        max_grad_norm: f32,
        anchor_pull: f32,
        active: i32,
        pad: i32,
    }
);

// SAFETY: plain old data with no padding and no invalid bit patterns.
unsafe impl cudarc::driver::ValidAsZeroBits for SlotOptim {}

params_struct!(
    /// AdamW over a pool's slots; see `AdamWParams` in lk_params.h.
    AdamWParams {
        master_a: u64, master_b: u64, m1_a: u64, m1_b: u64, m2_a: u64, m2_b: u64,
        anchor_a: u64, anchor_b: u64,
        grad_a: u64, grad_b: u64,
        work_a: u64, work_b: u64,
        slot_rank: u64, hyper: u64, step: u64, status: u64, grad_norm: u64,
        n: i32, k: i32, max_rank: i32, slots: i32,
        beta1: f32, beta2: f32, eps: f32,
        pad: i32,
    }
);

params_struct!(
    /// Runtime self-test kernels (kernels/runtime_selftest.cu).
    SelftestParams {
        input: u64, input2: u64, out: u64,
        n: i32, variant: i32,
    }
);

/// (field name, offset, size) of one struct's fields.
pub type FieldLayout = &'static [(&'static str, usize, usize)];

/// Every params struct: (C name, size, fields), for the layout test.
pub const ALL_PARAMS: &[(&str, usize, FieldLayout)] = &[
    (
        "FusedForwardParams",
        std::mem::size_of::<FusedForwardParams>(),
        FusedForwardParams::FIELDS,
    ),
    (
        "SelftestParams",
        std::mem::size_of::<SelftestParams>(),
        SelftestParams::FIELDS,
    ),
];
