//! SlotOptimizer::step against reference::adamw_slot_step, over several steps.

use super::adamw_model::{self, Drift, Trajectory, clip_factor};
use super::*;

/// The optimizer's slots, (rank, settings): weight decay; rank 1, clipped
/// (its gradient norm is far above 1); pulled toward its anchor. A fourth
/// slot of the pool stays empty.
fn optimizer_slots() -> [(usize, SlotHyper); 3] {
    let hyper = |lr, weight_decay, max_grad_norm, anchor_pull| SlotHyper {
        lr,
        weight_decay,
        max_grad_norm,
        anchor_pull,
    };
    [
        (8, hyper(1e-2, 0.01, 0.0, 0.0)),
        (1, hyper(2e-2, 0.0, 1.0, 0.0)),
        (3, hyper(1e-2, 0.1, 0.0, 0.5)),
    ]
}

const OPT_STEPS: u32 = 3;

/// PyTorch's defaults. The kernel computes the bias corrections 1 - beta^t
/// in f64 and rounds their reciprocals once to f32, so even at beta2 = 0.999
/// they are good to one f32 rounding and the f32 control sees a 0.01% lr error.
const OPT_BETAS: AdamWConfig = AdamWConfig {
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
};

pub(super) fn optimizer_rows(dev: &Device) -> Res<Vec<Row>> {
    // f32 pool: the masters at the f32 control, and the gradient norms;
    // bf16 pool: the masters and the bf16 working copy the forward reads.
    let mut rows = optimizer::<f32>(dev)?;
    rows.extend(optimizer::<bf16>(dev)?);
    Ok(rows)
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

/// OPT_STEPS steps of the optimizer over three slots of a `T` pool, beside
/// the reference (and its control, lr off by the control's error: the step
/// has no adapter scale, lr is its scale).
fn optimizer<T: KernelElement>(dev: &Device) -> Res<Vec<Row>> {
    let cfg = PoolConfig {
        slots: 4,
        max_rank: 8,
        n: N,
        k: K_ANY,
    };
    let (n, k) = (cfg.n, cfg.k);
    let slots = optimizer_slots();
    let mut pool = AdapterPool::<T>::new(dev, cfg)?;
    let mut opt = SlotOptimizer::new(&pool, OPT_BETAS)?;
    let (mut want, mut control, mut drift, mut anchors) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (s, &(rank, hyper)) in slots.iter().enumerate() {
        // Small weights, as early in training: the lr-sized steps then show
        // in the storage-type copy.
        let a: Vec<f32> = common::values(rank * k, 40 + s as u64, 0.02);
        let b: Vec<f32> = common::values(n * rank, 50 + s as u64, 0.02);
        opt.load_adapter(&mut pool, s, &a, &b, rank, 1.0, hyper)?;
        let p: Vec<f32> = a.iter().chain(&b).copied().collect();
        let lr_off = SlotHyper {
            lr: off::<T>(hyper.lr),
            ..hyper
        };
        want.push(Trajectory::<T>::new(&p, hyper));
        control.push(Trajectory::<T>::new(&p, lr_off));
        drift.push(vec![Drift::default(); p.len()]);
        anchors.push(p);
    }

    // The gradient norms each step reports: (kernel, reference) per slot.
    let (mut norms, mut norms_want) = (Vec::new(), Vec::new());
    for step in 1..=OPT_STEPS {
        let ga: Vec<f32> = common::values(cfg.slots * cfg.max_rank * k, 60 + step as u64, 1.0);
        let gb: Vec<f32> = common::values(cfg.slots * n * cfg.max_rank, 70 + step as u64, 1.0);
        opt.step(&mut pool, &dev.upload(&ga)?, &dev.upload(&gb)?)?;
        let statuses = opt.statuses()?;
        if statuses[3] != SlotStatus::Idle {
            return Err(format!("the empty slot stepped: {:?}", statuses[3]).into());
        }
        for (s, &(rank, hyper)) in slots.iter().enumerate() {
            let grad = slot_values(cfg, s, rank, (&ga, &gb));
            let clip = clip_factor(&hyper, &grad);
            let traj = &want[s];
            for (e, d) in drift[s].iter_mut().enumerate() {
                let state = [traj.p[e], traj.m1[e], traj.m2[e], grad[e], anchors[s][e]];
                *d = adamw_model::drift(*d, &OPT_BETAS, &hyper, clip, step, state.map(f64::from));
            }
            let SlotStep::Updated { grad_norm } = want[s].step(&OPT_BETAS, &grad, &anchors[s])?
            else {
                return Err("the reference skipped a finite gradient".into());
            };
            control[s].step(&OPT_BETAS, &grad, &anchors[s])?;
            norms.push(match statuses[s] {
                SlotStatus::Updated { grad_norm } => grad_norm as f64,
                _ => f64::NAN, // not stepped: fails the row
            });
            norms_want.push((grad_norm, grad.len()));
        }
    }

    let ranks: Vec<String> = slots.iter().map(|s| s.0.to_string()).collect();
    let what = format!("-x{n}x{k}, r{}", ranks.join(","));
    let steps = format!("{OPT_STEPS} steps:");
    let mut rows = Vec::new();
    // The f32 masters after the last step.
    let (mut got, mut p_want, mut p_control, mut bound) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (s, traj) in want.iter().enumerate() {
        let (a, b) = opt.master(&pool, s)?;
        got.extend(a.iter().chain(&b).map(|&v| v as f64));
        p_want.extend(wide(&traj.p));
        p_control.extend(wide(&control[s].p));
        bound.extend(drift[s].iter().map(|d| d.p));
    }
    let path = format!("{steps} masters (f32; control: lr)");
    let masters = label::<T>("SlotOptimizer::step", path, what.clone());
    rows.push(judged(masters, &got, &p_want, &p_control, &bound));

    if T::DTYPE == DType::F32 {
        // The norms: no scale enters them; the control is the gradient off.
        let delta = control_delta(T::DTYPE);
        let want: Vec<f64> = norms_want.iter().map(|w| w.0).collect();
        let control: Vec<f64> = want.iter().map(|w| w * (1.0 + delta)).collect();
        let bound: Vec<f64> = norms_want
            .iter()
            // The f64 sum of squares and root, then one rounding to f32.
            .map(|&(w, len)| (U32 + gamma(len + 1, f64::EPSILON / 2.0)) * w)
            .collect();
        let path = format!("{steps} grad norms (control: g)");
        let label = label::<T>("SlotOptimizer::step", path, what);
        rows.push(judged(label, &norms, &want, &control, &bound));
    } else {
        // The working copy of a (the pool's a rows), rounded from the kernel's
        // master: within the two roundings of the two masters and their drift.
        let working = pool_a_rows(&pool, cfg.slots)?;
        let r = rounding::<T>();
        let (mut got, mut w_want, mut w_control, mut bound) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (s, &(rank, _)) in slots.iter().enumerate() {
            let len = rank * k;
            got.extend(wide(&working[s * cfg.max_rank * k..][..len]));
            w_want.extend(wide(&want[s].working[..len]));
            w_control.extend(wide(&control[s].working[..len]));
            bound.extend(want[s].working[..len].iter().zip(&drift[s]).map(|(w, d)| {
                2.0 * r.u * (1.0 + 2.0 * r.u) * w.to_f64().abs()
                    + (1.0 + 2.0 * r.u) * d.p
                    + 2.0 * r.eta
            }));
        }
        let path = format!("{steps} working copy of a (control: lr)");
        let label = label::<T>("SlotOptimizer::step", path, what);
        rows.push(judged(label, &got, &w_want, &w_control, &bound));
    }
    Ok(rows)
}

/// The pool's `a` of every slot in its layout `[slots][max_rank][k]` (rows
/// past a slot's rank, and empty slots, as zeros).
fn pool_a_rows<T: KernelElement>(pool: &AdapterPool<T>, slots: usize) -> Res<Vec<T>> {
    let PoolConfig { max_rank, k, .. } = pool.config();
    let mut rows = vec![T::default(); slots * max_rank * k];
    for s in 0..slots {
        if let Some(adapter) = pool.adapter(s)? {
            rows[s * max_rank * k..][..adapter.a.len()].copy_from_slice(&adapter.a);
        }
    }
    Ok(rows)
}
