//! The fused optimizer step ([`crate::ops::adamw`]) on gradients held in
//! candle tensors, read in place (no copy): what
//! [`multi_adapter_backward`](super::lora_backward::multi_adapter_backward)
//! and [`LoraLinear::backward`](super::LoraLinear::backward) return. Gradients
//! in a [`crate::PoolGrads`]
//! ([`multi_adapter_backward_into`](super::lora_backward::multi_adapter_backward_into))
//! need no tensors: [`SlotOptimizer::step_pool_grads`] takes them as they are.
use candle_core::{DType as CandleDType, Result, Tensor};

use super::multi_adapter_forward::check_pool_device;
use super::{CandleElement, expect_dims, operand, view};
use crate::adapter_pool::AdapterPool;
use crate::ops::adamw::SlotOptimizer;

/// One AdamW step of every active slot of `pool` ([`SlotOptimizer::step`])
/// from `grad_a` `[slots, max_rank, k]` and `grad_b` `[slots, n, max_rank]`
/// (f32, the pool's layout, on the pool's device). A wrong dtype, device or
/// shape is an error naming the operand, and so is every error of the step
/// itself; on an error nothing changed.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use lora_kernels::candle::{adamw::step, device};
/// use lora_kernels::ops::adamw::{AdamWConfig, SlotHyper, SlotOptimizer};
/// use lora_kernels::{AdapterPool, PoolConfig};
///
/// let cdev = Device::Cpu; // the host runtime
/// let cfg = PoolConfig { slots: 2, max_rank: 1, n: 3, k: 2 };
/// let mut pool = AdapterPool::<f32>::new(&device(&cdev)?, cfg)?;
/// let mut opt = SlotOptimizer::new(&pool, AdamWConfig::default())?;
/// let hyper = SlotHyper { lr: 0.5, weight_decay: 0.0, max_grad_norm: 0.0, anchor_pull: 0.0 };
/// opt.load_adapter(&mut pool, 1, &[1.0, 1.0], &[1.0; 3], 1, 1.0, hyper)?;
/// let grad_a = Tensor::ones((2, 1, 2), DType::F32, &cdev)?;
/// let grad_b = Tensor::ones((2, 3, 1), DType::F32, &cdev)?;
/// step(&mut opt, &mut pool, &grad_a, &grad_b)?;
/// // AdamW's first step moves each weight by lr against the gradient's sign.
/// assert_eq!(opt.master(&pool, 1)?.0, vec![0.5, 0.5]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn step<T: CandleElement>(
    opt: &mut SlotOptimizer,
    pool: &mut AdapterPool<T>,
    grad_a: &Tensor,
    grad_b: &Tensor,
) -> Result<()> {
    let cdev = grad_a.device();
    check_pool_device(pool, "grad_a", cdev)?;
    let cfg = pool.config();
    let ga = operand("grad_a", grad_a, CandleDType::F32, cdev)?;
    let gb = operand("grad_b", grad_b, CandleDType::F32, cdev)?;
    expect_dims("grad_a", &ga, &[cfg.slots, cfg.max_rank, cfg.k])?;
    expect_dims("grad_b", &gb, &[cfg.slots, cfg.n, cfg.max_rank])?;
    let (gas, gal) = ga.storage_and_layout();
    let (gbs, gbl) = gb.storage_and_layout();
    let (ga, gb) = (
        view::<f32>("grad_a", &gas, gal)?,
        view::<f32>("grad_b", &gbs, gbl)?,
    );
    Ok(opt.step(pool, ga, gb)?)
}
