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
use crate::shape::Dims;

kernel!(MERGE_F32 = lk_merge_f32 in "merge": MergeParams;);
kernel!(MERGE_F16 = lk_merge_f16 in "merge": MergeParams;);
kernel!(MERGE_BF16 = lk_merge_bf16 in "merge": MergeParams;);

/// Threads per block at most (one column each); fewer for small k, rounded
/// to whole warps.
const MAX_THREADS: usize = 256;
/// Rows of `w` per block (ROWS in kernels/merge.cu): each load of `a` feeds
/// this many rows.
const ROWS_PER_BLOCK: usize = 8;
/// CUDA's limit on grid.y: beyond it the kernel strides over column chunks.
const MAX_GRID_Y: usize = 65535;

/// Threads per block for rows of `k` columns: a column each.
fn threads_for(k: usize) -> usize {
    k.next_multiple_of(32).min(MAX_THREADS)
}

/// The block tile (rows of `w`, columns) of a launch over `k` columns.
pub(crate) fn block_tile(k: usize) -> (usize, usize) {
    (ROWS_PER_BLOCK, threads_for(k))
}

/// Whether to fold an adapter into the base weight or take it back out
/// ([`merge`] on a device, `reference::merge` on the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeOp {
    /// `w <- w + s b a`
    Merge,
    /// `w <- w - s b a`
    Unmerge,
}

/// `w` (`[n, k]`) <- `w + s b a` (Merge) or `w - s b a` (Unmerge), in place.
///
/// Only `dims.n` and `dims.k` are used: a weight has no batch dimension, so
/// `dims.m` is ignored (pass the layer's `Dims` as for the other ops, or `m
/// = 0`). Any n and k that `Dims::validate` accepts (an lm_head's n included).
///
/// ```
/// use lora_kernels::ops::merge::merge;
/// use lora_kernels::{Device, DeviceAdapter, Dims, MergeOp};
///
/// let dev = Device::cuda(0).or_else(|_| Device::host())?;
/// let dims = Dims::new(0, 2, 3); // w [n, k]
/// let w0 = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
/// let mut w = dev.upload(&w0)?;
/// let (a, b) = (dev.upload(&[1.0f32, 0.0, 2.0])?, dev.upload(&[1.0f32, -1.0])?); // rank 1
/// let adapter = DeviceAdapter::new(&a, &b, 1, 0.5);
/// merge(&dev, dims, &mut w, &adapter, MergeOp::Merge)?;
/// // w + 0.5 b a: row 0 gains [0.5, 0, 1], row 1 loses it.
/// assert_eq!(dev.download(&w)?, vec![1.5, 2.0, 4.0, 3.5, 5.0, 5.0]);
/// merge(&dev, dims, &mut w, &adapter, MergeOp::Unmerge)?;
/// assert_eq!(dev.download(&w)?, w0.to_vec());
/// # Ok::<(), lora_kernels::Error>(())
/// ```
pub fn merge<'a, T: KernelElement>(
    dev: &Device,
    dims: Dims,
    w: impl Into<BufMut<'a, T>>,
    adapter: &DeviceAdapter<'_, T>,
    op: MergeOp,
) -> Result<()> {
    let mut w = w.into();
    let Dims { n, k, .. } = dims;
    Dims::new(0, n, k).validate()?;
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
    let threads = threads_for(k);
    let launch = LaunchDims {
        grid: [
            n.div_ceil(ROWS_PER_BLOCK) as u32,
            k.div_ceil(threads).min(MAX_GRID_Y) as u32,
            1,
        ],
        block: [threads as u32, 1, 1],
        dynamic_smem_bytes: 0,
    };
    // SAFETY: w holds n*k, a r*k and b n*r elements on `dev` (checked above);
    // n and k are in 1..=i32::MAX (Dims::validate), so grid.x = n / 8
    // (rounded up) is within CUDA's 2^31 - 1 and grid.y within 1..=65535;
    // block x handles rows 8x .. min(8x + 8, n) only, its threads stride over
    // columns (grid.y * threads apart) while q < k, with 64-bit offsets; the
    // pointer guards live past the launch.
    unsafe { kernel.launch(dev, launch, &params) }
}
