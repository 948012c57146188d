//! The fused optimizer against the reference step, slot by slot, with
//! docs/DESIGN.md section 3's per-element bound (carried from step to step)
//! and a negative control that must fail it: per-slot learning rate, weight
//! decay, clipping, the anchor pull, NaN/Inf skipping, inactive slots, the
//! refreshed storage-type copy, gradients near 1e19, and steps that would
//! overflow (skipped whole).
mod common;

use common::adamw_model::{Drift, Trajectory, clip_factor, drift};
use common::*;
use half::{bf16, f16};
use lora_kernels::ops::KernelElement;
use lora_kernels::ops::adamw::{AdamWConfig, SlotHyper, SlotOptimizer, SlotState, SlotStatus};
use lora_kernels::reference::{self, AdamW, AdamWState, SlotStep};
use lora_kernels::{AdapterPool, DType, Device, Error, PoolConfig};

const CFG: PoolConfig = PoolConfig {
    slots: 5,
    max_rank: 6,
    n: 11,
    k: 9,
};
const RANKS: [usize; 5] = [6, 1, 3, 4, 2];
/// A pool whose max_rank is a multiple of 4: slots of rank 4 and 8 take the
/// kernel's 16-byte path, rank 1 the one-value path.
const QUAD_CFG: PoolConfig = PoolConfig {
    slots: 5,
    max_rank: 8,
    n: 11,
    k: 9,
};
const QUAD_RANKS: [usize; 5] = [8, 1, 4, 8, 4];

fn hyper(lr: f32, weight_decay: f32, max_grad_norm: f32, anchor_pull: f32) -> SlotHyper {
    SlotHyper {
        lr,
        weight_decay,
        max_grad_norm,
        anchor_pull,
    }
}

fn hypers() -> [SlotHyper; 5] {
    [
        hyper(1e-2, 0.0, 0.0, 0.0),
        hyper(5e-2, 0.1, 0.0, 0.0),
        hyper(1e-2, 0.0, 0.05, 0.0), // clipped: gradients are much larger than 0.05
        hyper(2e-2, 0.01, 0.0, 0.5), // pulled toward the anchor
        hyper(1e-2, 0.0, 0.0, 0.0),  // gets a NaN gradient
    ]
}

/// The relative error in lr that the control carries: section 3's control
/// for the masters (f32); for the storage copy, its own type's.
fn control_delta(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 1e-2,
        DType::F16 => 3e-3,
        _ => 1e-4,
    }
}

/// A pool, its optimizer, and per slot the reference, its two controls (lr
/// off by the f32 control's error, for the masters, and by the storage
/// type's, for the copy) and the drift bound between kernel and reference.
struct Run<T> {
    dev: Device,
    betas: AdamWConfig,
    pool: AdapterPool<T>,
    opt: SlotOptimizer,
    active: Vec<bool>,
    want: Vec<Trajectory<T>>,
    controls: [Vec<Trajectory<T>>; 2],
    drift: Vec<Vec<Drift>>,
    anchors: Vec<Vec<f32>>,
}

impl<T: KernelElement> Run<T> {
    /// Slot s gets rank `ranks[s]`, `hypers[s]` and random weights times
    /// `weight_scale` (small weights show lr-sized steps in the storage copy).
    fn new(
        dev: &Device,
        cfg: PoolConfig,
        ranks: &[usize],
        hypers: &[SlotHyper],
        weight_scale: f32,
    ) -> Self {
        Self::with_betas(
            dev,
            cfg,
            ranks,
            hypers,
            weight_scale,
            AdamWConfig::default(),
        )
    }

    /// [`Self::new`] with other betas and eps.
    fn with_betas(
        dev: &Device,
        cfg: PoolConfig,
        ranks: &[usize],
        hypers: &[SlotHyper],
        weight_scale: f32,
        betas: AdamWConfig,
    ) -> Self {
        let pool = AdapterPool::<T>::new(dev, cfg).unwrap();
        let opt = SlotOptimizer::new(&pool, betas).unwrap();
        let mut run = Run {
            dev: dev.clone(),
            betas,
            pool,
            opt,
            active: vec![false; cfg.slots],
            want: Vec::new(),
            controls: [Vec::new(), Vec::new()],
            drift: Vec::new(),
            anchors: Vec::new(),
        };
        for (s, (&r, &h)) in ranks.iter().zip(hypers).enumerate() {
            let scaled = |seed, len| -> Vec<f32> {
                let values: Vec<f32> = random(&mut rng(seed), len);
                values.iter().map(|v| v * weight_scale).collect()
            };
            let (a, b) = (
                scaled(s as u64, r * cfg.k),
                scaled(50 + s as u64, cfg.n * r),
            );
            (run.opt)
                .load_adapter(&mut run.pool, s, &a, &b, r, 1.0, h)
                .unwrap();
            let p: Vec<f32> = a.iter().chain(&b).copied().collect();
            run.active[s] = true;
            run.want.push(Trajectory::new(&p, h));
            run.controls[0].push(Trajectory::new(&p, h));
            run.controls[1].push(Trajectory::new(&p, h));
            run.drift.push(vec![Drift::default(); p.len()]);
            run.anchors.push(p);
            run.set_reference_hyper(s, h);
        }
        run
    }

    /// `h` for slot s's reference, and its controls' lr off.
    fn set_reference_hyper(&mut self, s: usize, h: SlotHyper) {
        self.want[s].hyper = h;
        for (control, dtype) in self.controls.iter_mut().zip([DType::F32, T::DTYPE]) {
            let lr = (h.lr as f64 * (1.0 + control_delta(dtype))) as f32;
            control[s].hyper = SlotHyper { lr, ..h };
        }
    }

    fn set_hyper(&mut self, s: usize, h: SlotHyper) {
        self.opt.set_hyper(s, h).unwrap();
        self.set_reference_hyper(s, h);
    }

    fn set_active(&mut self, slot: usize, active: bool) {
        self.opt.set_active(slot, active).unwrap();
        self.active[slot] = active;
    }

    /// One step of the kernel and of the references, on pool-layout gradients;
    /// the statuses must be the reference's outcomes, the norms within one f32
    /// rounding (both sum squares in f64).
    fn step(&mut self, ga: &[f32], gb: &[f32]) -> Vec<SlotStatus> {
        let (gad, gbd) = (self.dev.upload(ga).unwrap(), self.dev.upload(gb).unwrap());
        self.opt.step(&mut self.pool, &gad, &gbd).unwrap();
        let statuses = self.opt.statuses().unwrap();
        eprintln!(
            "DBG {} checked {:?} {:?}",
            std::any::type_name::<T>(),
            self.opt.checked_slots().unwrap(),
            statuses
        );
        let cfg = self.pool.config();
        for s in 0..self.want.len() {
            if !self.active[s] {
                assert_eq!(statuses[s], SlotStatus::Idle, "slot {s}");
                continue;
            }
            let grad = slot_values(cfg, s, self.want[s].p.len() / (cfg.n + cfg.k), (ga, gb));
            let before = self.drift_step(s, &grad);
            let outcome = self.want[s]
                .step(&self.betas, &grad, &self.anchors[s])
                .unwrap();
            for control in &mut self.controls {
                control[s]
                    .step(&self.betas, &grad, &self.anchors[s])
                    .unwrap();
            }
            let norm_ok = |got: f32, want: f64| (got as f64 - want).abs() <= ulp::<f32>(want);
            match (outcome, statuses[s]) {
                (SlotStep::Updated { grad_norm: w }, SlotStatus::Updated { grad_norm: got }) => {
                    assert!(norm_ok(got, w), "slot {s} norm {got} vs {w}");
                    self.drift[s] = before;
                }
                (
                    SlotStep::SkippedOverflow { grad_norm: w },
                    SlotStatus::SkippedOverflow { grad_norm: got },
                ) => {
                    assert!(norm_ok(got, w), "slot {s} norm {got} vs {w}");
                }
                (SlotStep::Skipped, SlotStatus::SkippedNonFinite) => {}
                other => panic!("slot {s}: {other:?} on {}", self.dev.name()),
            }
        }
        statuses
    }

    /// Slot s's drift after a step on `grad`, from the reference's state before it.
    fn drift_step(&self, s: usize, grad: &[f32]) -> Vec<Drift> {
        let traj = &self.want[s];
        let h = traj.hyper;
        let clip = clip_factor(&h, grad);
        (0..grad.len())
            .map(|e| {
                let state = [
                    traj.p[e],
                    traj.m1[e],
                    traj.m2[e],
                    grad[e],
                    self.anchors[s][e],
                ];
                drift(
                    self.drift[s][e],
                    &self.betas,
                    &h,
                    clip,
                    traj.steps + 1,
                    state.map(f64::from),
                )
            })
            .collect()
    }

    /// The kernel's masters and storage copy (every slot, a then b).
    fn kernel_state(&self) -> (Vec<f32>, Vec<T>) {
        let (mut masters, mut copies) = (Vec::new(), Vec::new());
        for s in 0..self.want.len() {
            let (a, b) = self.opt.master(&self.pool, s).unwrap();
            masters.extend(a.iter().chain(&b));
            let adapter = self.pool.adapter(s).unwrap().expect("a loaded slot");
            copies.extend(adapter.a.iter().chain(&adapter.b));
        }
        (masters, copies)
    }

    /// Masters within the drift bound of the reference and outside it for the
    /// control; the storage copy the kernel's masters rounded once, and within
    /// its own bound of the reference's copy (and not of the control's).
    fn check(&self) {
        let on = self.dev.name();
        let (masters, copies) = self.kernel_state();
        let gather = |f: &dyn Fn(&Trajectory<T>) -> Vec<f64>, of: &[Trajectory<T>]| -> Vec<f64> {
            of.iter().flat_map(f).collect()
        };
        let p = |t: &Trajectory<T>| t.p.iter().map(|&v| v as f64).collect();
        let bound: Vec<f64> = self.drift.iter().flatten().map(|d| d.p).collect();
        let got: Vec<f64> = masters.iter().map(|&v| v as f64).collect();
        compare_within(
            &format!("masters on {on}"),
            &got,
            &gather(&p, &self.want),
            &bound,
        )
        .unwrap();
        let control = compare_within("control", &got, &gather(&p, &self.controls[0]), &bound);
        assert!(
            control.is_err(),
            "the masters' control (lr off) passed on {on}"
        );

        for (q, (c, m)) in copies.iter().zip(&masters).enumerate() {
            assert_eq!(
                *c,
                T::from_f32(*m),
                "copy {q} is not its master rounded, on {on}"
            );
        }
        if T::DTYPE == DType::F32 {
            return; // the copy is the master
        }
        // |round(x) - round(y)| <= |x - y| + ulp_T(max(|x|, |y|)).
        let working = |t: &Trajectory<T>| t.working.iter().map(|v| v.to_f64()).collect();
        let want = gather(&working, &self.want);
        let bound: Vec<f64> = (want.iter().zip(&bound))
            .map(|(w, d)| d + ulp::<T>(w.abs() + d))
            .collect();
        let got: Vec<f64> = copies.iter().map(|v| v.to_f64()).collect();
        compare_within(&format!("copy on {on}"), &got, &want, &bound).unwrap();
        let control = compare_within(
            "control",
            &got,
            &gather(&working, &self.controls[1]),
            &bound,
        );
        assert!(
            control.is_err(),
            "the copy's control (lr off) passed on {on}"
        );
    }
}

/// A slot's parameters (a then b) from pool-layout gradients.
fn slot_values(cfg: PoolConfig, slot: usize, rank: usize, (ga, gb): (&[f32], &[f32])) -> Vec<f32> {
    let PoolConfig { max_rank, n, k, .. } = cfg;
    let mut v = ga[slot * max_rank * k..][..rank * k].to_vec();
    for c in 0..n {
        v.extend_from_slice(&gb[(slot * n + c) * max_rank..][..rank]);
    }
    v
}

/// Random pool-layout gradients times `scale`.
fn gradients(cfg: PoolConfig, seed: u64, scale: f32) -> (Vec<f32>, Vec<f32>) {
    let PoolConfig {
        slots,
        max_rank,
        n,
        k,
    } = cfg;
    let mut g = rng(seed);
    let mut ga: Vec<f32> = random(&mut g, slots * max_rank * k);
    let mut gb: Vec<f32> = random(&mut g, slots * n * max_rank);
    ga.iter_mut().chain(gb.iter_mut()).for_each(|v| *v *= scale);
    (ga, gb)
}

fn every_slot_matches_the_reference<T: KernelElement>() {
    for (cfg, ranks) in [(CFG, RANKS), (QUAD_CFG, QUAD_RANKS)] {
        every_slot_matches_the_reference_in::<T>(cfg, &ranks);
    }
}

fn every_slot_matches_the_reference_in<T: KernelElement>(cfg: PoolConfig, ranks: &[usize]) {
    for dev in devices() {
        let mut run = Run::<T>::new(&dev, cfg, ranks, &hypers(), 0.05);
        run.set_active(1, false); // slot 1 sits out the first two steps
        for step in 0..4u64 {
            if step == 2 {
                run.set_active(1, true);
            }
            let (mut ga, gb) = gradients(cfg, 100 + step, 3.0);
            ga[4 * cfg.max_rank * cfg.k + 2] = f32::NAN; // slot 4's gradient is poisoned
            run.step(&ga, &gb);
            assert_eq!(
                run.opt.checked_slots().unwrap(),
                vec![false; cfg.slots],
                "step {step}: an ordinary step ran the checking pass"
            );
        }
        let steps = run.opt.steps().unwrap();
        assert_eq!(
            steps,
            vec![4, 2, 4, 4, 0],
            "step counts (slot 4 always skipped, slot 1 idle twice)"
        );
        run.check();
    }
}

#[test]
fn every_slot_matches_the_reference_bf16() {
    every_slot_matches_the_reference::<bf16>();
}

#[test]
fn every_slot_matches_the_reference_f16() {
    every_slot_matches_the_reference::<f16>();
}

#[test]
fn every_slot_matches_the_reference_f32() {
    every_slot_matches_the_reference::<f32>();
}

#[test]
fn a_fresh_optimizer_reports_every_slot_idle() {
    for dev in devices() {
        let pool = AdapterPool::<bf16>::new(&dev, CFG).unwrap();
        let opt = SlotOptimizer::new(&pool, AdamWConfig::default()).unwrap();
        assert_eq!(opt.statuses().unwrap(), vec![SlotStatus::Idle; CFG.slots]);
    }
}

#[test]
fn eps_zero_is_refused() {
    let dev = Device::host().unwrap();
    let pool = AdapterPool::<bf16>::new(&dev, CFG).unwrap();
    let config = AdamWConfig {
        eps: 0.0,
        ..AdamWConfig::default()
    };
    let err = SlotOptimizer::new(&pool, config)
        .err()
        .expect("eps = 0 accepted");
    assert!(
        matches!(err, Error::InvalidArgument { name: "eps", .. }),
        "{err}"
    );
    let cfg = AdamW {
        eps: 0.0,
        ..AdamW::default()
    };
    let (mut p, mut m1, mut m2, mut w) = ([0.5f32; 3], [0f32; 3], [0f32; 3], [0f32; 3]);
    let state = AdamWState {
        p: &mut p,
        m1: &mut m1,
        m2: &mut m2,
        working: &mut w,
    };
    let err = reference::adamw_step(&cfg, 1, &[0.0; 3], state).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { name: "eps", .. }),
        "{err}"
    );
}

/// Gradients near 1e19: their squares pass f32's range, so the norm must be
/// summed without overflow; clipped (slot 0) and not (slot 1), the steps and
/// the reported norms match the reference.
#[test]
fn huge_gradients_clip_and_report_a_finite_norm() {
    let cfg = PoolConfig {
        slots: 2,
        max_rank: 3,
        n: 7,
        k: 5,
    };
    let hypers = [hyper(1e-2, 0.0, 1.0, 0.0), hyper(1e-2, 0.0, 0.0, 0.0)];
    for dev in devices() {
        let mut run = Run::<f32>::new(&dev, cfg, &[3, 2], &hypers, 1.0);
        for step in 0..3 {
            let (ga, gb) = gradients(cfg, 7 + step, 1e19);
            for status in run.step(&ga, &gb) {
                let SlotStatus::Updated { grad_norm } = status else {
                    panic!("{status:?}")
                };
                assert!(grad_norm.is_finite() && grad_norm > 1e19, "{grad_norm}");
            }
        }
        run.check();
    }
}

/// A slot whose step would leave NaN or Inf anywhere skips it whole; the
/// others step. Slot 1: m2 = (1 - beta2) g^2 passes f32's range; slot 2: a
/// huge lr makes the weights pass it; slot 3: the f16 copy passes 65504.
#[test]
fn an_overflowing_step_is_skipped_and_changes_nothing() {
    // Ranks 2 take the one-value path, ranks 4 the 16-byte path (one value
    // of four overflowing must skip the slot too).
    overflowing_step_in(2, [2, 1, 2, 2]);
    overflowing_step_in(4, [4, 1, 4, 4]);
}

fn overflowing_step_in(max_rank: usize, ranks: [usize; 4]) {
    let cfg = PoolConfig {
        slots: 4,
        max_rank,
        n: 5,
        k: 4,
    };
    let hypers = [
        hyper(1e-2, 0.0, 0.0, 0.0),
        hyper(1e-2, 0.0, 0.0, 0.0),
        hyper(1e38, 10.0, 0.0, 0.0),
        hyper(1e6, 0.0, 0.0, 0.0),
    ];
    for dev in devices() {
        let mut run = Run::<f16>::new(&dev, cfg, &ranks, &hypers, 0.05);
        let before = run.kernel_state();
        let (mut ga, gb) = gradients(cfg, 3, 1.0);
        ga[cfg.max_rank * cfg.k + 1] = 1e21; // slot 1
        let statuses = run.step(&ga, &gb);
        assert!(
            matches!(statuses[0], SlotStatus::Updated { .. }),
            "{statuses:?}"
        );
        for s in 1..4 {
            assert!(
                matches!(statuses[s], SlotStatus::SkippedOverflow { .. }),
                "slot {s}: {statuses:?}"
            );
        }
        assert_eq!(run.opt.steps().unwrap(), vec![1, 0, 0, 0]);
        // Slots 1..4 bit for bit as before (slot 0 stepped, and comes first).
        let after = run.kernel_state();
        let slot0 = ranks[0] * (cfg.n + cfg.k);
        assert_eq!(
            after.0[slot0..],
            before.0[slot0..],
            "masters of skipped slots"
        );
        assert_eq!(
            after.1[slot0..],
            before.1[slot0..],
            "pool copies of skipped slots"
        );
        // Their moments too: a second, harmless step matches the reference,
        // which skipped the first.
        for s in 1..4 {
            run.set_hyper(s, hyper(1e-2, 0.0, 0.0, 0.0));
        }
        let (ga, gb) = gradients(cfg, 4, 1.0);
        run.step(&ga, &gb);
        assert_eq!(run.opt.steps().unwrap(), vec![2, 1, 1, 1]);
        run.check();
    }
}

#[test]
fn anchors_pull_toward_the_weights_at_the_task_start() {
    let PoolConfig { n, k, .. } = CFG;
    let dev = Device::host().unwrap();
    let mut pool = AdapterPool::<bf16>::new(&dev, CFG).unwrap();
    let mut opt = SlotOptimizer::new(&pool, AdamWConfig::default()).unwrap();
    let r = 2;
    let (a, b): (Vec<f32>, Vec<f32>) = (random(&mut rng(1), r * k), random(&mut rng(2), n * r));
    // Same gradients, with and without the pull: the pulled slot ends closer to its anchor.
    let mut distances = Vec::new();
    for pull in [0.0, 5.0] {
        opt.load_adapter(&mut pool, 0, &a, &b, r, 1.0, hyper(0.05, 0.0, 0.0, pull))
            .unwrap();
        opt.set_anchor(0).unwrap();
        for step in 0..20 {
            let (ga, gb) = gradients(CFG, step, 3.0);
            opt.step(&mut pool, &ga, &gb).unwrap();
            let checked = opt.checked_slots().unwrap();
            assert!(
                !checked[0],
                "step {step}: the pulled slot ran the checking pass"
            );
        }
        let (na, nb) = opt.master(&pool, 0).unwrap();
        let d: f64 = na
            .iter()
            .chain(&nb)
            .zip(a.iter().chain(&b))
            .map(|(p, q)| ((p - q) as f64).powi(2))
            .sum();
        distances.push(d.sqrt());
    }
    assert!(
        distances[1] < 0.5 * distances[0],
        "pull did not hold the adapter near its anchor: {distances:?}"
    );
}

/// A slot's state moved to another optimizer (masters through
/// `load_adapter`, the rest through `set_state`) continues bit for bit as
/// the original does under the same gradients; with fresh moments it does
/// not. Bad states are refused, naming the part, and change nothing.
#[test]
fn saved_state_continues_training_bit_for_bit() {
    for dev in devices() {
        let (rank, h) = (3, hyper(2e-2, 0.01, 0.0, 0.5));
        let (a, b): (Vec<f32>, Vec<f32>) = (
            random(&mut rng(1), rank * CFG.k),
            random(&mut rng(2), CFG.n * rank),
        );
        let mut pool = AdapterPool::<bf16>::new(&dev, CFG).unwrap();
        let mut opt = SlotOptimizer::new(&pool, AdamWConfig::default()).unwrap();
        opt.load_adapter(&mut pool, 2, &a, &b, rank, 1.0, h)
            .unwrap();
        // The gradients where the pools are (on a GPU: device buffers).
        let on_dev =
            |(ga, gb): &(Vec<f32>, Vec<f32>)| (dev.upload(ga).unwrap(), dev.upload(gb).unwrap());
        for step in 0..3 {
            let (ga, gb) = on_dev(&gradients(CFG, step, 1.0));
            opt.step(&mut pool, &ga, &gb).unwrap();
        }
        let state = opt.state(&pool, 2).unwrap();
        assert_eq!(state.step, 3);
        let (ma, mb) = opt.master(&pool, 2).unwrap();

        // Another pool and optimizer, another slot.
        let mut pool2 = AdapterPool::<bf16>::new(&dev, CFG).unwrap();
        let mut opt2 = SlotOptimizer::new(&pool2, AdamWConfig::default()).unwrap();
        opt2.load_adapter(&mut pool2, 0, &ma, &mb, rank, 1.0, h)
            .unwrap();
        let mut bad = state.clone();
        bad.m1.1.pop();
        let err = opt2.set_state(&pool2, 0, &bad).unwrap_err().to_string();
        assert!(err.contains("m1.b"), "{err}");
        let mut bad = state.clone();
        bad.m2.0[4] = -1.0;
        let err = opt2.set_state(&pool2, 0, &bad).unwrap_err().to_string();
        assert!(err.contains("m2.a"), "{err}");
        bad = state.clone();
        bad.anchor.1[0] = f32::NAN;
        assert!(opt2.set_state(&pool2, 0, &bad).is_err());
        bad = state.clone();
        bad.step = -1;
        assert!(opt2.set_state(&pool2, 0, &bad).is_err());
        assert_eq!(
            opt2.state(&pool2, 0).unwrap().step,
            0,
            "a refused state changed the slot"
        );
        opt2.set_state(&pool2, 0, &state).unwrap();
        assert_eq!(opt2.state(&pool2, 0).unwrap(), state);

        // The same next gradients for slot 2 of the original and slot 0 of the copy.
        let move_slot = |(ga, gb): (Vec<f32>, Vec<f32>)| {
            let (sa, sb) = (CFG.max_rank * CFG.k, CFG.n * CFG.max_rank);
            let (mut a0, mut b0) = (vec![0f32; ga.len()], vec![0f32; gb.len()]);
            a0[..sa].copy_from_slice(&ga[2 * sa..3 * sa]);
            b0[..sb].copy_from_slice(&gb[2 * sb..3 * sb]);
            (a0, b0)
        };
        let mut pool3 = AdapterPool::<bf16>::new(&dev, CFG).unwrap();
        let mut fresh = SlotOptimizer::new(&pool3, AdamWConfig::default()).unwrap();
        fresh
            .load_adapter(&mut pool3, 0, &ma, &mb, rank, 1.0, h)
            .unwrap();
        for step in 3..6 {
            let g = gradients(CFG, step, 1.0);
            let (ga, gb) = on_dev(&g);
            opt.step(&mut pool, &ga, &gb).unwrap();
            let (moved_a, moved_b) = on_dev(&move_slot(g));
            opt2.step(&mut pool2, &moved_a, &moved_b).unwrap();
            fresh.step(&mut pool3, &moved_a, &moved_b).unwrap();
        }
        let want = opt.master(&pool, 2).unwrap();
        assert_eq!(opt2.master(&pool2, 0).unwrap(), want);
        assert_eq!(
            pool2.adapter(0).unwrap().unwrap().a,
            pool.adapter(2).unwrap().unwrap().a
        );
        assert_ne!(
            fresh.master(&pool3, 0).unwrap(),
            want,
            "fresh moments continued identically"
        );
    }
}

/// On the GPU at a real shape: 8 rank-16 slots of a hidden-4096 layer.
#[test]
fn gpu_real_shape_matches_reference() {
    let Some(dev) = gpu() else { return };
    let cfg = PoolConfig {
        slots: 8,
        max_rank: 16,
        n: 4096,
        k: 4096,
    };
    let hypers = [hyper(1e-3, 0.01, 10.0, 0.0); 8];
    let mut run = Run::<bf16>::new(&dev, cfg, &[16; 8], &hypers, 0.05);
    for step in 0..2 {
        let (ga, gb) = gradients(cfg, 3 + step, 1.0);
        run.step(&ga, &gb);
        let checked = run.opt.checked_slots().unwrap();
        assert_eq!(checked, vec![false; 8], "step {step} ran the checking pass");
    }
    run.check();
}

/// A step the stored bounds cannot clear runs the checking pass and, finding
/// nothing to overflow, is taken like any other. beta2 = 0 leaves the ratio
/// m1 / sqrt(m2) only its |m1| / eps bound, which passes f16's 65504 / lr.
#[test]
fn steps_the_bounds_cannot_clear_are_checked_then_taken() {
    let betas = AdamWConfig {
        beta1: 0.9,
        beta2: 0.0,
        eps: 1e-8,
    };
    let hypers = [hyper(1e-2, 0.01, 0.0, 0.0), hyper(2e-2, 0.0, 1.0, 0.5)];
    for dev in devices() {
        let mut run = Run::<f16>::with_betas(&dev, CFG, &[3, 4], &hypers, 0.05, betas);
        for step in 0..3 {
            let (ga, gb) = gradients(CFG, 20 + step, 1.0);
            let statuses = run.step(&ga, &gb);
            assert!(
                statuses[..2]
                    .iter()
                    .all(|s| matches!(s, SlotStatus::Updated { .. })),
                "{statuses:?}"
            );
            assert_eq!(&run.opt.checked_slots().unwrap()[..2], [true, true]);
        }
        run.check();
    }
}

/// Every writer of a slot's state keeps the bounds the kernel trusts to skip
/// the checking pass: after each, a step that must overflow is still caught
/// (skipped, nothing written). Each case starts from a slot whose bounds are
/// small, so a writer that left them stale would let the step write Inf.
#[test]
fn bounds_follow_every_writer_of_the_state() {
    for dev in devices() {
        bounds_follow_load::<f16>(&dev);
        bounds_follow_set_state(&dev);
        bounds_follow_set_anchor(&dev);
        bounds_follow_steps(&dev);
    }
}

const ONE_SLOT: PoolConfig = PoolConfig {
    slots: 1,
    max_rank: 2,
    n: 3,
    k: 5,
};

/// A one-slot pool holding a rank-2 adapter, its optimizer, and steps that
/// must be ordinary or caught.
struct OneSlot<T> {
    dev: Device,
    pool: AdapterPool<T>,
    opt: SlotOptimizer,
}

impl<T: KernelElement> OneSlot<T> {
    /// Every weight `weights`, PyTorch's betas.
    fn new(dev: &Device, weights: f32, h: SlotHyper) -> Self {
        Self::with_betas(dev, weights, h, AdamWConfig::default())
    }

    fn with_betas(dev: &Device, weights: f32, h: SlotHyper, betas: AdamWConfig) -> Self {
        let pool = AdapterPool::<T>::new(dev, ONE_SLOT).unwrap();
        let opt = SlotOptimizer::new(&pool, betas).unwrap();
        let mut slot = OneSlot {
            dev: dev.clone(),
            pool,
            opt,
        };
        slot.load(weights, h);
        slot
    }

    fn load(&mut self, weights: f32, h: SlotHyper) {
        let (a, b) = ones(weights);
        (self.opt)
            .load_adapter(&mut self.pool, 0, &a, &b, 2, 1.0, h)
            .unwrap();
    }

    /// One step on pool-layout gradients `g`: the slot's status, and whether
    /// it ran the checking pass.
    fn step(&mut self, (ga, gb): &(Vec<f32>, Vec<f32>)) -> (SlotStatus, bool) {
        let (ga, gb) = (self.dev.upload(ga).unwrap(), self.dev.upload(gb).unwrap());
        self.opt.step(&mut self.pool, &ga, &gb).unwrap();
        let (status, checked) = (self.opt.statuses(), self.opt.checked_slots());
        (status.unwrap()[0], checked.unwrap()[0])
    }

    /// The step is taken, without the checking pass.
    fn ordinary(&mut self, what: &str, g: &(Vec<f32>, Vec<f32>)) {
        let (status, checked) = self.step(g);
        assert!(
            matches!(status, SlotStatus::Updated { .. }) && !checked,
            "{what}: {status:?}, checked {checked}"
        );
    }

    /// The step is skipped as overflowing, after the checking pass, and the
    /// masters are as before.
    fn caught(&mut self, what: &str, g: &(Vec<f32>, Vec<f32>)) {
        let before = self.opt.master(&self.pool, 0).unwrap();
        let (status, checked) = self.step(g);
        assert!(
            matches!(status, SlotStatus::SkippedOverflow { .. }) && checked,
            "{what}: {status:?}, checked {checked}"
        );
        let after = self.opt.master(&self.pool, 0).unwrap();
        assert_eq!(after, before, "{what}: masters changed");
    }

    fn set_hyper(&mut self, h: SlotHyper) {
        self.opt.set_hyper(0, h).unwrap();
    }
}

/// Pool-layout values (or gradients) of `ONE_SLOT`, all `v`.
fn ones(v: f32) -> (Vec<f32>, Vec<f32>) {
    (vec![v; 2 * ONE_SLOT.k], vec![v; ONE_SLOT.n * 2])
}

/// A reload with weights near f16's limit: lr 2000 moves some past 65504.
fn bounds_follow_load<T: KernelElement>(dev: &Device) {
    let h = hyper(2000.0, 0.0, 0.0, 0.0);
    let mut slot = OneSlot::<T>::new(dev, 0.05, h);
    let g = gradients(ONE_SLOT, 1, 1.0);
    slot.ordinary("load", &g);
    slot.load(64000.0, h);
    slot.caught("after load_adapter", &g);
}

/// Restored moments and anchors that overflow the next step, one part each.
fn bounds_follow_set_state(dev: &Device) {
    let (ga, gb) = gradients(ONE_SLOT, 2, 1.0);
    // Each case: a pool type, a change to the saved state, a gradient scale
    // on the first element, and the slot's hyperparameters.
    type Edit = fn(&mut SlotState);
    let cases: [(&str, bool, Edit, f32, SlotHyper); 4] = [
        // m1 large where m2 is 0: the ratio m1 / sqrt(m2) is unbounded, and
        // m1' / sqrt(m2') times lr 10 passes 65504.
        (
            "m1 / sqrt(m2)",
            true,
            |s| (s.m1.0[0], s.m2.0[0]) = (1000.0, 0.0),
            1.0,
            hyper(10.0, 0.0, 0.0, 0.0),
        ),
        // m1 near f32's limit: m1' times the bias correction 1 / (1 - 0.9^2) passes it.
        (
            "m1",
            false,
            |s| (s.m1.0[0], s.m2.0[0]) = (3e38, 3e38),
            1.0,
            hyper(1e-3, 0.0, 0.0, 0.0),
        ),
        // m2 at f32's limit, plus (1 - b2) g^2 with g = 1e20, passes it.
        (
            "m2",
            false,
            |s| s.m2.0[0] = f32::MAX,
            1e20,
            hyper(1e-3, 0.0, 0.0, 0.0),
        ),
        // An anchor near f32's limit: the pull 10 (p - anchor) passes it.
        (
            "anchor",
            false,
            |s| s.anchor.0[0] = 3e38,
            1.0,
            hyper(1e-3, 0.0, 0.0, 10.0),
        ),
    ];
    for (what, half, edit, g0, h) in cases {
        let mut g = (ga.clone(), gb.clone());
        g.0[0] *= g0;
        if half {
            bounds_follow_set_state_in(OneSlot::<f16>::new(dev, 0.05, h), what, edit, &g);
        } else {
            bounds_follow_set_state_in(OneSlot::<f32>::new(dev, 0.05, h), what, edit, &g);
        }
    }
}

fn bounds_follow_set_state_in<T: KernelElement>(
    mut slot: OneSlot<T>,
    what: &str,
    edit: fn(&mut SlotState),
    g: &(Vec<f32>, Vec<f32>),
) {
    slot.ordinary(what, &gradients(ONE_SLOT, 3, 1.0));
    let mut state = slot.opt.state(&slot.pool, 0).unwrap();
    edit(&mut state);
    slot.opt.set_state(&slot.pool, 0, &state).unwrap();
    slot.caught(&format!("after set_state of {what}"), g);
}

/// An anchor taken from weights near 1e30, with the weights then back at 0:
/// the pull 1e10 (p - anchor) passes f32's limit.
fn bounds_follow_set_anchor(dev: &Device) {
    let mut slot = OneSlot::<f32>::new(dev, 0.05, hyper(1e30, 0.0, 0.0, 0.0));
    let g = gradients(ONE_SLOT, 4, 1.0);
    slot.ordinary("lr 1e30", &g);
    slot.opt.set_anchor(0).unwrap();
    // lr = wd = 1: p - (ratio + p) rounds to 0 where |p| ~ 1e30.
    slot.set_hyper(hyper(1.0, 1.0, 0.0, 0.0));
    slot.ordinary("lr = wd = 1", &g);
    let (a, b) = slot.opt.master(&slot.pool, 0).unwrap();
    assert!(a.iter().chain(&b).all(|&v| v == 0.0), "{a:?} {b:?}");
    slot.set_hyper(hyper(1e-3, 0.0, 0.0, 1e10));
    slot.caught("after set_anchor", &g);
}

/// The bounds a step writes itself: the weights' (lr 30000, then 40000 on
/// the same gradient, moves f16 weights past 65504), q's (a restored m1 of
/// 1000 over m2 of 1, stepped at lr 1, then at lr 1000), and the moments'.
fn bounds_follow_steps(dev: &Device) {
    let g = gradients(ONE_SLOT, 5, 1.0);
    let mut slot = OneSlot::<f16>::new(dev, 0.05, hyper(30000.0, 0.0, 0.0, 0.0));
    slot.ordinary("lr 30000", &g);
    slot.set_hyper(hyper(40000.0, 0.0, 0.0, 0.0));
    slot.caught("after a step moved the weights", &g);

    let mut slot = OneSlot::<f16>::new(dev, 0.05, hyper(1.0, 0.0, 0.0, 0.0));
    slot.ordinary("lr 1", &gradients(ONE_SLOT, 6, 1.0));
    let mut state = slot.opt.state(&slot.pool, 0).unwrap();
    (state.m1.0[0], state.m2.0[0]) = (1000.0, 1.0);
    slot.opt.set_state(&slot.pool, 0, &state).unwrap();
    slot.ordinary("restored m1 at lr 1", &g);
    slot.set_hyper(hyper(1000.0, 0.0, 0.0, 0.0));
    slot.caught("after a step kept m1 / sqrt(m2) large", &g);

    bounds_follow_step_moments(dev);
}

/// Moments grown by steps. m1: with beta2 = 0 and eps = 1 the ratio's only
/// bound is |m1'| / eps; m1 = 100 from gradients of 1000, then gradients of
/// 1e-3 at lr 200 move f16 weights by about 470 lr. m2: gradients of 2e19
/// with beta2 = 0.5 take m2 to 2e38, 3e38, then past f32's limit.
fn bounds_follow_step_moments(dev: &Device) {
    let betas = AdamWConfig {
        beta1: 0.9,
        beta2: 0.0,
        eps: 1.0,
    };
    let mut slot = OneSlot::<f16>::with_betas(dev, 0.05, hyper(1e-3, 0.0, 0.0, 0.0), betas);
    slot.ordinary("gradients of 1000", &ones(1000.0));
    slot.set_hyper(hyper(200.0, 0.0, 0.0, 0.0));
    slot.caught("after a step made m1 large", &ones(1e-3));

    let betas = AdamWConfig {
        beta1: 0.9,
        beta2: 0.5,
        eps: 1e-8,
    };
    let mut slot = OneSlot::<f32>::with_betas(dev, 0.05, hyper(1e-3, 0.0, 0.0, 0.0), betas);
    for step in 0..2 {
        slot.ordinary(&format!("m2 step {step}"), &ones(2e19));
    }
    slot.caught("after steps made m2 large", &ones(2e19));
}

/// Powers of ten of one step's inputs, for `extreme_steps_stay_all_or_nothing`.
#[derive(Debug, Clone)]
struct Extreme {
    /// Weights, m1, m2, anchor, gradient.
    values: [i32; 5],
    /// lr, weight decay, pull, eps, max_grad_norm (decay, pull, clip: < -6 is 0).
    hyper: [i32; 5],
    /// beta1, beta2 (indices into fixed lists), steps taken, data seed.
    betas: (usize, usize),
    step: i32,
    seed: u64,
}

fn extreme() -> impl Strategy<Value = Extreme> {
    let values = [-30i32..39, -30i32..39, -30i32..39, -30i32..39, -30i32..39];
    let hyper = [-8i32..39, -9i32..3, -9i32..13, -40i32..1, -9i32..20];
    (
        values,
        hyper,
        (0usize..4, 0usize..4),
        0i32..1000,
        any::<u64>(),
    )
        .prop_map(|(values, hyper, betas, step, seed)| Extreme {
            values,
            hyper,
            betas,
            step,
            seed,
        })
}

/// One step from an extreme state: a step that skipped the checking pass
/// left every value finite (the bounds were sound), one that ran it either
/// stepped to finite values or changed nothing. Magnitudes range over f32's
/// (f16 weights up to 10^4), so both paths and the edge between them occur.
fn extreme_step<T: KernelElement>(dev: &Device, e: &Extreme) -> Result<(), TestCaseError> {
    let pow = |x: i32| 10f64.powi(x) as f32;
    let optional = |x: i32| if x < -6 { 0.0 } else { pow(x) };
    let [lr, wd, pull, eps, clip] = e.hyper;
    let h = hyper(pow(lr), optional(wd), optional(clip), optional(pull));
    let betas = AdamWConfig {
        beta1: [0.0, 0.5, 0.9, 0.99][e.betas.0],
        beta2: [0.0, 0.5, 0.999, 0.99999][e.betas.1],
        eps: pow(eps),
    };
    let top = if T::DTYPE == DType::F16 { 4 } else { 37 };
    let [w, m1, m2, anchor, g] = e.values;
    let mut slot = OneSlot::<T>::with_betas(dev, pow(w.min(top)), h, betas);
    let mut r = rng(e.seed);
    let mut scaled = |len: usize, x: i32, magnitude: bool| -> Vec<f32> {
        let v: Vec<f32> = random(&mut r, len);
        v.iter()
            .map(|&v| if magnitude { v.abs() } else { v } * pow(x))
            .collect()
    };
    let (la, lb) = (2 * ONE_SLOT.k, ONE_SLOT.n * 2);
    let state = SlotState {
        step: e.step,
        m1: (scaled(la, m1, false), scaled(lb, m1, false)),
        m2: (scaled(la, m2, true), scaled(lb, m2, true)),
        anchor: (scaled(la, anchor, false), scaled(lb, anchor, false)),
    };
    slot.opt.set_state(&slot.pool, 0, &state).unwrap();
    let grads = (
        scaled(ONE_SLOT.max_rank * ONE_SLOT.k, g, false),
        scaled(ONE_SLOT.n * ONE_SLOT.max_rank, g, false),
    );
    let before = slot.opt.master(&slot.pool, 0).unwrap();
    let (status, checked) = slot.step(&grads);
    let (a, b) = slot.opt.master(&slot.pool, 0).unwrap();
    let now = slot.opt.state(&slot.pool, 0).unwrap();
    let copy = slot.pool.adapter(0).unwrap().unwrap();
    let finite = a
        .iter()
        .chain(&b)
        .chain(&now.m1.0)
        .chain(&now.m1.1)
        .all(|v| v.is_finite())
        && now.m2.0.iter().chain(&now.m2.1).all(|v| v.is_finite())
        && copy.a.iter().chain(&copy.b).all(|v| v.to_f32().is_finite());
    match status {
        SlotStatus::Updated { .. } => prop_assert!(finite, "{status:?}, checked {checked}: {e:?}"),
        SlotStatus::SkippedOverflow { .. } => {
            prop_assert!(checked, "skipped without the checking pass: {e:?}");
            prop_assert_eq!(
                (a, b),
                before,
                "a skipped step changed the masters: {:?}",
                e
            );
        }
        _ => prop_assert!(false, "{status:?}: {e:?}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn extreme_steps_stay_all_or_nothing(e in extreme(), t in 0u8..3) {
        for dev in devices() {
            match t {
                0 => extreme_step::<f32>(&dev, &e)?,
                1 => extreme_step::<f16>(&dev, &e)?,
                _ => extreme_step::<bf16>(&dev, &e)?,
            }
        }
    }
}
