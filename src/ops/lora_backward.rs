//! Adapter gradients (docs/DESIGN.md section 1): `u = s g b`, `dx = g w + u a`,
//! `db = s g^T t`, `da = u^T x`, each output optional, with an accumulate mode
//! and a deterministic mode (bit-identical results run to run: f32 partials
//! per token range, summed in a fixed order, no float atomics). The base
//! weight stays frozen. Kernels: kernels/lora_backward.cu, and for `dx` of
//! 512 tokens or more on a GPU of compute capability 9.0 (and the host
//! runtime) kernels/lora_backward_wgmma.cu (`wgmma_dispatch`). Reference:
//! `reference::backward`.
//!
//! [`lora_backward`] trains one adapter; [`multi_adapter_backward`] trains
//! every adapter of a pool that a batch uses, each token's gradient going to
//! its own slot, in the same launches.
use super::lora_backward_wgmma::{self as wgmma, backward_dx_wgmma};
use super::tiles::{
    DECODE, DECODE_DEEP, DECODE_WIDE, DECODE_WIDE_DEEP, GATHER_GEMM, MmaTiles, PREFILL,
    STATIC_SMEM_MARGIN, TOKEN_GEMM,
};
use super::{
    DeviceAdapter, KernelElement, check_operand, check_output, grid, in_ptr, out_ptr,
    wgmma_dispatch,
};
use crate::adapter_pool::AdapterPool;
use crate::buffer::{BufMut, BufRef, Buffer, Home, check_home};
use crate::device::Device;
use crate::element::DType;
use crate::error::Result;
use crate::launch::{Kernel, LaunchDims, kernel};
use crate::params::BackwardParams;
use crate::pool_grads::PoolGrads;
use crate::shape::{Dims, elements};
use cudarc::driver::{DeviceRepr, SyncOnDrop, ValidAsZeroBits};

kernel!(U_F32 = lk_backward_u_f32 in "lora_backward": BackwardParams;);
kernel!(DX_F32 = lk_backward_dx_f32 in "lora_backward": BackwardParams;);
kernel!(DB_F32 = lk_backward_db_f32 in "lora_backward": BackwardParams;);
kernel!(DA_F32 = lk_backward_da_f32 in "lora_backward": BackwardParams;);
kernel!(DB_MMA_F16_ALIGNED = lk_backward_db_mma_f16_aligned in "lora_backward": BackwardParams;);
kernel!(DB_MMA_F16_ANY = lk_backward_db_mma_f16_any in "lora_backward": BackwardParams;);
kernel!(DB_MMA_BF16_ALIGNED = lk_backward_db_mma_bf16_aligned in "lora_backward": BackwardParams;);
kernel!(DB_MMA_BF16_ANY = lk_backward_db_mma_bf16_any in "lora_backward": BackwardParams;);
kernel!(DA_MMA_F16_ALIGNED = lk_backward_da_mma_f16_aligned in "lora_backward": BackwardParams;);
kernel!(DA_MMA_F16_ANY = lk_backward_da_mma_f16_any in "lora_backward": BackwardParams;);
kernel!(DA_MMA_BF16_ALIGNED = lk_backward_da_mma_bf16_aligned in "lora_backward": BackwardParams;);
kernel!(DA_MMA_BF16_ANY = lk_backward_da_mma_bf16_any in "lora_backward": BackwardParams;);
kernel!(U_MMA_F16_ALIGNED = lk_backward_u_mma_f16_aligned in "lora_backward": BackwardParams;);
kernel!(U_MMA_F16_ANY = lk_backward_u_mma_f16_any in "lora_backward": BackwardParams;);
kernel!(U_MMA_BF16_ALIGNED = lk_backward_u_mma_bf16_aligned in "lora_backward": BackwardParams;);
kernel!(U_MMA_BF16_ANY = lk_backward_u_mma_bf16_any in "lora_backward": BackwardParams;);
kernel!(REDUCE = lk_backward_reduce in "lora_backward": BackwardParams;);
kernel!(U_SUM = lk_backward_u_sum in "lora_backward": BackwardParams;);
kernel!(FIRST_TOKENS = lk_backward_first_tokens in "lora_backward": BackwardParams;);
kernel!(DX_DECODE_DEEP_F16_ALIGNED = lk_backward_dx_decode_deep_f16_aligned in "lora_backward": BackwardParams;);
kernel!(DX_DECODE_DEEP_F16_ANY = lk_backward_dx_decode_deep_f16_any in "lora_backward": BackwardParams;);
kernel!(DX_DECODE_DEEP_BF16_ALIGNED = lk_backward_dx_decode_deep_bf16_aligned in "lora_backward": BackwardParams;);
kernel!(DX_DECODE_DEEP_BF16_ANY = lk_backward_dx_decode_deep_bf16_any in "lora_backward": BackwardParams;);
kernel!(DX_DECODE_WIDE_F16_ALIGNED = lk_backward_dx_decode_wide_f16_aligned in "lora_backward": BackwardParams;);
kernel!(DX_DECODE_WIDE_F16_ANY = lk_backward_dx_decode_wide_f16_any in "lora_backward": BackwardParams;);
kernel!(DX_DECODE_WIDE_BF16_ALIGNED = lk_backward_dx_decode_wide_bf16_aligned in "lora_backward": BackwardParams;);
kernel!(DX_DECODE_WIDE_BF16_ANY = lk_backward_dx_decode_wide_bf16_any in "lora_backward": BackwardParams;);
kernel!(DX_DECODE_WIDE_DEEP_F16_ALIGNED = lk_backward_dx_decode_wide_deep_f16_aligned in "lora_backward": BackwardParams;);
kernel!(DX_DECODE_WIDE_DEEP_F16_ANY = lk_backward_dx_decode_wide_deep_f16_any in "lora_backward": BackwardParams;);
kernel!(DX_DECODE_WIDE_DEEP_BF16_ALIGNED = lk_backward_dx_decode_wide_deep_bf16_aligned in "lora_backward": BackwardParams;);
kernel!(DX_DECODE_WIDE_DEEP_BF16_ANY = lk_backward_dx_decode_wide_deep_bf16_any in "lora_backward": BackwardParams;);
kernel!(DX_PREFILL_F16_ALIGNED = lk_backward_dx_prefill_f16_aligned in "lora_backward": BackwardParams;);
kernel!(DX_PREFILL_F16_ANY = lk_backward_dx_prefill_f16_any in "lora_backward": BackwardParams;);
kernel!(DX_PREFILL_BF16_ALIGNED = lk_backward_dx_prefill_bf16_aligned in "lora_backward": BackwardParams;);
kernel!(DX_PREFILL_BF16_ANY = lk_backward_dx_prefill_bf16_any in "lora_backward": BackwardParams;);

const THREADS: u32 = 256;
/// Enough blocks to fill a large GPU; token ranges are split until reached.
const TARGET_BLOCKS: usize = 264;
const MAX_SPLITS: usize = 64;
/// The fewest columns of n a range of the tensor-core u takes: its
/// pipeline's 4 stages of 64.
const U_MIN_COLS: usize = 256;

/// Ranges of n the tensor-core u reduces over in separate blocks (grid x)
/// when its token ranges and layers (`blocks`) are too few to fill the GPU,
/// as with a decode batch: each range keeps its own pipeline in flight.
fn u_column_ranges(n: usize, blocks: usize) -> usize {
    TARGET_BLOCKS
        .div_ceil(blocks.max(1))
        .min(n.div_ceil(U_MIN_COLS))
        .max(1)
}

/// How the backward pass writes its gradients.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackwardOptions {
    /// Add to the gradients' current contents (gradient accumulation).
    pub accumulate: bool,
    /// Bit-identical gradients run to run: no float atomics.
    pub deterministic: bool,
    /// dx on Hopper's wgmma and TMA (`kernels/lora_backward_wgmma.cu`): GPUs
    /// of compute capability 9.0 and the host runtime, f16/bf16, `n` and `k`
    /// multiples of 8, g and w 16-byte aligned. `Some(true)` forces it
    /// (anything else is then an error before any gradient changes),
    /// `Some(false)` never takes it, `None` (the default) takes it from 512
    /// tokens where it can run: the dispatch the first GPU report chose
    /// (`ops::wgmma_dispatch`). Bit-identical run to run, like every dx.
    pub wgmma: Option<bool>,
}

/// The gradients to compute; None skips one. Single adapter: `dx` `[m, k]`,
/// `da` `[rank, k]`, `db` `[n, rank]`. Pool: `da` `[slots, max_rank, k]`,
/// `db` `[slots, n, max_rank]` (the pool's layout, f32).
pub struct Grads<'a, T> {
    /// `dL/dx`, in the storage type.
    pub dx: Option<BufMut<'a, T>>,
    /// `dL/da`, f32.
    pub da: Option<BufMut<'a, f32>>,
    /// `dL/db`, f32.
    pub db: Option<BufMut<'a, f32>>,
}

/// Device scratch of the backward pass (`u`, and the deterministic mode's
/// partials), grown on demand and reused: keep one per device. It works only
/// with the device it was made on (an error otherwise).
pub struct BackwardScratch {
    u: Buffer<f32>,
    partials: Buffer<f32>,
    /// Each slot's first token (`first_token` in the kernels), for a pool
    /// larger than the batch.
    first: Buffer<i32>,
    home: Home,
}

impl BackwardScratch {
    /// Empty scratch on `dev` (it grows on first use).
    pub fn new(dev: &Device) -> Result<Self> {
        Ok(BackwardScratch {
            u: dev.zeros(0)?,
            partials: dev.zeros(0)?,
            first: dev.zeros(0)?,
            home: dev.home(),
        })
    }

    /// An error unless the scratch was made where `dev` runs (same backend
    /// and, on CUDA, the same context): its memory is useless elsewhere.
    fn check_device(&self, dev: &Device) -> Result<()> {
        check_home("scratch", dev.home(), self.home)
    }

    fn reserve(&mut self, dev: &Device, u: usize, partials: usize, first: usize) -> Result<()> {
        if self.u.len() < u {
            self.u = dev.zeros(u)?;
        }
        if self.partials.len() < partials {
            self.partials = dev.zeros(partials)?;
        }
        if self.first.len() < first {
            self.first = dev.zeros(first)?;
        }
        Ok(())
    }
}

/// What the backward pass reads, on the device: `g = dL/dy` `[m, n]`, the
/// forward pass's `x` `[m, k]` and `w` `[n, k]`, and `t = x a^T` (f32) saved
/// by the forward pass (`[m, rank]` for one adapter, `[m, max_rank]` for a pool).
pub struct DeviceBackwardInputs<'a, T> {
    /// `dL/dy`, `[m, n]`.
    pub g: BufRef<'a, T>,
    /// The forward pass's input, `[m, k]`.
    pub x: BufRef<'a, T>,
    /// The frozen base weight, `[n, k]`.
    pub w: BufRef<'a, T>,
    /// `t = x a^T` as the forward pass saved it (unscaled f32).
    pub t: BufRef<'a, f32>,
}

impl<'a, T> DeviceBackwardInputs<'a, T> {
    /// Bundles the four operands (buffers, views or `BufRef`s).
    pub fn new(
        g: impl Into<BufRef<'a, T>>,
        x: impl Into<BufRef<'a, T>>,
        w: impl Into<BufRef<'a, T>>,
        t: impl Into<BufRef<'a, f32>>,
    ) -> Self {
        DeviceBackwardInputs {
            g: g.into(),
            x: x.into(),
            w: w.into(),
            t: t.into(),
        }
    }
}

/// Gradients of one adapter (`t` from `fused_forward_saving_t`, `[m, rank]`).
///
/// ```
/// use lora_kernels::ops::fused_forward::fused_forward_saving_t;
/// use lora_kernels::ops::lora_backward::{
///     BackwardOptions, BackwardScratch, DeviceBackwardInputs, Grads, lora_backward,
/// };
/// use lora_kernels::{Device, DeviceAdapter, Dims};
///
/// let dev = Device::cuda(0).or_else(|_| Device::host())?;
/// let (dims, rank) = (Dims::new(2, 3, 4), 1);
/// let x = dev.upload(&[1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])?;
/// let w = dev.upload(&[0.25f32; 12])?;
/// let (a, b) = (dev.upload(&[1.0f32, 2.0, 3.0, 4.0])?, dev.upload(&[1.0f32; 3])?);
/// let adapter = DeviceAdapter::new(&a, &b, rank, 2.0);
///
/// // Training forward: y, and t = x a^T for the backward pass.
/// let (mut y, mut t) = (dev.zeros::<f32>(6)?, dev.zeros::<f32>(2)?);
/// fused_forward_saving_t(&dev, dims, &x, &w, &adapter, &mut y, &mut t)?;
/// assert_eq!(dev.download(&t)?, vec![1.0, 2.0]);
///
/// // dL/dy = 1 everywhere; ask for dL/db only.
/// let g = dev.upload(&[1.0f32; 6])?;
/// let mut db = dev.zeros::<f32>(3)?;
/// let grads = Grads { dx: None, da: None, db: Some((&mut db).into()) };
/// let mut scratch = BackwardScratch::new(&dev)?;
/// let inputs = DeviceBackwardInputs::new(&g, &x, &w, &t);
/// lora_backward(&dev, dims, &adapter, inputs, grads, BackwardOptions::default(), &mut scratch)?;
/// // db = s g^T t = 2 * (1 + 2) for every row of b.
/// assert_eq!(dev.download(&db)?, vec![6.0; 3]);
/// # Ok::<(), lora_kernels::Error>(())
/// ```
pub fn lora_backward<T: KernelElement>(
    dev: &Device,
    dims: Dims,
    adapter: &DeviceAdapter<'_, T>,
    inputs: DeviceBackwardInputs<'_, T>,
    grads: Grads<'_, T>,
    opts: BackwardOptions,
    scratch: &mut BackwardScratch,
) -> Result<()> {
    let DeviceBackwardInputs { g, x, w, t } = inputs;
    dims.validate()?;
    adapter.validate(dev, dims.n, dims.k)?;
    check_operand(dev, "t", &t, dims.m, adapter.rank)?;
    let shape = Shape {
        dims,
        max_rank: adapter.rank,
        slots: 1,
    };
    let pool = PoolRefs {
        a: &adapter.a,
        b: &adapter.b,
        ranks: None,
        scales: None,
        ids: None,
        uniform: (adapter.rank, adapter.scale),
    };
    run(dev, shape, (g, x, w, &t), pool, grads, None, opts, scratch)
}

/// Gradients of every adapter a batch uses: token `i` trains slot
/// `slot_ids[i]` (`-1`, empty slots and out-of-range ids train nothing).
/// `t` is `[m, max_rank]` f32 (from `multi_adapter_forward_saving_t`).
///
/// ```
/// use half::bf16;
/// use lora_kernels::ops::lora_backward::{
///     BackwardOptions, BackwardScratch, DeviceBackwardInputs, Grads, multi_adapter_backward,
/// };
/// use lora_kernels::{AdapterPool, Device, PoolConfig};
///
/// let dev = Device::cuda(0).or_else(|_| Device::host())?;
/// let cfg = PoolConfig { slots: 2, max_rank: 2, n: 3, k: 4 };
/// let mut pool = AdapterPool::<bf16>::new(&dev, cfg)?;
/// let one = bf16::from_f32(1.0);
/// pool.load(0, &[one; 4], &[one; 3], 1, 2.0)?; // rank 1, scale 2
/// pool.load(1, &[one; 8], &[one; 6], 2, 1.0)?; // rank 2
///
/// // Token 0 uses slot 0, token 1 no adapter; t as the forward saved it.
/// let ids = dev.upload(&[0i32, -1])?;
/// let x = dev.upload(&[one; 8])?;
/// let w = dev.upload(&[one; 12])?;
/// let t = dev.upload(&[4.0f32, 0.0, 9.0, 9.0])?; // [m, max_rank]
/// let g = dev.upload(&[one; 6])?; // dL/dy
/// let mut db = dev.zeros::<f32>(2 * 3 * 2)?; // [slots, n, max_rank]
/// let grads = Grads { dx: None, da: None, db: Some((&mut db).into()) };
/// let inputs = DeviceBackwardInputs::new(&g, &x, &w, &t);
/// let mut scratch = BackwardScratch::new(&dev)?;
/// multi_adapter_backward(&pool, 2, &ids, inputs, grads, BackwardOptions::default(), &mut scratch)?;
/// // Slot 0: db = s g^T t = 2 * 4 in its one rank column; slot 1: untouched by token 1.
/// let db = dev.download(&db)?;
/// assert_eq!(&db[..6], &[8.0, 0.0, 8.0, 0.0, 8.0, 0.0]);
/// assert_eq!(&db[6..], &[0.0; 6]);
/// # Ok::<(), lora_kernels::Error>(())
/// ```
pub fn multi_adapter_backward<'a, T: KernelElement>(
    pool: &AdapterPool<T>,
    m: usize,
    slot_ids: impl Into<BufRef<'a, i32>>,
    inputs: DeviceBackwardInputs<'_, T>,
    grads: Grads<'_, T>,
    opts: BackwardOptions,
    scratch: &mut BackwardScratch,
) -> Result<()> {
    let ids = slot_ids.into();
    pool_backward(pool, m, ids, inputs, grads, None, opts, scratch)
}

/// [`multi_adapter_backward`] into a [`PoolGrads`] (`dx` optional as
/// there), which also keeps the statistics the gradients' writers leave per
/// slot and column tile (sum of squares, largest magnitude), so that
/// [`SlotOptimizer::step_pool_grads`] reads each gradient once. A call
/// refused by validation changes nothing; one that fails after it began to
/// write drops the statistics (the gradient may be part written). Nothing
/// else differs from `multi_adapter_backward`.
///
/// [`SlotOptimizer::step_pool_grads`]: super::adamw::SlotOptimizer::step_pool_grads
#[allow(clippy::too_many_arguments)] // multi_adapter_backward's, with the gradients apart
pub fn multi_adapter_backward_into<'a, T: KernelElement>(
    pool: &AdapterPool<T>,
    m: usize,
    slot_ids: impl Into<BufRef<'a, i32>>,
    inputs: DeviceBackwardInputs<'_, T>,
    dx: Option<BufMut<'_, T>>,
    grads: &mut PoolGrads,
    opts: BackwardOptions,
    scratch: &mut BackwardScratch,
) -> Result<()> {
    grads.check_pool(pool)?;
    let cfg = pool.config();
    let by_token = plan(T::DTYPE, Dims::new(m, cfg.n, cfg.k), cfg.slots, true).by_token;
    // Accumulating, a batch that leaves slots unwritten leaves their
    // gradients, and records, as they were.
    let keeps_old = opts.accumulate && (m == 0 || by_token);
    let (current, da, db, stats) = grads.start_backward(pool, keeps_old);
    let out = Grads {
        dx,
        da: Some(da.into()),
        db: Some(db.into()),
    };
    pool_backward(
        pool,
        m,
        slot_ids.into(),
        inputs,
        out,
        Some(stats),
        opts,
        scratch,
    )?;
    grads.finish_backward(pool, current);
    Ok(())
}

/// The columns (of k for da, of n for db) per tile of the statistics a
/// backward pass over `dtype` leaves: its da and db kernels' per block.
pub(crate) fn stats_tile_cols(dtype: DType) -> [usize; 2] {
    [RangeKernel::da(dtype).cols, RangeKernel::db(dtype).cols]
}

#[allow(clippy::too_many_arguments)]
fn pool_backward<T: KernelElement>(
    pool: &AdapterPool<T>,
    m: usize,
    ids: BufRef<'_, i32>,
    inputs: DeviceBackwardInputs<'_, T>,
    grads: Grads<'_, T>,
    stats: Option<StatsOut<'_>>,
    opts: BackwardOptions,
    scratch: &mut BackwardScratch,
) -> Result<()> {
    let DeviceBackwardInputs { g, x, w, t } = inputs;
    let dev = pool.device();
    let cfg = pool.config();
    let dims = Dims::new(m, cfg.n, cfg.k);
    dims.validate()?;
    check_operand(dev, "slot_ids", &ids, m, 1)?;
    check_operand(dev, "t", &t, m, cfg.max_rank)?;
    let (a, b, ranks, scales) = (
        BufRef::from(&pool.a),
        BufRef::from(&pool.b),
        BufRef::from(&pool.ranks),
        BufRef::from(&pool.scales),
    );
    let refs = PoolRefs {
        a: &a,
        b: &b,
        ranks: Some(&ranks),
        scales: Some(&scales),
        ids: Some(&ids),
        uniform: (0, 0.0),
    };
    let shape = Shape {
        dims,
        max_rank: cfg.max_rank,
        slots: cfg.slots,
    };
    run(dev, shape, (g, x, w, &t), refs, grads, stats, opts, scratch)
}

#[derive(Clone, Copy)]
struct Shape {
    dims: Dims,
    max_rank: usize,
    slots: usize,
}

/// The adapters, in the pool layout (a single adapter: one slot, `uniform`).
struct PoolRefs<'r, 'a, T> {
    a: &'r BufRef<'a, T>,
    b: &'r BufRef<'a, T>,
    ranks: Option<&'r BufRef<'a, i32>>,
    scales: Option<&'r BufRef<'a, f32>>,
    ids: Option<&'r BufRef<'a, i32>>,
    uniform: (usize, f32),
}

#[allow(clippy::too_many_arguments)]
fn run<T: KernelElement>(
    dev: &Device,
    shape: Shape,
    (g, x, w, t): (
        BufRef<'_, T>,
        BufRef<'_, T>,
        BufRef<'_, T>,
        &BufRef<'_, f32>,
    ),
    pool: PoolRefs<'_, '_, T>,
    mut grads: Grads<'_, T>,
    mut stats: Option<StatsOut<'_>>,
    opts: BackwardOptions,
    scratch: &mut BackwardScratch,
) -> Result<()> {
    let Shape {
        dims,
        max_rank,
        slots,
    } = shape;
    let Dims { m, n, k } = dims;
    scratch.check_device(dev)?;
    check_operand(dev, "g", &g, m, n)?;
    check_operand(dev, "x", &x, m, k)?;
    check_operand(dev, "w", &w, n, k)?;
    check_operand(dev, "a", pool.a, slots * max_rank, k)?;
    check_operand(dev, "b", pool.b, slots * n, max_rank)?;
    // g's and w's addresses, for the launches and for the wgmma dx's check.
    let (pg, _g1) = in_ptr(dev, &g);
    let (pw, _g3) = in_ptr(dev, &w);
    let mut dx_on_wgmma = false;
    if let Some(dx) = &grads.dx {
        check_output(dev, "dx", dx, m, k)?;
        dx_on_wgmma = match opts.wgmma {
            Some(true) => wgmma::check(dev, T::DTYPE, dims, pg, pw).map(|()| true)?,
            Some(false) => false,
            None => {
                m >= wgmma_dispatch::DX_MIN_M
                    && wgmma::check(dev, T::DTYPE, dims, pg, pw).is_ok()
                    && wgmma_dispatch::runs(dev, T::DTYPE, wgmma::kernel(T::DTYPE))
            }
        };
    }
    if let Some(da) = &grads.da {
        check_output(dev, "da", da, slots * max_rank, k)?;
    }
    if let Some(db) = &grads.db {
        check_output(dev, "db", db, slots * n, max_rank)?;
    }
    let Plan {
        by_token,
        u: u_plan,
        db: db_split,
        da: da_split,
    } = plan(T::DTYPE, dims, slots, pool.ids.is_some());
    let layers = if by_token { ("m", m) } else { ("slots", slots) };
    let (db_k, da_k) = (RangeKernel::db(T::DTYPE), RangeKernel::da(T::DTYPE));
    let u_k = RangeKernel::u(T::DTYPE);
    let u_cols = u_plan.map_or(1, |(_, cols)| cols);
    // The tensor-core u writes a partial per column range, which u_sum scales
    // and adds into u; a single range is written into u itself.
    let u_partials = if u_cols > 1 {
        elements("partials", u_cols, m * max_rank)?
    } else {
        0
    };
    let len_db = elements("db", slots * n, max_rank)?;
    let len_da = elements("da", slots * max_rank, k)?;
    let partials_of = |split: TokenSplit, len: usize, wanted: bool| {
        if wanted && split.splits > 1 && opts.deterministic {
            elements("partials", split.splits, len)
        } else {
            Ok(0)
        }
    };
    let partials = partials_of(db_split, len_db, grads.db.is_some())?
        .max(partials_of(da_split, len_da, grads.da.is_some())?)
        .max(u_partials);
    let grids = Grids::new::<T>(
        dims,
        (max_rank, slots),
        layers,
        u_plan,
        (&db_k, db_split),
        (&da_k, da_split),
    )?;
    let first_len = if by_token { slots } else { 0 };
    scratch.reserve(dev, elements("u", m, max_rank)?, partials, first_len)?;
    // Per part (da, db): its statistics' records and tile counters, if wanted.
    // Everything is checked: from here on the gradients change.
    let (mut stats_a, mut stats_b) = match stats.as_mut() {
        Some(StatsOut { a, b, current }) => {
            **current = [false; 2];
            (Some(a), Some(b))
        }
        None => (None, None),
    };
    // Atomics add into the gradient, and with a layer per token no block
    // writes the slots no token uses: it starts from zero unless accumulating
    // (its statistics too: zero describes it). No tokens: the gradients of
    // this batch are zero.
    for (buf, part_stats, split) in [
        (grads.da.as_mut(), stats_a.as_deref_mut(), da_split),
        (grads.db.as_mut(), stats_b.as_deref_mut(), db_split),
    ] {
        if let Some(buf) = buf
            && (m == 0 || by_token || (split.splits > 1 && !opts.deterministic))
            && !opts.accumulate
        {
            zero(dev, buf)?;
            if let Some(part) = part_stats {
                zero(dev, &mut part.records)?;
            }
        }
    }
    if m == 0 {
        return Ok(());
    }

    let (px, _g2) = in_ptr(dev, &x);
    let (pt, _g4) = in_ptr(dev, t);
    let (pa, _g5) = in_ptr(dev, pool.a);
    let (pb, _g6) = in_ptr(dev, pool.b);
    let (pr, _g7) = pool.ranks.map_or((0, None), |b| in_ptr(dev, b));
    let (ps, _g8) = pool.scales.map_or((0, None), |b| in_ptr(dev, b));
    let (pids, _g9) = pool.ids.map_or((0, None), |b| in_ptr(dev, b));
    let (mut u, mut part) = (
        BufMut::from(&mut scratch.u),
        BufMut::from(&mut scratch.partials),
    );
    let (pu, _g10) = out_ptr(dev, &mut u);
    let (ppart, _g11) = out_ptr(dev, &mut part);
    let mut first = BufMut::from(&mut scratch.first);
    if by_token {
        zero(dev, &mut first)?;
    }
    let (pfirst, _g15) = out_ptr(dev, &mut first);
    let (pdx, _g12) = grads.dx.as_mut().map_or((0, None), |b| out_ptr(dev, b));
    let (pda, _g13) = grads.da.as_mut().map_or((0, None), |b| out_ptr(dev, b));
    let (pdb, _g14) = grads.db.as_mut().map_or((0, None), |b| out_ptr(dev, b));
    let atomic = |split: TokenSplit| split.splits > 1 && !opts.deterministic;
    let (db_stats, db_counters, _g16) = stats_ptrs(dev, stats_b, pdb != 0, atomic(db_split))?;
    let (da_stats, da_counters, _g17) = stats_ptrs(dev, stats_a, pda != 0, atomic(da_split))?;
    let params = BackwardParams {
        g: pg,
        x: px,
        w: pw,
        a_pool: pa,
        b_pool: pb,
        slot_rank: pr,
        slot_scale: ps,
        token_slots: pids,
        t: pt,
        u: pu,
        dx: pdx,
        da: pda,
        db: pdb,
        partials: ppart,
        first_token: if by_token { pfirst } else { 0 },
        m: m as i32,
        n: n as i32,
        k: k as i32,
        max_rank: max_rank as i32,
        slots: slots as i32,
        uniform_rank: pool.uniform.0 as i32,
        uniform_scale: pool.uniform.1,
        splits: 1,
        tokens_per_split: m as i32,
        accumulate: opts.accumulate as i32,
        deterministic: opts.deterministic as i32,
        reduce_len: 0,
        reduce_out: 0,
        grad_stats: 0,
        tile_counters: 0,
        tile_cols: 0,
        reduce_db: 0,
    };
    let block = [THREADS, 1, 1];
    let simt = |grid: [u32; 3]| LaunchDims {
        grid,
        block,
        dynamic_smem_bytes: 0,
    };
    // SAFETY (every launch below): all operands were checked above to live on
    // `dev` with the sizes the kernels index: g m*n, x m*k, w n*k, the pool's
    // a slots*max_rank*k and b slots*n*max_rank, t m*max_rank, dx m*k, da and
    // db the pool layout; u holds m*max_rank, the partials u_cols*m*max_rank
    // for a tensor-core u of several column ranges (one range: u itself)
    // and each wanted reduction's splits*len and, with
    // a layer per token, first_token `slots`
    // i32 (reserve above); slot ids are range-checked on the device before
    // any pool or first_token access; grids follow the kernels' tiles
    // (first tokens: a thread per token; u: a block per token on SIMT, or
    // RangeKernel's block size and shared memory with a token range per grid
    // row and a range of n per grid column, each writing its own partial,
    // 16-byte copies only when n, max_rank and the bases of g and b allow;
    // u_sum: a thread per element of u; dx: 64 columns x 32 rows, or the
    // wgmma kernel (its preconditions checked: wgmma::check), or the
    // tensor-core tiles with their
    // block size and shared memory, 16-byte loads only when n, k and the
    // bases allow; db, da: RangeKernel's columns, block size and shared
    // memory, 16-byte copies only when the gathered operand allows, y: the
    // reduction's own token ranges, passed in its params; z of u, db and da:
    // slots, or tokens when first_token is set), all within CUDA's grid
    // limits (Grids::new); the pointer guards live until after the launches.
    unsafe {
        if by_token {
            // first_token holds `slots` zeros (zeroed above).
            FIRST_TOKENS.launch(
                dev,
                simt([m.div_ceil(THREADS as usize) as u32, 1, 1]),
                &params,
            )?;
        }
        match (&u_k, u_plan) {
            (Some(u), Some((split, _))) => {
                let aligned = n.is_multiple_of(8)
                    && max_rank.is_multiple_of(8)
                    && [pg, pb].iter().all(|p| p.is_multiple_of(16));
                // The column ranges' partials (u_cols * m * max_rank, reserved
                // above; one range: u itself, scaled in place) into u.
                let p = BackwardParams {
                    splits: u_cols as i32,
                    partials: if u_cols > 1 { ppart } else { pu },
                    ..params
                };
                u.kernel(aligned)
                    .launch(dev, u.dims(grids.u), &split.params(&p))?;
                U_SUM.launch(dev, simt(grids.u_sum), &p)?;
            }
            _ => U_F32.launch(dev, simt(grids.u), &params)?,
        }
        if pdx != 0 && dx_on_wgmma {
            // Checked above (wgmma::check); u is computed.
            backward_dx_wgmma(dev, T::DTYPE, dims, &params)?;
        } else if pdx != 0 {
            let aligned = n.is_multiple_of(8)
                && k.is_multiple_of(8)
                && [pg, pw].iter().all(|p| p.is_multiple_of(16));
            match dx_mma(T::DTYPE, m, aligned, dev.max_block_smem()) {
                Some((kernel, tiles)) => {
                    let dims = LaunchDims {
                        grid: grids.dx,
                        block: [tiles.threads, 1, 1],
                        dynamic_smem_bytes: tiles.smem_bytes_bt(),
                    };
                    kernel.launch(dev, dims, &params)?;
                }
                None => DX_F32.launch(dev, simt(grids.dx), &params)?,
            }
        }
        if pdb != 0 {
            let aligned = n.is_multiple_of(8) && pg.is_multiple_of(16);
            let p = BackwardParams {
                grad_stats: db_stats,
                tile_counters: db_counters,
                tile_cols: db_k.cols as i32,
                reduce_db: 1,
                ..db_split.params(&params)
            };
            db_k.kernel(aligned).launch(dev, db_k.dims(grids.db), &p)?;
            reduce(dev, &p, opts, pdb, len_db, grids.reduce_db)?;
        }
        if pda != 0 {
            let aligned = k.is_multiple_of(8) && px.is_multiple_of(16);
            let p = BackwardParams {
                grad_stats: da_stats,
                tile_counters: da_counters,
                tile_cols: da_k.cols as i32,
                ..da_split.params(&params)
            };
            da_k.kernel(aligned).launch(dev, da_k.dims(grids.da), &p)?;
            reduce(dev, &p, opts, pda, len_da, grids.reduce_da)?;
        }
    }
    Ok(())
}

/// How the launches of a backward cut their work: [`run`] launches by it and
/// `ops::traffic` models it, so the two cannot disagree.
#[derive(Clone, Copy)]
pub(crate) struct Plan {
    /// The grid layers (z) of u, db and da are the batch's tokens (each slot
    /// the batch uses gets the layer of its first token), not the slots: a
    /// pool larger than the batch, so no block is launched for the slots no
    /// token uses. Those take the whole batch as one token range.
    pub by_token: bool,
    /// The tensor-core u (f16/bf16): its token ranges and ranges of n. None
    /// on SIMT (f32: a block per token).
    pub u: Option<(TokenSplit, usize)>,
    /// Token ranges of the db and da reductions, each sized from its own grid.
    pub db: TokenSplit,
    pub da: TokenSplit,
}

/// The plan for `dims` over a pool of `slots` slots (`pool`: tokens carry
/// slot ids; a single adapter is one slot without ids).
pub(crate) fn plan(dtype: DType, dims: Dims, slots: usize, pool: bool) -> Plan {
    let Dims { m, n, k } = dims;
    let by_token = pool && m < slots;
    let layers = if by_token { m } else { slots };
    let split = |kernel: &RangeKernel, blocks_per_layer: usize| {
        if by_token {
            TokenSplit::whole(m)
        } else {
            kernel.split(m, slots * blocks_per_layer)
        }
    };
    let (db_k, da_k) = (RangeKernel::db(dtype), RangeKernel::da(dtype));
    // u: a range of tokens per block row for every layer, and with few of
    // those a range of n per block column.
    let u = RangeKernel::u(dtype).map(|u| {
        let split = split(&u, 1);
        (split, u_column_ranges(n, split.splits * layers))
    });
    Plan {
        by_token,
        u,
        db: split(&db_k, n.div_ceil(db_k.cols)),
        da: split(&da_k, k.div_ceil(da_k.cols)),
    }
}

/// The grids of the launches, checked against CUDA's limits before any of
/// them runs (a call that fails changes nothing).
struct Grids {
    u: [u32; 3],
    /// lk_backward_u_sum: a thread per element of u.
    u_sum: [u32; 3],
    dx: [u32; 3],
    db: [u32; 3],
    da: [u32; 3],
    /// lk_backward_reduce: a block per (slot, column tile) of db and of da.
    reduce_db: [u32; 3],
    reduce_da: [u32; 3],
}

impl Grids {
    /// `layers`: the grid's z extent of u, db and da, named for errors
    /// (`slots`, or `m` with a layer per token).
    fn new<T: KernelElement>(
        dims: Dims,
        (max_rank, slots): (usize, usize),
        (name, layers): (&'static str, usize),
        u_split: Option<(TokenSplit, usize)>,
        (db, db_split): (&RangeKernel, TokenSplit),
        (da, da_split): (&RangeKernel, TokenSplit),
    ) -> Result<Self> {
        let Dims { m, n, k } = dims;
        // dx: the tensor-core tiles for f16/bf16 (alignment and the
        // pipeline's depth pick only the entry point, not the tile's
        // shape), 64 columns x 32 rows on SIMT.
        let (dx_rows, dx_cols) =
            dx_mma(T::DTYPE, m, false, usize::MAX).map_or((32, 64), |(_, t)| (t.bm, t.bn));
        Ok(Grids {
            // u: a block per token on SIMT, or tensor-core column ranges x
            // token ranges x layers.
            u: match u_split {
                Some((split, cols)) => grid(name, layers, [cols, split.splits, layers])?,
                None => grid("m", m, [m, 1, 1])?,
            },
            u_sum: grid("m", m, [(m * max_rank).div_ceil(THREADS as usize), 1, 1])?,
            dx: grid("m", m, [k.div_ceil(dx_cols), m.div_ceil(dx_rows), 1])?,
            db: grid(name, layers, [n.div_ceil(db.cols), db_split.splits, layers])?,
            da: grid(name, layers, [k.div_ceil(da.cols), da_split.splits, layers])?,
            reduce_db: grid("slots", slots, [slots * n.div_ceil(db.cols), 1, 1])?,
            reduce_da: grid("slots", slots, [slots * k.div_ceil(da.cols), 1, 1])?,
        })
    }
}

/// How a `RangeKernel` (u, db or da) cuts the batch into token ranges, one
/// per grid row: enough blocks to fill a large GPU, each range long enough
/// to be worth a block.
#[derive(Clone, Copy)]
pub(crate) struct TokenSplit {
    pub tokens_per_split: usize,
    pub splits: usize,
}

impl TokenSplit {
    /// The whole batch as one range.
    fn whole(m: usize) -> Self {
        TokenSplit {
            tokens_per_split: m.max(1),
            splits: 1,
        }
    }

    /// The launch's parameters with this split.
    fn params(self, params: &BackwardParams) -> BackwardParams {
        BackwardParams {
            splits: self.splits as i32,
            tokens_per_split: self.tokens_per_split as i32,
            ..*params
        }
    }
}

/// A kernel whose blocks each take one range of tokens (grid y) of one slot
/// (grid z), and its block shape: the reductions over tokens db and da
/// (tensor cores for f16/bf16: kernels/include/lk_token_gemm.cuh; SIMT for
/// f32) and the tensor-core u (kernels/include/lk_gather_gemm.cuh).
struct RangeKernel {
    aligned: &'static Kernel<BackwardParams>,
    any: &'static Kernel<BackwardParams>,
    /// Columns of g (db) or x (da) per block (grid x); u's blocks take all
    /// of b's columns.
    cols: usize,
    threads: u32,
    smem: u32,
    /// The shortest token range worth its own blocks.
    min_tokens: usize,
    /// The most ranges: db and da keep a partial per range in deterministic
    /// mode; u writes each token's row once and needs none.
    max_splits: usize,
}

impl RangeKernel {
    fn tensor_cores(
        aligned: &'static Kernel<BackwardParams>,
        any: &'static Kernel<BackwardParams>,
    ) -> Self {
        RangeKernel {
            aligned,
            any,
            cols: TOKEN_GEMM.bn,
            threads: TOKEN_GEMM.threads,
            smem: TOKEN_GEMM.smem_bytes(),
            min_tokens: 2 * TOKEN_GEMM.bk,
            max_splits: MAX_SPLITS,
        }
    }

    fn simt(kernel: &'static Kernel<BackwardParams>, cols: usize) -> Self {
        RangeKernel {
            aligned: kernel,
            any: kernel,
            cols,
            threads: THREADS,
            smem: 0,
            min_tokens: 16,
            max_splits: MAX_SPLITS,
        }
    }

    fn db(dtype: DType) -> Self {
        match dtype {
            DType::F16 => Self::tensor_cores(&DB_MMA_F16_ALIGNED, &DB_MMA_F16_ANY),
            DType::BF16 => Self::tensor_cores(&DB_MMA_BF16_ALIGNED, &DB_MMA_BF16_ANY),
            _ => Self::simt(&DB_F32, 64),
        }
    }

    fn da(dtype: DType) -> Self {
        match dtype {
            DType::F16 => Self::tensor_cores(&DA_MMA_F16_ALIGNED, &DA_MMA_F16_ANY),
            DType::BF16 => Self::tensor_cores(&DA_MMA_BF16_ALIGNED, &DA_MMA_BF16_ANY),
            _ => Self::simt(&DA_F32, THREADS as usize),
        }
    }

    /// u on tensor cores for f16/bf16: a tile of 32 tokens per range at
    /// least; None for f32 (the SIMT kernel, a block per token).
    fn u(dtype: DType) -> Option<Self> {
        let (aligned, any): (
            &'static Kernel<BackwardParams>,
            &'static Kernel<BackwardParams>,
        ) = match dtype {
            DType::F16 => (&U_MMA_F16_ALIGNED, &U_MMA_F16_ANY),
            DType::BF16 => (&U_MMA_BF16_ALIGNED, &U_MMA_BF16_ANY),
            _ => return None,
        };
        Some(RangeKernel {
            aligned,
            any,
            cols: 0,
            threads: GATHER_GEMM.threads,
            smem: GATHER_GEMM.smem_bytes(),
            min_tokens: GATHER_GEMM.bm,
            max_splits: usize::MAX,
        })
    }

    /// Token ranges for `m` tokens when one range takes `blocks_per_range` blocks.
    fn split(&self, m: usize, blocks_per_range: usize) -> TokenSplit {
        let want = TARGET_BLOCKS
            .div_ceil(blocks_per_range.max(1))
            .min(self.max_splits)
            .min(m.div_ceil(self.min_tokens))
            .max(1);
        let tokens_per_split = m.div_ceil(want).max(1);
        TokenSplit {
            tokens_per_split,
            splits: m.div_ceil(tokens_per_split).max(1),
        }
    }

    /// The entry point: 16-byte copies need the row length of every operand
    /// copied that way a multiple of 8 and its base 16-byte aligned.
    fn kernel(&self, aligned: bool) -> &'static Kernel<BackwardParams> {
        if aligned { self.aligned } else { self.any }
    }

    fn dims(&self, grid: [u32; 3]) -> LaunchDims {
        LaunchDims {
            grid,
            block: [self.threads, 1, 1],
            dynamic_smem_bytes: self.smem,
        }
    }
}

/// Sums the partials of the last reduction in a fixed order (deterministic
/// mode with several token ranges), a block per (slot, column tile) of the
/// gradient (`grid`), with the tiles' statistics when `params` asks for
/// them; nothing to do otherwise.
///
/// # Safety
/// `params.partials` holds `params.splits * len` f32 written by the last reduction
/// kernel, `out` points to `len` f32 on `dev`, `grid` is the gradient's
/// slots times its column tiles of `params.tile_cols`, and
/// `params.grad_stats` is 0 or holds 2 f64 per such tile.
unsafe fn reduce(
    dev: &Device,
    params: &BackwardParams,
    opts: BackwardOptions,
    out: u64,
    len: usize,
    grid: [u32; 3],
) -> Result<()> {
    if params.splits == 1 || !opts.deterministic {
        return Ok(());
    }
    let p = BackwardParams {
        reduce_len: len as i64,
        reduce_out: out,
        ..*params
    };
    let dims = LaunchDims {
        grid,
        block: [THREADS, 1, 1],
        dynamic_smem_bytes: 0,
    };
    // SAFETY: guaranteed by the caller (see above).
    unsafe { REDUCE.launch(dev, dims, &p) }
}

/// Where a backward writes the statistics of one part (da or db) of a
/// pool's gradient, for an optimizer that then reads the gradient once
/// ([`crate::PoolGrads`]): f64 [2] per (slot, column tile), and a u32
/// counter per tile.
pub(crate) struct StatsPart<'a> {
    pub records: BufMut<'a, f64>,
    pub counters: BufMut<'a, u32>,
}

/// The statistics of both parts, and the flags saying whether they describe
/// the gradients: cleared before the backward's first write, so that a call
/// refused by validation leaves them as they were.
pub(crate) struct StatsOut<'a> {
    pub a: StatsPart<'a>,
    pub b: StatsPart<'a>,
    pub current: &'a mut [bool; 2],
}

/// The device pointers of a part's statistics (records, counters; 0 when
/// none are wanted or its gradient is not computed), with their guards; the
/// counters zeroed first where the tiles' blocks count on them (`atomic`).
#[allow(clippy::type_complexity)]
fn stats_ptrs<'s>(
    dev: &'s Device,
    part: Option<&'s mut StatsPart<'_>>,
    computed: bool,
    atomic: bool,
) -> Result<(u64, u64, Option<[Option<SyncOnDrop<'s>>; 2]>)> {
    let Some(part) = part.filter(|_| computed) else {
        return Ok((0, 0, None));
    };
    if atomic {
        zero(dev, &mut part.counters)?;
    }
    let (records, g1) = out_ptr(dev, &mut part.records);
    let (counters, g2) = out_ptr(dev, &mut part.counters);
    Ok((records, counters, Some([g1, g2])))
}

fn zero<E: DeviceRepr + ValidAsZeroBits + Default + Clone>(
    dev: &Device,
    buf: &mut BufMut<'_, E>,
) -> Result<()> {
    match (dev, buf) {
        (_, BufMut::Host(s)) => s.fill(E::default()),
        (Device::Cuda(_), BufMut::Cuda(v)) => {
            let stream = dev.cuda_stream().expect("a CUDA device has a stream");
            stream.memset_zeros(v)?;
        }
        (Device::Host(_), BufMut::Cuda(_)) => unreachable!("backend checked by validation"),
    }
    Ok(())
}

/// The tensor-core dx kernel and its tiles for f16/bf16, on a device whose
/// blocks may take `max_smem` bytes of shared memory; None for f32 (SIMT).
/// Decode tiles up to m = 64, as the forward: up to 16 tokens 16-row tiles
/// with the deep pipeline (one row of blocks, about one per SM: twice the
/// bytes of `w` in flight, 89 KiB, which every GPU from sm_80 fits); from 17
/// 64-row tiles (`w` read once per column tile, each warp expanding its own
/// rows), deep where the device fits it (126 KiB: sm_80, sm_90).
pub(crate) fn dx_mma(
    dtype: DType,
    m: usize,
    aligned: bool,
    max_smem: usize,
) -> Option<(&'static Kernel<BackwardParams>, &'static MmaTiles)> {
    let decode = m <= super::fused_forward::DECODE_MAX_M;
    let wide = m > DECODE.bm;
    let deep = if wide {
        DECODE_WIDE_DEEP.smem_bytes_bt() as usize + STATIC_SMEM_MARGIN <= max_smem
    } else {
        true
    };
    let bf16 = match dtype {
        DType::F16 => false,
        DType::BF16 => true,
        _ => return None,
    };
    let (kernel, tiles) = match (decode, wide, deep) {
        (true, false, _) => (
            [
                &DX_DECODE_DEEP_F16_ALIGNED,
                &DX_DECODE_DEEP_F16_ANY,
                &DX_DECODE_DEEP_BF16_ALIGNED,
                &DX_DECODE_DEEP_BF16_ANY,
            ],
            &DECODE_DEEP,
        ),
        (true, true, false) => (
            [
                &DX_DECODE_WIDE_F16_ALIGNED,
                &DX_DECODE_WIDE_F16_ANY,
                &DX_DECODE_WIDE_BF16_ALIGNED,
                &DX_DECODE_WIDE_BF16_ANY,
            ],
            &DECODE_WIDE,
        ),
        (true, true, true) => (
            [
                &DX_DECODE_WIDE_DEEP_F16_ALIGNED,
                &DX_DECODE_WIDE_DEEP_F16_ANY,
                &DX_DECODE_WIDE_DEEP_BF16_ALIGNED,
                &DX_DECODE_WIDE_DEEP_BF16_ANY,
            ],
            &DECODE_WIDE_DEEP,
        ),
        (false, _, _) => (
            [
                &DX_PREFILL_F16_ALIGNED,
                &DX_PREFILL_F16_ANY,
                &DX_PREFILL_BF16_ALIGNED,
                &DX_PREFILL_BF16_ANY,
            ],
            &PREFILL,
        ),
    };
    // Per type, the 16-byte path first.
    Some((kernel[2 * usize::from(bf16) + usize::from(!aligned)], tiles))
}
