//! Serving vs learning while serving, timed at one token per user.
use std::time::Instant;

use candle_core::Device;
use lora_kernels::Element;
use lora_kernels::candle::CandleElement;
use lora_kernels::ops::adamw::SlotHyper;
use lora_kernels::peft::LoadOptions;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::model::{Batch, Config, Model};
use crate::{DEMO, Res, random_adapter, sync};

/// Serving vs learning while serving, timed: every slot holds an adapter
/// and each step serves one token per user (a decode step); a learning
/// step also trains every user on its token (training forward, backward,
/// optimizer). Small on the host runtime; on a GPU, Llama-3-8B's projection
/// shapes (two layers of distinct weights, more than L2 holds) and 256 users
/// of rank 16.
pub fn throughput<T: CandleElement>(dev: &Device, gpu: bool) -> Res<()> {
    let (cfg, reps) = if gpu {
        let cfg = Config {
            vocab: 8192,
            hidden: 4096,
            heads: 32,
            kv_heads: 8,
            intermediate: 14336,
            layers: 2,
            max_seq: 8,
            slots: 256,
            max_rank: 16,
        };
        (cfg, 20)
    } else {
        (Config { slots: 16, ..DEMO }, 3)
    };
    let users = cfg.slots;
    let mut model = Model::<T>::new(cfg, dev, 7)?;
    let hyper = SlotHyper {
        lr: 1e-3,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        anchor_pull: 0.0,
    };
    let bound = 1.0 / (cfg.hidden as f32).sqrt();
    for slot in 0..users {
        let adapter = random_adapter(&cfg, cfg.max_rank, slot as u64, (bound, 0.01))?;
        let m = &mut model;
        (m.adapters).load_for_training(
            slot,
            &adapter,
            LoadOptions::default(),
            hyper,
            &mut m.optimizers,
        )?;
    }
    let mut rng = StdRng::seed_from_u64(8);
    let batch = Batch {
        tokens: (0..users)
            .map(|_| rng.random_range(0..cfg.vocab as u32))
            .collect(),
        ids: (0..users as i32).collect(),
        seqs: users,
        seq: 1,
    };
    let targets: Vec<u32> = (0..users)
        .map(|_| rng.random_range(0..cfg.vocab as u32))
        .collect();
    let weights = vec![1.0; users];
    let mut serve = || -> Res<()> { sync(&model.forward(&batch)?) };
    let serve_s = median_seconds(reps, &mut serve)?;
    let mut learn = || -> Res<()> {
        sync(&model.forward(&batch)?)?;
        let tape = model.forward_train(&batch)?;
        model.learn(&tape, &targets, &weights)?;
        sync(&tape.logits)
    };
    let learn_s = median_seconds(reps, &mut learn)?;
    println!(
        "\nthroughput, {} tokens of {users} users (hidden {}, intermediate {}, {} layers, rank {}, \
         {:?}; median of {reps}):\n  serve-only step {:.2} ms ({:.0} tokens/s); learn-while-serving \
         step {:.2} ms ({:.0} tokens/s): {:.2}x the serve-only step{}",
        users,
        cfg.hidden,
        cfg.intermediate,
        cfg.layers,
        cfg.max_rank,
        <T as Element>::DTYPE,
        serve_s * 1e3,
        users as f64 / serve_s,
        learn_s * 1e3,
        users as f64 / learn_s,
        learn_s / serve_s,
        if gpu {
            " (goal on a GPU: <= 2.0x)"
        } else {
            " on the host runtime (CPU): not a GPU figure"
        }
    );
    Ok(())
}

/// `f` run twice to warm up, then `reps` times: the median seconds.
fn median_seconds(reps: usize, f: &mut dyn FnMut() -> Res<()>) -> Res<f64> {
    for _ in 0..2 {
        f()?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[reps / 2])
}
