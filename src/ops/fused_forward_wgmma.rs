//! The fused forward's prefill on Hopper's wgmma and TMA
//! (`kernels/fused_forward_wgmma.cu`, sm_90a): a producer warpgroup streams
//! x, w and a through TMA, two consumer warpgroups multiply with wgmma, and
//! the expand runs as in the mma.sync kernel. `fused_forward` takes it for
//! a prefill whose tiles fill every SM 4 times (`wgmma_dispatch`), and
//! `LaunchForm::wgmma` forces it; it runs on GPUs of compute capability 9.0
//! and on the host runtime, which emulates the instructions
//! (docs/DESIGN.md section 6).
use super::multi_adapter_forward::OneAdapter;
use super::{KernelElement, check_wgmma, grid};
use crate::device::Device;
use crate::element::DType;
use crate::error::Result;
use crate::launch::{Kernel, LaunchDims, kernel};
use crate::params::FusedWgmmaParams;
use crate::shape::{Dims, invalid};
use crate::tensor_map::{TileMap2d, tensor_map_2d};

kernel!(WGMMA_F16 = lk_fused_forward_wgmma_f16 in "fused_forward_wgmma": FusedWgmmaParams;);
kernel!(WGMMA_BF16 = lk_fused_forward_wgmma_bf16 in "fused_forward_wgmma": FusedWgmmaParams;);

/// The kernel for `dtype` (f16 or bf16; the caller checked which).
pub(crate) fn kernel(dtype: DType) -> &'static Kernel<FusedWgmmaParams> {
    match dtype {
        DType::BF16 => &WGMMA_BF16,
        _ => &WGMMA_F16,
    }
}

/// The kernel's tile (rows of x, columns of y), k-tile, stages and ranks
/// (`WgmmaTiles` and `lk::RC` in the kernel).
const BM: usize = 128;
const BN: usize = 128;
const BK: usize = 64;
const STAGES: usize = 3;
/// The largest rank the kernel takes (one chunk: t stays in registers).
pub(crate) const MAX_RANK: usize = 64;
/// Three warpgroups: the producer and two consumers.
const THREADS: u32 = 384;

/// Dynamic shared memory: 1024 bytes to align the stages, the stages (x,
/// w and a boxes), and the expand's hi, lo, class and weight tiles (rows of
/// 64 + 8 elements).
fn smem_bytes(elem: usize) -> usize {
    let stage = (2 * BM * BK + MAX_RANK * BK) * elem;
    let expand = (3 * BM + BN) * (MAX_RANK + 8) * elem;
    1024 + STAGES * stage + expand
}

/// Launches the wgmma kernel on a persistent grid (at most one block per
/// SM), `col_tiles` column tiles a work unit, `t` saved where `ops.t` is
/// not 0. An error, launching nothing, for a rank above 64,
/// or rows TMA can't read: `k` not a multiple of 8, or x, w or a not 16-byte
/// aligned.
///
/// # Safety
/// `dims` passed `Dims::validate` with `m >= 1`, `ops.rank >= 1`, `T` is f16
/// or bf16, `col_tiles >= 1`, and the addresses are of buffers that live on
/// `dev`'s backend until the launch is queued, with the element counts the
/// kernel indexes: x `m k`, w `n k`, a `rank k`, b `n rank`, y `m n`, t (when
/// not 0) `m rank` f32.
pub(crate) unsafe fn fused_forward_wgmma<T: KernelElement>(
    dev: &Device,
    dims: Dims,
    ops: OneAdapter,
    beta: f32,
    col_tiles: usize,
) -> Result<()> {
    let Dims { m, n, k } = dims;
    check_wgmma(dev, T::DTYPE, "the wgmma kernel")?;
    if ops.rank > MAX_RANK {
        return Err(invalid(
            "rank",
            ops.rank,
            "the wgmma kernel takes ranks up to 64",
        ));
    }
    if !k.is_multiple_of(8) || [ops.x, ops.w, ops.a].iter().any(|p| !p.is_multiple_of(16)) {
        return Err(invalid(
            "k",
            k,
            "the wgmma kernel loads rows of whole 16-byte chunks: k a multiple of 8, x, w and a 16-byte aligned",
        ));
    }
    let map = |ptr: u64, rows: usize, box_rows: usize| {
        let tile = TileMap2d {
            ptr,
            dtype: T::DTYPE,
            rows,
            cols: k,
            box_rows: box_rows as u32,
            box_cols: BK as u32,
            swizzle: 128,
        };
        tensor_map_2d(dev, &tile)
    };
    let params = FusedWgmmaParams {
        x_map: map(ops.x, m, BM)?,
        w_map: map(ops.w, n, BN)?,
        a_map: map(ops.a, ops.rank, MAX_RANK)?,
        b: ops.b,
        y: ops.y,
        t_out: ops.t,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        r: ops.rank as i32,
        scale: ops.scale,
        beta,
        col_tiles: col_tiles as i32,
        pad: 0,
    };
    let kernel = kernel(T::DTYPE);
    // Persistent: at most one block per SM (its shared memory allows no
    // more), each taking work units (a row tile by col_tiles column tiles)
    // until none are left.
    let units = m.div_ceil(BM) * n.div_ceil(BN).div_ceil(col_tiles);
    let launch = LaunchDims {
        grid: grid("m", m, [units.min(dev.sm_count()), 1, 1])?,
        block: [THREADS, 1, 1],
        dynamic_smem_bytes: smem_bytes(T::DTYPE.size()) as u32,
    };
    // SAFETY: the caller's contract gives operands on `dev`'s backend with
    // the element counts the kernel indexes, valid dims and a rank >= 1 of
    // f16/bf16 storage; checked here: rank <= 64 (one chunk, as the kernel
    // assumes), rows TMA can load (k % 8 == 0, 16-byte aligned bases), and
    // tensor maps of exactly those matrices whose boxes are the kernel's
    // (128 rows of x and w, 64 of a, 64 k, 128-byte swizzle: the layout
    // its descriptors read); a 1-D grid of at least one block (m >= 1)
    // whose blocks take the work units covering m x n (a row tile by
    // col_tiles tiles of 128 x 128, each bounded by m and n in the kernel)
    // until none are left, 384 threads and the shared memory the kernel
    // lays out.
    unsafe { kernel.launch(dev, launch, &params) }
}
