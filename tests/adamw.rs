//! The fused optimizer against the reference step, slot by slot: per-slot
//! learning rate, weight decay, clipping, the anchor pull, NaN/Inf skipping,
//! inactive slots, and the refreshed storage-type copy.
mod common;

use common::*;
use half::bf16;
use lora_kernels::ops::adamw::{AdamWConfig, SlotHyper, SlotOptimizer, SlotStatus};
use lora_kernels::reference::{self, AdamWState, SlotStep};
use lora_kernels::{AdapterPool, Device, PoolConfig};

const CFG: PoolConfig = PoolConfig {
    slots: 5,
    max_rank: 6,
    n: 11,
    k: 9,
};
const RANKS: [usize; 5] = [6, 1, 3, 4, 2];

fn hypers() -> [SlotHyper; 5] {
    let h = |lr, wd, clip, pull| SlotHyper {
        lr,
        weight_decay: wd,
        max_grad_norm: clip,
        anchor_pull: pull,
    };
    [
        h(1e-2, 0.0, 0.0, 0.0),
        h(5e-2, 0.1, 0.0, 0.0),
        h(1e-2, 0.0, 0.05, 0.0), // clipped: gradients are much larger than 0.05
        h(2e-2, 0.01, 0.0, 0.5), // pulled toward the anchor
        h(1e-2, 0.0, 0.0, 0.0),  // gets a NaN gradient
    ]
}

/// Reference state per slot: parameters (a then b), moments, steps taken.
struct SlotState {
    p: Vec<f32>,
    m1: Vec<f32>,
    m2: Vec<f32>,
    anchor: Vec<f32>,
    steps: u32,
}

/// Gradients in the pool layout, and the same per slot as (a then b).
fn gradients(seed: u64) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
    let PoolConfig {
        slots,
        max_rank,
        n,
        k,
    } = CFG;
    let mut g = rng(seed);
    let mut ga: Vec<f32> = random(&mut g, slots * max_rank * k);
    let mut gb: Vec<f32> = random(&mut g, slots * n * max_rank);
    ga.iter_mut().chain(gb.iter_mut()).for_each(|v| *v *= 3.0);
    ga[4 * max_rank * k + 2] = f32::NAN; // slot 4's gradient is poisoned
    let per_slot = (0..slots)
        .map(|s| {
            let r = RANKS[s];
            let mut v = ga[s * max_rank * k..s * max_rank * k + r * k].to_vec();
            for c in 0..n {
                v.extend_from_slice(&gb[(s * n + c) * max_rank..(s * n + c) * max_rank + r]);
            }
            v
        })
        .collect();
    (ga, gb, per_slot)
}

#[test]
fn every_slot_matches_the_reference_step() {
    let PoolConfig { n, k, .. } = CFG;
    let betas = AdamWConfig::default();
    for dev in devices() {
        let mut pool = AdapterPool::<bf16>::new(&dev, CFG).unwrap();
        let mut opt = SlotOptimizer::new(&pool, betas).unwrap();
        let mut states = Vec::new();
        for (s, &r) in RANKS.iter().enumerate() {
            let (a, b): (Vec<f32>, Vec<f32>) = (
                random(&mut rng(s as u64), r * k),
                random(&mut rng(50 + s as u64), n * r),
            );
            opt.load_adapter(&mut pool, s, &a, &b, r, 1.0, hypers()[s])
                .unwrap();
            let p: Vec<f32> = a.iter().chain(&b).copied().collect();
            states.push(SlotState {
                m1: vec![0.0; p.len()],
                m2: vec![0.0; p.len()],
                anchor: p.clone(),
                p,
                steps: 0,
            });
        }
        opt.set_active(1, false).unwrap(); // slot 1 sits out the first two steps
        for step in 0..4u64 {
            if step == 2 {
                opt.set_active(1, true).unwrap();
            }
            let (ga, gb, per_slot) = gradients(100 + step);
            let (gad, gbd) = (dev.upload(&ga).unwrap(), dev.upload(&gb).unwrap());
            opt.step(&mut pool, &gad, &gbd).unwrap();
            let statuses = opt.statuses().unwrap();
            for (s, st) in states.iter_mut().enumerate() {
                if s == 1 && step < 2 {
                    assert_eq!(statuses[s], SlotStatus::Idle);
                    continue;
                }
                let mut working = vec![bf16::ZERO; st.p.len()];
                let state = AdamWState {
                    p: &mut st.p,
                    m1: &mut st.m1,
                    m2: &mut st.m2,
                    working: &mut working,
                };
                let anchor = (hypers()[s].anchor_pull > 0.0).then_some(&st.anchor[..]);
                let outcome = reference::adamw_slot_step(
                    &betas,
                    &hypers()[s],
                    st.steps + 1,
                    &per_slot[s],
                    anchor,
                    state,
                )
                .unwrap();
                match (outcome, statuses[s]) {
                    (SlotStep::Updated { grad_norm }, SlotStatus::Updated { grad_norm: got }) => {
                        st.steps += 1;
                        assert!(
                            (got as f64 - grad_norm).abs() <= 1e-5 * grad_norm,
                            "slot {s} norm {got} vs {grad_norm}"
                        );
                    }
                    (SlotStep::Skipped, SlotStatus::SkippedNonFinite) => {}
                    other => panic!("slot {s} step {step}: {other:?} on {}", dev.name()),
                }
            }
        }
        let steps = opt.steps().unwrap();
        assert_eq!(
            steps,
            vec![4, 2, 4, 4, 0],
            "step counts (slot 4 always skipped, slot 1 idle twice)"
        );
        for (s, st) in states.iter().enumerate() {
            let (a, b) = opt.master(&pool, s).unwrap();
            let got: Vec<f32> = a.iter().chain(&b).copied().collect();
            compare(
                &format!("slot {s} master on {}", dev.name()),
                &got,
                &st.p,
                1e-6,
                1e-5,
            )
            .unwrap();
        }
        // The pool's bf16 copy is the master rounded once.
        let working = pool.adapter(0).unwrap().expect("slot 0 holds an adapter").a;
        let (a0, _) = opt.master(&pool, 0).unwrap();
        for (q, v) in a0.iter().enumerate() {
            assert_eq!(working[q], bf16::from_f32(*v));
        }
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
    let hyper = |pull| SlotHyper {
        lr: 0.05,
        weight_decay: 0.0,
        max_grad_norm: 0.0,
        anchor_pull: pull,
    };
    // Same gradients, with and without the pull: the pulled slot ends closer to its anchor.
    let mut distances = Vec::new();
    for pull in [0.0, 5.0] {
        opt.load_adapter(&mut pool, 0, &a, &b, r, 1.0, hyper(pull))
            .unwrap();
        opt.set_anchor(0).unwrap();
        for step in 0..20 {
            let (ga, gb, _) = gradients(step);
            opt.step(&mut pool, &ga, &gb).unwrap();
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
    let mut pool = AdapterPool::<bf16>::new(&dev, cfg).unwrap();
    let betas = AdamWConfig::default();
    let mut opt = SlotOptimizer::new(&pool, betas).unwrap();
    let hyper = SlotHyper {
        lr: 1e-3,
        weight_decay: 0.01,
        max_grad_norm: 10.0,
        anchor_pull: 0.0,
    };
    let (a, b): (Vec<f32>, Vec<f32>) = (
        random(&mut rng(1), 16 * 4096),
        random(&mut rng(2), 4096 * 16),
    );
    for s in 0..8 {
        opt.load_adapter(&mut pool, s, &a, &b, 16, 1.0, hyper)
            .unwrap();
    }
    let (ga, gb): (Vec<f32>, Vec<f32>) = (
        random(&mut rng(3), 8 * 16 * 4096),
        random(&mut rng(4), 8 * 4096 * 16),
    );
    opt.step(
        &mut pool,
        &dev.upload(&ga).unwrap(),
        &dev.upload(&gb).unwrap(),
    )
    .unwrap();
    for s in [0usize, 7] {
        let mut grad = ga[s * 16 * 4096..(s + 1) * 16 * 4096].to_vec();
        grad.extend_from_slice(&gb[s * 4096 * 16..(s + 1) * 4096 * 16]);
        let mut p: Vec<f32> = a.iter().chain(&b).copied().collect();
        let (mut m1, mut m2, mut wk) = (
            vec![0f32; p.len()],
            vec![0f32; p.len()],
            vec![bf16::ZERO; p.len()],
        );
        let state = AdamWState {
            p: &mut p,
            m1: &mut m1,
            m2: &mut m2,
            working: &mut wk,
        };
        reference::adamw_slot_step(&betas, &hyper, 1, &grad, None, state).unwrap();
        let (na, nb) = opt.master(&pool, s).unwrap();
        let got: Vec<f32> = na.iter().chain(&nb).copied().collect();
        compare(&format!("slot {s} on {}", dev.name()), &got, &p, 1e-6, 1e-5).unwrap();
    }
}
