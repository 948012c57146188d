//! The training tables: the adapter backward (ours: u, dx, da, db in the
//! crate's kernels, fast and deterministic modes) beside cuBLAS's unfused
//! five-GEMM backward, and the fused optimizer step over 1,000 rank-16 slots
//! against its bandwidth floor.
use half::bf16;
use lora_kernels::cublas_baseline::CublasBaseline;
use lora_kernels::ops::adamw::{AdamWConfig, SlotHyper, SlotOptimizer};
use lora_kernels::ops::lora_backward::{
    BackwardOptions, BackwardScratch, DeviceBackwardInputs, Grads, lora_backward,
    multi_adapter_backward_into,
};
use lora_kernels::timing::{Timing, time_on_stream};
use lora_kernels::{AdapterPool, Device, DeviceAdapter, Dims, PoolConfig, PoolGrads};
use serde_json::json;

use crate::{Ceilings, Inputs, RUNS, Res, WARMUP, data};

pub fn backward_table(
    dev: &Device,
    blas: &CublasBaseline,
    ceilings: Ceilings,
) -> Res<Vec<serde_json::Value>> {
    println!(
        "\n   adapter backward, bf16 (dx, da, db): ours (the default: fast / deterministic; on Hopper the \
         fast one with each dx, mma.sync / wgmma: the default takes wgmma from 512 tokens) vs cuBLAS \
         unfused (5 GEMMs) and cuBLAS's g w alone (the GEMM a backward can't avoid)"
    );
    println!(
        "   {:>5} {:>5} {:>6} {:>3} {:>10} {:>10} {:>11} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "n",
        "k",
        "m",
        "r",
        "ours us",
        "det. us",
        "mma.sync us",
        "wgmma us",
        "unfused us",
        "g w us",
        "floor us",
        "ours/unf",
        "best/g w",
        "% floor"
    );
    let hopper = dev.compute_capability() == Some((9, 0));
    let stream = dev.cuda_stream().expect("a CUDA device");
    let mut rows = Vec::new();
    for (n, k) in [(4096usize, 4096usize), (14336, 4096)] {
        let inputs = Inputs::<bf16>::new(dev, n, k, 4096)?;
        let g_all = stream.clone_htod(&data::<bf16>(4096 * n, 20))?;
        // 64 to 512 tokens: where the wgmma dx overtakes the mma.sync one
        // (the default takes it from 512, ops::wgmma_dispatch).
        for m in [16usize, 64, 128, 256, 512, 4096] {
            for r in [16usize, 64] {
                let dims = Dims::new(m, n, k);
                let (a, b) = (
                    stream.clone_htod(&data::<bf16>(r * k, 3))?,
                    stream.clone_htod(&data::<bf16>(n * r, 4))?,
                );
                let t32 = stream.clone_htod(&data::<f32>(m * r, 5))?;
                let t16 = stream.clone_htod(&data::<bf16>(m * r, 5))?;
                let (mut dx, mut da, mut db) = (
                    stream.alloc_zeros::<bf16>(m * k)?,
                    stream.alloc_zeros::<f32>(r * k)?,
                    stream.alloc_zeros::<f32>(n * r)?,
                );
                let (mut dx16, mut da16, mut db16, mut u16) = (
                    stream.alloc_zeros::<bf16>(m * k)?,
                    stream.alloc_zeros::<bf16>(r * k)?,
                    stream.alloc_zeros::<bf16>(n * r)?,
                    stream.alloc_zeros::<bf16>(m * r)?,
                );
                let mut scratch = BackwardScratch::new(dev)?;
                let g = g_all.slice(..m * n);
                let x = inputs.x.slice(..m * k);
                let copies = inputs.ws.len();
                let mut i = 0;
                let mut ours = |deterministic, wgmma| {
                    time_on_stream(dev, WARMUP, RUNS, || {
                        i += 1;
                        let grads = Grads {
                            dx: Some((&mut dx).into()),
                            da: Some((&mut da).into()),
                            db: Some((&mut db).into()),
                        };
                        let adapter = DeviceAdapter::new(&a, &b, r, 0.5);
                        let opts = BackwardOptions {
                            accumulate: false,
                            deterministic,
                            wgmma,
                        };
                        lora_backward(
                            dev,
                            dims,
                            &adapter,
                            DeviceBackwardInputs::new(
                                g_all.slice(..m * n),
                                inputs.x.slice(..m * k),
                                &inputs.ws[i % copies],
                                &t32,
                            ),
                            grads,
                            opts,
                            &mut scratch,
                        )
                    })
                };
                let (fast, det) = (ours(false, None)?, ours(true, None)?);
                // Each dx forced, where the default could take either.
                let (mma_sync, wgmma) = if hopper {
                    let us = |t: Timing| Some(t.median_us);
                    (us(ours(false, Some(false))?), us(ours(false, Some(true))?))
                } else {
                    (None, None)
                };
                let unfused = time_on_stream(dev, WARMUP, RUNS, || {
                    i += 1;
                    let w = &inputs.ws[i % copies];
                    blas.backward_unfused(
                        dims,
                        (&g, &x, w),
                        (&a, &b, r, 0.5),
                        &t16,
                        &mut u16,
                        (&mut dx16, &mut da16, &mut db16),
                    )
                })?;
                let gw = time_on_stream(dev, WARMUP, RUNS, || {
                    i += 1;
                    blas.backward_base(dims, &g, &inputs.ws[i % copies], &mut dx16)
                })?;
                // Our fastest form: the default, or a dx forced where it ran.
                let best = [mma_sync, wgmma]
                    .into_iter()
                    .flatten()
                    .fold(fast.median_us, f64::min);
                let bytes = 2.0 * (2 * m * n + m * k + n * k + r * (n + k) + m * k) as f64
                    + 4.0 * (m * r + r * (n + k)) as f64;
                let flops = 2.0 * (m * n * k + m * k * r + 2 * m * n * r + m * r * k) as f64;
                let floor_us = ceilings.floor_us(bytes, flops);
                println!(
                    "   {n:>5} {k:>5} {m:>6} {r:>3} {:>10.1} {:>10.1} {:>11} {:>10} {:>12.1} {:>9.1} {floor_us:>9.1} \
                     {:>9.2} {:>9.2} {:>7.0}%",
                    fast.median_us,
                    det.median_us,
                    shown(mma_sync),
                    shown(wgmma),
                    unfused.median_us,
                    gw.median_us,
                    fast.median_us / unfused.median_us,
                    best / gw.median_us,
                    100.0 * floor_us / fast.median_us
                );
                rows.push(json!({
                    "n": n, "k": k, "m": m, "r": r, "ours_us": fast.median_us, "ours_deterministic_us": det.median_us,
                    "ours_mma_sync_dx_us": mma_sync, "ours_wgmma_dx_us": wgmma,
                    "cublas_unfused_us": unfused.median_us, "cublas_g_w_us": gw.median_us, "floor_us": floor_us,
                    "best_over_g_w": best / gw.median_us,
                    "ours_over_unfused": fast.median_us / unfused.median_us, "pct_of_floor": 100.0 * floor_us / fast.median_us,
                }));
            }
        }
    }
    Ok(rows)
}

/// A time in microseconds, or `-` for a form that did not run.
fn shown(us: Option<f64>) -> String {
    us.map_or("-".to_string(), |us| format!("{us:.1}"))
}

pub fn optimizer_table(dev: &Device, ceilings: Ceilings) -> Res<serde_json::Value> {
    let (slots, rank, n, k) = (1000usize, 16usize, 4096usize, 4096usize);
    let mut pool = AdapterPool::<bf16>::new(
        dev,
        PoolConfig {
            slots,
            max_rank: rank,
            n,
            k,
        },
    )?;
    let mut opt = SlotOptimizer::new(&pool, AdamWConfig::default())?;
    let hyper = SlotHyper {
        lr: 1e-3,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        anchor_pull: 0.0,
    };
    let (a, b) = (data::<f32>(rank * k, 1), data::<f32>(n * rank, 2));
    for s in 0..slots {
        opt.load_adapter(&mut pool, s, &a, &b, rank, 1.0, hyper)?;
    }
    let grads = pool_gradients(dev, &pool)?;
    // The same gradients two ways: the norm read from them (step), or from
    // the statistics the backward pass left (step_pool_grads).
    let step = time_on_stream(dev, 3, 20, || opt.step(&mut pool, grads.da(), grads.db()))?;
    let once = time_on_stream(dev, 3, 20, || opt.step_pool_grads(&mut pool, &grads))?;
    let from_stats = opt.norm_from_stats()?.iter().all(|&s| s);
    let params = (slots * rank * (n + k)) as f64;
    // Each parameter: read p, m1, m2, g; write p, m1, m2 (f32) and the bf16 copy.
    let floor_us = ceilings.floor_us(params * 30.0, 0.0);
    // Slots whose bounds did not clear the last step: they read g and the
    // state once more (kernels/adamw.cu).
    let checked = opt.checked_slots()?.iter().filter(|&&c| c).count();
    println!(
        "\n   fused AdamW step over {slots} rank-{rank} slots (hidden {n}, {:.0} M parameters), floor {floor_us:.1} us:",
        params / 1e6
    );
    for (how, t) in [
        ("step (gradient read twice)", &step),
        ("step_pool_grads (once)", &once),
    ] {
        println!(
            "     {how:<28} {:>9.1} us ({:.0}% of floor)",
            t.median_us,
            100.0 * floor_us / t.median_us
        );
    }
    println!("     {checked} slots checked; norms from the statistics: {from_stats}");
    Ok(json!({
        "slots": slots, "rank": rank, "n": n, "k": k, "params": params,
        "ours_us": step.median_us, "floor_us": floor_us, "pct_of_floor": 100.0 * floor_us / step.median_us,
        "from_stats_us": once.median_us, "from_stats_pct_of_floor": 100.0 * floor_us / once.median_us,
        "norms_from_stats": from_stats, "checked_slots": checked,
    }))
}

/// The pool's gradients from the backward pass of a 64-token batch over
/// its first slots: those slots' gradients, zero elsewhere, and the
/// statistics of all of them.
fn pool_gradients(dev: &Device, pool: &AdapterPool<bf16>) -> Res<PoolGrads> {
    let PoolConfig { max_rank, n, k, .. } = pool.config();
    let m = 64;
    let stream = dev.cuda_stream().expect("a CUDA device");
    let ids: Vec<i32> = (0..m as i32).collect();
    let (g, x, w) = (
        stream.clone_htod(&data::<bf16>(m * n, 5))?,
        stream.clone_htod(&data::<bf16>(m * k, 6))?,
        stream.clone_htod(&data::<bf16>(n * k, 7))?,
    );
    let (ids, t) = (
        stream.clone_htod(&ids)?,
        stream.clone_htod(&data::<f32>(m * max_rank, 8))?,
    );
    let mut grads = PoolGrads::new(pool)?;
    let mut scratch = BackwardScratch::new(dev)?;
    let inputs = DeviceBackwardInputs::new(&g, &x, &w, &t);
    let opts = BackwardOptions::default();
    multi_adapter_backward_into(pool, m, &ids, inputs, None, &mut grads, opts, &mut scratch)?;
    Ok(grads)
}
