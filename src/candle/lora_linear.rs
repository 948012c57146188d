//! A linear layer for candle models: a frozen base weight and many users'
//! adapters in an [`AdapterPool`], each token served by its own adapter in
//! one launch, with a training forward and a backward for the adapters.
use candle_core::{Result, Tensor};

use std::sync::Mutex;

use super::lora_backward::{BackwardRequest, TensorGrads, multi_adapter_backward_with_scratch};
use super::multi_adapter_forward::{multi_adapter_forward, multi_adapter_forward_saving_t};
use super::{CandleElement, device, dtype, expect_dims, matrix_dims, operand};
use crate::adapter_pool::{AdapterPool, PoolConfig};
use crate::ops::lora_backward::BackwardScratch;

/// `y = x w^T + s_i (x a_i^T) b_i^T` with `w` `[n, k]` frozen and token `i`'s
/// adapter taken from slot `ids[i]` of the layer's pool (`-1`: the base only).
///
/// The pool lives on the weight's device (on CUDA, on candle's stream, so
/// the layer's launches are ordered with candle's own work). Loading and
/// evicting adapters goes through [`LoraLinear::load_adapter`] and
/// [`LoraLinear::evict`], or [`LoraLinear::pool_mut`] for the pool's whole
/// API (a [`crate::ops::adamw::SlotOptimizer`] steps it in place).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use lora_kernels::candle::LoraLinear;
///
/// let dev = Device::Cpu; // the host runtime; a Cuda device runs on the GPU
/// let w = Tensor::zeros((3, 4), DType::F32, &dev)?; // n = 3, k = 4
/// let mut layer = LoraLinear::<f32>::new(w, 2, 1)?; // 2 slots of rank <= 1
/// let a = Tensor::ones((1, 4), DType::F32, &dev)?;
/// let b = Tensor::ones((3, 1), DType::F32, &dev)?;
/// layer.load_adapter(1, &a, &b, 0.5)?;
///
/// // Token 0: no adapter; token 1: slot 1.
/// let x = Tensor::ones((2, 4), DType::F32, &dev)?;
/// let ids = Tensor::new(&[-1i32, 1], &dev)?;
/// let y = layer.forward(&x, &ids)?;
/// assert_eq!(y.to_vec2::<f32>()?, vec![vec![0.0; 3], vec![2.0; 3]]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct LoraLinear<T> {
    weight: Tensor,
    pool: AdapterPool<T>,
    /// The backward's device scratch, kept between calls.
    scratch: Mutex<BackwardScratch>,
}

/// What the training forward keeps for the backward: the input, the
/// per-token `t = x a_i^T` (f32) and the ids.
pub struct LoraLinearSaved {
    x: Tensor,
    t: Tensor,
    ids: Tensor,
}

impl<T: CandleElement> LoraLinear<T> {
    /// A layer over the frozen base weight `weight` `[n, k]` (of type `T`)
    /// with an empty pool of `slots` adapters of rank at most `max_rank`,
    /// on the weight's device.
    pub fn new(weight: Tensor, slots: usize, max_rank: usize) -> Result<Self> {
        let weight = operand("weight", &weight, dtype::<T>(), weight.device())?;
        let (n, k) = matrix_dims("weight", &weight)?;
        let cfg = PoolConfig {
            slots,
            max_rank,
            n,
            k,
        };
        let pool = AdapterPool::new(&device(weight.device())?, cfg)?;
        let scratch = Mutex::new(BackwardScratch::new(pool.device())?);
        Ok(LoraLinear {
            weight,
            pool,
            scratch,
        })
    }

    /// The frozen base weight, `[n, k]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The adapter pool.
    pub fn pool(&self) -> &AdapterPool<T> {
        &self.pool
    }

    /// The adapter pool, to load, evict or step its slots directly.
    pub fn pool_mut(&mut self) -> &mut AdapterPool<T> {
        &mut self.pool
    }

    /// Puts the adapter `a` `[rank, k]`, `b` `[n, rank]` with scale `scale`
    /// into `slot` (replacing what was there; the tensors are copied).
    /// Refused, changing nothing, on a wrong dtype or shape, a rank past the
    /// pool's, or a NaN or Inf weight (docs/DESIGN.md section 10).
    pub fn load_adapter(&mut self, slot: usize, a: &Tensor, b: &Tensor, scale: f32) -> Result<()> {
        let (n, k) = (self.pool.config().n, self.pool.config().k);
        let ty = dtype::<T>();
        let (a, b) = (
            operand("a", a, ty, a.device())?,
            operand("b", b, ty, b.device())?,
        );
        let rank = matrix_dims("a", &a)?.0;
        expect_dims("a", &a, &[rank, k])?;
        expect_dims("b", &b, &[n, rank])?;
        let (a, b) = (
            a.flatten_all()?.to_vec1::<T>()?,
            b.flatten_all()?.to_vec1::<T>()?,
        );
        Ok(self.pool.load(slot, &a, &b, rank, scale)?)
    }

    /// Empties `slot`: its tokens are served by the base weight alone.
    pub fn evict(&mut self, slot: usize) -> Result<()> {
        Ok(self.pool.evict(slot)?)
    }

    /// The serving forward: `x` `[..., k]`, `ids` (I32 or U32) one slot per
    /// token, with `x`'s leading dims; returns `y` `[..., n]`.
    pub fn forward(&self, x: &Tensor, ids: &Tensor) -> Result<Tensor> {
        multi_adapter_forward(&self.pool, x, &self.weight, ids)
    }

    /// The training forward: `y` as [`LoraLinear::forward`], and what
    /// [`LoraLinear::backward`] needs.
    pub fn forward_train(&self, x: &Tensor, ids: &Tensor) -> Result<(Tensor, LoraLinearSaved)> {
        let (y, t) = multi_adapter_forward_saving_t(&self.pool, x, &self.weight, ids)?;
        let saved = LoraLinearSaved {
            x: x.clone(),
            t,
            ids: ids.clone(),
        };
        Ok((y, saved))
    }

    /// The backward of [`LoraLinear::forward_train`] for `g = dL/dy` (`y`'s
    /// shape): `dx` (x's shape, type `T`) and the adapters' gradients in the
    /// pool's layout, `da` `[slots, max_rank, k]` and `db` `[slots, n,
    /// max_rank]` (f32; slots no token used get zeros), as `req` asks.
    pub fn backward(
        &self,
        saved: &LoraLinearSaved,
        g: &Tensor,
        req: BackwardRequest,
    ) -> Result<TensorGrads> {
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let inputs = (g, &saved.x, &self.weight, &saved.t);
        multi_adapter_backward_with_scratch(&self.pool, inputs, &saved.ids, req, &mut scratch)
    }
}
