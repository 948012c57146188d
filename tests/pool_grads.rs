//! `PoolGrads`: the statistics the backward pass leaves per slot and column
//! tile as it writes the gradients (sum of squares, largest magnitude) must
//! describe the gradients exactly, down every path that finishes a tile (one
//! token range, atomics over several, the deterministic reduction, a layer
//! per token, accumulation, batches of no tokens); the optimizer must then
//! step as it does from the gradient alone, reading it once, and must never
//! trust statistics that no longer describe the gradient (changed by hand,
//! a failed or partial pass, a reloaded slot).
mod common;

use common::pool_model::PoolCase;
use common::*;
use half::{bf16, f16};
use lora_kernels::ops::KernelElement;
use lora_kernels::ops::adamw::{AdamWConfig, SlotHyper, SlotOptimizer, SlotStatus};
use lora_kernels::ops::lora_backward::{
    BackwardOptions, BackwardScratch, DeviceBackwardInputs, multi_adapter_backward_into,
};
use lora_kernels::{AdapterPool, Device, Dims, PoolConfig, PoolGrads};

/// A pool loaded with a case's adapters, its gradients and scratch.
struct Trainer<T> {
    dev: Device,
    pool: AdapterPool<T>,
    grads: PoolGrads,
    scratch: BackwardScratch,
}

impl<T: KernelElement> Trainer<T> {
    fn new(dev: &Device, case: &PoolCase<T>) -> Self {
        let pool = case.pool(dev);
        Trainer {
            grads: PoolGrads::new(&pool).unwrap(),
            scratch: BackwardScratch::new(dev).unwrap(),
            dev: dev.clone(),
            pool,
        }
    }

    /// The backward pass of `case`'s batch (its ids, g, x, t) into the grads.
    fn backward(&mut self, case: &PoolCase<T>, opts: BackwardOptions) {
        let dev = &self.dev;
        let (g, x, w) = (
            dev.upload(&case.g).unwrap(),
            dev.upload(&case.x).unwrap(),
            dev.upload(&case.w).unwrap(),
        );
        let (ids, t) = (dev.upload(&case.ids).unwrap(), dev.upload(&case.t).unwrap());
        let inputs = DeviceBackwardInputs::new(&g, &x, &w, &t);
        let m = case.dims.m;
        multi_adapter_backward_into(
            &self.pool,
            m,
            &ids,
            inputs,
            None,
            &mut self.grads,
            opts,
            &mut self.scratch,
        )
        .unwrap();
    }

    /// Per slot, the sum of squares and largest magnitude (Inf for NaN or
    /// Inf) of its gradients' entries below its rank, from the gradients.
    fn stats_of_gradients(&self) -> Vec<(f64, f64)> {
        let PoolConfig {
            slots,
            max_rank,
            n,
            k,
        } = self.pool.config();
        let da = self.dev.download(self.grads.da()).unwrap();
        let db = self.dev.download(self.grads.db()).unwrap();
        (0..slots)
            .map(|s| {
                let rank = self.pool.rank(s).unwrap_or(0);
                let a = (0..rank).flat_map(|j| (0..k).map(move |q| (s * max_rank + j) * k + q));
                let b = (0..n).flat_map(|c| (0..rank).map(move |j| (s * n + c) * max_rank + j));
                let values = a.map(|i| da[i]).chain(b.map(|i| db[i]));
                values.fold((0.0, 0.0), |(sq, max), v| {
                    if v.is_finite() {
                        (sq + (v as f64).powi(2), f64::max(max, v.abs() as f64))
                    } else {
                        (sq, f64::INFINITY)
                    }
                })
            })
            .collect()
    }

    /// The statistics are current and equal what the gradients hold.
    fn check_stats(&self, what: &str) {
        let stats = self.grads.slot_stats(&self.pool).unwrap();
        let stats = stats.unwrap_or_else(|| panic!("{what}: no current statistics"));
        let want = self.stats_of_gradients();
        for (s, (got, want)) in stats.iter().zip(&want).enumerate() {
            assert!(agree(*got, *want), "{what}: slot {s}: {got:?} != {want:?}");
            // Negative control: a sum of squares 0.01% off must not agree.
            if want.1.is_finite() && want.0 > 0.0 {
                assert!(!agree((got.0 * 1.0001, got.1), *want));
            }
        }
    }
}

/// Statistics agree: the same largest magnitude (both are f32 values or Inf),
/// and sums of squares of the same f32 values added in f64 in other orders
/// (relative error ~1e-16 per addition), when the gradient is finite.
fn agree(got: (f64, f64), want: (f64, f64)) -> bool {
    got.1 == want.1 && (want.1.is_infinite() || (got.0 - want.0).abs() <= 1e-12 * want.0)
}

fn opts(accumulate: bool, deterministic: bool) -> BackwardOptions {
    BackwardOptions {
        accumulate,
        deterministic,
        ..Default::default()
    }
}

/// `m` tokens over slots [0, 2, -1, 3, 2, 0, 7] in turn (7: out of range;
/// slot 1 is empty), n and k past several column tiles of every kernel.
fn case<T: KernelElement>(m: usize, seed: u64) -> PoolCase<T> {
    let ids = (0..m).map(|i| [0, 2, -1, 3, 2, 0, 7][i % 7]).collect();
    PoolCase::new(Dims::new(m, 140, 270), 12, &[5, 0, 12, 1], ids, seed)
}

fn stats_describe_the_gradients<T: KernelElement>() {
    // 13 tokens: one token range; 300: several (atomics, or partials and
    // the deterministic reduction).
    for m in [13, 300] {
        let c = case::<T>(m, 3 + m as u64);
        for dev in devices() {
            for det in [false, true] {
                let what = format!("{:?} m {m} deterministic {det} on {}", T::DTYPE, dev.name());
                let mut tr = Trainer::new(&dev, &c);
                tr.backward(&c, opts(false, det));
                tr.check_stats(&what);
                // Accumulating onto it: the statistics of the sums.
                tr.backward(&c, opts(true, det));
                tr.check_stats(&format!("{what}, accumulated"));
            }
        }
    }
}

#[test]
fn stats_describe_the_gradients_f32() {
    stats_describe_the_gradients::<f32>();
}

#[test]
fn stats_describe_the_gradients_f16() {
    stats_describe_the_gradients::<f16>();
}

#[test]
fn stats_describe_the_gradients_bf16() {
    stats_describe_the_gradients::<bf16>();
}

/// A pool larger than the batch (a grid layer per token): the slots no token
/// uses are zeroed with their statistics, or, accumulating, kept with them
/// while those still describe them.
#[test]
fn stats_of_slots_the_batch_leaves_alone() {
    fn check<T: KernelElement>(dev: &Device) {
        let ranks = [5, 0, 12, 1, 3, 7];
        let ids = vec![2, 4, -1, 2];
        let small = PoolCase::<T>::new(Dims::new(4, 140, 270), 12, &ranks, ids, 5);
        let ids = (0..30).map(|i| i % 6).collect();
        let large = PoolCase::<T>::new(Dims::new(30, 140, 270), 12, &ranks, ids, 6);
        let what = format!("{:?} on {}", T::DTYPE, dev.name());
        let mut tr = Trainer::new(dev, &large);
        tr.backward(&large, opts(false, false));
        tr.backward(&small, opts(false, false));
        tr.check_stats(&format!("{what}: a layer per token"));
        tr.backward(&large, opts(false, false));
        tr.backward(&small, opts(true, false));
        tr.check_stats(&format!("{what}: a layer per token, accumulated"));

        // Changed by hand: nothing describes the untouched slots any more,
        // until a batch that covers every slot rewrites them all. The
        // junk past slot 0's rank must stay out of its statistics.
        let mut da = tr.dev.download(tr.grads.da()).unwrap();
        da[5 * 270] = 1e30; // slot 0, rank row 5: past its rank
        *tr.grads.da_mut() = tr.dev.upload(&da).unwrap();
        assert!(!tr.grads.has_stats(&tr.pool), "{what}: da_mut drops them");
        tr.backward(&small, opts(true, false));
        assert!(
            !tr.grads.has_stats(&tr.pool),
            "{what}: slots 0, 3 undescribed"
        );
        tr.backward(&large, opts(true, true));
        tr.check_stats(&format!("{what}: rewritten"));
        assert_eq!(tr.dev.download(tr.grads.da()).unwrap()[5 * 270], 1e30);
    }
    for dev in devices() {
        check::<f32>(&dev);
        check::<bf16>(&dev);
    }
}

/// A batch of no tokens: zero gradients with zero statistics, or,
/// accumulating, both as they were.
#[test]
fn an_empty_batch_zeroes_or_keeps_the_stats() {
    for dev in devices() {
        let c = case::<bf16>(13, 8);
        let mut empty = c.clone();
        empty.dims.m = 0;
        (empty.ids, empty.g, empty.x, empty.t) = (vec![], vec![], vec![], vec![]);
        let mut tr = Trainer::new(&dev, &c);
        tr.backward(&c, opts(false, false));
        let before = tr.grads.slot_stats(&tr.pool).unwrap();
        tr.backward(&empty, opts(true, false));
        assert_eq!(tr.grads.slot_stats(&tr.pool).unwrap(), before);
        tr.check_stats("empty, accumulated");
        tr.backward(&empty, opts(false, false));
        tr.check_stats("empty");
        let zeros = tr.grads.slot_stats(&tr.pool).unwrap().unwrap();
        assert!(zeros.iter().all(|&s| s == (0.0, 0.0)), "{zeros:?}");
    }
}

/// A trainer whose pool the optimizer loaded with `case`'s adapters (f32
/// masters), every non-empty slot active, with clipping that bites.
fn optimizer<T: KernelElement>(dev: &Device, case: &PoolCase<T>) -> (Trainer<T>, SlotOptimizer) {
    let mut tr = Trainer::new(dev, case);
    let mut opt = SlotOptimizer::new(&tr.pool, AdamWConfig::default()).unwrap();
    let hyper = SlotHyper {
        lr: 0.01,
        weight_decay: 0.1,
        max_grad_norm: 0.5,
        anchor_pull: 0.0,
    };
    for (s, (rank, scale, a, b)) in case.slots.iter().enumerate() {
        if *rank > 0 {
            let f = |v: &[T]| v.iter().map(|e| e.to_f64() as f32).collect::<Vec<_>>();
            opt.load_adapter(&mut tr.pool, s, &f(a), &f(b), *rank, *scale, hyper)
                .unwrap();
        }
    }
    tr.grads = PoolGrads::new(&tr.pool).unwrap();
    (tr, opt)
}

/// Stepping from the statistics gives what stepping from the gradient gives
/// (norms within an f32 rounding: the f64 sums differ in order only), and
/// reads the gradient once.
fn steps_as_from_the_gradient<T: KernelElement>() {
    for dev in devices() {
        let c = case::<T>(300, 9);
        let (mut tr, mut opt) = optimizer(&dev, &c);
        let (mut plain_tr, mut plain) = optimizer(&dev, &c);
        for step in 0..2 {
            tr.backward(&c, opts(false, step == 1));
            opt.step_pool_grads(&mut tr.pool, &tr.grads).unwrap();
            plain
                .step(&mut plain_tr.pool, tr.grads.da(), tr.grads.db())
                .unwrap();
            let what = format!("{:?} step {step} on {}", T::DTYPE, dev.name());
            let (got, want) = (opt.statuses().unwrap(), plain.statuses().unwrap());
            for (s, (g, w)) in got.iter().zip(&want).enumerate() {
                match (g, w) {
                    (
                        SlotStatus::Updated { grad_norm: a },
                        SlotStatus::Updated { grad_norm: b },
                    ) => assert!(
                        (a - b).abs() <= b * 2f32.powi(-23),
                        "{what} slot {s}: {a} {b}"
                    ),
                    _ => assert_eq!(g, w, "{what} slot {s}"),
                }
            }
            let active: Vec<bool> = c.slots.iter().map(|s| s.0 > 0).collect();
            assert_eq!(opt.norm_from_stats().unwrap(), active, "{what}");
            assert_eq!(plain.norm_from_stats().unwrap(), vec![false; 4], "{what}");
            for s in (0..4).filter(|&s| active[s]) {
                let (a, b) = opt.master(&tr.pool, s).unwrap();
                let (pa, pb) = plain.master(&plain_tr.pool, s).unwrap();
                for (u, v) in a.iter().chain(&b).zip(pa.iter().chain(&pb)) {
                    assert!(
                        (u - v).abs() <= v.abs() * 2f32.powi(-22),
                        "{what} slot {s}: {u} {v}"
                    );
                }
            }
        }
    }
}

#[test]
fn steps_as_from_the_gradient_f32() {
    steps_as_from_the_gradient::<f32>();
}

#[test]
fn steps_as_from_the_gradient_f16() {
    steps_as_from_the_gradient::<f16>();
}

#[test]
fn steps_as_from_the_gradient_bf16() {
    steps_as_from_the_gradient::<bf16>();
}

/// A NaN or Inf in one slot's gradient, seen through the statistics, skips
/// that slot's step and no other; one put in by hand is seen too (the
/// statistics are dropped, the step reads the gradient).
#[test]
fn non_finite_gradients_skip_their_slot_only() {
    for dev in devices() {
        for (m, det) in [(13, false), (300, false), (300, true)] {
            let mut c = case::<bf16>(m, 10);
            c.x[2 * 270 + 7] = bf16::NAN; // token 2: no adapter, so nothing
            c.x[7] = bf16::INFINITY; // token 0: slot 0's da
            c.save_t();
            c.t.iter_mut()
                .for_each(|v| *v = if v.is_finite() { *v } else { 1.0 });
            let (mut tr, mut opt) = optimizer(&dev, &c);
            tr.backward(&c, opts(false, det));
            tr.check_stats("Inf in x");
            opt.step_pool_grads(&mut tr.pool, &tr.grads).unwrap();
            let status = opt.statuses().unwrap();
            let what = format!("m {m} deterministic {det} on {}", dev.name());
            assert_eq!(status[0], SlotStatus::SkippedNonFinite, "{what}");
            assert_eq!(status[1], SlotStatus::Idle, "{what}");
            for s in [2, 3] {
                assert!(
                    matches!(status[s], SlotStatus::Updated { .. }),
                    "{what} slot {s}"
                );
            }
            assert_eq!(
                opt.norm_from_stats().unwrap(),
                vec![true, false, true, true]
            );

            // By hand: slot 3's gradient gets a NaN; the step must see it.
            let mut db = dev.download(tr.grads.db()).unwrap();
            db[3 * 140 * 12] = f32::NAN; // slot 3, row 0, rank 0
            *tr.grads.db_mut() = dev.upload(&db).unwrap();
            opt.step_pool_grads(&mut tr.pool, &tr.grads).unwrap();
            let status = opt.statuses().unwrap();
            assert_eq!(status[3], SlotStatus::SkippedNonFinite, "{what}: by hand");
            assert!(matches!(status[2], SlotStatus::Updated { .. }), "{what}");
            assert_eq!(opt.norm_from_stats().unwrap(), vec![false; 4]);
        }
    }
}

/// Statistics of adapters since replaced describe the wrong ranks: a load
/// or eviction drops them; bad input and the gradients of another pool are
/// refused, with nothing changed.
#[test]
fn stats_are_trusted_only_for_their_pool_as_it_was() {
    for dev in devices() {
        let c = case::<bf16>(13, 11);
        let mut tr = Trainer::new(&dev, &c);
        tr.backward(&c, opts(false, false));
        assert!(tr.grads.has_stats(&tr.pool));
        tr.pool.evict(1).unwrap(); // already empty: still a change of the slot
        assert!(!tr.grads.has_stats(&tr.pool));
        tr.backward(&c, opts(false, false));
        assert!(tr.grads.has_stats(&tr.pool));

        // Bad input: refused with nothing changed, the statistics included.
        let (g, x, w) = (
            dev.upload(&c.g).unwrap(),
            dev.upload(&c.x).unwrap(),
            dev.upload(&c.w).unwrap(),
        );
        let (ids, short_t) = (dev.upload(&c.ids).unwrap(), dev.upload(&c.t[1..]).unwrap());
        let inputs = DeviceBackwardInputs::new(&g, &x, &w, &short_t);
        let err = multi_adapter_backward_into(
            &tr.pool,
            13,
            &ids,
            inputs,
            None,
            &mut tr.grads,
            opts(false, false),
            &mut tr.scratch,
        )
        .unwrap_err();
        assert!(err.to_string().contains("`t`"), "{err}");
        assert!(tr.grads.has_stats(&tr.pool));
        tr.check_stats("after a refused call");

        let other = Trainer::new(&dev, &c);
        assert!(!other.grads.has_stats(&tr.pool));
        let da = dev.download(tr.grads.da()).unwrap();
        let t = dev.upload(&c.t).unwrap();
        let inputs = DeviceBackwardInputs::new(&g, &x, &w, &t);
        let err = multi_adapter_backward_into(
            &other.pool,
            13,
            &ids,
            inputs,
            None,
            &mut tr.grads,
            opts(false, false),
            &mut tr.scratch,
        )
        .unwrap_err();
        assert!(err.to_string().contains("grads"), "{err}");
        assert!(tr.grads.has_stats(&tr.pool));
        assert_eq!(dev.download(tr.grads.da()).unwrap(), da);

        let (mut other, mut opt) = optimizer(&dev, &c);
        let err = opt.step_pool_grads(&mut other.pool, &tr.grads).unwrap_err();
        assert!(err.to_string().contains("grads"), "{err}");
        assert_eq!(opt.steps().unwrap(), vec![0; 4]);
    }
}
