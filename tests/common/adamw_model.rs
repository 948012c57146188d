//! What the optimizer's checks compare against: a slot's reference
//! trajectory, and a model of kernels/adamw.cu's f32 arithmetic, to first
//! order in u, bounding how far the kernel's master and moments may drift
//! from the reference's over a run of steps. Shared by tests/adamw.rs and the
//! tour's optimizer check.
#![allow(dead_code)]

use lora_kernels::Element;
use lora_kernels::ops::adamw::{AdamWConfig, SlotHyper};
use lora_kernels::reference::{self, AdamWState, SlotStep};

/// f32's unit roundoff.
const U: f64 = f32::EPSILON as f64 / 2.0;

/// The clip factor of a slot's step: the kernel's, computed in f64 from the
/// gradient's norm.
pub fn clip_factor(h: &SlotHyper, grad: &[f32]) -> f64 {
    let norm = grad.iter().map(|&g| (g as f64).powi(2)).sum::<f64>().sqrt();
    let max = h.max_grad_norm as f64;
    if max > 0.0 && norm > max {
        max / norm
    } else {
        1.0
    }
}

/// Bounds on |kernel - reference| of one parameter's master and moments.
#[derive(Clone, Copy, Default)]
pub struct Drift {
    pub p: f64,
    pub m1: f64,
    pub m2: f64,
}

/// One step of adamw.cu's f32 arithmetic on one parameter, to first order in
/// u = 2^-24: the drift after it, from the drift before it and the
/// reference's state before it (`w`, `m1`, `m2`), its gradient `g` and
/// anchor. The kernel's clip factor and bias corrections come from f64 (one
/// rounding each to f32 where they enter the f32 arithmetic).
pub fn drift(
    d: Drift,
    betas: &AdamWConfig,
    h: &SlotHyper,
    clip: f64,
    t: u32,
    state: [f64; 5],
) -> Drift {
    let [w, m1, m2, g, anchor] = state;
    let (b1, b2) = (betas.beta1 as f64, betas.beta2 as f64);
    let (bias1, bias2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
    let (lr, wd, pull) = (h.lr as f64, h.weight_decay as f64, h.anchor_pull as f64);
    // g' = round(g clip) + pull (w - anchor): the kernel pulls from its own
    // master and rounds the difference, the product and the sum; the
    // reference rounds g' once.
    let gp = g * clip + pull * (w - anchor);
    let dg =
        U * (g * clip).abs() + pull * (d.p + 2.0 * U * (w - anchor).abs()) + 2.0 * U * gp.abs();
    // Moments: products and a sum each (one product more in m2).
    let a1 = b1 * m1 + (1.0 - b1) * gp;
    let a2 = b2 * m2 + (1.0 - b2) * gp * gp;
    let e1 = b1 * d.m1 + (1.0 - b1) * dg + 2.0 * U * (b1 * m1.abs() + (1.0 - b1) * gp.abs());
    let e2 = b2 * d.m2 + (1.0 - b2) * 2.0 * gp.abs() * dg + 3.0 * U * a2;
    // (a1 * (1/bias1)) / (sqrtf(a2) * (1/sqrt(bias2)) + eps) + wd w.
    let mean = a1 / bias1;
    let d_mean = (e1 + 2.0 * U * a1.abs()) / bias1;
    let root = (a2 / bias2).sqrt();
    let rel_root = if a2 > 0.0 { 0.5 * e2 / a2 } else { 0.0 } + 3.0 * U;
    let den = root + betas.eps as f64;
    let ratio = mean / den;
    let d_ratio = d_mean / den + ratio.abs() * (rel_root * root / den + 2.0 * U);
    let update = ratio + wd * w;
    let d_update = d_ratio + wd * (d.p + U * w.abs()) + U * update.abs();
    // p - lr update: the product, the difference, and the reference's own
    // rounding of p, m1, m2 to f32.
    let p = w - lr * update;
    Drift {
        p: d.p + lr * (d_update + U * update.abs()) + 2.0 * U * p.abs(),
        m1: e1 + U * a1.abs(),
        m2: e2 + U * a2,
    }
}

/// One slot's reference trajectory: parameters (a then b), moments, the
/// storage-type copy, steps taken.
pub struct Trajectory<T> {
    pub p: Vec<f32>,
    pub m1: Vec<f32>,
    pub m2: Vec<f32>,
    pub working: Vec<T>,
    pub steps: u32,
    pub hyper: SlotHyper,
}

impl<T: Element> Trajectory<T> {
    /// Weights `p` (a then b) at step 0, with settings `hyper`.
    pub fn new(p: &[f32], hyper: SlotHyper) -> Self {
        Trajectory {
            p: p.to_vec(),
            m1: vec![0.0; p.len()],
            m2: vec![0.0; p.len()],
            working: p.iter().map(|&v| T::from_f32(v)).collect(),
            steps: 0,
            hyper,
        }
    }

    /// One reference step (counted when the slot is updated).
    pub fn step(
        &mut self,
        betas: &AdamWConfig,
        grad: &[f32],
        anchor: &[f32],
    ) -> lora_kernels::Result<SlotStep> {
        let anchor = (self.hyper.anchor_pull > 0.0).then_some(anchor);
        let state = AdamWState {
            p: &mut self.p,
            m1: &mut self.m1,
            m2: &mut self.m2,
            working: &mut self.working,
        };
        let outcome =
            reference::adamw_slot_step(betas, &self.hyper, self.steps + 1, grad, anchor, state)?;
        if matches!(outcome, SlotStep::Updated { .. }) {
            self.steps += 1;
        }
        Ok(outcome)
    }
}
