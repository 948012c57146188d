//! The multi-adapter forward on candle tensors: every token uses its own
//! adapter from an [`AdapterPool`] (or none), one launch
//! ([`crate::ops::multi_adapter_forward`]).
//!
//! Also what the pool's candle functions share (crate-private): the checks
//! and views of the per-token slot ids, and the check that the pool lives
//! where the tensors do.
use std::sync::Arc;

use candle_core::{CpuStorage, DType as CandleDType, Layout, Result, Storage, Tensor};
use cudarc::driver::CudaStream;

use super::fused_forward::{Rows, rows_of, with_last};
use super::{CandleElement, device, dtype, expect_dims, on_device, operand, tensor, view};
use crate::adapter_pool::AdapterPool;
use crate::buffer::BufRef;
use crate::ops::multi_adapter_forward::{self as op, Routing};
use crate::shape::elements;

/// `y = x w^T + s_i (x_i a_i^T) b_i^T`: token `i` uses the adapter in slot
/// `ids[i]` of `pool` (`-1`: the base model only). `x` is `[..., k]` (the
/// leading dims are the tokens, `m` their product), `w` `[n, k]` with the
/// pool's `n` and `k`, both of the pool's type `T`; `ids` is an `I32` or `U32`
/// tensor with `x`'s leading dims (or `[m]`). `y` is `[..., n]`.
///
/// The pool must live where the tensors do: make it on
/// [`crate::candle::device`]`(tensors' device)`. Ids are read on the device,
/// never on the host: one outside `-1..slots` is served as `-1` and counted
/// in [`AdapterPool::bad_id_count`]; one naming an empty slot gets the base
/// model only. `U32` ids are read as the same bits in `i32`: `u32::MAX` is
/// `-1`, and ids from 2^31 on are out of range. Check ids you hold on the
/// host with [`AdapterPool::check_ids`] for clear errors.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use lora_kernels::candle::multi_adapter_forward::multi_adapter_forward;
/// use lora_kernels::{AdapterPool, PoolConfig};
///
/// let cdev = Device::Cpu; // runs on the host runtime
/// let cfg = PoolConfig { slots: 2, max_rank: 1, n: 2, k: 3 };
/// let mut pool = AdapterPool::<f32>::new(&lora_kernels::candle::device(&cdev)?, cfg)?;
/// pool.load(1, &[1.0; 3], &[1.0, 2.0], 1, 1.0)?;
/// let x = Tensor::ones((2, 3), candle_core::DType::F32, &cdev)?;
/// let w = Tensor::zeros((2, 3), candle_core::DType::F32, &cdev)?; // no base term
/// let ids = Tensor::new(&[1i32, -1], &cdev)?; // token 0: slot 1; token 1: none
/// let y = multi_adapter_forward(&pool, &x, &w, &ids)?;
/// // Token 0: t = x a^T = 3, y = t b^T = [3, 6]; token 1: the base term, 0.
/// assert_eq!(y.to_vec2::<f32>()?, vec![vec![3.0, 6.0], vec![0.0, 0.0]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn multi_adapter_forward<T: CandleElement>(
    pool: &AdapterPool<T>,
    x: &Tensor,
    w: &Tensor,
    ids: &Tensor,
) -> Result<Tensor> {
    let (y, _) = run(pool, x, w, ids, false)?;
    Ok(y)
}

/// The training forward: `y` as [`multi_adapter_forward`], and each token's
/// `t = x a_i^T` (unscaled, f32, `[m, pool.config().max_rank]`; its first
/// `rank` columns are the token's adapter's, the rest and the rows of tokens
/// without an adapter are zero) for
/// [`crate::candle::lora_backward::multi_adapter_backward`].
pub fn multi_adapter_forward_saving_t<T: CandleElement>(
    pool: &AdapterPool<T>,
    x: &Tensor,
    w: &Tensor,
    ids: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (y, t) = run(pool, x, w, ids, true)?;
    Ok((y, t.expect("t was asked for")))
}

/// Checks the operands, runs the op and wraps its outputs.
fn run<T: CandleElement>(
    pool: &AdapterPool<T>,
    x: &Tensor,
    w: &Tensor,
    ids: &Tensor,
    save_t: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let cdev = x.device();
    check_pool_device(pool, "x", cdev)?;
    let ty = dtype::<T>();
    let (x, w) = (operand("x", x, ty, cdev)?, operand("w", w, ty, cdev)?);
    let cfg = pool.config();
    let rows = rows_of("x", &x)?;
    expect_dims("x", &x, &with_last(&rows.lead, cfg.k))?;
    expect_dims("w", &w, &[cfg.n, cfg.k])?;
    let ids = slot_ids(ids, &rows, cdev)?;
    let Rows { lead, m, .. } = rows;

    let dev = pool.device();
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (is, il) = ids.storage_and_layout();
    let (xv, wv) = (view::<T>("x", &xs, xl)?, view::<T>("w", &ws, wl)?);
    let routing = Routing::Tokens(ids_view(&is, il)?);
    let mut y = dev.zeros::<T>(elements("y", m, cfg.n)?)?;
    let t = if save_t {
        // Zeros: the op leaves the rows of tokens without an adapter as they are.
        let mut t = dev.zeros::<f32>(elements("t", m, cfg.max_rank)?)?;
        op::multi_adapter_forward_saving_t(pool, m, xv, wv, &routing, &mut y, &mut t)?;
        Some(tensor(t, &[m, cfg.max_rank], cdev)?)
    } else {
        op::multi_adapter_forward(pool, m, xv, wv, &routing, 0.0, &mut y)?;
        None
    };
    Ok((tensor(y, &with_last(&lead, cfg.n), cdev)?, t))
}

/// An error naming `operand` (the first tensor of the call) unless `pool`
/// lives on `dev`'s memory and, on CUDA, queues its work on `dev`'s stream
/// (candle's): the op runs on the pool's device, and on another stream it
/// would race with candle's work on the tensors.
pub(crate) fn check_pool_device<T: CandleElement>(
    pool: &AdapterPool<T>,
    operand: &str,
    dev: &candle_core::Device,
) -> Result<()> {
    let tensors = device(dev)?;
    let pool_dev = pool.device();
    let same_stream = |a: Option<&Arc<CudaStream>>, b: Option<&Arc<CudaStream>>| match (a, b) {
        (Some(a), Some(b)) => a.cu_stream() == b.cu_stream(),
        (a, b) => a.is_none() && b.is_none(),
    };
    if tensors.home() == pool_dev.home()
        && same_stream(tensors.cuda_stream(), pool_dev.cuda_stream())
    {
        return Ok(());
    }
    Err(candle_core::Error::Msg(format!(
        "operand `{operand}` is on candle's {:?} ({}), but the pool's device differs ({}): \
         make the pool on lora_kernels::candle::device of the tensors' candle device",
        dev.location(),
        tensors.name(),
        pool_dev.name()
    )))
}

/// `ids` checked as the slot ids of the tokens `rows`: an `I32` or `U32`
/// tensor on `dev` with the tokens' leading dims or `[m]`, made contiguous.
/// Errors name the operand `ids`.
pub(crate) fn slot_ids(ids: &Tensor, rows: &Rows, dev: &candle_core::Device) -> Result<Tensor> {
    if !matches!(ids.dtype(), CandleDType::I32 | CandleDType::U32) {
        return Err(candle_core::Error::Msg(format!(
            "operand `ids` has dtype {:?}, slot ids are I32 or U32",
            ids.dtype()
        )));
    }
    on_device("ids", ids, dev)?;
    let Rows { lead, m, .. } = rows;
    if ids.dims() != lead && ids.dims() != [*m] {
        return Err(candle_core::Error::Msg(format!(
            "operand `ids` has shape {:?}: one slot id per token needs x's leading dims {lead:?} \
             or [{m}]",
            ids.dims()
        )));
    }
    ids.contiguous()
}

/// The slot ids a tensor from [`slot_ids`] holds, as the kernels read them
/// (`i32`; `U32` ids reinterpreted, same bits).
pub(crate) fn ids_view<'s>(storage: &'s Storage, layout: &Layout) -> Result<BufRef<'s, i32>> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("operand `ids` is not contiguous".into()))?;
    match storage {
        Storage::Cpu(CpuStorage::I32(v)) => Ok(BufRef::Host(&v[start..end])),
        Storage::Cpu(CpuStorage::U32(v)) => u32_as_i32(BufRef::Host(&v[start..end])),
        #[cfg(feature = "candle-cuda")]
        Storage::Cuda(cuda) if storage.dtype() == CandleDType::I32 => {
            Ok(BufRef::Cuda(cuda.as_cuda_slice::<i32>()?.slice(start..end)))
        }
        #[cfg(feature = "candle-cuda")]
        Storage::Cuda(cuda) => {
            u32_as_i32(BufRef::Cuda(cuda.as_cuda_slice::<u32>()?.slice(start..end)))
        }
        _ => Err(candle_core::Error::Msg(format!(
            "operand `ids`: lora-kernels cannot read this storage ({:?})",
            storage.dtype()
        ))),
    }
}

/// The same memory read as `i32`: `u32::MAX` is `-1`, ids from 2^31 on are
/// negative (out of range, served as base only by the kernels).
fn u32_as_i32(ids: BufRef<'_, u32>) -> Result<BufRef<'_, i32>> {
    match ids {
        // SAFETY: u32 and i32 have the same size and alignment and every bit
        // pattern is a valid i32; the new slice covers the same elements of
        // the same borrow.
        BufRef::Host(s) => Ok(BufRef::Host(unsafe {
            std::slice::from_raw_parts(s.as_ptr().cast::<i32>(), s.len())
        })),
        BufRef::Cuda(v) => {
            let len = v.len();
            // SAFETY: as above: the view covers `len` u32, exactly the bytes
            // of `len` i32, every bit pattern of which is valid.
            unsafe { v.transmute::<i32>(len) }
                .map(BufRef::Cuda)
                .ok_or_else(|| candle_core::Error::Msg("operand `ids`: cannot view as i32".into()))
        }
    }
}
