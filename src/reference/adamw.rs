use crate::element::Element;
use crate::error::{Error, Result};
use crate::ops::adamw::{AdamWConfig, SlotHyper};
use crate::shape::invalid;

/// Plain AdamW on one parameter tensor, as [`adamw_step`] applies it
/// (docs/DESIGN.md section 1). The fused optimizer splits these settings into
/// [`AdamWConfig`] (shared by all slots) and [`SlotHyper`] (per slot).
#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f32,
    /// Decay of the first moment, in [0, 1).
    pub beta1: f32,
    /// Decay of the second moment, in [0, 1).
    pub beta2: f32,
    /// Added to the root of the second moment; finite and > 0.
    pub eps: f32,
    /// Decoupled weight decay (`p -= lr * weight_decay * p`).
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamW {
    pub(crate) fn validate(&self) -> Result<()> {
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(invalid("eps", self.eps, "must be finite and > 0"));
        }
        for (name, v) in [("lr", self.lr), ("weight_decay", self.weight_decay)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(name, v, "must be finite and >= 0"));
            }
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(invalid(name, v, "must be in [0, 1)"));
            }
        }
        Ok(())
    }
}

/// One parameter tensor's optimizer state: the f32 master copy `p`, the
/// moments `m1`, `m2`, and the f16/bf16 working copy the forward kernels read.
#[derive(Debug)]
pub struct AdamWState<'a, T> {
    /// The f32 master weights.
    pub p: &'a mut [f32],
    /// First moment.
    pub m1: &'a mut [f32],
    /// Second moment.
    pub m2: &'a mut [f32],
    /// The storage-type copy the forward kernels read, refreshed from `p`.
    pub working: &'a mut [T],
}

/// One AdamW step (`step` counts from 1) in f64, results rounded to f32
/// (master, moments) and to `T` (working copy, from the new master).
pub fn adamw_step<T: Element>(
    cfg: &AdamW,
    step: u32,
    grad: &[f32],
    state: AdamWState<'_, T>,
) -> Result<()> {
    cfg.validate()?;
    if step == 0 {
        return Err(invalid("step", step, "steps count from 1"));
    }
    let len = state.p.len();
    for (operand, actual) in [
        ("grad", grad.len()),
        ("m1", state.m1.len()),
        ("m2", state.m2.len()),
        ("working", state.working.len()),
    ] {
        if actual != len {
            return Err(Error::Shape {
                operand,
                shape: format!("the {len} parameters of `p`"),
                expected: len,
                actual,
            });
        }
    }
    let (b1, b2) = (cfg.beta1 as f64, cfg.beta2 as f64);
    let bias1 = 1.0 - b1.powi(step as i32);
    let bias2 = 1.0 - b2.powi(step as i32);
    for (i, &g) in grad.iter().enumerate() {
        let g = g as f64;
        let m1 = b1 * state.m1[i] as f64 + (1.0 - b1) * g;
        let m2 = b2 * state.m2[i] as f64 + (1.0 - b2) * g * g;
        let p = state.p[i] as f64;
        let update =
            (m1 / bias1) / ((m2 / bias2).sqrt() + cfg.eps as f64) + cfg.weight_decay as f64 * p;
        let p = p - cfg.lr as f64 * update;
        state.m1[i] = m1 as f32;
        state.m2[i] = m2 as f32;
        state.p[i] = p as f32;
        state.working[i] = T::from_f32(p as f32);
    }
    Ok(())
}

/// What one slot's step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SlotStep {
    /// Stepped; the gradient's L2 norm before clipping.
    Updated {
        /// The gradient's L2 norm before clipping.
        grad_norm: f64,
    },
    /// The gradient held NaN or Inf: nothing changed.
    Skipped,
    /// The step would have left NaN or Inf in the slot (a weight or moment
    /// beyond f32's range, or a weight beyond the storage type's): nothing
    /// changed.
    SkippedOverflow {
        /// The gradient's L2 norm before clipping.
        grad_norm: f64,
    },
}

/// One step of the fused optimizer for one slot, whose parameters (a then b)
/// are one vector: NaN/Inf anywhere in `grad` skips the step; otherwise the
/// gradient is clipped to `max_grad_norm`, pulled toward `anchor`, and fed to
/// [`adamw_step`] with the slot's own learning rate and weight decay. `step`
/// is this step's number (from 1). All or nothing: if any new weight, moment
/// (f32) or working-copy value (`T`) would be NaN or Inf, `state` is left as
/// it was and the step reports [`SlotStep::SkippedOverflow`].
pub fn adamw_slot_step<T: Element>(
    config: &AdamWConfig,
    hyper: &SlotHyper,
    step: u32,
    grad: &[f32],
    anchor: Option<&[f32]>,
    state: AdamWState<'_, T>,
) -> Result<SlotStep> {
    if let Some(anchor) = anchor
        && anchor.len() != grad.len()
    {
        return Err(Error::Shape {
            operand: "anchor",
            shape: format!("the {} parameters", grad.len()),
            expected: grad.len(),
            actual: anchor.len(),
        });
    }
    if grad.len() != state.p.len() {
        return Err(Error::Shape {
            operand: "grad",
            shape: format!("the {} parameters of `p`", state.p.len()),
            expected: state.p.len(),
            actual: grad.len(),
        });
    }
    if grad.iter().any(|g| !g.is_finite()) {
        return Ok(SlotStep::Skipped);
    }
    let grad_norm = grad
        .iter()
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt();
    let clip = if hyper.max_grad_norm > 0.0 && grad_norm > hyper.max_grad_norm as f64 {
        hyper.max_grad_norm as f64 / grad_norm
    } else {
        1.0
    };
    let effective: Vec<f32> = grad
        .iter()
        .enumerate()
        .map(|(i, &g)| {
            let pull = anchor.map_or(0.0, |a| {
                hyper.anchor_pull as f64 * (state.p[i] as f64 - a[i] as f64)
            });
            (g as f64 * clip + pull) as f32
        })
        .collect();
    let cfg = AdamW {
        lr: hyper.lr,
        weight_decay: hyper.weight_decay,
        beta1: config.beta1,
        beta2: config.beta2,
        eps: config.eps,
    };
    let (mut p, mut m1, mut m2) = (state.p.to_vec(), state.m1.to_vec(), state.m2.to_vec());
    let mut working = state.working.to_vec();
    let next = AdamWState {
        p: &mut p,
        m1: &mut m1,
        m2: &mut m2,
        working: &mut working,
    };
    adamw_step(&cfg, step, &effective, next)?;
    let finite = p.iter().chain(&m1).chain(&m2).all(|v| v.is_finite())
        && working.iter().all(|v| v.to_f64().is_finite());
    if !finite {
        return Ok(SlotStep::SkippedOverflow { grad_norm });
    }
    state.p.copy_from_slice(&p);
    state.m1.copy_from_slice(&m1);
    state.m2.copy_from_slice(&m2);
    state.working.copy_from_slice(&working);
    Ok(SlotStep::Updated { grad_norm })
}
