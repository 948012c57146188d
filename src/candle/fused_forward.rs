//! The fused forward on candle tensors: `y = x w^T + s (x a^T) b^T`, one launch
//! ([`crate::ops::fused_forward`]).
mod autograd;

pub use autograd::fused_forward_autograd;

use candle_core::{Result, Tensor};

use super::{CandleElement, device, dtype, expect_dims, matrix_dims, operand, tensor, view};
use crate::buffer::{BufRef, Buffer};
use crate::device::Device;
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
    let c = Checked::new::<T>(x, w, a, b)?;
    let cdev = c.x.device();
    let (xs, xl) = c.x.storage_and_layout();
    let (ws, wl) = c.w.storage_and_layout();
    let (as_, al) = c.a.storage_and_layout();
    let (bs, bl) = c.b.storage_and_layout();
    let views = (
        view::<T>("x", &xs, xl)?,
        view::<T>("w", &ws, wl)?,
        view::<T>("a", &as_, al)?,
        view::<T>("b", &bs, bl)?,
    );
    let (y, t) = c.launch(&device(cdev)?, views, scale, save_t)?;
    let t = t
        .map(|t| tensor(t, &[c.dims.m, c.rank], cdev))
        .transpose()?;
    Ok((tensor(y, &c.y_shape(), cdev)?, t))
}

/// The operands of one fused forward, checked (type, device, shapes) and
/// contiguous, with the sizes they imply.
struct Checked {
    x: Tensor,
    w: Tensor,
    a: Tensor,
    b: Tensor,
    /// `x`'s leading dims (one token per row).
    lead: Vec<usize>,
    dims: Dims,
    rank: usize,
}

/// The kernels' views of (x, w, a, b).
type Views<'s, T> = (BufRef<'s, T>, BufRef<'s, T>, BufRef<'s, T>, BufRef<'s, T>);

impl Checked {
    fn new<T: CandleElement>(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor) -> Result<Self> {
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
        let dims = Dims::new(m, n, k);
        Ok(Checked {
            x,
            w,
            a,
            b,
            lead,
            dims,
            rank,
        })
    }

    fn y_shape(&self) -> Vec<usize> {
        with_last(&self.lead, self.dims.n)
    }

    /// Runs the op on `dev` over `views` of (x, w, a, b): `y` and, when
    /// `save_t`, `t`.
    fn launch<T: CandleElement>(
        &self,
        dev: &Device,
        (x, w, a, b): Views<'_, T>,
        scale: f32,
        save_t: bool,
    ) -> Result<(Buffer<T>, Option<Buffer<f32>>)> {
        let Dims { m, n, .. } = self.dims;
        let adapter = DeviceAdapter::new(a, b, self.rank, scale);
        let mut y = dev.zeros::<T>(elements("y", m, n)?)?;
        if !save_t {
            op::fused_forward(dev, self.dims, x, w, &adapter, 0.0, &mut y)?;
            return Ok((y, None));
        }
        let mut t = dev.zeros::<f32>(elements("t", m, self.rank)?)?;
        op::fused_forward_saving_t(dev, self.dims, x, w, &adapter, &mut y, &mut t)?;
        Ok((y, Some(t)))
    }
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
