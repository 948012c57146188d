use super::{Adapter, dot, forward_row};
use crate::element::Element;
use crate::error::Result;
use crate::shape::{Dims, check_finite, check_matrix};

/// `y = x w^T + s (x a^T) b^T (+ beta y)`. With `beta == 0` the old `y` is not
/// read (so NaN left in it does not leak into the result).
pub fn fused_forward<T: Element>(
    dims: Dims,
    x: &[T],
    w: &[T],
    adapter: &Adapter<'_, T>,
    beta: f32,
    y: &mut [T],
) -> Result<()> {
    validate(dims, x, w, adapter, beta, y.len())?;
    for i in 0..dims.m {
        forward_row(dims, x, w, Some(adapter), beta, i, y);
    }
    Ok(())
}

/// The intermediate `t = x a^T` `[m, rank]`, accumulated in f64 and rounded
/// once to f32: what the forward pass saves for the backward pass.
pub fn lora_intermediate<T: Element>(
    dims: Dims,
    x: &[T],
    adapter: &Adapter<'_, T>,
) -> Result<Vec<f32>> {
    dims.validate()?;
    check_matrix("x", dims.m, dims.k, x.len())?;
    adapter.validate(dims.n, dims.k)?;
    let k = dims.k;
    Ok((0..dims.m * adapter.rank)
        .map(|e| {
            let (i, j) = (e / adapter.rank, e % adapter.rank);
            dot(&x[i * k..(i + 1) * k], &adapter.a[j * k..(j + 1) * k]) as f32
        })
        .collect())
}

pub(crate) fn validate<T>(
    dims: Dims,
    x: &[T],
    w: &[T],
    adapter: &Adapter<'_, T>,
    beta: f32,
    y_len: usize,
) -> Result<()> {
    dims.validate()?;
    check_matrix("x", dims.m, dims.k, x.len())?;
    check_matrix("w", dims.n, dims.k, w.len())?;
    adapter.validate(dims.n, dims.k)?;
    check_finite("beta", beta)?;
    check_matrix("y", dims.m, dims.n, y_len)
}
