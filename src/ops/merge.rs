//! Merge / unmerge: fold an adapter into the base weight, `w <- w +/- s b a`,
//! accumulated in f32 and rounded once to the storage type. Kernel:
//! kernels/merge.cu. Reference: `reference::merge`.
//!
//! How exactly unmerge restores `w`: merge rounds `w + s b a` once; unmerge
//! subtracts the same f32 product and rounds again, so `unmerge(merge(w))`
//! differs from `w` by at most the two roundings: `|w' - w| <= 2 u (|w| +
//! |s b a|)` with u the storage type's unit roundoff (exact for f32 up to f32
//! rounding of the product). Keep the original `w` when bit-exact restoration
//! matters.
use super::{DeviceAdapter, KernelElement, check_output, in_ptr, out_ptr};
use crate::buffer::BufMut;
use crate::device::Device;
use crate::element::DType;
use crate::error::Result;
use crate::launch::{LaunchDims, kernel};
use crate::params::MergeParams;
use crate::reference::MergeOp;
use crate::shape::Dims;

kernel!(MERGE_F32 = lk_merge_f32 in "merge": MergeParams;);
kernel!(MERGE_F16 = lk_merge_f16 in "merge": MergeParams;);
kernel!(MERGE_BF16 = lk_merge_bf16 in "merge": MergeParams;);

const THREADS: u32 = 256;

/// `w` (`[n, k]`) <- `w + s b a` (Merge) or `w - s b a` (Unmerge), in place.
pub fn merge<'a, T: KernelElement>(
    dev: &Device,
    n: usize,
    k: usize,
    w: impl Into<BufMut<'a, T>>,
    adapter: &DeviceAdapter<'_, T>,
    op: MergeOp,
) -> Result<()> {
    let mut w = w.into();
    Dims::new(0, n, k).validate()?;
    if n > u16::MAX as usize {
        return Err(crate::shape::invalid(
            "n",
            n,
            "merge takes at most 65535 rows (one grid row each)",
        ));
    }
    check_output(dev, "w", &w, n, k)?;
    adapter.validate(dev, n, k)?;
    let (pa, _ga) = in_ptr(dev, &adapter.a);
    let (pb, _gb) = in_ptr(dev, &adapter.b);
    let (pw, _gw) = out_ptr(dev, &mut w);
    let params = MergeParams {
        w: pw,
        a: pa,
        b: pb,
        n: n as i32,
        k: k as i32,
        r: adapter.rank as i32,
        scale: adapter.scale,
        sign: if op == MergeOp::Merge { 1.0 } else { -1.0 },
    };
    let kernel = match T::DTYPE {
        DType::F16 => &MERGE_F16,
        DType::BF16 => &MERGE_BF16,
        _ => &MERGE_F32,
    };
    let dims = LaunchDims {
        grid: [k.div_ceil(THREADS as usize) as u32, n as u32, 1],
        block: [THREADS, 1, 1],
        dynamic_smem_bytes: 0,
    };
    // SAFETY: w holds n*k, a r*k and b n*r elements on `dev` (checked above);
    // the grid has a row per c < n (<= 65535) and covers k columns, each
    // thread checking q < k; the pointer guards live past the launch.
    unsafe { kernel.launch(dev, dims, &params) }
}
