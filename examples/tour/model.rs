//! Model-level rows: whole steps over Llama-3-8B's seven projections in two
//! layers of distinct weights (about 0.87 GB of bf16 weights, far past any
//! L2), each step timed as one region of CUDA events around all of its
//! launches. A decode step (64 tokens) and a prefill step (2048 tokens):
//! cuBLAS base-only, one adapter shared by every token (`fused_forward`),
//! and 64 adapters (`multi_adapter_forward`). Then the learn-while-serving
//! step for 256 tokens of 256 users: serve-only (the multi-adapter forward)
//! against forward saving `t`, the backward (`dx` and the pool's gradients)
//! and the optimizer over every slot. All rank 16, bf16.
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use half::bf16;
use lora_kernels::cublas_baseline::CublasBaseline;
use lora_kernels::ops::adamw::{AdamWConfig, SlotHyper, SlotOptimizer};
use lora_kernels::ops::fused_forward::fused_forward;
use lora_kernels::ops::lora_backward::{
    BackwardOptions, BackwardScratch, DeviceBackwardInputs, multi_adapter_backward_into,
};
use lora_kernels::ops::multi_adapter_forward::{
    Routing, multi_adapter_forward, multi_adapter_forward_saving_t,
};
use lora_kernels::timing::{Timing, time_on_stream};
use lora_kernels::{AdapterPool, Device, DeviceAdapter, Dims, PoolConfig, PoolGrads, Result};
use serde_json::json;

use crate::{Res, data};

/// Llama-3-8B's projections as (name, n, k): y = x w^T with w [n][k].
const PROJECTIONS: [(&str, usize, usize); 7] = [
    ("q", 4096, 4096),
    ("k", 1024, 4096),
    ("v", 1024, 4096),
    ("o", 4096, 4096),
    ("gate", 14336, 4096),
    ("up", 14336, 4096),
    ("down", 4096, 14336),
];
/// Layers of distinct weights: each holds 0.44 GB of bf16 weights.
const LAYERS: usize = 2;
const RANK: usize = 16;
const SCALE: f32 = 0.5;
/// Whole steps are long: fewer runs than the kernel tables take.
const WARMUP: usize = 2;
const RUNS: usize = 10;
/// The largest batch and the widest projection (n or k), for the shared buffers.
const MAX_M: usize = 2048;
const MAX_WIDTH: usize = 14336;

/// One projection of one layer: its weight, one shared adapter, and a pool.
struct Projection {
    n: usize,
    k: usize,
    w: CudaSlice<bf16>,
    a: CudaSlice<bf16>,
    b: CudaSlice<bf16>,
    pool: AdapterPool<bf16>,
}

/// The step's operands: x and y (and g, dx, t for the learning step) of the
/// largest batch, shared by every projection (their contents don't matter to
/// the time, only that they are not zeros).
struct Activations {
    x: CudaSlice<bf16>,
    y: CudaSlice<bf16>,
}

pub fn table(dev: &Device, blas: &CublasBaseline) -> Res<serde_json::Value> {
    println!(
        "\n   model steps: Llama-3-8B's 7 projections x {LAYERS} layers of distinct weights, bf16, r {RANK}; \
         median of {RUNS} whole steps after {WARMUP}"
    );
    let stream = dev.cuda_stream().expect("a CUDA device");
    let mut acts = Activations {
        x: stream.clone_htod(&data::<bf16>(MAX_M * MAX_WIDTH, 30))?,
        y: stream.alloc_zeros::<bf16>(MAX_M * MAX_WIDTH)?,
    };
    let mut rows = Vec::new();
    {
        let layers = projections(dev, 64, true)?;
        println!(
            "   {:>8} {:>6} {:>9} {:>12} {:>10}",
            "step", "tokens", "adapters", "us / step", "/ base"
        );
        for (label, m, adapters) in [("decode", 64, 64), ("prefill", MAX_M, 64)] {
            let base = time_step(dev, &layers, &mut acts, m, |p, dims, x, mut y| {
                blas.base(dims, &x, &p.w, &mut y)
            })?;
            let shared = time_step(dev, &layers, &mut acts, m, |p, dims, x, y| {
                let adapter = DeviceAdapter::new(&p.a, &p.b, RANK, SCALE);
                fused_forward(dev, dims, x, &p.w, &adapter, 0.0, y)
            })?;
            let multi = time_multi(dev, &layers, &mut acts, m, adapters)?;
            for (what, count, t) in [
                ("base", 0, &base),
                ("shared", 1, &shared),
                ("multi", adapters, &multi),
            ] {
                println!(
                    "   {label:>8} {m:>6} {:>9} {:>12.1} {:>10.2}",
                    if what == "base" {
                        "none".to_string()
                    } else {
                        count.to_string()
                    },
                    t.median_us,
                    t.median_us / base.median_us
                );
                rows.push(json!({
                    "step": label, "tokens": m, "adapters": count, "kind": what,
                    "us": t.median_us, "over_base": t.median_us / base.median_us,
                }));
            }
        }
    }
    let learning = learn_while_serving(dev, &mut acts)?;
    Ok(json!({ "layers": LAYERS, "rank": RANK, "steps": rows, "learn_while_serving": learning }))
}

/// Every layer's projections, with pools of `slots` rank-16 slots: with
/// `load`, each holding the projection's shared adapter; else left for the
/// caller to load (the optimizer loads its own, with their masters).
fn projections(dev: &Device, slots: usize, load: bool) -> Res<Vec<Projection>> {
    let stream = dev.cuda_stream().expect("a CUDA device");
    let mut all = Vec::new();
    for layer in 0..LAYERS {
        for (p, &(_, n, k)) in PROJECTIONS.iter().enumerate() {
            let seed = (layer * PROJECTIONS.len() + p) as u64 * 8;
            let pool_config = PoolConfig {
                slots,
                max_rank: RANK,
                n,
                k,
            };
            let mut pool = AdapterPool::<bf16>::new(dev, pool_config)?;
            let (a, b) = (
                data::<bf16>(RANK * k, seed + 1),
                data::<bf16>(n * RANK, seed + 2),
            );
            if load {
                for s in 0..slots {
                    pool.load(s, &a, &b, RANK, SCALE)?;
                }
            }
            pool.reserve_tokens(MAX_M)?;
            all.push(Projection {
                n,
                k,
                w: stream.clone_htod(&data::<bf16>(n * k, seed + 3))?,
                a: stream.clone_htod(&a)?,
                b: stream.clone_htod(&b)?,
                pool,
            });
        }
    }
    Ok(all)
}

/// One step: `launch` on every projection of every layer in turn (x and y
/// cut to `m` rows of its shape), timed as a whole.
fn time_step(
    dev: &Device,
    layers: &[Projection],
    acts: &mut Activations,
    m: usize,
    mut launch: impl FnMut(&Projection, Dims, CudaView<bf16>, CudaViewMut<bf16>) -> Result<()>,
) -> Res<Timing> {
    let Activations { x, y } = acts;
    Ok(time_on_stream(dev, WARMUP, RUNS, || {
        for p in layers {
            let dims = Dims::new(m, p.n, p.k);
            launch(p, dims, x.slice(..m * p.k), y.slice_mut(..m * p.n))?;
        }
        Ok(())
    })?)
}

/// `m` tokens over `adapters` slots, in contiguous groups (token i on slot
/// i * adapters / m).
fn time_multi(
    dev: &Device,
    layers: &[Projection],
    acts: &mut Activations,
    m: usize,
    adapters: usize,
) -> Res<Timing> {
    let ids: Vec<i32> = (0..m).map(|i| (i * adapters / m) as i32).collect();
    let ids = dev.upload(&ids)?;
    let routing = Routing::Tokens((&ids).into());
    time_step(dev, layers, acts, m, |p, _, x, y| {
        multi_adapter_forward(&p.pool, m, x, &p.w, &routing, 0.0, y)
    })
}

/// 256 tokens of 256 users, one adapter each: the serve-only step, and the
/// step that also trains every user on its token (forward saving `t`, the
/// backward's `dx` and the pool's gradients with their statistics, then one
/// AdamW step over every slot of every projection).
fn learn_while_serving(dev: &Device, acts: &mut Activations) -> Res<serde_json::Value> {
    let users = 256;
    let stream = dev.cuda_stream().expect("a CUDA device");
    let mut layers = projections(dev, users, false)?;
    let hyper = SlotHyper {
        lr: 1e-4,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        anchor_pull: 0.0,
    };
    let mut optimizers = Vec::new();
    let mut grads = Vec::new();
    for (i, p) in layers.iter_mut().enumerate() {
        let mut opt = SlotOptimizer::new(&p.pool, AdamWConfig::default())?;
        let (a, b) = (
            data::<f32>(RANK * p.k, 100 + i as u64),
            data::<f32>(p.n * RANK, 200 + i as u64),
        );
        for s in 0..users {
            opt.load_adapter(&mut p.pool, s, &a, &b, RANK, SCALE, hyper)?;
        }
        optimizers.push(opt);
        grads.push(PoolGrads::new(&p.pool)?);
    }
    // Serving: every user's token on its own adapter.
    let serve = time_multi(dev, &layers, acts, users, users)?;

    let ids = dev.upload(&(0..users as i32).collect::<Vec<_>>())?;
    let routing = Routing::Tokens((&ids).into());
    let Activations { x, y } = acts;
    let g = stream.clone_htod(&data::<bf16>(users * MAX_WIDTH, 31))?;
    let mut dx = stream.alloc_zeros::<bf16>(users * MAX_WIDTH)?;
    let mut t = stream.alloc_zeros::<f32>(users * RANK)?;
    let mut scratch = BackwardScratch::new(dev)?;
    let learn = time_on_stream(dev, WARMUP, RUNS, || {
        for ((p, opt), pool_grads) in layers.iter_mut().zip(&mut optimizers).zip(&mut grads) {
            let (xs, ys) = (x.slice(..users * p.k), y.slice_mut(..users * p.n));
            multi_adapter_forward_saving_t(&p.pool, users, xs, &p.w, &routing, ys, &mut t)?;
            let inputs =
                DeviceBackwardInputs::new(g.slice(..users * p.n), x.slice(..users * p.k), &p.w, &t);
            let dxs = dx.slice_mut(..users * p.k);
            let opts = BackwardOptions::default();
            multi_adapter_backward_into(
                &p.pool,
                users,
                &ids,
                inputs,
                Some(dxs.into()),
                pool_grads,
                opts,
                &mut scratch,
            )?;
            opt.step_pool_grads(&mut p.pool, pool_grads)?;
        }
        Ok(())
    })?;
    println!(
        "   learn while serving, {users} tokens of {users} users: serve-only {:.1} us / step, \
         learning {:.1} us / step: {:.2}x the serve-only step (goal <= 2.0x)",
        serve.median_us,
        learn.median_us,
        learn.median_us / serve.median_us
    );
    Ok(json!({
        "users": users, "serve_us": serve.median_us, "learn_us": learn.median_us,
        "learn_over_serve": learn.median_us / serve.median_us,
    }))
}
