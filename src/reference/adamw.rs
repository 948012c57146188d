use crate::element::Element;
use crate::error::{Error, Result};
use crate::shape::invalid;

/// AdamW hyper-parameters (DESIGN.md section 1).
#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
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
        for (name, v) in [
            ("lr", self.lr),
            ("eps", self.eps),
            ("weight_decay", self.weight_decay),
        ] {
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
    pub p: &'a mut [f32],
    pub m1: &'a mut [f32],
    pub m2: &'a mut [f32],
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
