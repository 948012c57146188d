use super::{Adapter, dot};
use crate::element::Element;
use crate::error::Result;
use crate::shape::{Dims, check_matrix};

/// What the backward pass reads: `g = dL/dy` `[m, n]`, the forward inputs, and
/// `t = x a^T` `[m, rank]` saved by the forward pass (f32).
#[derive(Debug, Clone, Copy)]
pub struct BackwardInputs<'a, T> {
    /// `dL/dy`, `[m, n]`.
    pub g: &'a [T],
    /// The forward pass's input, `[m, k]`.
    pub x: &'a [T],
    /// The frozen base weight, `[n, k]`.
    pub w: &'a [T],
    /// The adapter being trained.
    pub adapter: Adapter<'a, T>,
    /// `t = x a^T`, `[m, rank]`, unscaled f32.
    pub t: &'a [f32],
}

/// The gradients to compute; each is optional. With `accumulate`, results are
/// added to what the buffers hold (gradient accumulation), otherwise they
/// overwrite it. `da` is `[rank, k]`, `db` is `[n, rank]` (f32), `dx` is `[m, k]`.
#[derive(Debug, Default)]
pub struct Gradients<'a, T> {
    /// `dL/dx`, `[m, k]`.
    pub dx: Option<&'a mut [T]>,
    /// `dL/da`, `[rank, k]`.
    pub da: Option<&'a mut [f32]>,
    /// `dL/db`, `[n, rank]`.
    pub db: Option<&'a mut [f32]>,
    /// Add to the buffers' contents instead of overwriting them.
    pub accumulate: bool,
}

/// Adapter backward (docs/DESIGN.md section 1), contracting through the rank:
/// `u = s g b`, `db = s g^T t`, `da = u^T x`, `dx = g w + u a`.
pub fn backward<T: Element>(
    dims: Dims,
    inp: &BackwardInputs<'_, T>,
    grads: Gradients<'_, T>,
) -> Result<()> {
    let Dims { m, n, k } = dims;
    dims.validate()?;
    inp.adapter.validate(n, k)?;
    let (r, s) = (inp.adapter.rank, inp.adapter.scale as f64);
    check_matrix("g", m, n, inp.g.len())?;
    check_matrix("x", m, k, inp.x.len())?;
    check_matrix("w", n, k, inp.w.len())?;
    check_matrix("t", m, r, inp.t.len())?;
    if let Some(dx) = &grads.dx {
        check_matrix("dx", m, k, dx.len())?;
    }
    if let Some(da) = &grads.da {
        check_matrix("da", r, k, da.len())?;
    }
    if let Some(db) = &grads.db {
        check_matrix("db", n, r, db.len())?;
    }
    let (a, b) = (inp.adapter.a, inp.adapter.b);
    // u[i, j] = s * sum_c g[i, c] b[c, j]
    let u: Vec<f64> = (0..m * r)
        .map(|e| {
            let (i, j) = (e / r, e % r);
            s * (0..n)
                .map(|c| inp.g[i * n + c].to_f64() * b[c * r + j].to_f64())
                .sum::<f64>()
        })
        .collect();
    let accumulate = grads.accumulate;
    if let Some(db) = grads.db {
        for c in 0..n {
            for j in 0..r {
                let v = s
                    * (0..m)
                        .map(|i| inp.g[i * n + c].to_f64() * inp.t[i * r + j] as f64)
                        .sum::<f64>();
                store_f32(&mut db[c * r + j], v, accumulate);
            }
        }
    }
    if let Some(da) = grads.da {
        for j in 0..r {
            for q in 0..k {
                let v: f64 = (0..m)
                    .map(|i| u[i * r + j] * inp.x[i * k + q].to_f64())
                    .sum();
                store_f32(&mut da[j * k + q], v, accumulate);
            }
        }
    }
    if let Some(dx) = grads.dx {
        for i in 0..m {
            for q in 0..k {
                let base: f64 = (0..n)
                    .map(|c| inp.g[i * n + c].to_f64() * inp.w[c * k + q].to_f64())
                    .sum();
                let low: f64 = dot(
                    &u[i * r..(i + 1) * r],
                    &(0..r).map(|j| a[j * k + q]).collect::<Vec<T>>(),
                );
                let old = if accumulate {
                    dx[i * k + q].to_f64()
                } else {
                    0.0
                };
                dx[i * k + q] = T::from_f64(old + base + low);
            }
        }
    }
    Ok(())
}

fn store_f32(dst: &mut f32, v: f64, accumulate: bool) {
    *dst = if accumulate {
        (*dst as f64 + v) as f32
    } else {
        v as f32
    };
}
