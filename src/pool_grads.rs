//! A pool's adapter gradients together with what the backward pass learned
//! of them as it wrote them (docs/DESIGN.md section 1): per slot and column
//! tile, the sum of squares and the largest magnitude. With those the fused
//! optimizer ([`SlotOptimizer::step_pool_grads`]) has each slot's norm and
//! its non-finite check before it starts, and reads the gradient once, not
//! twice.
//!
//! The statistics are trusted only while they describe the gradient: the
//! type owns both, hands out the gradient mutably only through methods that
//! drop the statistics ([`PoolGrads::da_mut`], [`PoolGrads::db_mut`]), and
//! remembers which adapters (their pool generation, so their ranks) they were
//! made for. Whenever they are not current the optimizer computes the norm
//! from the gradient, as [`SlotOptimizer::step`] does.
//!
//! [`SlotOptimizer::step_pool_grads`]: crate::ops::adamw::SlotOptimizer::step_pool_grads
//! [`SlotOptimizer::step`]: crate::ops::adamw::SlotOptimizer::step
use crate::adapter_pool::{AdapterPool, PoolConfig};
use crate::buffer::{BufRef, Buffer};
use crate::device::Device;
use crate::error::Result;
use crate::ops::KernelElement;
use crate::ops::lora_backward::{StatsOut, StatsPart, stats_tile_cols};
use crate::shape::{elements, invalid};

/// `da` `[slots, max_rank, k]` and `db` `[slots, n, max_rank]` (f32, the
/// pool's layout) of one [`AdapterPool`], filled by
/// [`multi_adapter_backward_into`] and consumed by
/// [`SlotOptimizer::step_pool_grads`], which then reads each gradient once.
///
/// ```
/// use half::bf16;
/// use lora_kernels::ops::adamw::{AdamWConfig, SlotHyper, SlotOptimizer, SlotStatus};
/// use lora_kernels::ops::lora_backward::{
///     BackwardOptions, BackwardScratch, DeviceBackwardInputs, multi_adapter_backward_into,
/// };
/// use lora_kernels::{AdapterPool, Device, PoolConfig, PoolGrads};
///
/// let dev = Device::cuda(0).or_else(|_| Device::host())?;
/// let cfg = PoolConfig { slots: 2, max_rank: 2, n: 3, k: 4 };
/// let mut pool = AdapterPool::<bf16>::new(&dev, cfg)?;
/// let mut opt = SlotOptimizer::new(&pool, AdamWConfig::default())?;
/// let hyper = SlotHyper { lr: 0.1, weight_decay: 0.0, max_grad_norm: 1.0, anchor_pull: 0.0 };
/// opt.load_adapter(&mut pool, 0, &[0.5; 2 * 4], &[0.5; 3 * 2], 2, 1.0, hyper)?;
///
/// // One token of slot 0: dL/dy, x, w and t as the forward pass saved it.
/// let one = bf16::from_f32(1.0);
/// let ids = dev.upload(&[0i32])?;
/// let (g, x, w) = (dev.upload(&[one; 3])?, dev.upload(&[one; 4])?, dev.upload(&[one; 12])?);
/// let t = dev.upload(&[2.0f32, 2.0])?;
/// let mut grads = PoolGrads::new(&pool)?;
/// let mut scratch = BackwardScratch::new(&dev)?;
/// let inputs = DeviceBackwardInputs::new(&g, &x, &w, &t);
/// let opts = BackwardOptions::default();
/// multi_adapter_backward_into(&pool, 1, &ids, inputs, None, &mut grads, opts, &mut scratch)?;
/// assert!(grads.has_stats(&pool)); // the step will read the gradient once
///
/// opt.step_pool_grads(&mut pool, &grads)?;
/// // The gradient's norm: db = 2 everywhere (6 entries), da = 1.5 (8 entries).
/// let want = (6.0f32 * 4.0 + 8.0 * 2.25).sqrt();
/// match opt.statuses()?[0] {
///     SlotStatus::Updated { grad_norm } => assert!((grad_norm - want).abs() < 1e-5),
///     other => panic!("{other:?}"),
/// }
/// # Ok::<(), lora_kernels::Error>(())
/// ```
///
/// [`multi_adapter_backward_into`]: crate::ops::lora_backward::multi_adapter_backward_into
/// [`SlotOptimizer::step_pool_grads`]: crate::ops::adamw::SlotOptimizer::step_pool_grads
pub struct PoolGrads {
    dev: Device,
    cfg: PoolConfig,
    /// The pool these are gradients of ([`AdapterPool::id`]).
    pool_id: u64,
    da: Buffer<f32>,
    db: Buffer<f32>,
    /// Per part (da, db): f64 [2] per (slot, column tile), and the tiles'
    /// counters (the backward pass's, zero between its launches).
    records: [Buffer<f64>; 2],
    counters: [Buffer<u32>; 2],
    /// Per part, the columns (of k for da, of n for db) per tile.
    tile_cols: [usize; 2],
    /// Per part, whether its records describe the gradient as it is now.
    current: [bool; 2],
    /// Each slot's pool generation when the records were made: the ranks
    /// they cover.
    generations: Vec<u64>,
}

impl PoolGrads {
    /// Zero gradients for `pool`'s slots, without statistics yet.
    pub fn new<T: KernelElement>(pool: &AdapterPool<T>) -> Result<Self> {
        let dev = pool.device().clone();
        let cfg = pool.config();
        let PoolConfig { slots, n, k, .. } = cfg;
        let tile_cols = stats_tile_cols(T::DTYPE);
        let tiles = [k.div_ceil(tile_cols[0]), n.div_ceil(tile_cols[1])];
        // The gradients have the pool's own lengths; the counters half the
        // records' (checked here).
        let records = |tiles: usize| elements("slots", slots, 2 * tiles);
        Ok(PoolGrads {
            da: dev.zeros(pool.a.len())?,
            db: dev.zeros(pool.b.len())?,
            records: [
                dev.zeros(records(tiles[0])?)?,
                dev.zeros(records(tiles[1])?)?,
            ],
            counters: [dev.zeros(slots * tiles[0])?, dev.zeros(slots * tiles[1])?],
            tile_cols,
            current: [false; 2],
            generations: vec![0; slots],
            pool_id: pool.id(),
            dev,
            cfg,
        })
    }

    /// `dL/da`, `[slots, max_rank, k]`.
    pub fn da(&self) -> &Buffer<f32> {
        &self.da
    }

    /// `dL/db`, `[slots, n, max_rank]`.
    pub fn db(&self) -> &Buffer<f32> {
        &self.db
    }

    /// `dL/da` to change by hand: its statistics are dropped (the next step
    /// computes the norm from the gradient).
    pub fn da_mut(&mut self) -> &mut Buffer<f32> {
        self.current[0] = false;
        &mut self.da
    }

    /// `dL/db` to change by hand: its statistics are dropped.
    pub fn db_mut(&mut self) -> &mut Buffer<f32> {
        self.current[1] = false;
        &mut self.db
    }

    /// Whether the statistics describe these gradients for `pool`'s adapters
    /// as they are now: then [`SlotOptimizer::step_pool_grads`] reads each
    /// gradient once. False before the first backward pass, after a
    /// `da_mut`/`db_mut`, a backward pass that failed after it began to
    /// write (one refused by validation changes nothing), or a load or
    /// eviction of any slot since, and for another pool.
    ///
    /// [`SlotOptimizer::step_pool_grads`]: crate::ops::adamw::SlotOptimizer::step_pool_grads
    pub fn has_stats<T: KernelElement>(&self, pool: &AdapterPool<T>) -> bool {
        pool.id() == self.pool_id
            && self.current == [true; 2]
            && (0..self.cfg.slots).all(|s| pool.generation(s) == self.generations[s])
    }

    /// The statistics for the optimizer, when [`Self::has_stats`]: the
    /// records of da and db and their tiles per slot.
    #[allow(clippy::type_complexity)]
    pub(crate) fn stats<T: KernelElement>(
        &self,
        pool: &AdapterPool<T>,
    ) -> Option<([BufRef<'_, f64>; 2], [usize; 2])> {
        self.has_stats(pool).then(|| {
            (
                [(&self.records[0]).into(), (&self.records[1]).into()],
                self.tiles(),
            )
        })
    }

    /// Per slot, the sum of squares and the largest magnitude of its gradient
    /// (both parts, the entries below its rank) from the statistics, or None
    /// when they are not current. For tests: they check the statistics
    /// against the gradient.
    #[doc(hidden)]
    pub fn slot_stats<T: KernelElement>(
        &self,
        pool: &AdapterPool<T>,
    ) -> Result<Option<Vec<(f64, f64)>>> {
        if !self.has_stats(pool) {
            return Ok(None);
        }
        let parts = [
            self.dev.download(&self.records[0])?,
            self.dev.download(&self.records[1])?,
        ];
        let tiles = self.tiles();
        Ok(Some(
            (0..self.cfg.slots)
                .map(|s| {
                    let mut out = (0.0, 0.0f64);
                    for (records, tiles) in parts.iter().zip(tiles) {
                        for r in records[2 * s * tiles..2 * (s + 1) * tiles].chunks(2) {
                            out.0 += r[0];
                            out.1 = out.1.max(r[1]);
                        }
                    }
                    out
                })
                .collect(),
        ))
    }

    fn tiles(&self) -> [usize; 2] {
        [
            self.cfg.k.div_ceil(self.tile_cols[0]),
            self.cfg.n.div_ceil(self.tile_cols[1]),
        ]
    }

    /// An error unless these are `pool`'s gradients.
    pub(crate) fn check_pool<T: KernelElement>(&self, pool: &AdapterPool<T>) -> Result<()> {
        if pool.id() != self.pool_id {
            return Err(invalid(
                "grads",
                format!("gradients of pool #{}", self.pool_id),
                format!("not gradients of this pool (pool #{})", pool.id()),
            ));
        }
        Ok(())
    }

    /// For a backward pass: whether the records will be current after it
    /// (`keeps_old`: it accumulates without writing every slot, so they are
    /// only if they are now), then the outputs. The backward clears the
    /// flags before its first write; [`Self::finish_backward`] sets them.
    pub(crate) fn start_backward<T: KernelElement>(
        &mut self,
        pool: &AdapterPool<T>,
        keeps_old: bool,
    ) -> (bool, &mut Buffer<f32>, &mut Buffer<f32>, StatsOut<'_>) {
        let current_after = !keeps_old || self.has_stats(pool);
        let [ra, rb] = &mut self.records;
        let [ca, cb] = &mut self.counters;
        let stats = StatsOut {
            a: StatsPart {
                records: ra.into(),
                counters: ca.into(),
            },
            b: StatsPart {
                records: rb.into(),
                counters: cb.into(),
            },
            current: &mut self.current,
        };
        (current_after, &mut self.da, &mut self.db, stats)
    }

    /// After a backward pass that succeeded: the records describe the
    /// gradient (`current`, from [`Self::start_backward`]) for the pool's
    /// adapters as they are now.
    pub(crate) fn finish_backward<T: KernelElement>(
        &mut self,
        pool: &AdapterPool<T>,
        current: bool,
    ) {
        self.current = [current; 2];
        for (s, g) in self.generations.iter_mut().enumerate() {
            *g = pool.generation(s);
        }
    }
}
