//! Fused forward: `y = x w^T + s (x a^T) b^T (+ beta y)` in one launch.
//! Kernel: kernels/fused_forward_simt.cu. Reference: `reference::fused_forward`.
use super::{DeviceAdapter, KernelElement, check_operand, check_output, in_ptr, out_ptr};
use crate::buffer::{BufMut, BufRef};
use crate::device::Device;
use crate::element::DType;
use crate::error::Result;
use crate::launch::{Kernel, LaunchDims, kernel};
use crate::params::FusedForwardParams;
use crate::shape::{Dims, check_finite};

kernel!(SIMT_F32 = lk_fused_forward_simt_f32 in "fused_forward_simt": FusedForwardParams;);
kernel!(SIMT_F16 = lk_fused_forward_simt_f16 in "fused_forward_simt": FusedForwardParams;);
kernel!(SIMT_BF16 = lk_fused_forward_simt_bf16 in "fused_forward_simt": FusedForwardParams;);

/// Tile of `y` one block computes, and its thread count (fused_forward_simt.cu).
const SIMT_BM: usize = 32;
const SIMT_BN: usize = 64;
const SIMT_THREADS: u32 = 256;

/// The fused forward on `dev`. Today this is the SIMT kernel for every shape;
/// the tensor-core decode/prefill kernels will be dispatched from here.
pub fn fused_forward<'a, T: KernelElement>(
    dev: &Device,
    dims: Dims,
    x: impl Into<BufRef<'a, T>>,
    w: impl Into<BufRef<'a, T>>,
    adapter: &DeviceAdapter<'_, T>,
    beta: f32,
    y: impl Into<BufMut<'a, T>>,
) -> Result<()> {
    fused_forward_simt(dev, dims, x, w, adapter, beta, y)
}

/// The plain SIMT kernel (any shape, f32 accumulation). With `beta == 0`, `y`
/// is only written, never read.
pub fn fused_forward_simt<'a, T: KernelElement>(
    dev: &Device,
    dims: Dims,
    x: impl Into<BufRef<'a, T>>,
    w: impl Into<BufRef<'a, T>>,
    adapter: &DeviceAdapter<'_, T>,
    beta: f32,
    y: impl Into<BufMut<'a, T>>,
) -> Result<()> {
    let (x, w, mut y) = (x.into(), w.into(), y.into());
    dims.validate()?;
    check_operand(dev, "x", &x, dims.m, dims.k)?;
    check_operand(dev, "w", &w, dims.n, dims.k)?;
    adapter.validate(dev, dims.n, dims.k)?;
    check_finite("beta", beta)?;
    check_output(dev, "y", &y, dims.m, dims.n)?;
    if dims.m == 0 {
        return Ok(());
    }
    let kernel: &Kernel<FusedForwardParams> = match T::DTYPE {
        DType::F16 => &SIMT_F16,
        DType::BF16 => &SIMT_BF16,
        _ => &SIMT_F32,
    };
    let (px, _gx) = in_ptr(dev, &x);
    let (pw, _gw) = in_ptr(dev, &w);
    let (pa, _ga) = in_ptr(dev, &adapter.a);
    let (pb, _gb) = in_ptr(dev, &adapter.b);
    let (py, _gy) = out_ptr(dev, &mut y);
    let params = FusedForwardParams {
        x: px,
        w: pw,
        a: pa,
        b: pb,
        y: py,
        m: dims.m as i32,
        n: dims.n as i32,
        k: dims.k as i32,
        r: adapter.rank as i32,
        scale: adapter.scale,
        beta,
    };
    let launch = LaunchDims {
        grid: [
            dims.n.div_ceil(SIMT_BN) as u32,
            dims.m.div_ceil(SIMT_BM) as u32,
            1,
        ],
        block: [SIMT_THREADS, 1, 1],
        dynamic_smem_bytes: 0,
    };
    // SAFETY: every operand was checked above to live on `dev`'s backend with
    // exactly the element count the kernel indexes (x m*k, w n*k, a r*k, b n*r,
    // y m*n); m, n, k, r fit i32 (Dims::validate, check_rank); the grid covers
    // m x n with the kernel's 32 x 64 tile and 256-thread block; the pointer
    // guards (_g*) live until after the launch is queued.
    unsafe { kernel.launch(dev, launch, &params) }
}
