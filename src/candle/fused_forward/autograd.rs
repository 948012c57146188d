//! The fused forward as a candle `CustomOp3` over `(x, a, b)` with the base
//! weight frozen inside the op, so that it composes with candle's autograd:
//! `loss.backward()` reaches `x`, `a` and `b` through the crate's backward
//! kernels. The forward keeps `t = x a^T` (the kernel writes it at no extra
//! pass) for the backward to use.
use std::marker::PhantomData;
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::Checked;
use crate::buffer::Buffer;
use crate::candle::lora_backward::{BackwardRequest, lora_backward};
use crate::candle::{CandleElement, cpu_view, dtype, tensor, view};
use crate::device::Device;

/// `y = x w^T + scale (x a^T) b^T` as [`super::fused_forward`] computes it,
/// recorded in candle's graph: gradients flow to `x`, `a` and `b` (whichever
/// are variables or depend on one), not to `w`, the frozen base weight. `da`
/// and `db` are computed in f32 and rounded to `T` for candle.
///
/// ```
/// use candle_core::{DType, Device, Tensor, Var};
/// use lora_kernels::candle::fused_forward::fused_forward_autograd;
///
/// let dev = Device::Cpu; // the host runtime; a Cuda device runs on the GPU
/// let x = Tensor::ones((2, 4), DType::F32, &dev)?;
/// let w = Tensor::ones((3, 4), DType::F32, &dev)?;
/// let a = Var::ones((1, 4), DType::F32, &dev)?;
/// let b = Var::zeros((3, 1), DType::F32, &dev)?; // PEFT's initialisation: b = 0
/// let y = fused_forward_autograd::<f32>(&x, &w, &a, &b, 0.5)?;
/// let grads = y.sum_all()?.backward()?;
/// // dL/db = s t^T 1 = 0.5 * (4 + 4) in each row; dL/da = s b^T ... = 0.
/// assert_eq!(grads.get(&b).unwrap().to_vec2::<f32>()?, vec![vec![4.0]; 3]);
/// assert_eq!(grads.get(&a).unwrap().to_vec2::<f32>()?, vec![vec![0.0; 4]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn fused_forward_autograd<T: CandleElement>(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let c = Checked::new::<T>(x, w, a, b)?;
    let (x, a, b) = (c.x.clone(), c.a.clone(), c.b.clone());
    let op = TrackedForward::<T> {
        checked: c,
        scale,
        t: Mutex::new(None),
        _type: PhantomData,
    };
    x.apply_op3(&a, &b, op)
}

/// The op candle records: the checked operands (`w` among them) and, once
/// the forward ran, its `t`.
struct TrackedForward<T> {
    checked: Checked,
    scale: f32,
    t: Mutex<Option<Tensor>>,
    _type: PhantomData<fn() -> T>,
}

impl<T: CandleElement> TrackedForward<T> {
    /// Keeps the forward's `t` (on `cdev`) for the backward.
    fn keep_t(&self, t: Option<Buffer<f32>>, cdev: &candle_core::Device) -> Result<()> {
        let t = t.expect("the forward was asked for t");
        let t = tensor(t, &[self.checked.dims.m, self.checked.rank], cdev)?;
        *self.t.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        Ok(())
    }
}

impl<T: CandleElement> CustomOp3 for TrackedForward<T> {
    fn name(&self) -> &'static str {
        "lora-kernels fused_forward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (ws, wl) = self.checked.w.storage_and_layout();
        let views = (
            cpu_view::<T>("x", x, xl)?,
            view::<T>("w", &ws, wl)?,
            cpu_view::<T>("a", a, al)?,
            cpu_view::<T>("b", b, bl)?,
        );
        let (y, t) = self
            .checked
            .launch(&Device::host()?, views, self.scale, true)?;
        self.keep_t(t, &candle_core::Device::Cpu)?;
        let Buffer::Host(y) = y else {
            unreachable!("the host runtime writes host buffers")
        };
        Ok((T::to_cpu_storage_owned(y), self.checked.y_shape().into()))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        a: &candle_core::CudaStorage,
        al: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::candle::cuda_view;
        let (ws, wl) = self.checked.w.storage_and_layout();
        let views = (
            cuda_view::<T>("x", x, xl)?,
            view::<T>("w", &ws, wl)?,
            cuda_view::<T>("a", a, al)?,
            cuda_view::<T>("b", b, bl)?,
        );
        let dev = Device::from_stream(x.device.cuda_stream())?;
        let (y, t) = self.checked.launch(&dev, views, self.scale, true)?;
        self.keep_t(t, &candle_core::Device::Cuda(x.device.clone()))?;
        let Buffer::Cuda(y) = y else {
            unreachable!("a CUDA device writes device buffers")
        };
        let y = candle_core::CudaStorage::wrap_cuda_slice(y, x.device.clone());
        Ok((y, self.checked.y_shape().into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let t = self.t.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let t =
            t.ok_or_else(|| candle_core::Error::Msg("backward before the forward ran".into()))?;
        let (w, scale) = (&self.checked.w, self.scale);
        let req = BackwardRequest::default();
        let grads = lora_backward::<T>(g, x, w, &t, a, b, scale, req)?;
        // candle adds gradients of a variable's own type.
        let as_t = |grad: Option<Tensor>| grad.map(|g| g.to_dtype(dtype::<T>())).transpose();
        Ok((grads.dx, as_t(grads.da)?, as_t(grads.db)?))
    }
}
