//! The CPU reference of every operation: plain loops, f64 accumulation, one
//! rounding to the storage type at the end. Kernels are checked against these
//! (docs/DESIGN.md section 3), so they favour being obviously right over being fast.
//! Every function validates its inputs exactly as the kernels' entry points do.
mod adamw;
mod backward;
mod fused_forward;
mod merge;
mod multi_adapter_forward;

pub use adamw::{AdamW, AdamWState, SlotStep, adamw_slot_step, adamw_step};
pub use backward::{BackwardInputs, Gradients, backward};
pub use fused_forward::{fused_forward, lora_intermediate};
pub use merge::merge;
pub use multi_adapter_forward::{
    multi_adapter_forward, multi_adapter_forward_segments, segment_ids,
};

use crate::element::Element;
use crate::error::Result;
use crate::shape::{Dims, check_finite, check_matrix, check_rank};

/// One adapter as the reference (and the single-adapter ops) see it:
/// `a` is `[rank, k]`, `b` is `[n, rank]`, `scale` multiplies `(x a^T) b^T`.
#[derive(Debug, Clone, Copy)]
pub struct Adapter<'a, T> {
    /// The down projection, `[rank, k]`.
    pub a: &'a [T],
    /// The up projection, `[n, rank]`.
    pub b: &'a [T],
    /// The rank, 1..=[`crate::MAX_RANK`].
    pub rank: usize,
    /// The scale `s` (PEFT: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA).
    pub scale: f32,
}

impl<T> Adapter<'_, T> {
    pub(crate) fn validate(&self, n: usize, k: usize) -> Result<()> {
        check_rank("rank", self.rank)?;
        check_finite("scale", self.scale)?;
        check_matrix("a", self.rank, k, self.a.len())?;
        check_matrix("b", n, self.rank, self.b.len())
    }
}

/// Dot product of two rows in f64.
pub(crate) fn dot<T: Element, U: Element>(u: &[T], v: &[U]) -> f64 {
    u.iter().zip(v).map(|(p, q)| p.to_f64() * q.to_f64()).sum()
}

/// Row `i` of `y = x w^T + scale * (x a^T) b^T (+ beta y)` with the given
/// adapter (or none): the core of the single- and multi-adapter references.
pub(crate) fn forward_row<T: Element>(
    dims: Dims,
    x: &[T],
    w: &[T],
    adapter: Option<&Adapter<'_, T>>,
    beta: f32,
    i: usize,
    y: &mut [T],
) {
    let (n, k) = (dims.n, dims.k);
    let xi = &x[i * k..(i + 1) * k];
    let t: Vec<f64> = adapter.map_or(Vec::new(), |ad| {
        (0..ad.rank)
            .map(|j| dot(xi, &ad.a[j * k..(j + 1) * k]))
            .collect()
    });
    for c in 0..n {
        let mut acc = dot(xi, &w[c * k..(c + 1) * k]);
        if let Some(ad) = adapter {
            let lora: f64 = (0..ad.rank)
                .map(|j| t[j] * ad.b[c * ad.rank + j].to_f64())
                .sum();
            acc += ad.scale as f64 * lora;
        }
        if beta != 0.0 {
            acc += beta as f64 * y[i * n + c].to_f64();
        }
        y[i * n + c] = T::from_f64(acc);
    }
}
