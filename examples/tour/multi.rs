//! The multi-adapter table: batches of tokens over many adapters, ours (one
//! launch) beside cuBLAS base-only and the per-adapter cuBLAS loop Rust
//! engines run today. Floor bytes: w, x, y and each distinct adapter once.
use half::bf16;
use lora_kernels::cublas_baseline::{AdapterRows, CublasBaseline};
use lora_kernels::ops::fused_forward::{Regime, regime_for};
use lora_kernels::ops::multi_adapter_forward::{
    LaunchForm, Routing, multi_adapter_forward, multi_adapter_forward_tuned,
};
use lora_kernels::timing::{Timing, time_on_stream};
use lora_kernels::{AdapterPool, DType, Device, Dims, PoolConfig};
use serde_json::json;

use crate::fused::time_base;
use crate::{Ceilings, Inputs, RUNS, Res, WARMUP, cuda, data};

/// Ranks to bench: one rank for every adapter, or "mixed" (8, 16, 64 in turn).
const RANKS: [Option<usize>; 4] = [Some(8), Some(16), Some(64), None];

pub fn table(
    dev: &Device,
    blas: &CublasBaseline,
    ceilings: Ceilings,
) -> Res<Vec<serde_json::Value>> {
    println!(
        "\n   multi-adapter forward, bf16: ours (one launch) vs cuBLAS base-only and a per-adapter cuBLAS loop"
    );
    println!(
        "   {:>5} {:>5} {:>6} {:>8} {:>5} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>8} {:>12} {:>11} {:>10} {:>11}",
        "n",
        "k",
        "tokens",
        "adapters",
        "rank",
        "ours us",
        "base us",
        "loop us",
        "floor us",
        "ours/base",
        "loop/ours",
        "% floor",
        "unsplit/ours",
        "16-row/ours",
        "wgmma/ours",
        "direct/ours"
    );
    let mut rows = Vec::new();
    // n = 1024: a GQA model's k / v projection, whose few column tiles
    // leave SMs idle at decode (split-K).
    for (n, k, batches) in [
        (4096usize, 4096usize, &[1usize, 16, 64, 256][..]),
        (14336, 4096, &[1, 16, 64, 256]),
        (1024, 4096, &[1, 16]),
    ] {
        let mut inputs = Inputs::<bf16>::new(dev, n, k, 256)?;
        for &tokens in batches {
            // 1, 8 and 64 adapters, and every token on its own, each once.
            let mut counts = vec![1usize, 8, 64, tokens];
            counts.retain(|&distinct| distinct <= tokens);
            counts.sort_unstable();
            counts.dedup();
            for distinct in counts {
                for rank in RANKS {
                    rows.push(measure(
                        dev,
                        blas,
                        &mut inputs,
                        Dims::new(tokens, n, k),
                        distinct,
                        rank,
                        ceilings,
                    )?);
                }
            }
        }
    }
    Ok(rows)
}

/// Slot `s`'s rank: `rank`, or for "mixed" (`None`) 8, 16 and 64 in turn.
fn rank_of(rank: Option<usize>, s: usize) -> usize {
    rank.unwrap_or([8, 16, 64][s % 3])
}

/// Slot `s`'s adapter weights at rank `r` (deterministic, never zeros).
fn slot_weights(s: usize, r: usize, n: usize, k: usize) -> (Vec<bf16>, Vec<bf16>) {
    (
        data::<bf16>(r * k, 100 + s as u64),
        data::<bf16>(n * r, 200 + s as u64),
    )
}

/// A pool of `distinct` slots, every one loaded ([`rank_of`], [`slot_weights`], scale 0.5).
pub fn loaded_pool(
    dev: &Device,
    n: usize,
    k: usize,
    distinct: usize,
    rank: Option<usize>,
) -> Res<AdapterPool<bf16>> {
    let max_rank = (0..distinct).map(|s| rank_of(rank, s)).max().unwrap_or(1);
    let config = PoolConfig {
        slots: distinct,
        max_rank,
        n,
        k,
    };
    let mut pool = AdapterPool::<bf16>::new(dev, config)?;
    for s in 0..distinct {
        let r = rank_of(rank, s);
        let (a, b) = slot_weights(s, r, n, k);
        pool.load(s, &a, &b, r, 0.5)?;
    }
    Ok(pool)
}

fn measure(
    dev: &Device,
    blas: &CublasBaseline,
    inputs: &mut Inputs<bf16>,
    dims: Dims,
    distinct: usize,
    rank: Option<usize>,
    ceilings: Ceilings,
) -> Res<serde_json::Value> {
    let Dims { m, n, k } = dims;
    let slot_rank = |s: usize| rank_of(rank, s);
    let max_rank = (0..distinct).map(slot_rank).max().unwrap_or(1);
    let pool = loaded_pool(dev, n, k, distinct, rank)?;
    // The same weights, also as separate buffers for the cuBLAS loop.
    let mut separate = Vec::new();
    for s in 0..distinct {
        let r = slot_rank(s);
        let (a, b) = slot_weights(s, r, n, k);
        separate.push((dev.upload(&a)?, dev.upload(&b)?, r));
    }
    // Tokens sorted by adapter (contiguous rows), as the cuBLAS loop needs.
    let ids: Vec<i32> = (0..m).map(|i| (i * distinct / m) as i32).collect();
    let ids_dev = dev.upload(&ids)?;
    let stream = dev.cuda_stream().expect("a CUDA device");
    let mut t = stream.alloc_zeros::<bf16>(m * max_rank)?;
    let copies = inputs.ws.len();
    pool.reserve_tokens(m)?;

    let mut i = 0;
    let routing = Routing::Tokens((&ids_dev).into());
    let ours = time_on_stream(dev, WARMUP, RUNS, || {
        i += 1;
        let (x, y) = (inputs.x.slice(..m * k), inputs.y.slice_mut(..m * n));
        multi_adapter_forward(&pool, m, x, &inputs.ws[i % copies], &routing, 0.0, y)
    })?;
    // Other launch forms of the same batch, timed beside it: at n = 1024
    // the decode launches split each tile's k-loop (split-K), and unsplit
    // says what the split gains; past 16 tokens they take 64-row tiles (w
    // read once per column tile, each warp expanding its own rows), and
    // 16-row tiles (w read once per 16 rows, a block expanding them) say
    // what those gain. At decode, direct loads (w straight into registers,
    // no shared-memory pipeline, 16-row tiles) say what they would gain.
    let regime = regime_for(DType::BF16, m);
    let mut time_form = |form: LaunchForm| -> Res<f64> {
        let launch = (regime, form, &pool, &routing);
        Ok(time_tuned(dev, inputs, dims, launch, &mut i)?.median_us)
    };
    let decode = regime == Regime::Decode;
    let unsplit = match n == 1024 && decode {
        true => Some(time_form(LaunchForm {
            k_splits: Some(1),
            ..LaunchForm::default()
        })?),
        false => None,
    };
    let narrow = match m > 16 && decode {
        true => Some(time_form(LaunchForm {
            wide_tiles: Some(false),
            ..LaunchForm::default()
        })?),
        false => None,
    };
    let direct = match decode {
        true => Some(time_form(LaunchForm {
            direct_loads: true,
            ..LaunchForm::default()
        })?),
        false => None,
    };
    // Prefill on Hopper: the tile blocks on wgmma and TMA.
    let wgmma = match regime == Regime::Prefill && dev.compute_capability() == Some((9, 0)) {
        true => Some(time_form(LaunchForm {
            wgmma: Some(true),
            ..LaunchForm::default()
        })?),
        false => None,
    };
    let base = time_base(dev, blas, inputs, dims, &mut i)?;
    let groups: Vec<AdapterRows<'_, bf16>> = separate
        .iter()
        .enumerate()
        .map(|(s, (a, b, r))| {
            let first = ids.iter().position(|&id| id == s as i32).unwrap_or(m);
            let last = ids
                .iter()
                .rposition(|&id| id == s as i32)
                .map_or(first, |p| p + 1);
            AdapterRows {
                rows: first..last,
                a: cuda(a),
                b: cuda(b),
                rank: *r,
                scale: 0.5,
            }
        })
        .collect();
    let looped = time_on_stream(dev, WARMUP, RUNS, || {
        i += 1;
        let (x, mut y) = (inputs.x.slice(..m * k), inputs.y.slice_mut(..m * n));
        blas.per_adapter_loop(dims, &x, &inputs.ws[i % copies], &groups, &mut t, &mut y)
    })?;
    let adapter_elems: usize = (0..distinct).map(|s| slot_rank(s) * (n + k)).sum();
    let bytes = 2.0 * (m * k + n * k + m * n + adapter_elems) as f64;
    let flops = 2.0 * (m * n * k) as f64
        + ids
            .iter()
            .map(|&s| 2.0 * (slot_rank(s as usize) * (n + k)) as f64)
            .sum::<f64>();
    let floor_us = ceilings.floor_us(bytes, flops);
    let rank_label = rank.map_or("mixed".to_string(), |r| r.to_string());
    let gain = |other: Option<f64>| {
        other.map_or("-".to_string(), |u| format!("{:.2}", u / ours.median_us))
    };
    let (split_gain, wide_gain) = (gain(unsplit), gain(narrow));
    let (wgmma_gain, direct_gain) = (gain(wgmma), gain(direct));
    println!(
        "   {n:>5} {k:>5} {m:>6} {distinct:>8} {rank_label:>5} {:>10.1} {:>10.1} {:>10.1} {floor_us:>9.1} {:>9.2} {:>9.1} {:>7.0}% {split_gain:>12} {wide_gain:>11} {wgmma_gain:>10} {direct_gain:>11}",
        ours.median_us,
        base.median_us,
        looped.median_us,
        ours.median_us / base.median_us,
        looped.median_us / ours.median_us,
        100.0 * floor_us / ours.median_us
    );
    Ok(json!({
        "n": n, "k": k, "tokens": m, "adapters": distinct, "rank": rank_label,
        "regime": format!("{regime:?}"), "unsplit_us": unsplit, "rows16_us": narrow, "wgmma_us": wgmma, "direct_us": direct,
        "ours_us": ours.median_us, "cublas_base_us": base.median_us, "cublas_per_adapter_loop_us": looped.median_us,
        "floor_us": floor_us, "ours_over_base": ours.median_us / base.median_us,
        "loop_over_ours": looped.median_us / ours.median_us, "pct_of_floor": 100.0 * floor_us / ours.median_us,
    }))
}

/// The base-GEMM target, measured through the wgmma mainloop itself
/// (Hopper only): bf16 8192^3 with every token on no adapter (`-1`: rank 0,
/// no expand), the multi-adapter prefill's wgmma tile blocks against cuBLAS
/// base-only in the same run. Goal: cuBLAS / ours >= 0.95.
pub fn wgmma_base_table(dev: &Device, blas: &CublasBaseline) -> Res<Option<serde_json::Value>> {
    println!(
        "\n   the wgmma mainloop alone (r 0: every token on no adapter), bf16 8192^3, vs cuBLAS base-only"
    );
    if dev.compute_capability() != Some((9, 0)) {
        println!(
            "   not run: the wgmma kernels need compute capability 9.0, this is {}",
            dev.name()
        );
        return Ok(None);
    }
    let (m, n, k) = (8192usize, 8192usize, 8192usize);
    let dims = Dims::new(m, n, k);
    let mut inputs = Inputs::<bf16>::new(dev, n, k, m)?;
    let pool = AdapterPool::<bf16>::new(
        dev,
        PoolConfig {
            slots: 1,
            max_rank: 16,
            n,
            k,
        },
    )?;
    let ids = dev.upload(&vec![-1i32; m])?;
    let routing = Routing::Tokens((&ids).into());
    pool.reserve_tokens(m)?;
    let form = LaunchForm {
        wgmma: Some(true),
        ..LaunchForm::default()
    };
    let mut i = 0;
    let ours = time_tuned(
        dev,
        &mut inputs,
        dims,
        (Regime::Prefill, form, &pool, &routing),
        &mut i,
    )?;
    let base = time_base(dev, blas, &mut inputs, dims, &mut i)?;
    let tflops = |us: f64| 2.0 * (m * n * k) as f64 / (us * 1e-6) / 1e12;
    println!(
        "   ours {:.1} us ({:.0} TFLOP/s), cuBLAS {:.1} us ({:.0} TFLOP/s): cuBLAS / ours = {:.3}",
        ours.median_us,
        tflops(ours.median_us),
        base.median_us,
        tflops(base.median_us),
        base.median_us / ours.median_us
    );
    Ok(Some(json!({
        "m": m, "n": n, "k": k, "ours_us": ours.median_us, "cublas_base_us": base.median_us,
        "cublas_over_ours": base.median_us / ours.median_us,
    })))
}

/// One multi-adapter launch in a chosen regime and form (`beta` 0, `w`
/// rotated across its copies; `i` counts the launches), timed.
pub fn time_tuned(
    dev: &Device,
    inputs: &mut Inputs<bf16>,
    dims: Dims,
    (regime, form, pool, routing): (Regime, LaunchForm, &AdapterPool<bf16>, &Routing<'_>),
    i: &mut usize,
) -> Res<Timing> {
    let Dims { m, n, k } = dims;
    let copies = inputs.ws.len();
    Ok(time_on_stream(dev, WARMUP, RUNS, || {
        *i += 1;
        let (x, y) = (inputs.x.slice(..m * k), inputs.y.slice_mut(..m * n));
        let operands = (x.into(), (&inputs.ws[*i % copies]).into());
        multi_adapter_forward_tuned(
            regime,
            form,
            pool,
            m,
            operands,
            routing,
            0.0,
            (y.into(), None),
        )
    })?)
}
