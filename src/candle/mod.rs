//! The crate's operations on [candle](https://crates.io/crates/candle-core)
//! tensors (cargo feature `candle`; `candle-cuda` adds candle's CUDA tensors).
//!
//! - CUDA tensors run on the GPU on candle's own stream, without copies: the
//!   kernels read the tensors' device memory in place and write new tensors.
//! - CPU tensors run on the host runtime (the same kernel source on the CPU),
//!   so the candle path is tested on machines without a GPU.
//!
//! Every operand must have the op's dtype (f32, f16 or bf16; `t` and the
//! adapter gradients are f32, slot ids I32 or U32) and live on the same
//! candle device, where an [`AdapterPool`](crate::AdapterPool) they use must
//! live too (make it on [`device`]`(&candle_device)`); a wrong dtype, device
//! or shape is a candle error naming the operand. Strided
//! tensors (a transpose, a narrow) are made contiguous first, which copies
//! them. Errors of the ops themselves come back as candle errors carrying the
//! crate's message.
//!
//! This module holds what every candle function shares: the element types,
//! the crate's [`Device`] for a candle device, operand checks and the views
//! the kernels read, and new tensors from the buffers they write.
pub mod adamw;
pub mod fused_forward;
pub mod lora_backward;
pub mod lora_linear;
pub mod multi_adapter_forward;

pub use lora_linear::{LoraLinear, LoraLinearSaved};

use candle_core::op::BackpropOp;
use candle_core::{DType as CandleDType, Layout, Storage, Tensor, WithDType};

use crate::buffer::{BufRef, Buffer};
use crate::device::Device;
use crate::ops::KernelElement;

/// A storage type the kernels take that candle also has: f32, f16, bf16.
#[cfg(feature = "candle-cuda")]
pub trait CandleElement: KernelElement + WithDType + candle_core::cuda::CudaDType {}
/// A storage type the kernels take that candle also has: f32, f16, bf16.
#[cfg(not(feature = "candle-cuda"))]
pub trait CandleElement: KernelElement + WithDType {}

impl CandleElement for f32 {}
impl CandleElement for half::f16 {}
impl CandleElement for half::bf16 {}

/// candle's dtype for `T`.
pub(crate) fn dtype<T: CandleElement>() -> CandleDType {
    <T as WithDType>::DTYPE
}

/// The crate's errors as candle errors (the message is kept).
impl From<crate::Error> for candle_core::Error {
    fn from(e: crate::Error) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// The [`Device`] the crate's ops run on for a candle device: the host
/// runtime for `Cpu`, candle's own CUDA stream for `Cuda` (with the
/// `candle-cuda` feature). Cheap: kernel modules are loaded once per CUDA
/// context, whatever the stream.
pub fn device(dev: &candle_core::Device) -> candle_core::Result<Device> {
    match dev {
        candle_core::Device::Cpu => Ok(Device::host()?),
        #[cfg(feature = "candle-cuda")]
        candle_core::Device::Cuda(cuda) => Ok(Device::from_stream(cuda.cuda_stream())?),
        other => Err(candle_core::Error::Msg(format!(
            "lora-kernels runs on candle's Cpu device (host runtime){} only, not on {:?}",
            if cfg!(feature = "candle-cuda") {
                " and Cuda devices"
            } else {
                " (Cuda devices need the `candle-cuda` feature)"
            },
            other.location()
        ))),
    }
}

/// `t` checked for an op: dtype `dtype`, on `dev`, made contiguous (a copy
/// when it is strided). Errors name the operand.
pub(crate) fn operand(
    name: &'static str,
    t: &Tensor,
    dtype: CandleDType,
    dev: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    if t.dtype() != dtype {
        return Err(candle_core::Error::Msg(format!(
            "operand `{name}` has dtype {:?}, the op takes {dtype:?}",
            t.dtype()
        )));
    }
    on_device(name, t, dev)?;
    t.contiguous()
}

/// An error naming the operand unless `t` lives on `dev`.
pub(crate) fn on_device(
    name: &str,
    t: &Tensor,
    dev: &candle_core::Device,
) -> candle_core::Result<()> {
    if !t.device().same_device(dev) {
        return Err(candle_core::Error::Msg(format!(
            "operand `{name}` is on {:?}, the op runs on {:?}",
            t.device().location(),
            dev.location()
        )));
    }
    Ok(())
}

/// The two dims of `t`, which must be a matrix (errors name the operand).
pub(crate) fn matrix_dims(name: &str, t: &Tensor) -> candle_core::Result<(usize, usize)> {
    match *t.dims() {
        [rows, cols] => Ok((rows, cols)),
        _ => Err(candle_core::Error::Msg(format!(
            "operand `{name}` must be a matrix [rows, cols], got shape {:?}",
            t.dims()
        ))),
    }
}

/// Checks that `t` has exactly `dims` (errors name the operand).
pub(crate) fn expect_dims(name: &str, t: &Tensor, dims: &[usize]) -> candle_core::Result<()> {
    if t.dims() != dims {
        return Err(candle_core::Error::UnexpectedShape {
            msg: format!("operand `{name}`"),
            expected: dims.into(),
            got: t.shape().clone(),
        });
    }
    Ok(())
}

/// The elements a contiguous tensor's storage holds for it, as the kernels
/// read them. `storage` and `layout` come from [`Tensor::storage_and_layout`]
/// of a tensor returned by [`operand`].
pub(crate) fn view<'s, T: CandleElement>(
    name: &'static str,
    storage: &'s Storage,
    layout: &Layout,
) -> candle_core::Result<BufRef<'s, T>> {
    match storage {
        Storage::Cpu(cpu) => cpu_view(name, cpu, layout),
        #[cfg(feature = "candle-cuda")]
        Storage::Cuda(cuda) => cuda_view(name, cuda, layout),
        _ => Err(candle_core::Error::Msg(format!(
            "operand `{name}`: lora-kernels cannot read this storage"
        ))),
    }
}

/// [`view`] of CPU storage.
pub(crate) fn cpu_view<'s, T: CandleElement>(
    name: &'static str,
    cpu: &'s candle_core::CpuStorage,
    layout: &Layout,
) -> candle_core::Result<BufRef<'s, T>> {
    let (start, end) = contiguous(name, layout)?;
    Ok(BufRef::Host(&T::cpu_storage_as_slice(cpu)?[start..end]))
}

/// [`view`] of CUDA storage: the tensor's device memory, no copy.
#[cfg(feature = "candle-cuda")]
pub(crate) fn cuda_view<'s, T: CandleElement>(
    name: &'static str,
    cuda: &'s candle_core::CudaStorage,
    layout: &Layout,
) -> candle_core::Result<BufRef<'s, T>> {
    let (start, end) = contiguous(name, layout)?;
    Ok(BufRef::Cuda(cuda.as_cuda_slice::<T>()?.slice(start..end)))
}

/// Where a contiguous layout's elements start and end in its storage.
fn contiguous(name: &str, layout: &Layout) -> candle_core::Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("operand `{name}` is not contiguous")))
}

/// A new contiguous tensor of `shape` on `dev` owning `buf` (a buffer the
/// crate's ops wrote on [`device`]`(dev)`).
pub(crate) fn tensor<T: CandleElement>(
    buf: Buffer<T>,
    shape: &[usize],
    dev: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let storage = match (buf, dev) {
        (Buffer::Host(v), candle_core::Device::Cpu) => Storage::Cpu(T::to_cpu_storage_owned(v)),
        #[cfg(feature = "candle-cuda")]
        (Buffer::Cuda(s), candle_core::Device::Cuda(cuda)) => {
            Storage::Cuda(candle_core::CudaStorage::wrap_cuda_slice(s, cuda.clone()))
        }
        _ => {
            return Err(candle_core::Error::Msg(
                "lora-kernels: an output buffer is not on the tensors' device".into(),
            ));
        }
    };
    Ok(Tensor::from_storage(
        storage,
        shape,
        BackpropOp::none(),
        false,
    ))
}
