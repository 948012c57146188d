//! Adapter gradients on candle tensors ([`crate::ops::lora_backward`]): of one
//! adapter ([`lora_backward`]) or of every slot of a pool a batch uses
//! ([`multi_adapter_backward`]). The base weight stays frozen; the gradients
//! are new tensors (they overwrite nothing), or, for the optimizer to read
//! once, a [`PoolGrads`] ([`multi_adapter_backward_into`]).
use candle_core::{DType as CandleDType, Result, Tensor};

use super::fused_forward::{Rows, rows_of, with_last};
use super::multi_adapter_forward::{check_pool_device, ids_view, slot_ids};
use super::{CandleElement, device, dtype, expect_dims, matrix_dims, operand, tensor, view};
use crate::adapter_pool::AdapterPool;
use crate::buffer::{BufRef, Buffer};
use crate::device::Device;
use crate::ops::lora_backward::{
    self as op, BackwardOptions, BackwardScratch, DeviceBackwardInputs, Grads,
};
use crate::ops::{DeviceAdapter, KernelElement};
use crate::pool_grads::PoolGrads;
use crate::shape::{Dims, check_rank};

/// Which gradients to compute, and how.
#[derive(Debug, Clone, Copy)]
pub struct BackwardRequest {
    /// Compute `dL/dx`.
    pub dx: bool,
    /// Compute `dL/da`.
    pub da: bool,
    /// Compute `dL/db`.
    pub db: bool,
    /// Bit-identical `da` and `db` run to run (no float atomics; a little slower).
    pub deterministic: bool,
}

/// All three gradients, not deterministic.
impl Default for BackwardRequest {
    fn default() -> Self {
        BackwardRequest {
            dx: true,
            da: true,
            db: true,
            deterministic: false,
        }
    }
}

/// The gradients asked for (None for those not asked): `dx` in the storage
/// type with `x`'s shape; `da`, `db` f32: `[rank, k]` and `[n, rank]` for one
/// adapter, `[slots, max_rank, k]` and `[slots, n, max_rank]` for a pool (the
/// pool's layout: slot `s`'s gradient is `da[s, ..rank, ..]`,
/// `db[s, .., ..rank]`; slots no token used get zeros).
#[derive(Debug)]
pub struct TensorGrads {
    /// `dL/dx`.
    pub dx: Option<Tensor>,
    /// `dL/da`, f32.
    pub da: Option<Tensor>,
    /// `dL/db`, f32.
    pub db: Option<Tensor>,
}

/// Gradients of one adapter (`a` `[rank, k]`, `b` `[n, rank]`, `scale`) for
/// `g = dL/dy` with `y`'s shape `[..., n]`, the forward's `x` `[..., k]`
/// and `w` `[n, k]` (all of type `T`), and `t` `[m, rank]` (f32) as
/// [`crate::candle::fused_forward::fused_forward_saving_t`] returned it.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use lora_kernels::candle::fused_forward::fused_forward_saving_t;
/// use lora_kernels::candle::lora_backward::{BackwardRequest, lora_backward};
///
/// let dev = Device::Cpu; // runs on the host runtime
/// let x = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev)?;
/// let w = Tensor::zeros((3, 2), DType::F32, &dev)?;
/// let (a, b) = (Tensor::new(&[[1f32, 2.0]], &dev)?, Tensor::ones((3, 1), DType::F32, &dev)?);
/// let (_y, t) = fused_forward_saving_t::<f32>(&x, &w, &a, &b, 2.0)?;
/// let g = Tensor::ones((2, 3), DType::F32, &dev)?; // dL/dy
/// let req = BackwardRequest { dx: false, da: false, ..Default::default() };
/// let grads = lora_backward::<f32>(&g, &x, &w, &t, &a, &b, 2.0, req)?;
/// assert!(grads.dx.is_none() && grads.da.is_none());
/// // db = s g^T t = 2 * (1 + 2) for every row of b.
/// assert_eq!(grads.db.unwrap().to_vec2::<f32>()?, vec![vec![6.0]; 3]);
/// # Ok::<(), candle_core::Error>(())
/// ```
// The signature mirrors the forward's operands (g, x, w, t, then the adapter
// a, b, scale, as fused_forward takes it) plus the request.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward<T: CandleElement>(
    g: &Tensor,
    x: &Tensor,
    w: &Tensor,
    t: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f32,
    req: BackwardRequest,
) -> Result<TensorGrads> {
    let cdev = x.device();
    let inputs = Inputs::checked::<T>(g, x, w, t)?;
    let ty = dtype::<T>();
    let (a, b) = (operand("a", a, ty, cdev)?, operand("b", b, ty, cdev)?);
    let Dims { n, k, .. } = inputs.dims;
    let rank = matrix_dims("a", &a)?.0;
    check_rank("a", rank)?;
    expect_dims("a", &a, &[rank, k])?;
    expect_dims("b", &b, &[n, rank])?;
    inputs.check_t(rank)?;

    let dev = device(cdev)?;
    let (as_, al) = a.storage_and_layout();
    let (bs, bl) = b.storage_and_layout();
    let adapter = DeviceAdapter::new(
        view::<T>("a", &as_, al)?,
        view::<T>("b", &bs, bl)?,
        rank,
        scale,
    );
    let mut out = GradBuffers::new(&dev, req, &inputs, &[rank, k], &[n, rank])?;
    inputs.with_views::<T, _>(|dims, views| {
        let mut scratch = BackwardScratch::new(&dev)?;
        let grads = out.grads();
        op::lora_backward(
            &dev,
            dims,
            &adapter,
            views,
            grads,
            options(req),
            &mut scratch,
        )?;
        Ok(())
    })?;
    out.into_tensors(cdev)
}

/// Gradients of every adapter of `pool` that a batch uses: token `i` trains
/// slot `ids[i]` (`-1`, empty slots and out-of-range ids train nothing).
/// `g` has `y`'s shape `[..., n]`, `x` `[..., k]` and `w` `[n, k]` are the
/// forward's (the pool's type `T`, its `n` and `k`), `ids` as for
/// [`crate::candle::multi_adapter_forward::multi_adapter_forward`], and `t`
/// `[m, max_rank]` (f32) as
/// [`crate::candle::multi_adapter_forward::multi_adapter_forward_saving_t`]
/// returned it. The pool must live where the tensors do.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use lora_kernels::candle::lora_backward::{BackwardRequest, multi_adapter_backward};
/// use lora_kernels::candle::multi_adapter_forward::multi_adapter_forward_saving_t;
/// use lora_kernels::{AdapterPool, PoolConfig};
///
/// let cdev = Device::Cpu; // runs on the host runtime
/// let cfg = PoolConfig { slots: 2, max_rank: 2, n: 3, k: 2 };
/// let mut pool = AdapterPool::<f32>::new(&lora_kernels::candle::device(&cdev)?, cfg)?;
/// pool.load(0, &[1.0, 1.0], &[1.0; 3], 1, 2.0)?; // rank 1, scale 2
/// let x = Tensor::new(&[[1f32, 1.0], [3.0, 3.0]], &cdev)?;
/// let w = Tensor::zeros((3, 2), DType::F32, &cdev)?;
/// let ids = Tensor::new(&[0i32, -1], &cdev)?; // token 1: no adapter
/// let (_y, t) = multi_adapter_forward_saving_t(&pool, &x, &w, &ids)?;
/// let g = Tensor::ones((2, 3), DType::F32, &cdev)?; // dL/dy
/// let grads = multi_adapter_backward(&pool, &g, &x, &w, &t, &ids, BackwardRequest::default())?;
/// let db = grads.db.unwrap(); // [slots, n, max_rank]
/// // Slot 0: db = s g^T t = 2 * 2 in its one rank column; slot 1: unused.
/// assert_eq!(db.get(0)?.to_vec2::<f32>()?, vec![vec![4.0, 0.0]; 3]);
/// assert_eq!(db.get(1)?.to_vec2::<f32>()?, vec![vec![0.0, 0.0]; 3]);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn multi_adapter_backward<T: CandleElement>(
    pool: &AdapterPool<T>,
    g: &Tensor,
    x: &Tensor,
    w: &Tensor,
    t: &Tensor,
    ids: &Tensor,
    req: BackwardRequest,
) -> Result<TensorGrads> {
    let mut scratch = BackwardScratch::new(pool.device())?;
    multi_adapter_backward_with_scratch(pool, (g, x, w, t), ids, req, &mut scratch)
}

/// [`multi_adapter_backward`] with the caller's scratch: a model that runs
/// the backward of many projections every step keeps one (made on the
/// pool's device, [`BackwardScratch::new`]), so that no call allocates it
/// again. `(g, x, w, t)` are the operands [`multi_adapter_backward`] takes.
pub fn multi_adapter_backward_with_scratch<T: CandleElement>(
    pool: &AdapterPool<T>,
    (g, x, w, t): (&Tensor, &Tensor, &Tensor, &Tensor),
    ids: &Tensor,
    req: BackwardRequest,
    scratch: &mut BackwardScratch,
) -> Result<TensorGrads> {
    let cfg = pool.config();
    let (da_shape, db_shape) = (
        [cfg.slots, cfg.max_rank, cfg.k],
        [cfg.slots, cfg.n, cfg.max_rank],
    );
    let out = pool_backward(pool, (g, x, w, t), ids, |dev, inputs, ids| {
        let mut out = GradBuffers::new(dev, req, inputs, &da_shape, &db_shape)?;
        inputs.with_views::<T, _>(|dims, views| {
            let grads = out.grads();
            op::multi_adapter_backward(pool, dims.m, ids, views, grads, options(req), scratch)?;
            Ok(())
        })?;
        Ok(out)
    })?;
    out.into_tensors(x.device())
}

/// [`multi_adapter_backward_with_scratch`] into a [`PoolGrads`], which also
/// keeps the statistics the backward pass leaves for
/// [`SlotOptimizer::step_pool_grads`] (it then reads each gradient once:
/// [`op::multi_adapter_backward_into`]). `da` and `db` are always computed;
/// returns `dx` when `req.dx` (`req.da` and `req.db` are not read).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use lora_kernels::candle::lora_backward::{BackwardRequest, multi_adapter_backward_into};
/// use lora_kernels::candle::multi_adapter_forward::multi_adapter_forward_saving_t;
/// use lora_kernels::ops::lora_backward::BackwardScratch;
/// use lora_kernels::{AdapterPool, PoolConfig, PoolGrads};
///
/// let cdev = Device::Cpu; // runs on the host runtime
/// let cfg = PoolConfig { slots: 2, max_rank: 2, n: 3, k: 2 };
/// let mut pool = AdapterPool::<f32>::new(&lora_kernels::candle::device(&cdev)?, cfg)?;
/// pool.load(0, &[1.0, 1.0], &[1.0; 3], 1, 2.0)?; // rank 1, scale 2
/// let x = Tensor::new(&[[1f32, 1.0], [3.0, 3.0]], &cdev)?;
/// let w = Tensor::zeros((3, 2), DType::F32, &cdev)?;
/// let ids = Tensor::new(&[0i32, -1], &cdev)?; // token 1: no adapter
/// let (_y, t) = multi_adapter_forward_saving_t(&pool, &x, &w, &ids)?;
/// let g = Tensor::ones((2, 3), DType::F32, &cdev)?; // dL/dy
/// let mut grads = PoolGrads::new(&pool)?;
/// let mut scratch = BackwardScratch::new(pool.device())?;
/// let req = BackwardRequest { dx: false, ..Default::default() };
/// let dx = multi_adapter_backward_into(&pool, (&g, &x, &w, &t), &ids, &mut grads, req, &mut scratch)?;
/// assert!(dx.is_none() && grads.has_stats(&pool));
/// // Slot 0: db = s g^T t = 2 * 2 in its one rank column.
/// assert_eq!(pool.device().download(grads.db())?[..6], [4.0, 0.0, 4.0, 0.0, 4.0, 0.0]);
/// # Ok::<(), candle_core::Error>(())
/// ```
///
/// [`SlotOptimizer::step_pool_grads`]: crate::ops::adamw::SlotOptimizer::step_pool_grads
pub fn multi_adapter_backward_into<T: CandleElement>(
    pool: &AdapterPool<T>,
    (g, x, w, t): (&Tensor, &Tensor, &Tensor, &Tensor),
    ids: &Tensor,
    grads: &mut PoolGrads,
    req: BackwardRequest,
    scratch: &mut BackwardScratch,
) -> Result<Option<Tensor>> {
    let dx_only = BackwardRequest {
        da: false,
        db: false,
        ..req
    };
    let out = pool_backward(pool, (g, x, w, t), ids, |dev, inputs, ids| {
        let mut out = GradBuffers::new(dev, dx_only, inputs, &[], &[])?;
        inputs.with_views::<T, _>(|dims, views| {
            let dx = out.grads().dx;
            let opts = options(req);
            op::multi_adapter_backward_into(pool, dims.m, ids, views, dx, grads, opts, scratch)?;
            Ok(())
        })?;
        Ok(out)
    })?;
    Ok(out.into_tensors(x.device())?.dx)
}

/// What both pool backward functions check and set up: the inputs against
/// the pool (its device, `n`, `k`, `max_rank`) and the slot ids; then
/// returns `run(pool's device, inputs, ids)`.
fn pool_backward<T: CandleElement, R>(
    pool: &AdapterPool<T>,
    (g, x, w, t): (&Tensor, &Tensor, &Tensor, &Tensor),
    ids: &Tensor,
    run: impl FnOnce(&Device, &Inputs, BufRef<'_, i32>) -> Result<R>,
) -> Result<R> {
    let cdev = x.device();
    check_pool_device(pool, "x", cdev)?;
    let inputs = Inputs::checked::<T>(g, x, w, t)?;
    let cfg = pool.config();
    expect_dims("x", &inputs.x, &with_last(&inputs.rows.lead, cfg.k))?;
    expect_dims("w", &inputs.w, &[cfg.n, cfg.k])?;
    inputs.check_t(cfg.max_rank)?;
    let ids = slot_ids(ids, &inputs.rows, cdev)?;
    let (is, il) = ids.storage_and_layout();
    run(pool.device(), &inputs, ids_view(&is, il)?)
}

fn options(req: BackwardRequest) -> BackwardOptions {
    BackwardOptions {
        accumulate: false,
        deterministic: req.deterministic,
        ..Default::default()
    }
}

/// What both backward functions read: `g`, `x`, `w` of the op's type and
/// `t` (f32), on `x`'s device, contiguous, with the batch's dims.
struct Inputs {
    g: Tensor,
    x: Tensor,
    w: Tensor,
    t: Tensor,
    rows: Rows,
    dims: Dims,
}

impl Inputs {
    /// Checks dtypes and devices, and the shapes that depend on `x` and `w`
    /// alone: `x` `[..., k]`, `w` `[n, k]`, `g` `[..., n]` (errors name the operand).
    fn checked<T: CandleElement>(g: &Tensor, x: &Tensor, w: &Tensor, t: &Tensor) -> Result<Self> {
        let cdev = x.device();
        let ty = dtype::<T>();
        let (g, x) = (operand("g", g, ty, cdev)?, operand("x", x, ty, cdev)?);
        let w = operand("w", w, ty, cdev)?;
        let t = operand("t", t, CandleDType::F32, cdev)?;
        let rows = rows_of("x", &x)?;
        let n = matrix_dims("w", &w)?.0;
        expect_dims("w", &w, &[n, rows.k])?;
        expect_dims("g", &g, &with_last(&rows.lead, n))?;
        let dims = Dims::new(rows.m, n, rows.k);
        Ok(Inputs {
            g,
            x,
            w,
            t,
            rows,
            dims,
        })
    }

    /// Checks that `t` is `[m, cols]` (`cols`: the adapter's rank, or the
    /// pool's max_rank).
    fn check_t(&self, cols: usize) -> Result<()> {
        expect_dims("t", &self.t, &[self.dims.m, cols])
    }

    /// Calls `f` with the batch's dims and the kernels' views of the inputs.
    fn with_views<T: CandleElement, R>(
        &self,
        f: impl FnOnce(Dims, DeviceBackwardInputs<'_, T>) -> Result<R>,
    ) -> Result<R> {
        let (gs, gl) = self.g.storage_and_layout();
        let (xs, xl) = self.x.storage_and_layout();
        let (ws, wl) = self.w.storage_and_layout();
        let (ts, tl) = self.t.storage_and_layout();
        let views = DeviceBackwardInputs::new(
            view::<T>("g", &gs, gl)?,
            view::<T>("x", &xs, xl)?,
            view::<T>("w", &ws, wl)?,
            view::<f32>("t", &ts, tl)?,
        );
        f(self.dims, views)
    }
}

/// The buffers of the gradients asked for, with the shapes they become.
struct GradBuffers<T> {
    dx: Option<(Buffer<T>, Vec<usize>)>,
    da: Option<(Buffer<f32>, Vec<usize>)>,
    db: Option<(Buffer<f32>, Vec<usize>)>,
}

impl<T: CandleElement> GradBuffers<T> {
    /// Zeroed buffers on `dev` for the gradients `req` asks for: `dx` with
    /// `x`'s shape, `da` and `db` with the shapes given. Every shape is one
    /// of an existing tensor or of the pool's buffers, so its element count
    /// fits a usize.
    fn new(
        dev: &Device,
        req: BackwardRequest,
        inputs: &Inputs,
        da_shape: &[usize],
        db_shape: &[usize],
    ) -> Result<Self> {
        fn buffer<E: KernelElement>(
            dev: &Device,
            shape: &[usize],
        ) -> Result<(Buffer<E>, Vec<usize>)> {
            Ok((dev.zeros(shape.iter().product())?, shape.to_vec()))
        }
        let dx_shape = with_last(&inputs.rows.lead, inputs.dims.k);
        Ok(GradBuffers {
            dx: req.dx.then(|| buffer(dev, &dx_shape)).transpose()?,
            da: req.da.then(|| buffer(dev, da_shape)).transpose()?,
            db: req.db.then(|| buffer(dev, db_shape)).transpose()?,
        })
    }

    /// The op's view of the buffers.
    fn grads(&mut self) -> Grads<'_, T> {
        Grads {
            dx: self.dx.as_mut().map(|(b, _)| b.into()),
            da: self.da.as_mut().map(|(b, _)| b.into()),
            db: self.db.as_mut().map(|(b, _)| b.into()),
        }
    }

    /// The gradients as new tensors on `dev`.
    fn into_tensors(self, dev: &candle_core::Device) -> Result<TensorGrads> {
        fn wrap<E: CandleElement>(
            out: Option<(Buffer<E>, Vec<usize>)>,
            dev: &candle_core::Device,
        ) -> Result<Option<Tensor>> {
            out.map(|(buf, shape)| tensor(buf, &shape, dev)).transpose()
        }
        Ok(TensorGrads {
            dx: wrap(self.dx, dev)?,
            da: wrap(self.da, dev)?,
            db: wrap(self.db, dev)?,
        })
    }
}
