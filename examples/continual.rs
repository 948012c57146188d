//! A small model that keeps learning after deployment, built from the crate's
//! kernels: two linear layers (ReLU between) with a frozen base and a LoRA
//! adapter per user on each layer. Two users train in the same batches
//! (multi-adapter forward, backward and the fused optimizer), each through a
//! stream of tasks. Printed per phase: the loss on the current task and on
//! the earlier one (forgetting), without and with the stability option (a
//! pull toward the adapter as it was when the task began). Finally user 0's
//! adapters are merged into the base and the merged model reproduces the
//! adapted model's outputs.
//!
//!     cargo run --release --example continual
//!
//! On a GPU at a larger size, else on the host runtime (it says which).
//! The ReLU and the loss run on the CPU between the layers' kernels.
mod common;

use half::bf16;
use lora_kernels::ops::adamw::SlotOptimizer;
use lora_kernels::ops::adamw::{AdamWConfig, SlotHyper};
use lora_kernels::ops::lora_backward::{
    BackwardOptions, BackwardScratch, DeviceBackwardInputs, multi_adapter_backward_into,
};
use lora_kernels::ops::merge::merge;
use lora_kernels::ops::multi_adapter_forward::{
    Routing, multi_adapter_forward, multi_adapter_forward_saving_t,
};
use lora_kernels::{
    AdapterPool, Buffer, Device, DeviceAdapter, Dims, MergeOp, PoolConfig, PoolGrads,
};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const USERS: usize = 2;
const RANK: usize = 4;
const TASKS: usize = 2;

struct Size {
    d_in: usize,
    hidden: usize,
    d_out: usize,
    batch: usize,
    steps: usize,
}

fn values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    common::values(len, seed, scale as f64)
}

fn bf(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&e| bf16::from_f32(e)).collect()
}

/// One linear layer: frozen base w `[n, k]`, a pool with an adapter per user.
struct Layer {
    n: usize,
    k: usize,
    w: Vec<f32>,
    w_dev: Buffer<bf16>,
    pool: AdapterPool<bf16>,
    opt: SlotOptimizer,
    t: Buffer<f32>,
    /// da and db, with the statistics that let the step read them once.
    grads: PoolGrads,
}

impl Layer {
    fn new(dev: &Device, n: usize, k: usize, batch: usize, seed: u64) -> Res<Self> {
        let w = values(n * k, seed, 1.0 / (k as f32).sqrt());
        let pool = AdapterPool::new(
            dev,
            PoolConfig {
                slots: USERS,
                max_rank: RANK,
                n,
                k,
            },
        )?;
        let opt = SlotOptimizer::new(&pool, AdamWConfig::default())?;
        Ok(Layer {
            w_dev: dev.upload(&bf(&w))?,
            t: dev.zeros(batch * RANK)?,
            grads: PoolGrads::new(&pool)?,
            w,
            n,
            k,
            pool,
            opt,
        })
    }

    /// A fresh adapter for every user: a small random, b zero (the usual init).
    fn reset(&mut self, seed: u64) -> Res<()> {
        for u in 0..USERS {
            let a = values(RANK * self.k, seed + u as u64, 1.0 / (self.k as f32).sqrt());
            let b = vec![0f32; self.n * RANK];
            self.opt
                .load_adapter(&mut self.pool, u, &a, &b, RANK, 1.0, hyper(0.0))?;
        }
        Ok(())
    }
}

fn hyper(anchor_pull: f32) -> SlotHyper {
    SlotHyper {
        lr: 1e-2,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        anchor_pull,
    }
}

/// A teacher: the function a user's task asks for (a random two-layer net).
struct Teacher {
    w1: Vec<f32>,
    w2: Vec<f32>,
}

impl Teacher {
    fn new(size: &Size, l1: &Layer, l2: &Layer, seed: u64) -> Self {
        // The base model plus a random low-rank change per layer: learnable by rank-4 adapters.
        let delta = |layer: &Layer, seed: u64| {
            let (p, q) = (
                values(layer.n * RANK, seed, 1.0),
                values(RANK * layer.k, seed + 1, 1.5 / (layer.k as f32).sqrt()),
            );
            let mut w = layer.w.clone();
            for c in 0..layer.n {
                for j in 0..layer.k {
                    w[c * layer.k + j] += (0..RANK)
                        .map(|r| p[c * RANK + r] * q[r * layer.k + j])
                        .sum::<f32>()
                        * 0.5;
                }
            }
            w
        };
        let _ = size;
        Teacher {
            w1: delta(l1, seed),
            w2: delta(l2, seed + 7),
        }
    }

    fn target(&self, size: &Size, x: &[f32]) -> Vec<f32> {
        let rows = x.len() / size.d_in;
        let h = matmul_relu(x, &self.w1, rows, size.hidden, size.d_in, true);
        matmul_relu(&h, &self.w2, rows, size.d_out, size.hidden, false)
    }
}

fn matmul_relu(x: &[f32], w: &[f32], m: usize, n: usize, k: usize, relu: bool) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for c in 0..n {
            let v: f32 = (0..k).map(|j| x[i * k + j] * w[c * k + j]).sum();
            y[i * n + c] = if relu { v.max(0.0) } else { v };
        }
    }
    y
}

struct Model {
    dev: Device,
    l1: Layer,
    l2: Layer,
    scratch: BackwardScratch,
}

impl Model {
    /// Forward; returns (hidden pre-activation, output) on the host.
    fn forward(&mut self, x: &[f32], ids: &[i32], save_t: bool) -> Res<(Vec<f32>, Vec<f32>)> {
        let m = ids.len();
        let dev = &self.dev;
        let (xd, idd) = (dev.upload(&bf(x))?, dev.upload(ids)?);
        let routing = Routing::Tokens((&idd).into());
        let mut h = dev.zeros::<bf16>(m * self.l1.n)?;
        if save_t {
            multi_adapter_forward_saving_t(
                &self.l1.pool,
                m,
                &xd,
                &self.l1.w_dev,
                &routing,
                &mut h,
                &mut self.l1.t,
            )?;
        } else {
            multi_adapter_forward(&self.l1.pool, m, &xd, &self.l1.w_dev, &routing, 0.0, &mut h)?;
        }
        let pre: Vec<f32> = dev.download(&h)?.iter().map(|v| v.to_f32()).collect();
        let act = dev.upload(&bf(&pre.iter().map(|v| v.max(0.0)).collect::<Vec<_>>()))?;
        let mut y = dev.zeros::<bf16>(m * self.l2.n)?;
        if save_t {
            multi_adapter_forward_saving_t(
                &self.l2.pool,
                m,
                &act,
                &self.l2.w_dev,
                &routing,
                &mut y,
                &mut self.l2.t,
            )?;
        } else {
            multi_adapter_forward(
                &self.l2.pool,
                m,
                &act,
                &self.l2.w_dev,
                &routing,
                0.0,
                &mut y,
            )?;
        }
        Ok((pre, dev.download(&y)?.iter().map(|v| v.to_f32()).collect()))
    }

    fn loss(&mut self, x: &[f32], ids: &[i32], target: &[f32]) -> Res<f32> {
        let (_, y) = self.forward(x, ids, false)?;
        Ok(y.iter()
            .zip(target)
            .map(|(p, q)| (p - q) * (p - q))
            .sum::<f32>()
            / y.len() as f32)
    }

    /// One training step on a batch mixing users (ids), MSE loss.
    fn train_step(&mut self, x: &[f32], ids: &[i32], target: &[f32]) -> Res<()> {
        let m = ids.len();
        let (pre, y) = self.forward(x, ids, true)?;
        let dev = self.dev.clone();
        let opts = BackwardOptions {
            accumulate: false,
            deterministic: true,
            ..Default::default()
        };
        let dy: Vec<f32> = y
            .iter()
            .zip(target)
            .map(|(p, q)| 2.0 * (p - q) / y.len() as f32)
            .collect();
        let act = bf(&pre.iter().map(|v| v.max(0.0)).collect::<Vec<_>>());
        let (dyd, actd, idd) = (dev.upload(&bf(&dy))?, dev.upload(&act)?, dev.upload(ids)?);
        let mut dact = dev.zeros::<bf16>(m * self.l1.n)?;
        let l2 = &mut self.l2;
        multi_adapter_backward_into(
            &l2.pool,
            m,
            &idd,
            DeviceBackwardInputs::new(&dyd, &actd, &l2.w_dev, &l2.t),
            Some((&mut dact).into()),
            &mut l2.grads,
            opts,
            &mut self.scratch,
        )?;
        // ReLU backward on the CPU.
        let dpre: Vec<f32> = dev
            .download(&dact)?
            .iter()
            .zip(&pre)
            .map(|(g, p)| if *p > 0.0 { g.to_f32() } else { 0.0 })
            .collect();
        let (dpred, xd) = (dev.upload(&bf(&dpre))?, dev.upload(&bf(x))?);
        let l1 = &mut self.l1;
        multi_adapter_backward_into(
            &l1.pool,
            m,
            &idd,
            DeviceBackwardInputs::new(&dpred, &xd, &l1.w_dev, &l1.t),
            None,
            &mut l1.grads,
            opts,
            &mut self.scratch,
        )?;
        // The backward pass left each gradient's statistics (norm, NaN/Inf):
        // the step reads the gradients once.
        for layer in [&mut self.l1, &mut self.l2] {
            layer.opt.step_pool_grads(&mut layer.pool, &layer.grads)?;
        }
        Ok(())
    }
}

fn main() -> Res<()> {
    let (dev, on_gpu) = common::pick_device();
    let size = if on_gpu {
        Size {
            d_in: 256,
            hidden: 512,
            d_out: 128,
            batch: 64,
            steps: 300,
        }
    } else {
        Size {
            d_in: 24,
            hidden: 40,
            d_out: 12,
            batch: 32,
            steps: 150,
        }
    };
    println!(
        "continual learning on {}: 2 layers {} -> {} -> {}, rank-{RANK} adapters for {USERS} users, {TASKS} tasks each, {} steps per task, batches of {}",
        dev.name(),
        size.d_in,
        size.hidden,
        size.d_out,
        size.steps,
        size.batch
    );
    let mut model = Model {
        l1: Layer::new(&dev, size.hidden, size.d_in, size.batch, 1)?,
        l2: Layer::new(&dev, size.d_out, size.hidden, size.batch, 2)?,
        scratch: BackwardScratch::new(&dev)?,
        dev: dev.clone(),
    };
    // teachers[u][task]
    let teachers: Vec<Vec<Teacher>> = (0..USERS)
        .map(|u| {
            (0..TASKS)
                .map(|t| {
                    Teacher::new(
                        &size,
                        &model.l1,
                        &model.l2,
                        100 + 10 * (u * TASKS + t) as u64,
                    )
                })
                .collect()
        })
        .collect();
    let eval_x = values(size.batch * size.d_in, 999, 1.0);
    let eval_ids = |u: usize| vec![u as i32; size.batch];

    let mut summary = Vec::new();
    // The pull is lambda * (p - anchor) next to an MSE gradient averaged over
    // every output, so lambda is small; it acts from the second task on.
    for (label, pull) in [
        ("without stability", 0.0f32),
        ("with stability (anchor pull 0.02)", 0.02),
    ] {
        println!("\n== {label} ==");
        model.l1.reset(7)?;
        model.l2.reset(8)?;
        let mut final_losses = vec![[0f32; 2]; USERS];
        for task in 0..TASKS {
            for layer in [&mut model.l1, &mut model.l2] {
                for u in 0..USERS {
                    layer.opt.set_anchor(u)?; // the adapter as it was when this task began
                    layer
                        .opt
                        .set_hyper(u, hyper(if task > 0 { pull } else { 0.0 }))?;
                }
            }
            for step in 0..size.steps {
                // Each batch mixes both users; user u's tokens follow user u's current task.
                let x = values(
                    size.batch * size.d_in,
                    10_000 + (task * size.steps + step) as u64,
                    1.0,
                );
                let ids: Vec<i32> = (0..size.batch).map(|i| (i % USERS) as i32).collect();
                let mut target = vec![0f32; size.batch * size.d_out];
                for (u, user_teachers) in teachers.iter().enumerate() {
                    let t = user_teachers[task].target(&size, &x);
                    for i in (u..size.batch).step_by(USERS) {
                        target[i * size.d_out..(i + 1) * size.d_out]
                            .copy_from_slice(&t[i * size.d_out..(i + 1) * size.d_out]);
                    }
                }
                model.train_step(&x, &ids, &target)?;
                if step % (size.steps / 3) == 0 || step + 1 == size.steps {
                    let mut line = format!("task {} step {step:>4}:", task + 1);
                    for u in 0..USERS {
                        let now = model.loss(
                            &eval_x,
                            &eval_ids(u),
                            &teachers[u][task].target(&size, &eval_x),
                        )?;
                        line += &format!("  user {u} current-task loss {now:.4}");
                        if task > 0 {
                            let old = model.loss(
                                &eval_x,
                                &eval_ids(u),
                                &teachers[u][0].target(&size, &eval_x),
                            )?;
                            line += &format!(" (task 1 loss {old:.4})");
                        }
                        if step + 1 == size.steps && task + 1 == TASKS {
                            let old = model.loss(
                                &eval_x,
                                &eval_ids(u),
                                &teachers[u][0].target(&size, &eval_x),
                            )?;
                            final_losses[u] = [old, now];
                        }
                    }
                    println!("{line}");
                }
            }
        }
        summary.push((label, final_losses));
    }
    println!("\nforgetting after task 2 (loss on task 1 / on task 2):");
    for (label, losses) in &summary {
        let cells: Vec<String> = losses
            .iter()
            .enumerate()
            .map(|(u, l)| format!("user {u}: {:.4} / {:.4}", l[0], l[1]))
            .collect();
        println!("  {label:<34} {}", cells.join("   "));
    }

    // Merge user 0's adapters into copies of the base: the merged model (no
    // adapter) gives the adapted model's outputs.
    let ids0 = eval_ids(0);
    let (_, adapted) = model.forward(&eval_x, &ids0, false)?;
    for layer in [&mut model.l1, &mut model.l2] {
        let (a, b) = layer.opt.master(&layer.pool, 0)?;
        let (ad, bd) = (dev.upload(&bf(&a))?, dev.upload(&bf(&b))?);
        merge(
            &dev,
            Dims::new(0, layer.n, layer.k),
            &mut layer.w_dev,
            &DeviceAdapter::new(&ad, &bd, RANK, 1.0),
            MergeOp::Merge,
        )?;
    }
    let (_, merged) = model.forward(&eval_x, &vec![-1; size.batch], false)?;
    let scale = adapted.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
    let diff = adapted
        .iter()
        .zip(&merged)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    println!(
        "\nmerged user 0's adapters into the base: max |merged - adapted| = {diff:.2e} (outputs up to {scale:.2}; bf16 rounding of the merged weights and activations)"
    );
    Ok(())
}
