//! The fused optimizer step of the continual-learning loop: AdamW over every
//! slot of an [`AdapterPool`] in one launch (docs/DESIGN.md section 1), with f32
//! master weights and moments per slot, per-slot learning rate, weight decay
//! and gradient-norm clipping, NaN/Inf gradients skipping a slot's step (and
//! reported), and an optional pull toward an anchor copy of each adapter (its
//! weights before the current task) so new learning does not erase old.
//! A slot's step is all or nothing: one whose result would hold NaN or Inf
//! (in the masters, moments or the pool's copy) changes nothing, so no
//! non-finite weight ever enters the pool.
//! Kernel: kernels/adamw.cu. Reference: `reference::adamw_slot_step`.
use super::KernelElement;
use crate::adapter_pool::{AdapterPool, PoolConfig, check_storable, copy, read, unpad_rows, write};
use crate::buffer::{BufMut, BufRef, Buffer};
use crate::device::Device;
use crate::element::DType;
use crate::error::{Error, Result};
use crate::launch::{LaunchDims, kernel};
use crate::params::{AdamWParams, SlotOptim};
use crate::pool_grads::PoolGrads;
use crate::shape::{check_finite, invalid};

kernel!(ADAMW_F32 = lk_adamw_f32 in "adamw": AdamWParams;);
kernel!(ADAMW_F16 = lk_adamw_f16 in "adamw": AdamWParams;);
kernel!(ADAMW_BF16 = lk_adamw_bf16 in "adamw": AdamWParams;);

const THREADS: u32 = 512;

// A slot's status codes, as kernels/adamw.cu writes them.
const UPDATED: i32 = 0;
const SKIPPED_NON_FINITE: i32 = 1;
const IDLE: i32 = 2;
const SKIPPED_OVERFLOW: i32 = 3;
/// Or'd into a slot's status: its bounds did not rule out overflow, so the
/// step ran the checking pass.
const CHECKED: i32 = 16;
/// Or'd into a slot's status: its norm came from the gradient's statistics
/// (`step_pool_grads`), so the step read the gradient once.
const FROM_STATS: i32 = 32;

/// The AdamW settings every slot shares: the moments' decay rates and eps.
/// (Learning rate and weight decay are per slot: [`SlotHyper`].)
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Decay of the first moment, in [0, 1).
    pub beta1: f32,
    /// Decay of the second moment, in [0, 1).
    pub beta2: f32,
    /// Added to the root of the second moment; finite and > 0 (0 would
    /// divide 0 by 0 where a gradient and its moments are zero).
    pub eps: f32,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults: 0.9, 0.999, 1e-8.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl AdamWConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(invalid("eps", self.eps, "must be finite and > 0"));
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(invalid(name, v, "must be in [0, 1)"));
            }
        }
        Ok(())
    }
}

/// Per-slot settings of the fused optimizer (mirrors `SlotOptim` in lk_params.h).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlotHyper {
    /// Learning rate.
    pub lr: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Clip the slot's whole gradient to this L2 norm; 0 = no clipping.
    pub max_grad_norm: f32,
    /// Pull toward the anchor: `g += anchor_pull * (p - anchor)`; 0 = none.
    pub anchor_pull: f32,
}

impl SlotHyper {
    fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("lr", self.lr),
            ("weight_decay", self.weight_decay),
            ("max_grad_norm", self.max_grad_norm),
            ("anchor_pull", self.anchor_pull),
        ] {
            check_finite(name, v)?;
            if v < 0.0 {
                return Err(invalid(name, v, "must be >= 0"));
            }
        }
        Ok(())
    }
}

/// What a slot's last step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SlotStatus {
    /// Stepped; the gradient's L2 norm before clipping.
    Updated {
        /// The gradient's L2 norm before clipping.
        grad_norm: f32,
    },
    /// The gradient held NaN or Inf: weights, moments and step count unchanged.
    SkippedNonFinite,
    /// The step's result would hold NaN or Inf somewhere in the slot (a
    /// moment or weight overflowing f32, or the pool's copy its storage
    /// type): weights, moments and step count unchanged.
    SkippedOverflow {
        /// The gradient's L2 norm before clipping.
        grad_norm: f32,
    },
    /// Not active, or empty (also every slot before the first step).
    Idle,
}

/// Optimizer state for every slot of a pool, in the pool's layout (f32).
///
/// ```
/// use half::bf16;
/// use lora_kernels::ops::adamw::{AdamWConfig, SlotHyper, SlotOptimizer, SlotStatus};
/// use lora_kernels::{AdapterPool, Device, PoolConfig};
///
/// let dev = Device::cuda(0).or_else(|_| Device::host())?;
/// let cfg = PoolConfig { slots: 2, max_rank: 4, n: 3, k: 5 };
/// let mut pool = AdapterPool::<bf16>::new(&dev, cfg)?;
/// let mut opt = SlotOptimizer::new(&pool, AdamWConfig::default())?;
/// let hyper = SlotHyper { lr: 0.1, weight_decay: 0.0, max_grad_norm: 0.0, anchor_pull: 0.0 };
/// let (rank, scale) = (2, 1.0);
/// opt.load_adapter(&mut pool, 1, &[0.5; 2 * 5], &[0.5; 3 * 2], rank, scale, hyper)?;
///
/// // Gradients in the pool's layout (f32), e.g. from multi_adapter_backward.
/// let grad_a = dev.upload(&vec![1.0f32; 2 * 4 * 5])?; // [slots, max_rank, k]
/// let grad_b = dev.upload(&vec![1.0f32; 2 * 3 * 4])?; // [slots, n, max_rank]
/// opt.step(&mut pool, &grad_a, &grad_b)?;
///
/// let status = opt.statuses()?;
/// assert_eq!(status[0], SlotStatus::Idle); // slot 0 holds nothing
/// assert!(matches!(status[1], SlotStatus::Updated { .. }));
/// // AdamW's first step moves each weight by lr against the gradient's sign.
/// let (a, _b) = opt.master(&pool, 1)?;
/// assert!(a.iter().all(|&v| (v - 0.4).abs() < 1e-6));
/// # Ok::<(), lora_kernels::Error>(())
/// ```
pub struct SlotOptimizer {
    dev: Device,
    cfg: PoolConfig,
    /// The pool this optimizer trains ([`AdapterPool::id`]).
    pool_id: u64,
    /// Per slot, what `load_adapter` put there (None: nothing yet).
    trained: Vec<Option<Trained>>,
    config: AdamWConfig,
    master: [Buffer<f32>; 2],
    m1: [Buffer<f32>; 2],
    m2: [Buffer<f32>; 2],
    anchor: [Buffer<f32>; 2],
    /// Per slot, upper bounds over its elements of |master|, |m2| and
    /// |m1| / sqrt(m2) (3 a slot; the kernel's step stores the last as
    /// |m1| / (sqrt(m2) + e), kernels/adamw.cu), and of |anchor|: Inf where
    /// unknown. Every writer of the state keeps them (load, anchor, restore,
    /// and the kernel's step), so that a step whose bounds stay below the
    /// largest finite value skips the checking pass.
    state_bound: Buffer<f32>,
    anchor_bound: Buffer<f32>,
    hyper: Buffer<SlotOptim>,
    host_hyper: Vec<SlotOptim>,
    step: Buffer<i32>,
    status: Buffer<i32>,
    grad_norm: Buffer<f32>,
}

/// A slot loaded through [`SlotOptimizer::load_adapter`].
#[derive(Clone, Copy)]
struct Trained {
    rank: usize,
    /// The pool's generation of the slot right after that load.
    generation: u64,
}

impl SlotOptimizer {
    /// State for `pool`'s slots (all inactive until [`Self::load_adapter`]).
    /// `config` gives beta1, beta2 and eps; lr and weight decay are per slot
    /// ([`SlotHyper`]).
    pub fn new<T: KernelElement>(pool: &AdapterPool<T>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let dev = pool.device().clone();
        let cfg = pool.config();
        let (na, nb) = pool_lengths(cfg)?;
        let pair = || -> Result<[Buffer<f32>; 2]> { Ok([dev.zeros(na)?, dev.zeros(nb)?]) };
        Ok(SlotOptimizer {
            pool_id: pool.id(),
            trained: vec![None; cfg.slots],
            master: pair()?,
            m1: pair()?,
            m2: pair()?,
            anchor: pair()?,
            state_bound: dev.upload(&vec![f32::INFINITY; 3 * cfg.slots])?,
            anchor_bound: dev.upload(&vec![f32::INFINITY; cfg.slots])?,
            hyper: dev.zeros(cfg.slots)?,
            host_hyper: vec![SlotOptim::default(); cfg.slots],
            step: dev.zeros(cfg.slots)?,
            status: dev.upload(&vec![IDLE; cfg.slots])?,
            grad_norm: dev.zeros(cfg.slots)?,
            dev,
            cfg,
            config,
        })
    }

    /// Puts a new adapter (f32 weights: `a` `[rank, k]`, `b` `[n, rank]`) in
    /// `slot` for training: the pool gets its storage-type copy, the master
    /// weights and the anchor get the f32 values, moments and step count
    /// restart from zero, and the slot becomes active with `hyper`.
    ///
    /// Everything is checked before anything is written: the slot, rank,
    /// sizes, scale, `hyper`, and that every value is finite
    /// ([`Error::NonFinite`]) and stays finite in the pool's type
    /// ([`Error::OutOfRange`]); on an error nothing changed.
    #[allow(clippy::too_many_arguments)] // an adapter and its training settings
    pub fn load_adapter<T: KernelElement>(
        &mut self,
        pool: &mut AdapterPool<T>,
        slot: usize,
        a: &[f32],
        b: &[f32],
        rank: usize,
        scale: f32,
        hyper: SlotHyper,
    ) -> Result<()> {
        self.check_load(pool, slot, (a, b), rank, scale, hyper)?;
        let rounded = |v: &[f32]| v.iter().map(|&e| T::from_f32(e)).collect::<Vec<T>>();
        pool.load(slot, &rounded(a), &rounded(b), rank, scale)?;
        self.trained[slot] = Some(Trained {
            rank,
            generation: pool.generation(slot),
        });
        let (za, zb) = (vec![0f32; rank * self.cfg.k], vec![0f32; self.cfg.n * rank]);
        self.write_bounds(slot, 0, &[f32::INFINITY; 3], f32::INFINITY)?;
        let dev = &self.dev;
        write_pair(dev, self.cfg, &mut self.master, slot, (a, b), rank)?;
        write_pair(dev, self.cfg, &mut self.anchor, slot, (a, b), rank)?;
        write_pair(dev, self.cfg, &mut self.m1, slot, (&za, &zb), rank)?;
        write_pair(dev, self.cfg, &mut self.m2, slot, (&za, &zb), rank)?;
        write(&self.dev, &mut self.step, slot, &[0])?;
        let w = largest_magnitude(a).max(largest_magnitude(b));
        self.write_bounds(slot, 0, &[w, 0.0, 0.0], w)?;
        self.host_hyper[slot].active = 1;
        self.set_hyper(slot, hyper)
    }

    /// Everything [`Self::load_adapter`] checks before it writes.
    pub(crate) fn check_load<T: KernelElement>(
        &self,
        pool: &AdapterPool<T>,
        slot: usize,
        (a, b): (&[f32], &[f32]),
        rank: usize,
        scale: f32,
        hyper: SlotHyper,
    ) -> Result<()> {
        self.check_pool(pool)?;
        pool.check_load(slot, a.len(), b.len(), rank, scale)?;
        check_storable::<T>("a", a)?;
        check_storable::<T>("b", b)?;
        hyper.validate()
    }

    /// Per-slot learning rate, weight decay, clipping and anchor pull.
    pub fn set_hyper(&mut self, slot: usize, hyper: SlotHyper) -> Result<()> {
        self.check_slot(slot)?;
        hyper.validate()?;
        let h = &mut self.host_hyper[slot];
        (h.lr, h.weight_decay, h.max_grad_norm, h.anchor_pull) = (
            hyper.lr,
            hyper.weight_decay,
            hyper.max_grad_norm,
            hyper.anchor_pull,
        );
        let h = *h;
        write(&self.dev, &mut self.hyper, slot, &[h])
    }

    /// Whether [`Self::step`] updates `slot`.
    pub fn set_active(&mut self, slot: usize, active: bool) -> Result<()> {
        self.check_slot(slot)?;
        self.host_hyper[slot].active = active as i32;
        let h = self.host_hyper[slot];
        write(&self.dev, &mut self.hyper, slot, &[h])
    }

    /// Makes the slot's current weights its anchor (call when a new task
    /// starts; the pull then keeps the adapter near what it knew before).
    pub fn set_anchor(&mut self, slot: usize) -> Result<()> {
        self.check_slot(slot)?;
        write(&self.dev, &mut self.anchor_bound, slot, &[f32::INFINITY])?;
        let PoolConfig { max_rank, n, k, .. } = self.cfg;
        for (part, len) in [(0, max_rank * k), (1, n * max_rank)] {
            let at = slot * len;
            copy(
                &self.dev,
                &self.master[part],
                at,
                &mut self.anchor[part],
                at,
                len,
            )?;
        }
        // The anchor's bound is the master's.
        copy(
            &self.dev,
            &self.state_bound,
            3 * slot,
            &mut self.anchor_bound,
            slot,
            1,
        )
    }

    /// One AdamW step of every active slot, in one launch. `grad_a`, `grad_b`
    /// are the pool-layout f32 gradients (`multi_adapter_backward`'s da, db);
    /// the pool's storage-type weights are refreshed from the new masters.
    ///
    /// `pool` must be the pool the optimizer was made for, and no active
    /// slot may have been loaded through the pool since the optimizer loaded
    /// it ([`Error::SlotChanged`]; an evicted slot is skipped, `Idle`); on an
    /// error nothing changed.
    ///
    /// The step reads each gradient twice: once for the slot's norm (the clip
    /// factor and the check for NaN and Inf need all of it before the first
    /// write), once for the update. [`Self::step_pool_grads`] reads it once.
    pub fn step<'a, T: KernelElement>(
        &mut self,
        pool: &mut AdapterPool<T>,
        grad_a: impl Into<BufRef<'a, f32>>,
        grad_b: impl Into<BufRef<'a, f32>>,
    ) -> Result<()> {
        self.launch_step(pool, grad_a.into(), grad_b.into(), None)
    }

    /// [`Self::step`] with the gradients of a [`PoolGrads`]
    /// (`multi_adapter_backward_into`'s): while it holds their statistics
    /// ([`PoolGrads::has_stats`]) each slot's norm and non-finite check come
    /// from them, and the step reads each gradient once; otherwise it runs as
    /// `step`. The same errors as `step`, and `grads` must be `pool`'s.
    pub fn step_pool_grads<T: KernelElement>(
        &mut self,
        pool: &mut AdapterPool<T>,
        grads: &PoolGrads,
    ) -> Result<()> {
        grads.check_pool(pool)?;
        let stats = grads.stats(pool);
        self.launch_step(pool, grads.da().into(), grads.db().into(), stats)
    }

    /// The step's launch; `stats`: the gradients' statistics (f64 [2] per
    /// slot and column tile of da and of db) and their tiles per slot.
    fn launch_step<T: KernelElement>(
        &mut self,
        pool: &mut AdapterPool<T>,
        ga: BufRef<'_, f32>,
        gb: BufRef<'_, f32>,
        stats: Option<([BufRef<'_, f64>; 2], [usize; 2])>,
    ) -> Result<()> {
        self.check_pool(pool)?;
        let PoolConfig {
            slots,
            max_rank,
            n,
            k,
        } = self.cfg;
        super::check_operand(&self.dev, "grad_a", &ga, slots * max_rank, k)?;
        super::check_operand(&self.dev, "grad_b", &gb, slots * n, max_rank)?;
        self.check_unchanged(pool)?;
        let dev = &self.dev;
        let [ma, mb] = &mut self.master;
        let [m1a, m1b] = &mut self.m1;
        let [m2a, m2b] = &mut self.m2;
        let [ana, anb] = &self.anchor;
        let (mut ma, mut mb, mut m1a, mut m1b, mut m2a, mut m2b) = (
            BufMut::from(ma),
            BufMut::from(mb),
            BufMut::from(m1a),
            BufMut::from(m1b),
            BufMut::from(m2a),
            BufMut::from(m2b),
        );
        let (ana, anb) = (BufRef::from(ana), BufRef::from(anb));
        let (mut wa, mut wb) = (BufMut::from(&mut pool.a), BufMut::from(&mut pool.b));
        let ranks = BufRef::from(&pool.ranks);
        let hyper = BufRef::from(&self.hyper);
        let (mut step, mut status, mut norm) = (
            BufMut::from(&mut self.step),
            BufMut::from(&mut self.status),
            BufMut::from(&mut self.grad_norm),
        );
        use super::{in_ptr, out_ptr};
        let (p_ma, _g1) = out_ptr(dev, &mut ma);
        let (p_mb, _g2) = out_ptr(dev, &mut mb);
        let (p_m1a, _g3) = out_ptr(dev, &mut m1a);
        let (p_m1b, _g4) = out_ptr(dev, &mut m1b);
        let (p_m2a, _g5) = out_ptr(dev, &mut m2a);
        let (p_m2b, _g6) = out_ptr(dev, &mut m2b);
        let (p_ana, _g7) = in_ptr(dev, &ana);
        let (p_anb, _g8) = in_ptr(dev, &anb);
        let (p_ga, _g9) = in_ptr(dev, &ga);
        let (p_gb, _g10) = in_ptr(dev, &gb);
        let (p_wa, _g11) = out_ptr(dev, &mut wa);
        let (p_wb, _g12) = out_ptr(dev, &mut wb);
        let (p_rank, _g13) = in_ptr(dev, &ranks);
        let (p_hyper, _g14) = in_ptr(dev, &hyper);
        let (p_step, _g15) = out_ptr(dev, &mut step);
        let (p_status, _g16) = out_ptr(dev, &mut status);
        let (p_norm, _g17) = out_ptr(dev, &mut norm);
        let mut state_bound = BufMut::from(&mut self.state_bound);
        let anchor_bound = BufRef::from(&self.anchor_bound);
        let (p_state_bound, _g18) = out_ptr(dev, &mut state_bound);
        let (p_anchor_bound, _g19) = in_ptr(dev, &anchor_bound);
        let ([p_stats_a, p_stats_b], _g20, tiles) = match &stats {
            Some(([sa, sb], tiles)) => {
                let ((pa, ga), (pb, gb)) = (in_ptr(dev, sa), in_ptr(dev, sb));
                ([pa, pb], Some([ga, gb]), *tiles)
            }
            None => ([0, 0], None, [0, 0]),
        };
        let params = AdamWParams {
            master_a: p_ma,
            master_b: p_mb,
            m1_a: p_m1a,
            m1_b: p_m1b,
            m2_a: p_m2a,
            m2_b: p_m2b,
            anchor_a: p_ana,
            anchor_b: p_anb,
            grad_a: p_ga,
            grad_b: p_gb,
            work_a: p_wa,
            work_b: p_wb,
            slot_rank: p_rank,
            hyper: p_hyper,
            step: p_step,
            status: p_status,
            grad_norm: p_norm,
            state_bound: p_state_bound,
            anchor_bound: p_anchor_bound,
            grad_stats_a: p_stats_a,
            grad_stats_b: p_stats_b,
            tiles_a: tiles[0] as i32,
            tiles_b: tiles[1] as i32,
            n: n as i32,
            k: k as i32,
            max_rank: max_rank as i32,
            slots: slots as i32,
            beta1: self.config.beta1,
            beta2: self.config.beta2,
            eps: self.config.eps,
            pad: 0,
        };
        let kernel = match T::DTYPE {
            DType::F16 => &ADAMW_F16,
            DType::BF16 => &ADAMW_BF16,
            _ => &ADAMW_F32,
        };
        let dims = LaunchDims {
            grid: [slots as u32, 1, 1],
            block: [THREADS, 1, 1],
            dynamic_smem_bytes: 0,
        };
        // SAFETY: this is the pool the state buffers were allocated for (its
        // id, checked above; every buffer has its config's pool-layout size),
        // the gradients were checked to have the pool layout's sizes, the
        // per-slot arrays hold `slots` entries, and the kernel indexes only
        // slot s's first rank (<= max_rank) rows/columns with s < slots (a
        // block per slot), in 64-bit offsets; the pointer guards live past
        // the launch. The bounds hold 3 and 1 entries per slot, indexed by
        // s < slots. The statistics, when given, are a PoolGrads' of this
        // pool (checked by step_pool_grads): 2 f64 per slot and tile, the
        // tile counts its own.
        unsafe { kernel.launch(dev, dims, &params) }
    }

    /// Each slot's outcome of the last step (waits for the device).
    pub fn statuses(&self) -> Result<Vec<SlotStatus>> {
        let status = self.dev.download(&self.status)?;
        let norms = self.dev.download(&self.grad_norm)?;
        Ok(status
            .iter()
            .zip(norms)
            .map(|(&s, grad_norm)| match s & !(CHECKED | FROM_STATS) {
                UPDATED => SlotStatus::Updated { grad_norm },
                SKIPPED_NON_FINITE => SlotStatus::SkippedNonFinite,
                SKIPPED_OVERFLOW => SlotStatus::SkippedOverflow { grad_norm },
                _ => SlotStatus::Idle,
            })
            .collect())
    }

    /// Per slot, whether the last step ran the checking pass: its stored
    /// bounds could not rule out overflow, so the step was computed once
    /// without writing (a further read of the gradient and state). For tests
    /// and benchmarks: normal training should not need it.
    #[doc(hidden)]
    pub fn checked_slots(&self) -> Result<Vec<bool>> {
        let status = self.dev.download(&self.status)?;
        Ok(status.iter().map(|&s| s & CHECKED != 0).collect())
    }

    /// Per slot, whether the last step took its norm and non-finite check
    /// from the gradient's statistics ([`Self::step_pool_grads`]), reading
    /// the gradient once. For tests and benchmarks.
    #[doc(hidden)]
    pub fn norm_from_stats(&self) -> Result<Vec<bool>> {
        let status = self.dev.download(&self.status)?;
        Ok(status.iter().map(|&s| s & FROM_STATS != 0).collect())
    }

    /// Steps taken by each slot since it was loaded.
    pub fn steps(&self) -> Result<Vec<i32>> {
        self.dev.download(&self.step)
    }

    /// The f32 master weights of `slot`: (a `[rank, k]`, b `[n, rank]`),
    /// of the adapter [`Self::load_adapter`] put there.
    pub fn master<T: KernelElement>(
        &self,
        pool: &AdapterPool<T>,
        slot: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let rank = self.trained_rank(pool, slot)?;
        read_pair(&self.dev, self.cfg, &self.master, slot, rank)
    }

    /// The rest of `slot`'s training state (moments, step count, anchor),
    /// to save beside its master weights and restore with
    /// [`Self::set_state`]: training then continues exactly where it stopped.
    pub fn state<T: KernelElement>(&self, pool: &AdapterPool<T>, slot: usize) -> Result<SlotState> {
        let rank = self.trained_rank(pool, slot)?;
        let pair = |bufs| read_pair(&self.dev, self.cfg, bufs, slot, rank);
        let step = read(&self.dev, &self.step, slot, 1)?[0];
        Ok(SlotState {
            step,
            m1: pair(&self.m1)?,
            m2: pair(&self.m2)?,
            anchor: pair(&self.anchor)?,
        })
    }

    /// Restores what [`Self::state`] returned into `slot`, which must hold
    /// an adapter of the same rank put there by [`Self::load_adapter`] (its
    /// master weights). Checked first, with nothing changed on an error:
    /// every part's size for that rank, finite values, second moments >= 0,
    /// a step count >= 0.
    pub fn set_state<T: KernelElement>(
        &mut self,
        pool: &AdapterPool<T>,
        slot: usize,
        state: &SlotState,
    ) -> Result<()> {
        let rank = self.trained_rank(pool, slot)?;
        self.check_state(state, rank)?;
        self.write_bounds(slot, 1, &[f32::INFINITY; 2], f32::INFINITY)?;
        let (dev, cfg) = (&self.dev, self.cfg);
        let parts = [
            (&mut self.m1, &state.m1),
            (&mut self.m2, &state.m2),
            (&mut self.anchor, &state.anchor),
        ];
        for (bufs, (a, b)) in parts {
            write_pair(dev, cfg, bufs, slot, (a, b), rank)?;
        }
        let largest =
            |(a, b): &(Vec<f32>, Vec<f32>)| largest_magnitude(a).max(largest_magnitude(b));
        let moments = [
            largest(&state.m2),
            moment_ratio(&state.m1.0, &state.m2.0).max(moment_ratio(&state.m1.1, &state.m2.1)),
        ];
        write(dev, &mut self.step, slot, &[state.step])?;
        self.write_bounds(slot, 1, &moments, largest(&state.anchor))
    }

    /// Sets `slot`'s stored bounds from `first` on (0 |master|, 1 |m2|, 2
    /// q, a bound of |m1| / sqrt(m2)) and its anchor's. Writers of the state
    /// call it twice: with Inf (unknown) before they write, so that an error
    /// part way leaves no bound below the values, and with the new bounds
    /// after.
    fn write_bounds(
        &mut self,
        slot: usize,
        first: usize,
        state: &[f32],
        anchor: f32,
    ) -> Result<()> {
        write(&self.dev, &mut self.state_bound, 3 * slot + first, state)?;
        write(&self.dev, &mut self.anchor_bound, slot, &[anchor])
    }

    /// What [`Self::set_state`] checks of `state` for an adapter of `rank`.
    pub(crate) fn check_state(&self, state: &SlotState, rank: usize) -> Result<()> {
        let (a_len, b_len) = (rank * self.cfg.k, self.cfg.n * rank);
        if state.step < 0 {
            return Err(invalid("step", state.step, "must be >= 0"));
        }
        let parts = [
            ("m1.a", &state.m1.0, a_len),
            ("m1.b", &state.m1.1, b_len),
            ("m2.a", &state.m2.0, a_len),
            ("m2.b", &state.m2.1, b_len),
            ("anchor.a", &state.anchor.0, a_len),
            ("anchor.b", &state.anchor.1, b_len),
        ];
        for (operand, v, len) in parts {
            if v.len() != len {
                let why = format!("needs {len} values for an adapter of rank {rank}");
                return Err(invalid(operand, v.len(), why));
            }
            let moment2 = operand.starts_with("m2");
            if let Some(i) = v
                .iter()
                .position(|e| !e.is_finite() || (moment2 && *e < 0.0))
            {
                let why = format!(
                    "value {i} must be finite{}",
                    if moment2 { " and >= 0" } else { "" }
                );
                return Err(invalid(operand, v[i], why));
            }
        }
        Ok(())
    }

    /// The rank of the adapter [`Self::load_adapter`] put in `slot`.
    fn trained_rank<T: KernelElement>(&self, pool: &AdapterPool<T>, slot: usize) -> Result<usize> {
        self.check_pool(pool)?;
        self.check_slot(slot)?;
        let Trained { rank, .. } = self.trained[slot].ok_or(Error::EmptySlot {
            token: 0,
            slot: slot as i32,
        })?;
        Ok(rank)
    }

    /// An error unless `pool` is the very pool the optimizer was made for
    /// (another one of the same shape would have its weights overwritten).
    fn check_pool<T: KernelElement>(&self, pool: &AdapterPool<T>) -> Result<()> {
        if pool.id() != self.pool_id {
            return Err(invalid(
                "pool",
                format!("pool #{} {:?}", pool.id(), pool.config()),
                format!(
                    "not the pool this optimizer was made for (pool #{})",
                    self.pool_id
                ),
            ));
        }
        Ok(())
    }

    /// [`Error::SlotChanged`] for the first active slot whose adapter in the
    /// pool is not the one `load_adapter` put there (a step would overwrite
    /// it). Evicted slots pass: the kernel skips empty slots.
    fn check_unchanged<T: KernelElement>(&self, pool: &AdapterPool<T>) -> Result<()> {
        for (slot, (hyper, trained)) in self.host_hyper.iter().zip(&self.trained).enumerate() {
            let loaded_here = trained.map(|t| t.generation);
            if hyper.active != 0
                && pool.rank(slot).is_some()
                && loaded_here != Some(pool.generation(slot))
            {
                return Err(Error::SlotChanged { slot });
            }
        }
        Ok(())
    }

    fn check_slot(&self, slot: usize) -> Result<()> {
        self.cfg.check_slot(slot)
    }
}

/// A slot's optimizer state besides its master weights ([`SlotOptimizer::state`]):
/// each pair is (`a` `[rank, k]`, `b` `[n, rank]`), f32.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotState {
    /// Steps taken (AdamW's bias correction depends on it).
    pub step: i32,
    /// First moments.
    pub m1: (Vec<f32>, Vec<f32>),
    /// Second moments.
    pub m2: (Vec<f32>, Vec<f32>),
    /// The anchor the pull draws toward.
    pub anchor: (Vec<f32>, Vec<f32>),
}

/// The largest |v| (0 for none): an upper bound the kernel may trust, so NaN
/// counts as Inf (callers check finiteness first; this keeps the bound sound
/// regardless).
fn largest_magnitude(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, &e| {
        if e.is_nan() {
            f32::INFINITY
        } else {
            m.max(e.abs())
        }
    })
}

/// The largest |m1| / sqrt(m2) over paired elements: 0 where both are 0, Inf
/// where m2 alone is (the kernel bounds the step's ratio by it; its 1% margin
/// covers this value's rounding to f32).
fn moment_ratio(m1: &[f32], m2: &[f32]) -> f32 {
    let ratio = |(&a, &b): (&f32, &f32)| match (a == 0.0, b > 0.0) {
        (_, true) => (a.abs() as f64 / (b as f64).sqrt()) as f32,
        (true, false) => 0.0,
        (false, false) => f32::INFINITY,
    };
    m1.iter().zip(m2).map(ratio).fold(0f32, f32::max)
}

/// `slot`'s (a, b) in the adapter's own layout from a pool-layout pair of
/// buffers (`b`'s rows padded to `max_rank`).
fn read_pair(
    dev: &Device,
    cfg: PoolConfig,
    [ba, bb]: &[Buffer<f32>; 2],
    slot: usize,
    rank: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let PoolConfig { max_rank, n, k, .. } = cfg;
    let a = read(dev, ba, slot * max_rank * k, rank * k)?;
    let b_rows = read(dev, bb, slot * n * max_rank, n * max_rank)?;
    Ok((a, unpad_rows(&b_rows, max_rank, rank)))
}

/// Writes (a `[rank, k]`, b `[n, rank]`) into `slot` of a pool-layout pair
/// of buffers, zeros past the rank.
fn write_pair(
    dev: &Device,
    cfg: PoolConfig,
    [ba, bb]: &mut [Buffer<f32>; 2],
    slot: usize,
    (a, b): (&[f32], &[f32]),
    rank: usize,
) -> Result<()> {
    let PoolConfig { max_rank, n, k, .. } = cfg;
    let mut a_rows = vec![0f32; max_rank * k];
    a_rows[..rank * k].copy_from_slice(a);
    let mut b_rows = vec![0f32; n * max_rank];
    for (dst, src) in b_rows.chunks_mut(max_rank).zip(b.chunks(rank)) {
        dst[..rank].copy_from_slice(src);
    }
    write(dev, ba, slot * max_rank * k, &a_rows)?;
    write(dev, bb, slot * n * max_rank, &b_rows)
}

/// Elements of the pool layout's `a` (`[slots][max_rank][k]`) and `b`
/// (`[slots][n][max_rank]`), or an error if they overflow usize.
fn pool_lengths(cfg: PoolConfig) -> Result<(usize, usize)> {
    let len = |dim: usize| {
        (cfg.slots.checked_mul(cfg.max_rank))
            .and_then(|v| v.checked_mul(dim))
            .ok_or_else(|| invalid("slots", cfg.slots, "pool size overflows usize"))
    };
    Ok((len(cfg.k)?, len(cfg.n)?))
}
