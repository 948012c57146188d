//! The fused forward on candle tensors: `y = x w^T + s (x a^T) b^T`, one launch
//! ([`crate::ops::fused_forward`]).
use candle_core::{Result, Tensor};

use super::{CandleElement, device, dtype, expect_dims, matrix_dims, operand, tensor, view};
use crate::ops::DeviceAdapter;
use crate::ops::fused_forward as op;
use crate::shape::{Dims, check_rank, elements};

/// `y = x w^T + scale (x a^T) b^T` for `x` `[..., k]` (any leading dims, one
/// token per row), `w` `[n, k]`, `a` `[rank, k]`, `b` `[n, rank]`, all of type
/// `T` on one device; `y` is `[..., n]`.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use lora_kernels::candle::fused_forward::fused_forward;
///
/// let dev = Device::Cpu; // runs on the host runtime; a Cuda device runs on the GPU
/// let x = Tensor::ones((2, 4), DType::F32, &dev)?;
/// let w = Tensor::ones((3, 4), DType::F32, &dev)?;
/// let a = Tensor::ones((1, 4), DType::F32, &dev)?;
/// let b = Tensor::full(2f32, (3, 1), &dev)?;
/// let y = fused_forward::<f32>(&x, &w, &a, &b, 0.5)?;
/// // x w^T = 4, x a^T = 4, 0.5 * 4 * 2 = 4.
/// assert_eq!(y.to_vec2::<f32>()?, vec![vec![8.0; 3]; 2]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn fused_forward<T: CandleElement>(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let (y, _) = run::<T>(x, w, a, b, scale, false)?;
    Ok(y)
}

/// The training forward: `y` as [`fused_forward`], and `t = x a^T`
/// (unscaled, f32, `[m, rank]` with `m` the number of rows of `x`) for
/// [`crate::candle::lora_backward::lora_backward`].
pub fn fused_forward_saving_t<T: CandleElement>(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let (y, t) = run::<T>(x, w, a, b, scale, true)?;
    Ok((y, t.expect("t was asked for")))
}

/// Checks the operands, runs the op and wraps its outputs.
fn run<T: CandleElement>(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f32,
    save_t: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let cdev = x.device();
    let ty = dtype::<T>();
    let (x, w) = (operand("x", x, ty, cdev)?, operand("w", w, ty, cdev)?);
    let (a, b) = (operand("a", a, ty, cdev)?, operand("b", b, ty, cdev)?);
    let Rows { lead, m, k } = rows_of("x", &x)?;
    let (n, rank) = (matrix_dims("w", &w)?.0, matrix_dims("a", &a)?.0);
    check_rank("a", rank)?;
    expect_dims("w", &w, &[n, k])?;
    expect_dims("a", &a, &[rank, k])?;
    expect_dims("b", &b, &[n, rank])?;

    let dev = device(cdev)?;
    let dims = Dims::new(m, n, k);
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (as_, al) = a.storage_and_layout();
    let (bs, bl) = b.storage_and_layout();
    let adapter = DeviceAdapter::new(
        view::<T>("a", &as_, al)?,
        view::<T>("b", &bs, bl)?,
        rank,
        scale,
    );
    let (xv, wv) = (view::<T>("x", &xs, xl)?, view::<T>("w", &ws, wl)?);
    let mut y = dev.zeros::<T>(elements("y", m, n)?)?;
    let t = if save_t {
        let mut t = dev.zeros::<f32>(elements("t", m, rank)?)?;
        op::fused_forward_saving_t(&dev, dims, xv, wv, &adapter, &mut y, &mut t)?;
        Some(tensor(t, &[m, rank], cdev)?)
    } else {
        op::fused_forward(&dev, dims, xv, wv, &adapter, 0.0, &mut y)?;
        None
    };
    Ok((tensor(y, &with_last(&lead, n), cdev)?, t))
}

/// The tokens of `x` `[..., k]`: one per row, whatever the leading dims.
pub(crate) struct Rows {
    /// The leading dims (`y` has them too, with `n` last).
    pub lead: Vec<usize>,
    /// The number of tokens: the product of the leading dims.
    pub m: usize,
    /// The features of a token: the last dim.
    pub k: usize,
}

/// The rows of `x` `[..., k]` (errors name the operand).
pub(crate) fn rows_of(name: &str, x: &Tensor) -> Result<Rows> {
    let Some((&k, lead)) = x.dims().split_last() else {
        return Err(candle_core::Error::Msg(format!(
            "operand `{name}` is a scalar; it needs at least one dim ([..., k])"
        )));
    };
    let m = lead
        .iter()
        .try_fold(1usize, |m, &d| m.checked_mul(d))
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "operand `{name}`: the product of the leading dims {lead:?} overflows usize"
            ))
        })?;
    Ok(Rows {
        lead: lead.to_vec(),
        m,
        k,
    })
}

/// `lead` followed by `last`: the shape of an output with `x`'s tokens.
pub(crate) fn with_last(lead: &[usize], last: usize) -> Vec<usize> {
    let mut shape = lead.to_vec();
    shape.push(last);
    shape
}
