//! The backward's `dx = g w + u a` on Hopper's wgmma and TMA
//! (`kernels/lora_backward_wgmma.cu`, sm_90a): a producer warpgroup streams
//! g and w through TMA, two consumer warpgroups multiply with wgmma (w read
//! MN-major as it lies in memory), and the `u a` expand runs as in the
//! mma.sync kernel, for one adapter or a pool. The backward takes it from
//! 512 tokens where it can run (`wgmma_dispatch`), and
//! `BackwardOptions::wgmma` forces it or keeps it off; it runs on GPUs of
//! compute capability 9.0 and on the host runtime, which emulates the
//! instructions (docs/DESIGN.md section 6).
use super::check_wgmma;
use crate::device::Device;
use crate::element::DType;
use crate::error::Result;
use crate::launch::{Kernel, LaunchDims, kernel};
use crate::params::{BackwardParams, BackwardWgmmaParams};
use crate::shape::{Dims, invalid};
use crate::tensor_map::{TileMap2d, tensor_map_2d};

kernel!(DX_WGMMA_F16 = lk_backward_dx_wgmma_f16 in "lora_backward_wgmma": BackwardWgmmaParams;);
kernel!(DX_WGMMA_BF16 = lk_backward_dx_wgmma_bf16 in "lora_backward_wgmma": BackwardWgmmaParams;);

/// The kernel for `dtype` (f16 or bf16; the caller checked which).
pub(crate) fn kernel(dtype: DType) -> &'static Kernel<BackwardWgmmaParams> {
    match dtype {
        DType::BF16 => &DX_WGMMA_BF16,
        _ => &DX_WGMMA_F16,
    }
}

/// The kernel's tile of dx (rows, columns), its tiles of the reduction over
/// n, its stages (`lk::wgmma_tiles::Tiles<4>`), and the expand's rank chunk
/// (`lk::RC`).
const BM: usize = 128;
const BN: usize = 128;
const BK: usize = 64;
const STAGES: usize = 4;
const RC: usize = 64;
/// w's boxes: 64 columns of k (128-byte rows), two per tile.
const W_BOX_COLS: usize = 64;
/// Three warpgroups: the producer and two consumers.
const THREADS: u32 = 384;

/// Dynamic shared memory: 1024 bytes to align the stages, the stages (g's
/// box, w's two), and the expand's hi, lo and class tiles (rows of RC + 8)
/// and its k-major a tile (`expand_elems<C, true>` in lk_tile_gemm.cuh).
fn smem_bytes(elem: usize) -> usize {
    let stage = (BM * BK + BK * BN) * elem;
    let expand = (3 * BM * (RC + 8) + RC * (BN + 8)) * elem;
    1024 + STAGES * stage + expand
}

/// Whether the wgmma kernel can compute dx here: an error naming why not,
/// for the backward to return before it changes anything. It takes f16 and
/// bf16 on GPUs of compute capability 9.0 and on the host runtime, and rows
/// TMA can load: n and k multiples of 8, g and w (their addresses `g`, `w`)
/// 16-byte aligned.
pub(crate) fn check(dev: &Device, dtype: DType, dims: Dims, g: u64, w: u64) -> Result<()> {
    check_wgmma(dev, dtype, "the wgmma dx")?;
    let Dims { n, k, .. } = dims;
    if !n.is_multiple_of(8)
        || !k.is_multiple_of(8)
        || !g.is_multiple_of(16)
        || !w.is_multiple_of(16)
    {
        return Err(invalid(
            "g",
            format!("n = {n}, k = {k}"),
            "the wgmma dx loads g and w in whole 16-byte chunks: n and k multiples of 8, g and w 16-byte aligned",
        ));
    }
    Ok(())
}

/// Launches the wgmma dx over `params` (everything the other dx kernels
/// read, u computed).
///
/// # Safety
/// [`check`] passed for these operands on `dev`; `dims` are valid with
/// `m >= 1`; `params` holds the addresses of buffers that live on `dev`'s
/// backend until the launch is queued, with the element counts every dx
/// kernel indexes (g m n, w n k, the pool's a, u m max_rank f32, dx m k, the
/// slot tables), and slot ids the kernel range-checks itself.
pub(crate) unsafe fn backward_dx_wgmma(
    dev: &Device,
    dtype: DType,
    dims: Dims,
    params: &BackwardParams,
) -> Result<()> {
    let Dims { m, n, k } = dims;
    let map = |ptr: u64, rows: usize, cols: usize, box_rows: usize, box_cols: usize| {
        let tile = TileMap2d {
            ptr,
            dtype,
            rows,
            cols,
            box_rows: box_rows as u32,
            box_cols: box_cols as u32,
            swizzle: 128,
        };
        tensor_map_2d(dev, &tile)
    };
    let wgmma = BackwardWgmmaParams {
        g_map: map(params.g, m, n, BM, BK)?,
        w_map: map(params.w, n, k, BK, W_BOX_COLS)?,
        p: *params,
    };
    let kernel = kernel(dtype);
    let launch = LaunchDims {
        grid: super::grid("m", m, [k.div_ceil(BN), m.div_ceil(BM), 1])?,
        block: [THREADS, 1, 1],
        dynamic_smem_bytes: smem_bytes(dtype.size()) as u32,
    };
    // SAFETY: the caller's contract gives operands on `dev`'s backend with
    // the element counts the kernel indexes, valid dims with m >= 1, and
    // `check` passed: f16/bf16 storage and rows TMA can load (n, k multiples
    // of 8, 16-byte aligned bases); the tensor maps describe exactly g
    // (m x n) and w (n x k) with the kernel's boxes (128 rows of g, 64 x 64
    // of w, 64-element rows in the 128-byte swizzle its descriptors read);
    // the grid covers dx's m x k in 128 x 128 tiles (within CUDA's limits,
    // else `grid` returned an error), 384 threads and the shared memory the
    // kernel lays out.
    unsafe { kernel.launch(dev, launch, &wgmma) }
}
