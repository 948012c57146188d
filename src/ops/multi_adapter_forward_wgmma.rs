//! The multi-adapter forward's prefill on Hopper's wgmma and TMA
//! (`kernels/multi_adapter_forward_wgmma.cu`, sm_90a): shrink blocks as in
//! the mma.sync kernel, then tile blocks whose producer warpgroup streams x
//! and w through TMA and whose two consumer warpgroups multiply with wgmma,
//! wait for the shrink and expand the tile's adapters. The multi-adapter
//! forward takes it for a prefill whose tiles fill every SM 4 times
//! (`wgmma_dispatch`), and `LaunchForm::wgmma` forces it; it runs on GPUs
//! of compute capability 9.0 and on the host runtime, which emulates the
//! instructions (docs/DESIGN.md section 6).
use crate::device::Device;
use crate::element::DType;
use crate::error::Result;
use crate::launch::{Kernel, LaunchDims, kernel};
use crate::params::{MultiAdapterParams, MultiAdapterWgmmaParams};
use crate::shape::invalid;
use crate::tensor_map::{TileMap2d, tensor_map_2d};

kernel!(WGMMA_F16 = lk_multi_adapter_wgmma_f16 in "multi_adapter_forward_wgmma": MultiAdapterWgmmaParams;);
kernel!(WGMMA_BF16 = lk_multi_adapter_wgmma_bf16 in "multi_adapter_forward_wgmma": MultiAdapterWgmmaParams;);

/// The kernel for `dtype` (f16 or bf16; the caller checked which).
pub(crate) fn kernel(dtype: DType) -> &'static Kernel<MultiAdapterWgmmaParams> {
    match dtype {
        DType::BF16 => &WGMMA_BF16,
        _ => &WGMMA_F16,
    }
}

/// A tile block's tile of y (rows, columns), its k-tile and stages
/// (`lk::wgmma_tiles::Tiles<4>`), and the expand's rank chunk (`lk::RC`).
pub(crate) const BM: usize = 128;
pub(crate) const BN: usize = 128;
const BK: usize = 64;
const STAGES: usize = 4;
const RC: usize = 64;
/// Three warpgroups: the producer and two consumers (shrink blocks: 12 warps).
pub(crate) const THREADS: u32 = 384;

/// Dynamic shared memory: 1024 bytes to align the stages, the stages (x's
/// and w's boxes), and the expand's hi, lo, class and b tiles (rows of RC
/// + 8: `expand_elems<C, false>` in lk_tile_gemm.cuh).
pub(crate) fn smem_bytes(elem: usize) -> usize {
    let stage = (BM + BN) * BK * elem;
    let expand = (3 * BM + BN) * (RC + 8) * elem;
    1024 + STAGES * stage + expand
}

/// Whether the wgmma kernel can load these operands (the caller checked
/// the device and type with `check_wgmma`): an error naming why not, before
/// anything is written. Rows TMA can load (and the shrink's 16-byte path
/// reads): `k` a multiple of 8, x, w and the pool's a 16-byte aligned.
pub(crate) fn check(k: usize, x: u64, w: u64, a: u64) -> Result<()> {
    if !k.is_multiple_of(8) || [x, w, a].iter().any(|p| !p.is_multiple_of(16)) {
        return Err(invalid(
            "k",
            k,
            "the wgmma kernel loads rows of whole 16-byte chunks: k a multiple of 8, x, w and a 16-byte aligned",
        ));
    }
    Ok(())
}

/// Launches the wgmma kernel over `params` on `grid` (the shrink blocks,
/// then a block per 128 x 128 tile of y).
///
/// # Safety
/// [`check`] passed for these operands on `dev`; `params` is what the
/// multi-adapter kernels read (its buffers live on `dev`'s backend until the
/// launch is queued, with the element counts they index, its counters zero,
/// t holding m x max_rank f32), with `m >= 1`, and `grid` is
/// `params.shrink_blocks` plus the tiles of [`BM`] x [`BN`] covering m x n.
pub(crate) unsafe fn launch(
    dev: &Device,
    dtype: DType,
    params: &MultiAdapterParams,
    grid: [u32; 3],
) -> Result<()> {
    let (m, n, k) = (params.m as usize, params.n as usize, params.k as usize);
    let map = |ptr: u64, rows: usize| {
        let tile = TileMap2d {
            ptr,
            dtype,
            rows,
            cols: k,
            box_rows: BM as u32,
            box_cols: BK as u32,
            swizzle: 128,
        };
        tensor_map_2d(dev, &tile)
    };
    let wgmma = MultiAdapterWgmmaParams {
        x_map: map(params.x, m)?,
        w_map: map(params.w, n)?,
        p: *params,
    };
    let kernel = kernel(dtype);
    let dims = LaunchDims {
        grid,
        block: [THREADS, 1, 1],
        dynamic_smem_bytes: smem_bytes(dtype.size()) as u32,
    };
    // SAFETY: the caller's contract gives the multi-adapter kernels'
    // operands on `dev`'s backend with the counts they index and a grid of
    // shrink blocks then tiles; `check` passed: f16/bf16 storage and rows
    // TMA and the shrink's 16-byte path can load (k % 8 == 0, 16-byte
    // aligned x, w, a); the tensor maps describe exactly x (m x k) and w
    // (n x k) with the kernel's boxes (128 rows of 64 k in the 128-byte
    // swizzle its descriptors read); 384 threads and the shared memory the
    // kernel lays out.
    unsafe { kernel.launch(dev, dims, &wgmma) }
}
