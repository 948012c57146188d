//! Kernel parameter structs: the Rust side of `kernels/include/lk_params.h`.
//!
//! The structs are generated from the header by bindgen into
//! `src/params_bindings.rs` (`scripts/gen-params`; the file is committed, and
//! `scripts/check-params-bindings` checks that it is what bindgen makes of the
//! header today). bindgen's compile-time assertions there check the sizes and
//! offsets clang computes; the unit test below checks every size and field
//! offset against the header as compiled by the host C++ compiler.
use cudarc::driver::{DeviceRepr, ValidAsZeroBits};

#[path = "params_bindings.rs"]
mod bindings;

pub use bindings::{
    AdamWParams, BackwardParams, BackwardWgmmaParams, FusedForwardParams, FusedWgmmaParams,
    HopperSelftestParams, LkTensorMap, MergeParams, MultiAdapterParams, MultiAdapterWgmmaParams,
    PoolLoadParams, SelftestParams, SlotOptim,
};

/// Every params struct with the names of all its fields (the list must be
/// complete: a destructuring pattern names every field, so a field missing
/// here does not compile). Each struct is `DeviceRepr`, and the layout test
/// checks each of them.
macro_rules! params_structs {
    ($($name:ident { $($field:ident),* $(,)? })*) => {
        $(
            // SAFETY: a #[repr(C)] struct of plain integers and floats that
            // bindgen generated from the C struct the kernel takes by value,
            // laid out as the C compilers lay it out (bindgen's assertions in
            // params_bindings.rs, and the layout test below).
            unsafe impl DeviceRepr for $name {}

            const _: fn($name) = |p| {
                let $name { $($field: _),* } = p;
            };
        )*

        /// Every params struct: (C name, size, fields), for the layout test.
        #[cfg(test)]
        const ALL_PARAMS: &[(&str, usize, FieldLayout)] = &[$(
            (
                stringify!($name),
                size_of::<$name>(),
                &[$((
                    stringify!($field),
                    std::mem::offset_of!($name, $field),
                    field_size(|p: &$name| &p.$field),
                )),*],
            ),
        )*];
    };
}

params_structs! {
    FusedForwardParams { x, w, a, b, y, t_out, m, n, k, r, scale, beta, col_tiles, k_splits, partials, counters }
    MultiAdapterParams {
        x, w, a_pool, b_pool, slot_rank, slot_scale, token_slots, seg_offsets, seg_slots,
        t, counters, bad_ids, y, m, n, k, max_rank, slots, segments, shrink_blocks, beta, k_splits,
        shrink_chunks, partials, split_counters, unit_partials, unit_counters, uniform_rank,
        uniform_scale,
    }
    BackwardParams {
        g, x, w, a_pool, b_pool, slot_rank, slot_scale, token_slots, t, u, dx, da, db, partials,
        first_token, m, n, k, max_rank, slots, uniform_rank, uniform_scale, splits, tokens_per_split,
        accumulate, deterministic, reduce_len, reduce_out, grad_stats, tile_counters, tile_cols,
        reduce_db,
    }
    MergeParams { w, a, b, n, k, r, scale, sign }
    PoolLoadParams { a, b, pool_b, stats, a_len, n, rank, max_rank, pad }
    SlotOptim { lr, weight_decay, max_grad_norm, anchor_pull, active, pad }
    AdamWParams {
        master_a, master_b, m1_a, m1_b, m2_a, m2_b, anchor_a, anchor_b, grad_a, grad_b,
        work_a, work_b, slot_rank, hyper, step, status, grad_norm, state_bound, anchor_bound,
        grad_stats_a, grad_stats_b, tiles_a, tiles_b, n, k, max_rank, slots,
        beta1, beta2, eps, pad,
    }
    SelftestParams { input, input2, out, n, variant }
    LkTensorMap { opaque }
    BackwardWgmmaParams { g_map, w_map, p }
    FusedWgmmaParams {
        x_map, w_map, a_map, b, y, t_out, m, n, k, r, scale, beta, col_tiles, pad,
    }
    MultiAdapterWgmmaParams { x_map, w_map, p }
    HopperSelftestParams { a_map, b_map, a, b, out, n, k, b_rows, swizzle, variant, b_mn_major }
}

// SAFETY: four f32 and two i32 with no padding (24 bytes, checked by the
// layout test): every bit pattern, all zeros included, is a valid value.
unsafe impl ValidAsZeroBits for SlotOptim {}

/// (field name, offset, size) of every field of one struct.
#[cfg(test)]
type FieldLayout = &'static [(&'static str, usize, usize)];

/// The size of the field that `field` projects to.
#[cfg(test)]
const fn field_size<T, F>(_field: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// The Rust structs against `kernels/host/lk_params_layout.cpp`: the header's
/// layouts as the host C++ compiler sees them.
#[cfg(all(test, feature = "host"))]
mod tests {
    use std::ffi::{CString, c_char};

    use super::ALL_PARAMS;
    use crate::launch::LaunchDims;

    unsafe extern "C" {
        fn lk_params_layout(
            ty: *const c_char,
            field: *const c_char,
            offset: *mut usize,
            size: *mut usize,
        ) -> i32;
        fn lk_params_field_count(ty: *const c_char) -> usize;
        fn lk_params_struct_count() -> usize;
    }

    fn c_layout(ty: &str, field: &str) -> Option<(usize, usize)> {
        let (ty, field) = (CString::new(ty).unwrap(), CString::new(field).unwrap());
        let (mut offset, mut size) = (0, 0);
        // SAFETY: both strings are NUL-terminated and outlive the call; the
        // function only writes the two out-parameters.
        let found =
            unsafe { lk_params_layout(ty.as_ptr(), field.as_ptr(), &mut offset, &mut size) };
        (found == 1).then_some((offset, size))
    }

    fn check(ty: &str, size: usize, fields: &[(&str, usize, usize)]) {
        assert_eq!(
            c_layout(ty, ""),
            Some((0, size)),
            "sizeof({ty}) differs between C and Rust"
        );
        let ty_c = CString::new(ty).unwrap();
        // SAFETY: NUL-terminated string that outlives the call.
        let c_fields = unsafe { lk_params_field_count(ty_c.as_ptr()) };
        assert_eq!(
            c_fields,
            fields.len(),
            "{ty}: C lists {c_fields} fields, Rust {}",
            fields.len()
        );
        for &(name, offset, size) in fields {
            assert_eq!(
                c_layout(ty, name),
                Some((offset, size)),
                "{ty}.{name}: (offset, size) differ between C and Rust"
            );
        }
    }

    #[test]
    fn params_structs_match_the_c_header() {
        for &(ty, size, fields) in ALL_PARAMS {
            check(ty, size, fields);
        }
        // Every struct of the C table is checked: the params structs and the
        // host launch configuration (below).
        // SAFETY: no arguments; returns a count.
        let c_structs = unsafe { lk_params_struct_count() };
        assert_eq!(c_structs, ALL_PARAMS.len() + 1);
    }

    #[test]
    fn host_launch_config_matches_the_runtime() {
        let fields = [
            ("grid", std::mem::offset_of!(LaunchDims, grid), 12),
            ("block", std::mem::offset_of!(LaunchDims, block), 12),
            (
                "dynamic_smem_bytes",
                std::mem::offset_of!(LaunchDims, dynamic_smem_bytes),
                4,
            ),
        ];
        check("LkHostLaunch", size_of::<LaunchDims>(), &fields);
    }

    #[test]
    fn the_check_fails_on_a_wrong_layout() {
        // A mirror with a field at the wrong offset must be told apart.
        let (ty, size, fields) = ALL_PARAMS[0];
        let mut wrong = fields.to_vec();
        wrong[1].1 += 4;
        let result = std::panic::catch_unwind(|| check(ty, size, &wrong));
        assert!(result.is_err());
    }
}
