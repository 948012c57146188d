//! Fused forward: `y = x w^T + s (x a^T) b^T (+ beta y)` in one launch.
//! Kernels: kernels/fused_forward_simt.cu (any type, the plain reference
//! kernel) and kernels/fused_forward_mma.cu (f16/bf16 on tensor cores: decode
//! tiles of two pipeline depths, split-K for a small `n`, and a prefill tile
//! shape). A prefill launch, and a decode launch of up to 64 tokens at ranks
//! up to 64, run on the multi-adapter kernel instead
//! (kernels/multi_adapter_forward.cu, every token on the one adapter), which
//! computes `t = x a^T` once for the launch where the fused kernel computes
//! it in every column tile (at prefill, once per block of `col_tiles`). On a
//! GPU of compute capability 9.0 (and the host runtime) a prefill whose
//! 128 x 128 tiles fill every SM 4 times runs on kernels/fused_forward_wgmma.cu
//! (`wgmma_dispatch`). Reference: `reference::fused_forward`.
use super::fused_forward_wgmma::{self, fused_forward_wgmma};
use super::multi_adapter_forward::{OneAdapter, one_adapter_fits, one_adapter_forward};
use super::split_k::{self, workspace, workspace_ptrs};
use super::{
    DeviceAdapter, KernelElement, check_operand, check_output, grid, in_ptr, out_ptr,
    wgmma_dispatch,
};
use crate::buffer::{BufMut, BufRef};
use crate::device::Device;
use crate::element::DType;
use crate::error::Result;
use crate::launch::{Kernel, LaunchDims, kernel};
use crate::params::FusedForwardParams;
use crate::shape::{Dims, check_finite, invalid};

use super::tiles::{
    DECODE, DECODE_WIDE, FUSED_PREFILL, PREFILL_COL_TILES, RANK_CHUNK, SIMT, STATIC_SMEM_MARGIN,
    fused_decode_tiles,
};

kernel!(SIMT_F32 = lk_fused_forward_simt_f32 in "fused_forward_simt": FusedForwardParams;);
kernel!(SIMT_F16 = lk_fused_forward_simt_f16 in "fused_forward_simt": FusedForwardParams;);
kernel!(SIMT_BF16 = lk_fused_forward_simt_bf16 in "fused_forward_simt": FusedForwardParams;);
kernel!(DECODE_F16_ALIGNED = lk_fused_forward_decode_f16_aligned in "fused_forward_mma": FusedForwardParams;);
kernel!(DECODE_F16_ANY = lk_fused_forward_decode_f16_any in "fused_forward_mma": FusedForwardParams;);
kernel!(DECODE_BF16_ALIGNED = lk_fused_forward_decode_bf16_aligned in "fused_forward_mma": FusedForwardParams;);
kernel!(DECODE_BF16_ANY = lk_fused_forward_decode_bf16_any in "fused_forward_mma": FusedForwardParams;);
kernel!(DECODE_WIDE_F16_ALIGNED = lk_fused_forward_decode_wide_f16_aligned in "fused_forward_mma": FusedForwardParams;);
kernel!(DECODE_WIDE_F16_ANY = lk_fused_forward_decode_wide_f16_any in "fused_forward_mma": FusedForwardParams;);
kernel!(DECODE_WIDE_BF16_ALIGNED = lk_fused_forward_decode_wide_bf16_aligned in "fused_forward_mma": FusedForwardParams;);
kernel!(DECODE_WIDE_BF16_ANY = lk_fused_forward_decode_wide_bf16_any in "fused_forward_mma": FusedForwardParams;);
kernel!(DECODE_DEEP_F16_ALIGNED = lk_fused_forward_decode_deep_f16_aligned in "fused_forward_mma": FusedForwardParams;);
kernel!(DECODE_DEEP_F16_ANY = lk_fused_forward_decode_deep_f16_any in "fused_forward_mma": FusedForwardParams;);
kernel!(DECODE_DEEP_BF16_ALIGNED = lk_fused_forward_decode_deep_bf16_aligned in "fused_forward_mma": FusedForwardParams;);
kernel!(DECODE_DEEP_BF16_ANY = lk_fused_forward_decode_deep_bf16_any in "fused_forward_mma": FusedForwardParams;);
kernel!(DECODE_WIDE_DEEP_F16_ALIGNED = lk_fused_forward_decode_wide_deep_f16_aligned in "fused_forward_mma": FusedForwardParams;);
kernel!(DECODE_WIDE_DEEP_F16_ANY = lk_fused_forward_decode_wide_deep_f16_any in "fused_forward_mma": FusedForwardParams;);
kernel!(DECODE_WIDE_DEEP_BF16_ALIGNED = lk_fused_forward_decode_wide_deep_bf16_aligned in "fused_forward_mma": FusedForwardParams;);
kernel!(DECODE_WIDE_DEEP_BF16_ANY = lk_fused_forward_decode_wide_deep_bf16_any in "fused_forward_mma": FusedForwardParams;);
kernel!(PREFILL_F16_ALIGNED = lk_fused_forward_prefill_f16_aligned in "fused_forward_mma": FusedForwardParams;);
kernel!(PREFILL_F16_ANY = lk_fused_forward_prefill_f16_any in "fused_forward_mma": FusedForwardParams;);
kernel!(PREFILL_BF16_ALIGNED = lk_fused_forward_prefill_bf16_aligned in "fused_forward_mma": FusedForwardParams;);
kernel!(PREFILL_BF16_ANY = lk_fused_forward_prefill_bf16_any in "fused_forward_mma": FusedForwardParams;);

/// Which kernel computes the fused forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Regime {
    /// Plain SIMT, any storage type (the only one for f32).
    Simt,
    /// Tensor cores, small m, bandwidth-bound: 16-row tiles up to m = 16, above
    /// that 64-row tiles (one block covers m <= 64, so `w` streams once); deep
    /// pipelines (more of `w` in flight) where the device's blocks may have
    /// their shared memory, with the same results.
    Decode,
    /// Tensor cores, warps of 64 x 64 on 128 x 256 tiles (the multi-adapter
    /// forward's and `dx`'s: 128 x 128): large m, compute-bound.
    Prefill,
}

/// Largest m the dispatcher sends to the decode kernel.
pub const DECODE_MAX_M: usize = 64;

/// The regime [`fused_forward`] picks for a shape and type.
pub fn regime_for(dtype: DType, m: usize) -> Regime {
    match dtype {
        DType::F16 | DType::BF16 if m <= DECODE_MAX_M => Regime::Decode,
        DType::F16 | DType::BF16 => Regime::Prefill,
        _ => Regime::Simt,
    }
}

/// The fused forward on `dev`, in the regime [`regime_for`] picks: tensor cores
/// for f16/bf16 (decode tiles up to m = 64, prefill tiles above), SIMT for f32.
/// With `beta == 0`, `y` is only written, never read.
///
/// At decode, where `n` gives fewer column tiles than the GPU has SMs, the
/// k-loop is split across blocks (split-K), and prefill and decode up to 64
/// tokens at ranks up to 64 compute `t` once for the launch (module docs),
/// through a workspace that `dev`'s stream keeps: a CUDA graph that captured
/// such a launch must not run concurrently with other work of that stream,
/// and a launch captured before the stream has a large enough workspace runs
/// without them (docs/DESIGN.md section 13).
///
/// ```
/// use half::bf16;
/// use lora_kernels::ops::fused_forward::fused_forward;
/// use lora_kernels::{Device, DeviceAdapter, Dims, Element, reference};
///
/// let dev = Device::cuda(0).or_else(|_| Device::host())?;
/// let (dims, rank, scale) = (Dims::new(3, 40, 24), 4, 0.5);
/// let data = |len: usize, seed: usize| -> Vec<bf16> {
///     (0..len).map(|i| bf16::from_f32(((i * 7 + seed) % 13) as f32 / 13.0 - 0.5)).collect()
/// };
/// let (x, w) = (data(dims.m * dims.k, 1), data(dims.n * dims.k, 2));
/// let (a, b) = (data(rank * dims.k, 3), data(dims.n * rank, 4));
///
/// let (xd, wd) = (dev.upload(&x)?, dev.upload(&w)?);
/// let (ad, bd) = (dev.upload(&a)?, dev.upload(&b)?);
/// let mut yd = dev.zeros::<bf16>(dims.m * dims.n)?;
/// let adapter = DeviceAdapter::new(&ad, &bd, rank, scale);
/// fused_forward(&dev, dims, &xd, &wd, &adapter, 0.0, &mut yd)?;
///
/// // The CPU reference: f64 accumulation, one rounding.
/// let mut want = vec![bf16::ZERO; dims.m * dims.n];
/// let host_adapter = reference::Adapter { a: &a, b: &b, rank, scale };
/// reference::fused_forward(dims, &x, &w, &host_adapter, 0.0, &mut want)?;
/// for (got, want) in dev.download(&yd)?.iter().zip(&want) {
///     // f32 accumulation and one rounding to bf16 (2^-8 relative).
///     assert!((got.to_f64() - want.to_f64()).abs() <= 1e-2 * (want.to_f64().abs() + 0.1));
/// }
/// # Ok::<(), lora_kernels::Error>(())
/// ```
pub fn fused_forward<'a, T: KernelElement>(
    dev: &Device,
    dims: Dims,
    x: impl Into<BufRef<'a, T>>,
    w: impl Into<BufRef<'a, T>>,
    adapter: &DeviceAdapter<'_, T>,
    beta: f32,
    y: impl Into<BufMut<'a, T>>,
) -> Result<()> {
    let regime = regime_for(T::DTYPE, dims.m);
    fused_forward_in(regime, dev, dims, x, w, adapter, beta, y)
}

/// The fused forward in a chosen regime (for tests and benchmarks). The
/// tensor-core regimes take f16/bf16 only.
#[allow(clippy::too_many_arguments)] // the op's operands plus the regime
pub fn fused_forward_in<'a, T: KernelElement>(
    regime: Regime,
    dev: &Device,
    dims: Dims,
    x: impl Into<BufRef<'a, T>>,
    w: impl Into<BufRef<'a, T>>,
    adapter: &DeviceAdapter<'_, T>,
    beta: f32,
    y: impl Into<BufMut<'a, T>>,
) -> Result<()> {
    launch(
        regime,
        LaunchForm::default(),
        dev,
        dims,
        (x.into(), w.into()),
        adapter,
        beta,
        (y.into(), None),
    )
}

/// The forward pass of training: `y = x w^T + s (x a^T) b^T` as
/// [`fused_forward`], also saving `t = x a^T` (unscaled, f32, `[m, rank]`)
/// for the backward pass, at no extra pass over `x`.
pub fn fused_forward_saving_t<'a, T: KernelElement>(
    dev: &Device,
    dims: Dims,
    x: impl Into<BufRef<'a, T>>,
    w: impl Into<BufRef<'a, T>>,
    adapter: &DeviceAdapter<'_, T>,
    y: impl Into<BufMut<'a, T>>,
    t: impl Into<BufMut<'a, f32>>,
) -> Result<()> {
    let regime = regime_for(T::DTYPE, dims.m);
    launch(
        regime,
        LaunchForm::default(),
        dev,
        dims,
        (x.into(), w.into()),
        adapter,
        0.0,
        (y.into(), Some(t.into())),
    )
}

/// How a fused forward launch is formed beyond its regime: for tests, and
/// for tuning on a GPU machine ([`fused_forward_tuned`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchForm {
    /// Column tiles per prefill block (decode and SIMT blocks take one), 1
    /// or more: `None` takes the kernel's own count (the fused mma.sync
    /// kernel 1, the wgmma kernel 4 a work unit).
    pub col_tiles: Option<usize>,
    /// The decode pipeline: `None` takes the deep one where the device lets
    /// a block have its shared memory, `Some(deep)` forces a choice (an
    /// error where the deep one does not fit).
    pub deep_decode: Option<bool>,
    /// Decode blocks per output tile, each over its range of `k` (split-K),
    /// and prefill ones where the shared shrink runs it on the multi-adapter
    /// kernel's mma.sync tiles: `None` splits where the tiles are fewer than
    /// the SMs (docs/DESIGN.md section 11), `Some(1)` never, `Some(s)` in `s`
    /// (an error past one split per k-tile or one block per SM). Decode ranks
    /// above 64, the fused kernel's own prefill, the wgmma prefill and SIMT
    /// take no split; a launch that can't have a workspace (a stream being
    /// captured before its first split-K launch) runs unsplit.
    pub k_splits: Option<usize>,
    /// Where a prefill launch, or a decode launch of up to 64 tokens at
    /// ranks up to 64, computes `t = x a^T`: `None` or `Some(true)` once for
    /// the launch, on the multi-adapter kernel with every token on the one
    /// adapter (`Some(true)` elsewhere is an error; `deep_decode` and
    /// `col_tiles` are then the multi-adapter kernel's own choice);
    /// `Some(false)` in the fused kernel's column tiles. A stream being
    /// captured before it has a large enough workspace runs the fused kernel,
    /// as does a prefill whose unsaved `t` would pass 2^24 values.
    pub shared_shrink: Option<bool>,
    /// The shared-shrink decode (up to 64 tokens) on 16-row tiles with `w`
    /// loaded straight into the MMAs' registers (the multi-adapter kernel's
    /// [`direct_loads`](crate::ops::multi_adapter_forward::LaunchForm::direct_loads)):
    /// `k` a multiple of 8 and x, w, a 16-byte aligned; an error for a launch
    /// that does not take the shared shrink at decode, before `y` changes.
    /// `deep_decode` does not apply. Not yet the default: the tuning sweep
    /// (`tour --tune`) decides the dispatch (docs/DESIGN.md section 8).
    pub direct_decode: bool,
    /// A prefill launch on Hopper's wgmma and TMA
    /// (`kernels/fused_forward_wgmma.cu`: GPUs of compute capability 9.0
    /// and the host runtime), `col_tiles` column tiles a work unit.
    /// `Some(true)` forces it: ranks up to 64, `k` a multiple of 8 and x, w,
    /// a 16-byte aligned, else an error; `shared_shrink`, `deep_decode` and
    /// `k_splits` do not apply. `Some(false)` never takes it. `None` takes it
    /// for a prefill it can run whose 128 x 128 tiles fill every SM 4 times
    /// (m = 4096 at n = 4096 on 132 SMs), unless `shared_shrink` or
    /// `k_splits` is forced: the dispatch the first GPU report chose
    /// (`ops::wgmma_dispatch`, docs/DESIGN.md section 8).
    pub wgmma: Option<bool>,
}

impl Default for LaunchForm {
    /// What [`fused_forward`] launches.
    fn default() -> Self {
        LaunchForm {
            col_tiles: None,
            deep_decode: None,
            k_splits: None,
            shared_shrink: None,
            direct_decode: false,
            wgmma: None,
        }
    }
}

/// The fused forward in a chosen regime and launch form, saving `t` when
/// given: for tests, and for tuning on a GPU machine. An error for
/// `col_tiles == 0`, for a deep decode pipeline the device can't fit, and
/// for a split count the launch can't take.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)] // the op's operands plus the launch form
pub fn fused_forward_tuned<T: KernelElement>(
    regime: Regime,
    form: LaunchForm,
    dev: &Device,
    dims: Dims,
    (x, w): (BufRef<'_, T>, BufRef<'_, T>),
    adapter: &DeviceAdapter<'_, T>,
    beta: f32,
    (y, t): (BufMut<'_, T>, Option<BufMut<'_, f32>>),
) -> Result<()> {
    launch(regime, form, dev, dims, (x, w), adapter, beta, (y, t))
}

#[allow(clippy::too_many_arguments)] // the op's operands plus the launch form
fn launch<T: KernelElement>(
    regime: Regime,
    form: LaunchForm,
    dev: &Device,
    dims: Dims,
    (x, w): (BufRef<'_, T>, BufRef<'_, T>),
    adapter: &DeviceAdapter<'_, T>,
    beta: f32,
    (mut y, mut t_out): (BufMut<'_, T>, Option<BufMut<'_, f32>>),
) -> Result<()> {
    dims.validate()?;
    check_operand(dev, "x", &x, dims.m, dims.k)?;
    check_operand(dev, "w", &w, dims.n, dims.k)?;
    adapter.validate(dev, dims.n, dims.k)?;
    check_finite("beta", beta)?;
    check_output(dev, "y", &y, dims.m, dims.n)?;
    if let Some(t) = &t_out {
        check_output(dev, "t", t, dims.m, adapter.rank)?;
    }
    if let Some(c) = form.col_tiles.filter(|&c| c == 0 || c > i32::MAX as usize) {
        return Err(invalid(
            "col_tiles",
            c,
            "column tiles per block: 1 ..= i32::MAX",
        ));
    }
    if dims.m == 0 {
        return Ok(());
    }
    if regime != Regime::Simt && !matches!(T::DTYPE, DType::F16 | DType::BF16) {
        return Err(invalid(
            "regime",
            format!("{regime:?}"),
            "tensor-core kernels take f16 or bf16 storage",
        ));
    }
    let (px, _gx) = in_ptr(dev, &x);
    let (pw, _gw) = in_ptr(dev, &w);
    let (pa, _ga) = in_ptr(dev, &adapter.a);
    let (pb, _gb) = in_ptr(dev, &adapter.b);
    let (py, _gy) = out_ptr(dev, &mut y);
    let (pt, _gt) = t_out.as_mut().map_or((0, None), |t| out_ptr(dev, t));
    let ops = OneAdapter {
        x: px,
        w: pw,
        a: pa,
        b: pb,
        y: py,
        t: pt,
        rank: adapter.rank,
        scale: adapter.scale,
    };
    if form.direct_decode && (form.wgmma == Some(true) || regime != Regime::Decode) {
        return Err(direct_decode_error(regime, dims, adapter.rank));
    }
    // 16-byte loads need rows of whole 16-byte chunks and aligned bases.
    let aligned = dims.k.is_multiple_of(8) && [px, pw, pa].iter().all(|p| p.is_multiple_of(16));
    if form
        .wgmma
        .unwrap_or_else(|| takes_wgmma::<T>(regime, form, dev, dims, &ops, aligned))
    {
        if regime != Regime::Prefill {
            return Err(invalid(
                "regime",
                format!("{regime:?}"),
                "the wgmma kernel serves the prefill regime",
            ));
        }
        // SAFETY: the operands were checked above to live on `dev`'s backend
        // with the element counts the kernel indexes (x m*k, w n*k, a r*k, b
        // n*r, y m*n, t m*r when saved), dims are valid with m >= 1, the rank
        // is >= 1 (adapter.validate), the type is f16/bf16 (tensor-core
        // regimes, above), col_tiles >= 1 (checked above), and the pointer
        // guards (_g*) live until after the launch is queued.
        let col_tiles = form.col_tiles.unwrap_or(wgmma_dispatch::FUSED_COL_TILES);
        return unsafe { fused_forward_wgmma::<T>(dev, dims, ops, beta, col_tiles) };
    }
    let shared = shared_shrink(regime, form, dims, adapter.rank, pt != 0)?;
    if form.direct_decode && !shared {
        return Err(direct_decode_error(regime, dims, adapter.rank));
    }
    if form.direct_decode && !aligned {
        return Err(invalid(
            "direct_decode",
            true,
            format!(
                "direct loads take k a multiple of 8 and x, w and a 16-byte aligned; k = {}",
                dims.k
            ),
        ));
    }
    if shared {
        // SAFETY: the operands were checked above to live on `dev`'s backend
        // with the element counts the kernel indexes (x m*k, w n*k, a r*k, b
        // n*r, y m*n, t m*r when saved), dims are valid, the rank is >= 1
        // (adapter.validate), the type is f16/bf16 (tensor-core regimes,
        // above) and one_adapter_fits holds (shared_shrink), and the pointer
        // guards (_g*) live until after the launch is queued.
        let split_and_loads = (form.k_splits, form.direct_decode);
        if unsafe { one_adapter_forward::<T>(regime, dev, dims, ops, beta, split_and_loads) }? {
            return Ok(());
        }
    }
    let (kernel, mut launch) = select(
        regime,
        T::DTYPE,
        aligned,
        dims,
        adapter.rank,
        form,
        dev.max_block_smem(),
    )?;
    let sm_count = dev.sm_count();
    let tiles = launch.grid[0] as usize * launch.grid[1] as usize;
    let splits = k_splits(regime, dims, adapter.rank, form.k_splits, tiles, sm_count)?;
    let (splits, mut scratch) = workspace(dev, splits)?;
    launch.grid[2] = splits as u32;
    let (partials, counters, _gs) = workspace_ptrs(dev, &mut scratch);
    let params = FusedForwardParams {
        x: px,
        w: pw,
        a: pa,
        b: pb,
        y: py,
        t_out: pt,
        m: dims.m as i32,
        n: dims.n as i32,
        k: dims.k as i32,
        r: adapter.rank as i32,
        scale: adapter.scale,
        beta,
        col_tiles: form.col_tiles.unwrap_or(PREFILL_COL_TILES) as i32,
        k_splits: splits as i32,
        partials,
        counters,
    };
    // SAFETY: every operand was checked above to live on `dev`'s backend with
    // exactly the element count the kernel indexes (x m*k, w n*k, a r*k, b n*r,
    // y m*n, t m*r when saved); m, n, k, r fit i32 (Dims::validate, check_rank); `select` gives
    // the grid covering m x n with the kernel's tile (a prefill block
    // covering col_tiles >= 1 tiles side by side, the last block of a row
    // stopping at n; within CUDA's grid
    // limits, else it returned an error), its block size and its shared
    // memory for this rank (a deep decode pipeline only within the device's
    // per-block limit); the 16-byte path is taken only when k and
    // the bases allow it; split-K (grid.z = splits > 1: decode, one chunk of
    // ranks, splits <= k-tiles, tiles x splits <= sm_count, `k_splits`) has
    // a workspace of split_k_scratch_len(sm_count) values, partial sums
    // first and the counters, zero between launches, at split_k_counters_at;
    // the pointer guards (_g*) live until after the launch is queued.
    unsafe { kernel.launch(dev, launch, &params) }
}

/// Whether a launch that leaves the kernel to the dispatch
/// ([`LaunchForm::wgmma`] `None`) takes the wgmma prefill: a prefill the
/// kernel can run (`aligned`: k a multiple of 8, x, w and a 16-byte aligned;
/// ranks up to 64) whose tiles fill the SMs (`wgmma_dispatch`), on a
/// device that runs it, where the form forces nothing of the other kernels.
fn takes_wgmma<T: KernelElement>(
    regime: Regime,
    form: LaunchForm,
    dev: &Device,
    dims: Dims,
    ops: &OneAdapter,
    aligned: bool,
) -> bool {
    regime == Regime::Prefill
        && aligned
        && ops.rank <= fused_forward_wgmma::MAX_RANK
        && form.shared_shrink.is_none()
        && form.k_splits.is_none()
        && wgmma_dispatch::prefill_fills(dims.m, dims.n, dev.sm_count())
        && wgmma_dispatch::runs(dev, T::DTYPE, fused_forward_wgmma::kernel(T::DTYPE))
}

/// [`LaunchForm::direct_decode`] asked of a launch that is not a
/// shared-shrink decode.
fn direct_decode_error(regime: Regime, dims: Dims, rank: usize) -> crate::error::Error {
    invalid(
        "direct_decode",
        true,
        format!(
            "direct loads serve the shared-shrink decode (up to {} tokens at ranks up to \
             {RANK_CHUNK}, not on the wgmma kernel), not {regime:?} with m = {} at rank {rank}",
            DECODE_WIDE.bm, dims.m
        ),
    )
}

/// Whether a launch computes `t` once on the multi-adapter kernel
/// ([`LaunchForm::shared_shrink`]): where asked, or by default where it
/// applies (`one_adapter_fits`: prefill, and decode with one row of tiles
/// and one chunk of ranks); an error where asked elsewhere.
fn shared_shrink(
    regime: Regime,
    form: LaunchForm,
    dims: Dims,
    rank: usize,
    saves_t: bool,
) -> Result<bool> {
    let fits = one_adapter_fits(regime, dims.m, rank, saves_t);
    match form.shared_shrink {
        Some(true) if !fits => Err(invalid(
            "shared_shrink",
            true,
            format!(
                "the shared shrink takes prefill launches (m x rank up to 2^24 unless t is \
                 saved) and decode launches of up to {} tokens at ranks up to {RANK_CHUNK}, not \
                 {regime:?} with m = {} at rank {rank}",
                DECODE_WIDE.bm, dims.m
            ),
        )),
        Some(asked) => Ok(asked),
        None => Ok(fits),
    }
}

/// Blocks per tile (split-K) for a launch of `tiles` tiles on `sm_count`
/// SMs: `forced` (checked), or split where the SMs would idle at decode with
/// one chunk of ranks (the tile's last block expands one chunk), else 1.
fn k_splits(
    regime: Regime,
    dims: Dims,
    rank: usize,
    forced: Option<usize>,
    tiles: usize,
    sm_count: usize,
) -> Result<usize> {
    split_k::k_splits(
        regime == Regime::Decode && rank <= RANK_CHUNK,
        format_args!("decode launches of ranks up to {RANK_CHUNK}"),
        forced,
        tiles,
        dims.k.div_ceil(DECODE.bk),
        sm_count,
    )
}

/// The kernel entry point and launch shape for a regime, type and alignment
/// on a device whose blocks may take `max_smem` bytes of shared memory; an
/// error when m needs more row tiles than grid.y takes, or when a forced deep
/// decode pipeline does not fit.
fn select(
    regime: Regime,
    dtype: DType,
    aligned: bool,
    dims: Dims,
    rank: usize,
    form: LaunchForm,
    max_smem: usize,
) -> Result<(&'static Kernel<FusedForwardParams>, LaunchDims)> {
    // `per_block` column tiles of `bn` per block.
    let grid = |bm: usize, bn: usize, per_block: usize| {
        let x = dims.n.div_ceil(bn).div_ceil(per_block);
        grid("m", dims.m, [x, dims.m.div_ceil(bm), 1])
    };
    let bf16 = dtype == DType::BF16;
    let (kernel, tiles, per_block) = match regime {
        Regime::Simt => {
            let kernel = match dtype {
                DType::F16 => &SIMT_F16,
                DType::BF16 => &SIMT_BF16,
                _ => &SIMT_F32,
            };
            let launch = LaunchDims {
                grid: grid(SIMT.bm, SIMT.bn, 1)?,
                block: [SIMT.threads, 1, 1],
                dynamic_smem_bytes: 0,
            };
            return Ok((kernel, launch));
        }
        Regime::Decode => {
            let deep_tiles = fused_decode_tiles(dims.m, true);
            let need =
                deep_tiles.smem_bytes(deep_tiles.shrink_rows(rank)) as usize + STATIC_SMEM_MARGIN;
            let deep = match form.deep_decode {
                None => need <= max_smem,
                Some(true) if need > max_smem => {
                    return Err(invalid(
                        "deep_decode",
                        true,
                        format!(
                            "the deep decode pipeline takes {need} bytes of shared memory per block at \
                             rank {rank}; this device allows {max_smem}"
                        ),
                    ));
                }
                Some(deep) => deep,
            };
            let tiles = fused_decode_tiles(dims.m, deep);
            let wide = tiles.bm == DECODE_WIDE.bm;
            let kernel = match (wide, deep, bf16, aligned) {
                (false, false, false, true) => &DECODE_F16_ALIGNED,
                (false, false, false, false) => &DECODE_F16_ANY,
                (false, false, true, true) => &DECODE_BF16_ALIGNED,
                (false, false, true, false) => &DECODE_BF16_ANY,
                (true, false, false, true) => &DECODE_WIDE_F16_ALIGNED,
                (true, false, false, false) => &DECODE_WIDE_F16_ANY,
                (true, false, true, true) => &DECODE_WIDE_BF16_ALIGNED,
                (true, false, true, false) => &DECODE_WIDE_BF16_ANY,
                (false, true, false, true) => &DECODE_DEEP_F16_ALIGNED,
                (false, true, false, false) => &DECODE_DEEP_F16_ANY,
                (false, true, true, true) => &DECODE_DEEP_BF16_ALIGNED,
                (false, true, true, false) => &DECODE_DEEP_BF16_ANY,
                (true, true, false, true) => &DECODE_WIDE_DEEP_F16_ALIGNED,
                (true, true, false, false) => &DECODE_WIDE_DEEP_F16_ANY,
                (true, true, true, true) => &DECODE_WIDE_DEEP_BF16_ALIGNED,
                (true, true, true, false) => &DECODE_WIDE_DEEP_BF16_ANY,
            };
            (kernel, tiles, 1)
        }
        Regime::Prefill => {
            let kernel = match (bf16, aligned) {
                (false, true) => &PREFILL_F16_ALIGNED,
                (false, false) => &PREFILL_F16_ANY,
                (true, true) => &PREFILL_BF16_ALIGNED,
                (true, false) => &PREFILL_BF16_ANY,
            };
            (
                kernel,
                &FUSED_PREFILL,
                form.col_tiles.unwrap_or(PREFILL_COL_TILES),
            )
        }
    };
    let launch = LaunchDims {
        grid: grid(tiles.bm, tiles.bn, per_block)?,
        block: [tiles.threads, 1, 1],
        dynamic_smem_bytes: tiles.smem_bytes(tiles.shrink_rows(rank)),
    };
    Ok((kernel, launch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::SM90_MAX_BLOCK_SMEM;

    /// Shared memory a block of sm_80 may opt in to (163 KiB).
    const SM80: usize = 163 * 1024;
    /// ... and of sm_86 / sm_89 (99 KiB).
    const SM86: usize = 99 * 1024;

    fn decode(
        m: usize,
        rank: usize,
        deep: Option<bool>,
        max_smem: usize,
    ) -> Result<(&'static str, u32)> {
        let form = LaunchForm {
            deep_decode: deep,
            ..LaunchForm::default()
        };
        let dims = Dims::new(m, 4096, 4096);
        let (kernel, launch) = select(
            Regime::Decode,
            DType::BF16,
            true,
            dims,
            rank,
            form,
            max_smem,
        )?;
        Ok((kernel.name, launch.dynamic_smem_bytes))
    }

    /// Split-K where a decode launch's tiles are fewer than the SMs: enough
    /// splits to give each SM a block, at most 8 and at least 4 k-tiles each;
    /// none for ranks above 64, at prefill or where the tiles fill the GPU.
    #[test]
    fn decode_splits_k_where_the_tiles_leave_sms_idle() {
        let auto = |regime, m, n: usize, k, r| {
            let tiles = n.div_ceil(32);
            k_splits(regime, Dims::new(m, n, k), r, None, tiles, 132).unwrap()
        };
        assert_eq!(auto(Regime::Decode, 1, 1024, 4096, 16), 4); // 32 tiles
        assert_eq!(auto(Regime::Decode, 64, 2048, 4096, 64), 2); // 64 tiles
        assert_eq!(auto(Regime::Decode, 1, 512, 4096, 16), 8); // 16 tiles, 8 at most
        assert_eq!(auto(Regime::Decode, 1, 512, 1024, 16), 4); // 16 k-tiles: 4 each
        assert_eq!(auto(Regime::Decode, 1, 4096, 4096, 16), 1); // 128 tiles
        assert_eq!(auto(Regime::Decode, 1, 14336, 4096, 16), 1);
        assert_eq!(auto(Regime::Decode, 1, 1024, 4096, 65), 1); // two chunks of ranks
        assert_eq!(auto(Regime::Decode, 1, 1024, 200, 16), 1); // 4 k-tiles
        assert_eq!(auto(Regime::Prefill, 100, 1024, 4096, 16), 1);
        // Forced: up to one split per k-tile and one block per SM.
        let forced = |splits, tiles, k| {
            k_splits(
                Regime::Decode,
                Dims::new(1, 1024, k),
                16,
                Some(splits),
                tiles,
                132,
            )
        };
        assert_eq!(forced(64, 2, 4096).unwrap(), 64);
        assert!(forced(65, 2, 4096).is_err());
        assert!(forced(5, 32, 4096).is_err()); // 160 blocks
        assert!(forced(0, 32, 4096).is_err());
    }

    /// The deep decode pipelines where the device's blocks may take their
    /// shared memory, the base ones elsewhere; a forced deep pipeline that
    /// does not fit is an error naming what it takes and what the device allows.
    #[test]
    fn decode_depth_follows_the_devices_shared_memory() {
        let name = |m, r, max| decode(m, r, None, max).unwrap().0;
        // sm_90 fits every rank's deep pipelines (one chunk of 64 ranks per stage).
        for r in [1, 16, 64, 200] {
            assert_eq!(
                name(1, r, SM90_MAX_BLOCK_SMEM),
                "lk_fused_forward_decode_deep_bf16_aligned"
            );
            assert_eq!(
                name(64, r, SM90_MAX_BLOCK_SMEM),
                "lk_fused_forward_decode_wide_deep_bf16_aligned"
            );
        }
        // sm_80: 12 stages of 16 + 32 + 48 rows fit, of 16 + 32 + 64 don't.
        assert_eq!(
            name(16, 48, SM80),
            "lk_fused_forward_decode_deep_bf16_aligned"
        );
        assert_eq!(name(16, 49, SM80), "lk_fused_forward_decode_bf16_aligned");
        assert_eq!(
            name(17, 32, SM80),
            "lk_fused_forward_decode_wide_deep_bf16_aligned"
        );
        assert_eq!(
            name(17, 33, SM80),
            "lk_fused_forward_decode_wide_bf16_aligned"
        );
        // sm_86: the base pipelines only.
        assert_eq!(name(1, 1, SM86), "lk_fused_forward_decode_bf16_aligned");
        assert_eq!(
            name(64, 1, SM86),
            "lk_fused_forward_decode_wide_bf16_aligned"
        );

        // The deep pipeline's shared memory: 12 stages of (16 + 32 + 16) rows of 72.
        assert_eq!(decode(1, 16, None, SM80).unwrap().1, 12 * 64 * 72 * 2);
        // Forcing either depth where it fits.
        assert_eq!(
            decode(1, 16, Some(false), SM90_MAX_BLOCK_SMEM).unwrap().0,
            "lk_fused_forward_decode_bf16_aligned"
        );
        assert_eq!(
            decode(1, 64, Some(true), SM90_MAX_BLOCK_SMEM).unwrap().1,
            12 * 112 * 72 * 2
        );
        let err = decode(1, 64, Some(true), SM80).unwrap_err().to_string();
        assert!(
            err.contains("deep_decode")
                && err.contains("194048")
                && err.contains(&SM80.to_string()),
            "{err}"
        );
    }
}
