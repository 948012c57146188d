//! The Rust mirrors of the kernel parameter structs (src/params.rs) and of the
//! host launch configuration must match the C declarations field for field:
//! sizes and offsets as the C++ compiler lays them out.
use std::ffi::{CString, c_char};

use lora_kernels::launch::LaunchDims;
use lora_kernels::params::ALL_PARAMS;

unsafe extern "C" {
    fn lk_params_layout(
        ty: *const c_char,
        field: *const c_char,
        offset: *mut usize,
        size: *mut usize,
    ) -> i32;
    fn lk_params_field_count(ty: *const c_char) -> usize;
}

fn c_layout(ty: &str, field: &str) -> Option<(usize, usize)> {
    let (ty, field) = (CString::new(ty).unwrap(), CString::new(field).unwrap());
    let (mut offset, mut size) = (0, 0);
    // SAFETY: both strings are NUL-terminated and outlive the call; the
    // function only writes the two out-parameters.
    let found = unsafe { lk_params_layout(ty.as_ptr(), field.as_ptr(), &mut offset, &mut size) };
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
    check("LkHostLaunch", std::mem::size_of::<LaunchDims>(), &fields);
}

#[test]
fn the_check_fails_on_a_wrong_layout() {
    // A mirror with a field at the wrong offset must be told apart.
    let (_, size, fields) = ALL_PARAMS[0];
    let mut wrong = fields.to_vec();
    wrong[1].1 += 4;
    let result = std::panic::catch_unwind(|| check(ALL_PARAMS[0].0, size, &wrong));
    assert!(result.is_err());
}
