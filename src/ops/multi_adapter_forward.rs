//! Multi-adapter forward: every token of a batch uses its own adapter from an
//! [`AdapterPool`] (or none), fused with the base product in one launch.
//! Kernel: kernels/multi_adapter_forward.cu; on a GPU of compute capability
//! 9.0 (and the host runtime) a prefill whose 128 x 128 tiles fill every SM
//! 4 times takes kernels/multi_adapter_forward_wgmma.cu instead
//! (`wgmma_dispatch`). Reference: `reference::multi_adapter_forward` (and
//! `_segments`).
//!
//! Slot ids live on the device, so the launch never depends on their values
//! (CUDA-graph capture stays valid). Ids given from the host should be checked
//! with [`AdapterPool::check_ids`] (clear errors). Ids already on the device
//! are not read by the host: an id outside `-1..slots` is served as `-1` (base
//! model only), never read outside the pool, and counted in
//! [`AdapterPool::bad_id_count`]. A token naming an empty slot gets the base
//! model only.
//!
//! A segment table is checked on the device too (reading it on the host would
//! wait for the stream and break graph capture): when its offsets do not run
//! non-decreasing from 0 to m, every token of the batch is served the base
//! model only (as if every id were -1), all m tokens are counted in
//! [`AdapterPool::bad_id_count`], and the `t` rows of
//! [`multi_adapter_forward_saving_t`] are unspecified. Tables built on the
//! host should be checked with [`check_segments`] (clear errors).
//!
//! At decode, where `n` gives fewer column tiles than the GPU has SMs (a GQA
//! model's k and v projections), each tile's k-loop is split across blocks
//! through a workspace of the stream, as in
//! [`fused_forward`](super::fused_forward::fused_forward): a CUDA graph that
//! captured such a launch must not run beside its stream's own work, and a
//! stream captured before its first split launch runs it unsplit
//! (docs/DESIGN.md section 13).
use super::fused_forward::{Regime, regime_for};
use super::multi_adapter_forward_wgmma as wgmma;
use super::split_k::{self, SharedShrink};
use super::tiles::{
    DECODE, DECODE_DEEP, DECODE_DIRECT, DECODE_WIDE, DECODE_WIDE_DEEP, DIRECT_BLOCKS_PER_SM,
    MmaTiles, PREFILL, SIMT, STATIC_SMEM_MARGIN,
};
use super::{
    KernelElement, check_operand, check_output, check_wgmma, grid, in_ptr, out_ptr, wgmma_dispatch,
};
use crate::adapter_pool::AdapterPool;
use crate::buffer::{BufMut, BufRef};
use crate::device::Device;
use crate::element::DType;
use crate::error::{Error, Result};
use crate::launch::{Kernel, LaunchDims, kernel};
use crate::params::MultiAdapterParams;
use crate::shape::{Dims, check_finite, invalid};

kernel!(DECODE_F16_ALIGNED = lk_multi_adapter_decode_f16_aligned in "multi_adapter_forward": MultiAdapterParams;);
kernel!(DECODE_F16_ANY = lk_multi_adapter_decode_f16_any in "multi_adapter_forward": MultiAdapterParams;);
kernel!(DECODE_BF16_ALIGNED = lk_multi_adapter_decode_bf16_aligned in "multi_adapter_forward": MultiAdapterParams;);
kernel!(DECODE_BF16_ANY = lk_multi_adapter_decode_bf16_any in "multi_adapter_forward": MultiAdapterParams;);
kernel!(DECODE_DEEP_F16_ALIGNED = lk_multi_adapter_decode_deep_f16_aligned in "multi_adapter_forward": MultiAdapterParams;);
kernel!(DECODE_DEEP_F16_ANY = lk_multi_adapter_decode_deep_f16_any in "multi_adapter_forward": MultiAdapterParams;);
kernel!(DECODE_DEEP_BF16_ALIGNED = lk_multi_adapter_decode_deep_bf16_aligned in "multi_adapter_forward": MultiAdapterParams;);
kernel!(DECODE_DEEP_BF16_ANY = lk_multi_adapter_decode_deep_bf16_any in "multi_adapter_forward": MultiAdapterParams;);
kernel!(DECODE_DIRECT_F16_ALIGNED = lk_multi_adapter_decode_direct_f16_aligned in "multi_adapter_forward": MultiAdapterParams;);
kernel!(DECODE_DIRECT_BF16_ALIGNED = lk_multi_adapter_decode_direct_bf16_aligned in "multi_adapter_forward": MultiAdapterParams;);
kernel!(DECODE_WIDE_F16_ALIGNED = lk_multi_adapter_decode_wide_f16_aligned in "multi_adapter_forward": MultiAdapterParams;);
kernel!(DECODE_WIDE_F16_ANY = lk_multi_adapter_decode_wide_f16_any in "multi_adapter_forward": MultiAdapterParams;);
kernel!(DECODE_WIDE_BF16_ALIGNED = lk_multi_adapter_decode_wide_bf16_aligned in "multi_adapter_forward": MultiAdapterParams;);
kernel!(DECODE_WIDE_BF16_ANY = lk_multi_adapter_decode_wide_bf16_any in "multi_adapter_forward": MultiAdapterParams;);
kernel!(DECODE_WIDE_DEEP_F16_ALIGNED = lk_multi_adapter_decode_wide_deep_f16_aligned in "multi_adapter_forward": MultiAdapterParams;);
kernel!(DECODE_WIDE_DEEP_F16_ANY = lk_multi_adapter_decode_wide_deep_f16_any in "multi_adapter_forward": MultiAdapterParams;);
kernel!(DECODE_WIDE_DEEP_BF16_ALIGNED = lk_multi_adapter_decode_wide_deep_bf16_aligned in "multi_adapter_forward": MultiAdapterParams;);
kernel!(DECODE_WIDE_DEEP_BF16_ANY = lk_multi_adapter_decode_wide_deep_bf16_any in "multi_adapter_forward": MultiAdapterParams;);
kernel!(PREFILL_F16_ALIGNED = lk_multi_adapter_prefill_f16_aligned in "multi_adapter_forward": MultiAdapterParams;);
kernel!(PREFILL_F16_ANY = lk_multi_adapter_prefill_f16_any in "multi_adapter_forward": MultiAdapterParams;);
kernel!(PREFILL_BF16_ALIGNED = lk_multi_adapter_prefill_bf16_aligned in "multi_adapter_forward": MultiAdapterParams;);
kernel!(PREFILL_BF16_ANY = lk_multi_adapter_prefill_bf16_any in "multi_adapter_forward": MultiAdapterParams;);
kernel!(SIMT_F32 = lk_multi_adapter_simt_f32 in "multi_adapter_forward": MultiAdapterParams;);

/// At most this many blocks compute the shrink (each then takes several units).
const MAX_SHRINK_BLOCKS: usize = 4096;
/// Tokens and rank rows of one shrink unit, a warp each (`SimtShrink` and
/// `MmaShrink` in the kernel): one token and 4 ranks on SIMT lanes at decode
/// and in f32, 16 tokens and 32 ranks on tensor cores at prefill.
pub(crate) fn shrink_unit(regime: Regime) -> (usize, usize) {
    match regime {
        Regime::Prefill => (16, 32),
        Regime::Decode | Regime::Simt => (1, 4),
    }
}

/// Values of `k` in one piece of a SIMT shrink unit's chunks (`KCHUNK` in
/// the kernel: 4 steps of 256, one pass of the warp's 16-byte loop).
const SHRINK_KCHUNK: usize = 1024;
/// SIMT shrink pieces (units times chunks) per SM that cutting `k` aims for.
const SHRINK_PIECES_PER_SM: usize = 4;

/// Most shares a tensor-core shrink unit's passes are cut into: one per
/// token of the unit, so one per distinct adapter at most.
pub(crate) const MAX_SHRINK_SHARES: usize = 16;

/// Items each shrink unit is cut into (the kernel's `shrink_chunks`): a
/// unit's warp waits a memory round trip per step it can't overlap, and a
/// few units leave most SMs idle, so they are cut until the pieces give
/// each of `sm_count` SMs about 4 warps, and no further than helps:
/// - SIMT units (decode, f32): chunks of `k`, at most one per 1024 values
///   (one token at rank 16 is 4 units: 4 warps for the whole GPU);
/// - tensor-core units (prefill): shares of their passes over `k`, one per
///   distinct adapter among the unit's 16 tokens, so at most
///   `min(16, adapters)`, where `adapters` is how many a launch can name
///   (1: the fused forward's one adapter, whose unit has one pass). 256
///   tokens of 64 adapters are 16 units of up to 16 passes each.
///
/// 1 where the units alone are that many.
pub(crate) fn shrink_chunks(
    regime: Regime,
    units: usize,
    k: usize,
    adapters: usize,
    sm_count: usize,
) -> usize {
    let most = match regime {
        Regime::Prefill => adapters.clamp(1, MAX_SHRINK_SHARES),
        Regime::Decode | Regime::Simt => k.div_ceil(SHRINK_KCHUNK),
    };
    (SHRINK_PIECES_PER_SM * sm_count / units.max(1)).clamp(1, most.max(1))
}

/// SIMT shrink units cut into chunks at most (several chunks each, so fewer
/// than the pieces [`shrink_chunks`] aims for), and their f32 sums at most (4
/// rank rows per piece): the pool's scratch for them. Tensor-core shares
/// need none: each pass writes its own rows of `t`.
pub(crate) fn chunked_shrink_units(sm_count: usize) -> usize {
    SHRINK_PIECES_PER_SM * sm_count
}
pub(crate) fn chunked_shrink_partials(sm_count: usize) -> usize {
    4 * chunked_shrink_units(sm_count)
}

/// Which adapter each token uses.
pub enum Routing<'a> {
    /// One slot id per token (`m` of them, `i32` on the device), `-1` = base only.
    Tokens(BufRef<'a, i32>),
    /// Sorted segments, for prefill: tokens `offsets[j]..offsets[j + 1]` use
    /// `slots[j]`; `offsets` has `slots.len() + 1` entries, from 0 to m. An
    /// empty batch (m = 0) may pass an empty table (`offsets = [0]`, no slots).
    /// A malformed table (checked on the device) gets every token the base
    /// model only and counts m bad ids (module docs).
    Segments {
        /// `segments + 1` token offsets, from 0 to m, non-decreasing.
        offsets: BufRef<'a, i32>,
        /// The slot of each segment (`-1` = base only).
        slots: BufRef<'a, i32>,
    },
}

/// `y = x w^T + s_i (x_i a_i^T) b_i^T (+ beta y)` for a batch of `m` tokens
/// (`x` `[m, k]`, `w` `[n, k]` with the pool's n and k, `y` `[m, n]`), in the
/// regime `fused_forward` would pick for m and the pool's type: tensor cores
/// for f16/bf16, SIMT tiles for f32. With `beta == 0`, `y` is only written.
///
/// ```
/// use lora_kernels::ops::multi_adapter_forward::{Routing, multi_adapter_forward};
/// use lora_kernels::{AdapterPool, Device, PoolConfig};
///
/// let dev = Device::cuda(0).or_else(|_| Device::host())?;
/// let cfg = PoolConfig { slots: 2, max_rank: 2, n: 2, k: 3 };
/// let mut pool = AdapterPool::<f32>::new(&dev, cfg)?;
/// pool.load(0, &[1.0, 1.0, 1.0], &[1.0, 2.0], 1, 1.0)?; // user 0: rank 1
/// pool.load(1, &[1.0; 6], &[1.0; 4], 2, 0.5)?; // user 1: rank 2
///
/// // Three tokens: user 0, no adapter, user 1.
/// let x = dev.upload(&[1.0f32; 9])?; // [m, k]
/// let w = dev.upload(&[0.0f32; 6])?; // [n, k]: no base term, to show the adapters
/// let ids = dev.upload(&[0i32, -1, 1])?;
/// let mut y = dev.zeros::<f32>(6)?; // [m, n]
/// multi_adapter_forward(&pool, 3, &x, &w, &Routing::Tokens((&ids).into()), 0.0, &mut y)?;
/// // token 0: t = x a^T = 3, y = t b^T = [3, 6]; token 1: 0; token 2: 0.5 * (3 + 3) each.
/// assert_eq!(dev.download(&y)?, vec![3.0, 6.0, 0.0, 0.0, 3.0, 3.0]);
/// # Ok::<(), lora_kernels::Error>(())
/// ```
pub fn multi_adapter_forward<'a, T: KernelElement>(
    pool: &AdapterPool<T>,
    m: usize,
    x: impl Into<BufRef<'a, T>>,
    w: impl Into<BufRef<'a, T>>,
    routing: &Routing<'_>,
    beta: f32,
    y: impl Into<BufMut<'a, T>>,
) -> Result<()> {
    multi_adapter_forward_in(regime_for(T::DTYPE, m), pool, m, x, w, routing, beta, y)
}

/// The same in a chosen regime: `Decode` or `Prefill` (tensor cores, f16/bf16
/// pools), `Simt` (f32 pools).
#[allow(clippy::too_many_arguments)] // the op's operands plus the regime
pub fn multi_adapter_forward_in<'a, T: KernelElement>(
    regime: Regime,
    pool: &AdapterPool<T>,
    m: usize,
    x: impl Into<BufRef<'a, T>>,
    w: impl Into<BufRef<'a, T>>,
    routing: &Routing<'_>,
    beta: f32,
    y: impl Into<BufMut<'a, T>>,
) -> Result<()> {
    let (operands, outputs) = ((x.into(), w.into()), (y.into(), None));
    let form = LaunchForm::default();
    launch(regime, form, pool, m, operands, routing, beta, outputs)
}

/// How a multi-adapter launch is formed beyond its regime: for tests, and
/// for tuning on a GPU machine ([`multi_adapter_forward_tuned`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchForm {
    /// Whether the grid has shrink blocks. Without them the tile blocks take
    /// every shrink item, in the lean forms they use for what they find
    /// unclaimed (on a GPU, tile blocks that start before the shrink blocks do).
    pub shrink_blocks: bool,
    /// Tile blocks per output tile, each over its range of `k` (split-K;
    /// decode, and the mma.sync prefill): `None` splits where the tiles are
    /// fewer than the SMs, `Some(1)` never, `Some(s)` in `s` (an error past
    /// one split per k-tile or one tile block per SM). The wgmma prefill and
    /// SIMT launches take no split; a launch that can't have a workspace (a
    /// stream being captured before its first split-K launch) runs unsplit.
    pub k_splits: Option<usize>,
    /// Decode tiles: `None` takes 64-row tiles for more than 16 tokens
    /// (`w` read once per column tile, each warp expanding its own 16 rows)
    /// and 16-row tiles up to 16, `Some(wide)` forces one (an error outside
    /// decode).
    pub wide_tiles: Option<bool>,
    /// A decode launch whose 16-row tile blocks load `w` straight into the
    /// MMAs' registers (`DecodeDirectTiles` in
    /// kernels/include/lk_direct_decode.cuh: no shared-memory pipeline, 8
    /// warps a block; past 16 tokens each row tile reads `w` again, mostly
    /// from L2): f16/bf16, `k` a multiple of 8 and x, w and the pool's a
    /// 16-byte aligned, else an error before `y` changes; an error with
    /// `wide_tiles: Some(true)`. Not yet the default: the tuning sweep
    /// (`tour --tune`) decides the dispatch (docs/DESIGN.md section 8).
    pub direct_loads: bool,
    /// A prefill launch whose tile blocks run on Hopper's wgmma and TMA
    /// (`kernels/multi_adapter_forward_wgmma.cu`: GPUs of compute capability
    /// 9.0 and the host runtime). `Some(true)` forces it: f16/bf16, `k` a
    /// multiple of 8 and x, w and the pool's a 16-byte aligned, else an
    /// error before `y` changes. `Some(false)` never takes it. `None` takes
    /// it for a prefill it can run whose 128 x 128 tiles fill every SM 4
    /// times (m = 4096 at n = 4096 on 132 SMs), unless `k_splits` is forced:
    /// the dispatch the first GPU report chose (`ops::wgmma_dispatch`,
    /// docs/DESIGN.md section 8).
    pub wgmma: Option<bool>,
    /// Prefill: the shares each tensor-core shrink unit's passes (one per
    /// distinct adapter among its 16 tokens) are cut into, an item each:
    /// `None` as [`shrink_chunks`] picks, `Some(s)` for `s` in 1..=16 (an
    /// error otherwise, and outside prefill). The bits of `y` and `t` are
    /// the same for every count.
    pub shrink_shares: Option<usize>,
}

impl Default for LaunchForm {
    /// What [`multi_adapter_forward`] launches.
    fn default() -> Self {
        LaunchForm {
            shrink_blocks: true,
            k_splits: None,
            wide_tiles: None,
            direct_loads: false,
            wgmma: None,
            shrink_shares: None,
        }
    }
}

/// The multi-adapter forward in a chosen regime and launch form, saving `t`
/// when given (as [`multi_adapter_forward_saving_t`]): for tests, and for
/// tuning on a GPU machine. An error for a split count the launch can't take.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)] // the op's operands plus the launch form
pub fn multi_adapter_forward_tuned<T: KernelElement>(
    regime: Regime,
    form: LaunchForm,
    pool: &AdapterPool<T>,
    m: usize,
    (x, w): (BufRef<'_, T>, BufRef<'_, T>),
    routing: &Routing<'_>,
    beta: f32,
    (y, t): (BufMut<'_, T>, Option<BufMut<'_, f32>>),
) -> Result<()> {
    launch(regime, form, pool, m, (x, w), routing, beta, (y, t))
}

/// The forward pass of training: as [`multi_adapter_forward`] (beta = 0),
/// also saving each token's `t = x a^T` (unscaled f32, `[m, max_rank]`, the
/// first `rank` columns of each token's adapter; rows of tokens without one
/// are left as they were) for `multi_adapter_backward`.
pub fn multi_adapter_forward_saving_t<'a, T: KernelElement>(
    pool: &AdapterPool<T>,
    m: usize,
    x: impl Into<BufRef<'a, T>>,
    w: impl Into<BufRef<'a, T>>,
    routing: &Routing<'_>,
    y: impl Into<BufMut<'a, T>>,
    t: impl Into<BufMut<'a, f32>>,
) -> Result<()> {
    let (operands, outputs) = ((x.into(), w.into()), (y.into(), Some(t.into())));
    let regime = regime_for(T::DTYPE, m);
    let form = LaunchForm::default();
    launch(regime, form, pool, m, operands, routing, 0.0, outputs)
}

#[allow(clippy::too_many_arguments)] // the op's operands plus the launch form
fn launch<T: KernelElement>(
    regime: Regime,
    form: LaunchForm,
    pool: &AdapterPool<T>,
    m: usize,
    (x, w): (BufRef<'_, T>, BufRef<'_, T>),
    routing: &Routing<'_>,
    beta: f32,
    (mut y, mut t_out): (BufMut<'_, T>, Option<BufMut<'_, f32>>),
) -> Result<()> {
    let dev = pool.device();
    let cfg = pool.config();
    let dims = Dims::new(m, cfg.n, cfg.k);
    dims.validate()?;
    // A regime and type with no kernel, or a form it can't take, is an
    // error, even for an empty batch.
    let tiling = Tiling::pick(
        regime,
        T::DTYPE,
        dims.m,
        (form.wide_tiles, form.direct_loads),
        dev.max_block_smem(),
    )?;
    check_operand(dev, "x", &x, m, cfg.k)?;
    check_operand(dev, "w", &w, cfg.n, cfg.k)?;
    check_finite("beta", beta)?;
    check_output(dev, "y", &y, m, cfg.n)?;
    if let Some(t) = &t_out {
        check_output(dev, "t", t, m, cfg.max_rank)?;
    }
    let segments = match routing {
        Routing::Tokens(ids) => {
            check_operand(dev, "slot_ids", ids, m, 1)?;
            0
        }
        Routing::Segments { offsets, slots } => {
            // An empty batch may come with an empty table (offsets = [0]).
            let min = usize::from(m > 0);
            if slots.len() < min || slots.len() > i32::MAX as usize - 1 {
                return Err(Error::Segments(format!(
                    "need {min}..i32::MAX segments for m = {m} tokens, got {}",
                    slots.len()
                )));
            }
            check_operand(dev, "segment slots", slots, slots.len(), 1)?;
            check_operand(dev, "segment offsets", offsets, slots.len() + 1, 1)?;
            slots.len()
        }
    };
    let (px, _gx) = in_ptr(dev, &x);
    let (pw, _gw) = in_ptr(dev, &w);
    let a_pool = BufRef::from(&pool.a);
    let (pa, _ga) = in_ptr(dev, &a_pool);
    // 16-byte loads (and TMA) need rows of whole 16-byte chunks and aligned bases.
    let aligned = cfg.k.is_multiple_of(8) && [px, pw, pa].iter().all(|p| p.is_multiple_of(16));
    let wgmma = form.wgmma.unwrap_or_else(|| {
        tiling == Tiling::Prefill
            && aligned
            && form.k_splits.is_none()
            && wgmma_dispatch::prefill_fills(m, cfg.n, dev.sm_count())
            && wgmma_dispatch::runs(dev, T::DTYPE, wgmma::kernel(T::DTYPE))
    });
    // The wgmma kernel's tile blocks, or the tiling's own.
    let shape = if wgmma {
        if tiling != Tiling::Prefill {
            return Err(invalid(
                "regime",
                format!("{regime:?}"),
                "the wgmma kernel serves the prefill regime",
            ));
        }
        check_wgmma(dev, T::DTYPE, "the wgmma kernel")?;
        TileShape::wgmma(T::DTYPE)
    } else {
        tiling.shape()
    };
    if m == 0 {
        return Ok(());
    }
    let plan = Plan::new(
        (tiling, shape, wgmma),
        (form.shrink_blocks, form.k_splits, form.shrink_shares),
        dims,
        (cfg.max_rank, cfg.slots),
        segments,
        dev.sm_count(),
    )?;
    let (shape, chunks, shrink_blocks, tiles) =
        (plan.shape, plan.chunks, plan.shrink_blocks, plan.tiles);
    let (splits, mut split_scratch) = split_k::workspace(dev, plan.splits)?;
    let blocks = grid("m", m, [shrink_blocks + tiles * splits, 1, 1])?;
    pool.reserve_tokens(m)?;
    let mut scratch = pool.scratch();
    let launched = {
        let b_pool = BufRef::from(&pool.b);
        let ranks = BufRef::from(&pool.ranks);
        let scales = BufRef::from(&pool.scales);
        let (pb, _gb) = in_ptr(dev, &b_pool);
        let (pr, _gr) = in_ptr(dev, &ranks);
        let (ps, _gs) = in_ptr(dev, &scales);
        let (ids, offsets, seg_slots) = match routing {
            Routing::Tokens(ids) => (Some(ids), None, None),
            Routing::Segments { offsets, slots } => (None, Some(offsets), Some(slots)),
        };
        let (pids, _gi) = ids.map_or((0, None), |b| in_ptr(dev, b));
        let (poff, _go) = offsets.map_or((0, None), |b| in_ptr(dev, b));
        let (pseg, _gq) = seg_slots.map_or((0, None), |b| in_ptr(dev, b));
        let scratch = &mut *scratch;
        let (mut t, mut counters, mut bad) = (
            BufMut::from(&mut scratch.t),
            BufMut::from(&mut scratch.counters),
            BufMut::from(&mut scratch.bad_ids),
        );
        let (mut unit_partials, mut unit_counters) = (
            BufMut::from(&mut scratch.unit_partials),
            BufMut::from(&mut scratch.unit_counters),
        );
        // The caller's t when it wants it saved, else the pool's scratch.
        let (pt, _gt) = match t_out.as_mut() {
            Some(t_out) => out_ptr(dev, t_out),
            None => out_ptr(dev, &mut t),
        };
        let (pc, _gc) = out_ptr(dev, &mut counters);
        let (pbad, _gbad) = out_ptr(dev, &mut bad);
        let (pup, _gup) = out_ptr(dev, &mut unit_partials);
        let (puc, _guc) = out_ptr(dev, &mut unit_counters);
        let (partials, split_counters, _gsplit) = split_k::workspace_ptrs(dev, &mut split_scratch);
        let (py, _gy) = out_ptr(dev, &mut y);
        plan.tiling.check_aligned(aligned)?;
        let params = MultiAdapterParams {
            x: px,
            w: pw,
            a_pool: pa,
            b_pool: pb,
            slot_rank: pr,
            slot_scale: ps,
            token_slots: pids,
            seg_offsets: poff,
            seg_slots: pseg,
            t: pt,
            counters: pc,
            bad_ids: pbad,
            y: py,
            m: m as i32,
            n: cfg.n as i32,
            k: cfg.k as i32,
            max_rank: cfg.max_rank as i32,
            slots: cfg.slots as i32,
            // 0 means per-token ids; an empty table never launches (m = 0 above).
            segments: segments as i32,
            shrink_blocks: shrink_blocks as i32,
            beta,
            k_splits: splits as i32,
            shrink_chunks: chunks as i32,
            partials,
            split_counters,
            unit_partials: pup,
            unit_counters: puc,
            uniform_rank: 0,
            uniform_scale: 0.0,
        };
        let launch = LaunchDims {
            grid: blocks,
            block: [shape.threads, 1, 1],
            dynamic_smem_bytes: shape.smem_bytes,
        };
        if wgmma {
            wgmma::check(cfg.k, px, pw, pa)?;
            // SAFETY: as below, with `check` passed and the grid of the
            // shrink blocks and the wgmma kernel's tiles (the plan's shape).
            return unsafe { wgmma::launch(dev, T::DTYPE, &params, blocks) };
        }
        let kernel = plan.tiling.kernel(T::DTYPE, aligned);
        // SAFETY: x, w, y and the routing buffers were checked above to live on
        // the pool's device with the element counts the kernel indexes (x m*k,
        // w n*k, y m*n, ids m or segments + 1 offsets and segments slots); the
        // pool's buffers have the sizes its config implies (AdapterPool::new),
        // slot ids read on the device are range-checked there before any pool
        // access, and the segment table only inside 0..=segments (its values
        // are checked on the device before any tile block uses them); t holds
        // m * max_rank f32 (reserve_tokens above) and the five counters are 0
        // between launches (zeroed at creation, reset by each launch), with
        // fewer than 2^31 shrink items for their 32-bit claim counter (checked
        // above); SIMT shrink units cut into chunks > 1 of k (at most one per
        // 1024 values) are fewer than chunked_shrink_units(sm_count), their
        // pieces fewer than chunked_shrink_partials / 4 (shrink_chunks), the
        // pool's scratch sizes (AdapterPool::new), and their counters are 0
        // between launches; the grid is shrink_blocks + the tiles covering m x n, times
        // `splits` blocks each (within CUDA's limit, checked above; split-K:
        // decode and mma.sync prefill tiles only, splits <= k-tiles and
        // tiles x splits <= sm_count, or
        // DIRECT_BLOCKS_PER_SM x sm_count for direct-load tiles, with
        // a workspace of split_k_scratch_len(sm_count) values, partial sums
        // first (one slot per block: split_k_counters_at holds sm_count of
        // the largest splittable tile's), then the counters, zero between
        // launches, at split_k_counters_at), with the block size and dynamic shared
        // memory of the kernel of these tiles and type (Tiling::pick above:
        // tensor-core tiles for f16/bf16, within the device's shared memory
        // per block; SIMT tiles with static shared memory only for f32);
        // 16-byte loads only when k and the bases allow (the direct-load
        // tiles, which have no other path, only then: check_aligned above);
        // the pointer guards live until after the launch.
        unsafe { kernel.launch(dev, launch, &params) }
    };
    drop(scratch);
    launched
}

/// A launch's shape, from the batch and the adapters' rank capacity alone
/// (never from the ids): the pool's launches and the one-adapter decode.
struct Plan {
    tiling: Tiling,
    shape: TileShape,
    /// Items per shrink unit ([`shrink_chunks`]): chunks of `k` (SIMT) or
    /// shares of the passes (tensor cores).
    chunks: usize,
    shrink_blocks: usize,
    /// Output tiles, and the blocks each wants (split-K) if it gets a workspace.
    tiles: usize,
    splits: usize,
}

impl Plan {
    /// The tiles (`shape`: the wgmma kernel's where `wgmma`); `form`:
    /// whether the grid has shrink blocks, a forced split count and
    /// a forced share count ([`LaunchForm`]); the adapters' rank capacity and
    /// how many a launch can name (slots); `segments`: the table's length (0:
    /// ids per token). An error for a forced split or share count the launch
    /// can't take, and for a batch whose shrink items pass a 32-bit claim
    /// counter.
    fn new(
        (tiling, shape, wgmma): (Tiling, TileShape, bool),
        (with_shrink_blocks, k_splits, shares): (bool, Option<usize>, Option<usize>),
        dims: Dims,
        (max_rank, adapters): (usize, usize),
        segments: usize,
        sm_count: usize,
    ) -> Result<Plan> {
        let regime = tiling.regime();
        // Shrink units: groups of tokens x groups of rank rows, cut into
        // pieces, a warp each, claimed by the warps from a 32-bit counter
        // together with the table entries.
        let (unit_tokens, unit_ranks) = shrink_unit(regime);
        let shrink_units = dims.m.div_ceil(unit_tokens) * max_rank.div_ceil(unit_ranks);
        let chunks = match shares {
            None => shrink_chunks(regime, shrink_units, dims.k, adapters, sm_count),
            Some(s) if regime == Regime::Prefill && (1..=MAX_SHRINK_SHARES).contains(&s) => s,
            Some(s) => {
                return Err(invalid(
                    "shrink_shares",
                    s,
                    format!(
                        "prefill launches cut a shrink unit's passes into 1..={MAX_SHRINK_SHARES} \
                         shares; this one runs in {regime:?}"
                    ),
                ));
            }
        };
        let pieces = shrink_units * chunks;
        let shrink_items = pieces.max(if segments == 0 { 0 } else { segments + 1 });
        if shrink_items > i32::MAX as usize {
            return Err(invalid(
                "m",
                dims.m,
                format!(
                    "the shrink has {shrink_items} work items (ceil(m / {unit_tokens}) x \
                     ceil(max_rank / {unit_ranks}) x {chunks} pieces, or segments + 1), more \
                     than {}: split the batch",
                    i32::MAX
                ),
            ));
        }
        let shrink_blocks = if with_shrink_blocks {
            pieces
                .div_ceil(shape.threads as usize / 32)
                .min(MAX_SHRINK_BLOCKS)
        } else {
            0
        };
        let tiles = dims.m.div_ceil(shape.bm) * dims.n.div_ceil(shape.bn);
        // Split-K fills the SMs with blocks: one each, or two of the
        // direct-load tiles (two fit an SM, and their loops keep bytes in
        // flight only in registers: the blocks are what add more). Decode
        // tiles and the mma.sync prefill's split (a few hundred tokens are
        // fewer 128 x 128 tiles than SMs: 64 at 256 tokens, n = 4096); the
        // wgmma kernel's tiles (a shape of their own) and SIMT tiles don't.
        let blocks_per_sm = if tiling == Tiling::DecodeDirect {
            DIRECT_BLOCKS_PER_SM
        } else {
            1
        };
        let splittable = match tiling {
            Tiling::Decode { .. } | Tiling::DecodeDirect => true,
            Tiling::Prefill => !wgmma,
            Tiling::Simt => false,
        };
        let bk = tiling.mma().map_or(DECODE.bk, |t| t.bk);
        let splits = split_k::k_splits(
            splittable,
            format_args!("decode and mma.sync prefill launches"),
            k_splits,
            tiles,
            dims.k.div_ceil(bk),
            sm_count * blocks_per_sm,
        )?;
        Ok(Plan {
            tiling,
            shape,
            chunks,
            shrink_blocks,
            tiles,
            splits,
        })
    }
}

/// The device addresses of a one-adapter launch's operands
/// ([`one_adapter_forward`]).
#[derive(Clone, Copy)]
pub(crate) struct OneAdapter {
    pub x: u64,
    pub w: u64,
    pub a: u64,
    pub b: u64,
    pub y: u64,
    /// Where to save `t` (`[m, rank]` f32), or 0.
    pub t: u64,
    pub rank: usize,
    pub scale: f32,
}

/// Most values of `t` a one-adapter launch keeps in the stream's workspace
/// (64 MiB, kept while the context lives): a larger batch that does not
/// save `t` runs the fused kernel.
const MAX_SHARED_T: usize = 1 << 24;

/// Whether the fused forward of `m` tokens at `rank` in `regime` can run on
/// this kernel ([`one_adapter_forward`]): a decode of one row of decode
/// tiles and one chunk of ranks, or a prefill (its `t` within
/// [`MAX_SHARED_T`] unless `saves_t`).
pub(crate) fn one_adapter_fits(regime: Regime, m: usize, rank: usize, saves_t: bool) -> bool {
    match regime {
        Regime::Decode => m <= DECODE_WIDE.bm && rank <= SharedShrink::T_VALUES / DECODE_WIDE.bm,
        Regime::Prefill => saves_t || m.saturating_mul(rank) <= MAX_SHARED_T,
        Regime::Simt => false,
    }
}

/// The fused forward (`y = x w^T + scale (x a^T) b^T (+ beta y)`, every
/// token on one adapter) on the multi-adapter kernel, in its uniform mode:
/// `t` is computed once for the launch by the shrink's warps (at decode
/// SIMT units, cut into chunks of `k` when they are few; at prefill tensor
/// cores, 16 tokens a unit), where the fused kernel computes it in every
/// column tile (at decode each reading all of `a`: at n = 4096, 128 times;
/// at prefill the shrink's MMAs ride in the main loop). The shrink's state
/// and `t` (unless the caller saves it) live in the stream's decode
/// workspace, which grows for a prefill's `t`; a stream being captured
/// before it has one that large launches nothing and gets `Ok(false)` (the
/// caller runs the fused kernel). `k_splits` and `direct_loads` as in
/// [`LaunchForm`] (an error for direct loads the launch can't take, before
/// anything is launched).
///
/// # Safety
/// `dims` passed `Dims::validate`, `one_adapter_fits(regime, dims.m, rank,
/// ops.t != 0)`, `rank >= 1`, `T` is f16 or bf16, and the addresses are of
/// buffers that live on `dev`'s backend until the launch is queued, with the
/// element counts the kernel indexes: x `m k`, w `n k`, a `rank k`, b `n
/// rank`, y `m n`, t (when not 0) `m rank` f32.
pub(crate) unsafe fn one_adapter_forward<T: KernelElement>(
    regime: Regime,
    dev: &Device,
    dims: Dims,
    ops: OneAdapter,
    beta: f32,
    (k_splits, direct_loads): (Option<usize>, bool),
) -> Result<bool> {
    let tiling = Tiling::pick(
        regime,
        T::DTYPE,
        dims.m,
        (None, direct_loads),
        dev.max_block_smem(),
    )?;
    let aligned =
        dims.k.is_multiple_of(8) && [ops.x, ops.w, ops.a].iter().all(|p| p.is_multiple_of(16));
    tiling.check_aligned(aligned)?;
    let plan = Plan::new(
        (tiling, tiling.shape(), false),
        (true, k_splits, None),
        dims,
        (ops.rank, 1),
        0,
        dev.sm_count(),
    )?;
    let t_values = if ops.t != 0 { 0 } else { dims.m * ops.rank };
    let len = SharedShrink::scratch_len(dev.sm_count(), t_values);
    let Some(scratch) = dev.split_k_scratch(len)? else {
        return Ok(false);
    };
    let blocks = grid(
        "m",
        dims.m,
        [plan.shrink_blocks + plan.tiles * plan.splits, 1, 1],
    )?;
    let mut scratch = Some(scratch);
    let (partials, split_counters, _guard) = split_k::workspace_ptrs(dev, &mut scratch);
    // The workspace starts with the partial sums.
    let shrink = SharedShrink::in_workspace(partials, dev.sm_count());
    let params = MultiAdapterParams {
        x: ops.x,
        w: ops.w,
        a_pool: ops.a,
        b_pool: ops.b,
        // 0: every token on slot 0, rank and scale below (uniform mode).
        slot_rank: 0,
        slot_scale: 0,
        token_slots: 0,
        seg_offsets: 0,
        seg_slots: 0,
        t: if ops.t != 0 { ops.t } else { shrink.t },
        counters: shrink.counters,
        bad_ids: 0,
        y: ops.y,
        m: dims.m as i32,
        n: dims.n as i32,
        k: dims.k as i32,
        max_rank: ops.rank as i32,
        slots: 1,
        segments: 0,
        shrink_blocks: plan.shrink_blocks as i32,
        beta,
        k_splits: plan.splits as i32,
        shrink_chunks: plan.chunks as i32,
        partials,
        split_counters,
        unit_partials: shrink.unit_partials,
        unit_counters: shrink.unit_counters,
        uniform_rank: ops.rank as i32,
        uniform_scale: ops.scale,
    };
    let launch = LaunchDims {
        grid: blocks,
        block: [plan.shape.threads, 1, 1],
        dynamic_smem_bytes: plan.shape.smem_bytes,
    };
    let kernel = plan.tiling.kernel(T::DTYPE, aligned);
    // SAFETY: the operands are as this function's contract says (the
    // adapter is a pool of one slot: a_pool rank x k, b_pool n x rank, t
    // [m][max_rank = rank]); no ids or pool tables are read (slot_rank = 0);
    // t (the caller's, or the workspace's, at least m x rank values after
    // the rest: SharedShrink::scratch_len), the kernel's counters, the chunk
    // sums and unit counters lie in the decode workspace (SharedShrink),
    // zero between launches, with SIMT shrink units cut into chunks > 1 fewer
    // than chunked_shrink_units(sm_count) (shrink_chunks; prefill's shares
    // use no scratch); the
    // grid is the shrink blocks + the tiles of this regime covering m x n,
    // `splits` blocks each (split-K: decode and mma.sync prefill tiles,
    // splits <= k-tiles and
    // tiles x splits <= sm_count (direct-load tiles: DIRECT_BLOCKS_PER_SM x
    // sm_count), Plan::new, the partial sums and their
    // counters in the same workspace), with fewer than 2^31 shrink items
    // (Plan::new); the block size and shared memory are the selected
    // kernel's; 16-byte loads only when k and the bases allow (the
    // direct-load tiles only then: check_aligned above); the workspace's
    // guard lives until after the launch.
    unsafe { kernel.launch(dev, launch, &params) }?;
    Ok(true)
}

/// The tiles of a launch (their shape and pipeline), and so its kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tiling {
    /// Tensor-core decode tiles of 16 rows, or of 64 (`wide`); `deep`: the
    /// deeper pipeline.
    Decode {
        wide: bool,
        deep: bool,
    },
    /// 16-row decode tiles whose blocks load `w` straight into registers
    /// ([`LaunchForm::direct_loads`]): aligned operands only.
    DecodeDirect,
    Prefill,
    /// f32 SIMT tiles.
    Simt,
}

impl Tiling {
    /// The tiles for `m` tokens of `dtype` in `regime` (`wide` and `direct`:
    /// the [`LaunchForm`]'s choices), on a device whose blocks may take
    /// `max_smem` bytes of shared memory; an error for a regime and type
    /// with no kernel, or a tile choice outside decode (direct loads: not
    /// on 64-row tiles).
    ///
    /// The deep pipelines: at decode the blocks are about one per SM (n /
    /// 32 of them), so a block's stages are all the bytes of `w` its SM has
    /// in flight. The 16-row one (81 KiB) fits every GPU from sm_80 and
    /// runs where one row of tiles covers the batch (m <= 16); the 64-row
    /// one (121.5 KiB) runs where the device lets a block take it.
    fn pick(
        regime: Regime,
        dtype: DType,
        m: usize,
        (wide, direct): (Option<bool>, bool),
        max_smem: usize,
    ) -> Result<Tiling> {
        let tensor_cores = matches!(dtype, DType::F16 | DType::BF16);
        if direct {
            if regime != Regime::Decode || !tensor_cores || wide == Some(true) {
                return Err(invalid(
                    "direct_loads",
                    true,
                    format!(
                        "direct loads serve f16/bf16 decode launches on 16-row tiles, not \
                         {regime:?} {dtype:?} with m = {m} (wide tiles: {wide:?})"
                    ),
                ));
            }
            return Ok(Tiling::DecodeDirect);
        }
        let tiles = match regime {
            Regime::Decode if tensor_cores => {
                let wide = wide.unwrap_or(m > DECODE.bm);
                let deep = if wide {
                    DECODE_WIDE_DEEP.smem_bytes(0) as usize + STATIC_SMEM_MARGIN <= max_smem
                } else {
                    m <= DECODE.bm
                };
                return Ok(Tiling::Decode { wide, deep });
            }
            Regime::Prefill if tensor_cores => Tiling::Prefill,
            Regime::Simt if dtype == DType::F32 => Tiling::Simt,
            Regime::Simt => {
                return Err(invalid(
                    "regime",
                    "Simt",
                    format!(
                        "the multi-adapter SIMT kernel takes f32 pools; {dtype:?} runs on tensor cores (Decode or Prefill)"
                    ),
                ));
            }
            _ => {
                return Err(invalid(
                    "regime",
                    format!("{regime:?}"),
                    format!(
                        "tensor-core kernels take f16 or bf16 pools, not {dtype:?}; f32 runs in Simt"
                    ),
                ));
            }
        };
        match wide {
            Some(wide) => Err(invalid(
                "wide_tiles",
                wide,
                format!("decode launches choose their tiles; this one runs in {regime:?}"),
            )),
            None => Ok(tiles),
        }
    }

    fn regime(self) -> Regime {
        match self {
            Tiling::Decode { .. } | Tiling::DecodeDirect => Regime::Decode,
            Tiling::Prefill => Regime::Prefill,
            Tiling::Simt => Regime::Simt,
        }
    }

    /// The tensor-core tile shape ([`Tiling::Simt`] has none).
    fn mma(self) -> Option<&'static MmaTiles> {
        match self {
            Tiling::Decode {
                wide: false,
                deep: false,
            } => Some(&DECODE),
            Tiling::Decode {
                wide: false,
                deep: true,
            } => Some(&DECODE_DEEP),
            Tiling::Decode {
                wide: true,
                deep: false,
            } => Some(&DECODE_WIDE),
            Tiling::Decode {
                wide: true,
                deep: true,
            } => Some(&DECODE_WIDE_DEEP),
            Tiling::DecodeDirect => Some(&DECODE_DIRECT),
            Tiling::Prefill => Some(&PREFILL),
            Tiling::Simt => None,
        }
    }

    /// The tile of `y` a block owns, the block size and the dynamic shared
    /// memory of the kernel.
    fn shape(self) -> TileShape {
        match self.mma() {
            Some(tiles) => TileShape {
                bm: tiles.bm,
                bn: tiles.bn,
                threads: tiles.threads,
                smem_bytes: tiles.smem_bytes(0),
            },
            None => TileShape {
                bm: SIMT.bm,
                bn: SIMT.bn,
                threads: SIMT.threads,
                smem_bytes: 0,
            },
        }
    }

    /// An error where these tiles need 16-byte loads and the operands
    /// can't take them (`aligned`: `k` a multiple of 8, x, w and a 16-byte
    /// aligned).
    fn check_aligned(self, aligned: bool) -> Result<()> {
        if self == Tiling::DecodeDirect && !aligned {
            return Err(invalid(
                "direct_loads",
                true,
                "direct loads take k a multiple of 8 and x, w and a 16-byte aligned",
            ));
        }
        Ok(())
    }

    /// The entry point for these tiles and type (one [`Tiling::pick`]
    /// accepted, and [`Tiling::check_aligned`] for `aligned`).
    fn kernel(self, dtype: DType, aligned: bool) -> &'static Kernel<MultiAdapterParams> {
        let bf16 = dtype == DType::BF16;
        match (self, bf16, aligned) {
            (Tiling::Simt, _, _) => &SIMT_F32,
            (Tiling::DecodeDirect, false, _) => &DECODE_DIRECT_F16_ALIGNED,
            (Tiling::DecodeDirect, true, _) => &DECODE_DIRECT_BF16_ALIGNED,
            (Tiling::Decode { wide, deep }, _, _) => match (wide, deep, bf16, aligned) {
                (false, false, false, true) => &DECODE_F16_ALIGNED,
                (false, false, false, false) => &DECODE_F16_ANY,
                (false, false, true, true) => &DECODE_BF16_ALIGNED,
                (false, false, true, false) => &DECODE_BF16_ANY,
                (false, true, false, true) => &DECODE_DEEP_F16_ALIGNED,
                (false, true, false, false) => &DECODE_DEEP_F16_ANY,
                (false, true, true, true) => &DECODE_DEEP_BF16_ALIGNED,
                (false, true, true, false) => &DECODE_DEEP_BF16_ANY,
                (true, false, false, true) => &DECODE_WIDE_F16_ALIGNED,
                (true, false, false, false) => &DECODE_WIDE_F16_ANY,
                (true, false, true, true) => &DECODE_WIDE_BF16_ALIGNED,
                (true, false, true, false) => &DECODE_WIDE_BF16_ANY,
                (true, true, false, true) => &DECODE_WIDE_DEEP_F16_ALIGNED,
                (true, true, false, false) => &DECODE_WIDE_DEEP_F16_ANY,
                (true, true, true, true) => &DECODE_WIDE_DEEP_BF16_ALIGNED,
                (true, true, true, false) => &DECODE_WIDE_DEEP_BF16_ANY,
            },
            (Tiling::Prefill, false, true) => &PREFILL_F16_ALIGNED,
            (Tiling::Prefill, false, false) => &PREFILL_F16_ANY,
            (Tiling::Prefill, true, true) => &PREFILL_BF16_ALIGNED,
            (Tiling::Prefill, true, false) => &PREFILL_BF16_ANY,
        }
    }
}

/// A launch's block tile, block size and dynamic shared memory.
#[derive(Clone, Copy)]
struct TileShape {
    bm: usize,
    bn: usize,
    threads: u32,
    smem_bytes: u32,
}

impl TileShape {
    /// The wgmma prefill kernel's, for `dtype`.
    fn wgmma(dtype: DType) -> TileShape {
        TileShape {
            bm: wgmma::BM,
            bn: wgmma::BN,
            threads: wgmma::THREADS,
            smem_bytes: wgmma::smem_bytes(dtype.size()) as u32,
        }
    }
}

/// Checks a segment table given from the host (see [`Routing::Segments`])
/// against the pool: well formed, covering `m` tokens, every slot -1 or occupied.
pub fn check_segments<T: KernelElement>(
    pool: &AdapterPool<T>,
    m: usize,
    offsets: &[i32],
    slots: &[i32],
) -> Result<()> {
    let ids = crate::reference::segment_ids(m, offsets, slots)?;
    pool.check_ids(&ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mma.sync prefill splits a batch whose 128 x 128 tiles leave SMs
    /// idle, as decode does; a batch that fills them, the wgmma kernel's
    /// tiles and SIMT tiles don't, and a forced split of those is an error.
    #[test]
    fn prefill_splits_where_its_tiles_leave_sms_idle() {
        let plan = |m, n, (tiling, wgmma): (Tiling, bool), k_splits| {
            let shape = if wgmma {
                TileShape::wgmma(DType::BF16)
            } else {
                tiling.shape()
            };
            let form = (true, k_splits, None);
            Plan::new(
                (tiling, shape, wgmma),
                form,
                Dims::new(m, n, 4096),
                (16, 64),
                0,
                132,
            )
            .map(|p| p.splits)
        };
        let mma = (Tiling::Prefill, false);
        assert_eq!(plan(256, 4096, mma, None).unwrap(), 2); // 64 tiles
        assert_eq!(plan(128, 4096, mma, None).unwrap(), 4);
        assert_eq!(plan(65, 1024, mma, None).unwrap(), 8); // 8 tiles: 8 splits at most
        assert_eq!(plan(512, 4096, mma, None).unwrap(), 1); // 128 tiles
        assert_eq!(plan(4096, 4096, mma, None).unwrap(), 1);
        assert_eq!(plan(256, 4096, mma, Some(1)).unwrap(), 1);
        assert!(plan(256, 4096, mma, Some(3)).is_err()); // 192 blocks on 132 SMs
        let wgmma = (Tiling::Prefill, true);
        assert_eq!(plan(256, 4096, wgmma, None).unwrap(), 1);
        assert!(plan(256, 4096, wgmma, Some(2)).is_err());
        assert_eq!(plan(256, 4096, (Tiling::Simt, false), None).unwrap(), 1);
    }

    /// A few tokens' SIMT units are cut into chunks of k until the pieces
    /// give each SM about 4 warps, at most one per 1024 values; a few
    /// prefill units into shares of their passes, at most one per adapter
    /// the launch can name and 16; many units take none. The pieces of cut
    /// SIMT units always fit the pool's scratch for them.
    #[test]
    fn few_shrink_units_are_cut_into_pieces() {
        let chunks = |regime, units, k, adapters| shrink_chunks(regime, units, k, adapters, 132);
        assert_eq!(chunks(Regime::Decode, 4, 4096, 1), 4); // one token, rank 16
        assert_eq!(chunks(Regime::Decode, 16, 14336, 64), 14);
        assert_eq!(chunks(Regime::Decode, 256, 4096, 64), 2);
        assert_eq!(chunks(Regime::Decode, 1024, 4096, 64), 1); // 64 tokens, rank 64
        assert_eq!(chunks(Regime::Decode, 4, 1000, 64), 1); // one piece
        assert_eq!(chunks(Regime::Simt, 3, 2050, 64), 3);
        assert_eq!(chunks(Regime::Prefill, 16, 4096, 64), 16); // 256 tokens, rank 16
        assert_eq!(chunks(Regime::Prefill, 16, 4096, 5), 5);
        assert_eq!(chunks(Regime::Prefill, 16, 4096, 1), 1); // the fused forward's one adapter
        assert_eq!(chunks(Regime::Prefill, 64, 4096, 64), 8); // 1024 tokens
        assert_eq!(chunks(Regime::Prefill, 256, 4096, 64), 2); // 4096 tokens
        assert_eq!(chunks(Regime::Prefill, 1024, 4096, 64), 1);
        for sm_count in [1, 16, 132] {
            for units in 1..2000 {
                let chunks = shrink_chunks(Regime::Decode, units, 1 << 20, 64, sm_count);
                if chunks > 1 {
                    assert!(units < chunked_shrink_units(sm_count));
                    assert!(4 * units * chunks <= chunked_shrink_partials(sm_count));
                }
            }
        }
    }
}
