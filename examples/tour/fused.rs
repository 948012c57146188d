//! The fused-forward table: every shape of the fused-forward issue, ours
//! beside cuBLAS base-only and cuBLAS unfused LoRA.
use half::{bf16, f16};
use lora_kernels::cublas_baseline::CublasBaseline;
use lora_kernels::ops::fused_forward::{
    LaunchForm, Regime, fused_forward, fused_forward_tuned, regime_for,
};
use lora_kernels::timing::{Timing, time_on_stream};
use lora_kernels::{Device, DeviceAdapter, Dims, KernelElement};
use serde_json::json;

use crate::{Ceilings, Inputs, RUNS, Res, WARMUP, data};

const MS: [usize; 7] = [1, 4, 16, 64, 512, 4096, 16384];

pub fn table(
    dev: &Device,
    blas: &CublasBaseline,
    ceilings: Ceilings,
) -> Res<Vec<serde_json::Value>> {
    println!(
        "\n   fused forward, one adapter: ours vs cuBLAS base-only and cuBLAS unfused LoRA (3 GEMMs)"
    );
    println!(
        "   {:>5} {:>5} {:>5} {:>6} {:>3} {:>8} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>8}",
        "dtype",
        "n",
        "k",
        "m",
        "r",
        "regime",
        "ours us",
        "base us",
        "unfused us",
        "floor us",
        "ours/base",
        "ours/unf",
        "% floor"
    );
    let mut rows = Vec::new();
    for (n, k) in [(4096usize, 4096usize), (14336, 4096)] {
        shape::<bf16>(dev, blas, n, k, ceilings, &mut rows)?;
        shape::<f16>(dev, blas, n, k, ceilings, &mut rows)?;
    }
    Ok(rows)
}

fn shape<T: KernelElement>(
    dev: &Device,
    blas: &CublasBaseline,
    n: usize,
    k: usize,
    ceilings: Ceilings,
    rows: &mut Vec<serde_json::Value>,
) -> Res<()>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let mut inputs = Inputs::<T>::new(dev, n, k, MS[MS.len() - 1])?;
    for m in MS {
        for r in [8usize, 16, 64] {
            rows.push(measure(
                dev,
                blas,
                &mut inputs,
                Dims::new(m, n, k),
                r,
                ceilings,
            )?);
        }
    }
    Ok(())
}

fn measure<T: KernelElement>(
    dev: &Device,
    blas: &CublasBaseline,
    inputs: &mut Inputs<T>,
    dims: Dims,
    r: usize,
    ceilings: Ceilings,
) -> Res<serde_json::Value>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let Dims { m, n, k } = dims;
    let stream = dev.cuda_stream().expect("a CUDA device");
    let (a, b) = (
        stream.clone_htod(&data::<T>(r * k, 3))?,
        stream.clone_htod(&data::<T>(n * r, 4))?,
    );
    let mut t = stream.alloc_zeros::<T>(m * r)?;
    let (scale, copies) = (0.5, inputs.ws.len());
    let mut i = 0;
    let ours = time_on_stream(dev, WARMUP, RUNS, || {
        i += 1;
        let adapter = DeviceAdapter::new(&a, &b, r, scale);
        fused_forward(
            dev,
            dims,
            inputs.x.slice(..m * k),
            &inputs.ws[i % copies],
            &adapter,
            0.0,
            inputs.y.slice_mut(..m * n),
        )
    })?;
    let base = time_base(dev, blas, inputs, dims, &mut i)?;
    let x = inputs.x.slice(..m * k);
    let unfused = time_on_stream(dev, WARMUP, RUNS, || {
        i += 1;
        let y = &mut inputs.y.slice_mut(..m * n);
        blas.unfused(
            dims,
            &x,
            &inputs.ws[i % copies],
            (&a, &b, r, scale),
            &mut t,
            y,
        )
    })?;
    let bytes = 2.0 * (m * k + n * k + r * k + n * r + m * n) as f64;
    let flops = 2.0 * (m * n * k + m * k * r + m * r * n) as f64;
    let floor_us = ceilings.floor_us(bytes, flops);
    let regime = format!("{:?}", regime_for(T::DTYPE, m));
    let dtype = format!("{:?}", T::DTYPE).to_lowercase();
    println!(
        "   {dtype:>5} {n:>5} {k:>5} {m:>6} {r:>3} {regime:>8} {:>10.1} {:>10.1} {:>10.1} {floor_us:>9.1} {:>9.2} {:>9.2} {:>7.0}%",
        ours.median_us,
        base.median_us,
        unfused.median_us,
        ours.median_us / base.median_us,
        ours.median_us / unfused.median_us,
        100.0 * floor_us / ours.median_us
    );
    Ok(json!({
        "dtype": dtype, "m": m, "n": n, "k": k, "r": r, "regime": regime,
        "ours_us": ours.median_us, "cublas_base_us": base.median_us, "cublas_unfused_us": unfused.median_us,
        "floor_us": floor_us, "ours_over_base": ours.median_us / base.median_us,
        "ours_over_unfused": ours.median_us / unfused.median_us, "pct_of_floor": 100.0 * floor_us / ours.median_us,
    }))
}

/// The fused prefill kernel's blocks of 1, 2 and 4 column tiles (`t`
/// computed once per block, in its main loop): the count
/// `PREFILL_COL_TILES` should take; the shared shrink (`t` computed once per
/// 16 tokens, on the multi-adapter kernel's mma.sync tiles); the wgmma
/// kernel's units of 1 and 4 column tiles; and the default launch (on a
/// Hopper GPU at m = 4096, the wgmma kernel's 4), timed beside cuBLAS
/// base-only.
pub fn col_tiles_table(dev: &Device, blas: &CublasBaseline) -> Res<Vec<serde_json::Value>> {
    println!(
        "\n   fused prefill: the fused kernel's column tiles per block (t computed once per block, \
         in its main loop); shared: t once per 16 tokens (shared shrink, mma.sync); wgmma: the \
         Hopper kernel (wgmma + TMA, warp-specialized), column tiles per unit; default: what \
         fused_forward launches (wgmma 4 on Hopper here); bf16"
    );
    let tiles = |col_tiles| LaunchForm {
        col_tiles: Some(col_tiles),
        shared_shrink: Some(false),
        ..LaunchForm::default()
    };
    // The wgmma kernel (Hopper only: elsewhere its rows say why not).
    let wgmma = |col_tiles| LaunchForm {
        col_tiles: Some(col_tiles),
        wgmma: Some(true),
        ..LaunchForm::default()
    };
    let shared = LaunchForm {
        wgmma: Some(false),
        ..LaunchForm::default()
    };
    let forms = [
        ("1", tiles(1)),
        ("2", tiles(2)),
        ("4", tiles(4)),
        ("shared", shared),
        ("wgmma 1", wgmma(1)),
        ("wgmma 4", wgmma(4)),
        ("default", LaunchForm::default()),
    ];
    forms_table(dev, blas, Regime::Prefill, &[4096], &forms, "col_tiles")
}

/// The fused decode kernel's base and deep pipelines (stages of `w` in
/// flight) without split-K, the same kernel as launched by default (deep,
/// and split-K where the tiles are fewer than the SMs: n = 1024), and the
/// default launch (up to 64 tokens at ranks up to 64: `t` computed once, on
/// the multi-adapter kernel), and the default launch with `w` loaded
/// straight into registers (`direct`: 16-row tiles, each re-reading `w`
/// past 16 tokens), timed beside cuBLAS base-only.
pub fn decode_launch_table(dev: &Device, blas: &CublasBaseline) -> Res<Vec<serde_json::Value>> {
    println!(
        "\n   fused decode: the fused kernel's pipeline depth (base: 5 stages of w in flight, deep: 11; \
         64 rows: 4 / 8), no split-K; own t: the fused kernel, deep + split-K where the tiles leave SMs \
         idle, t in every column tile; default: m <= 64, r <= 64 compute t once (shared shrink); \
         direct: the default with w loaded straight into registers, no shared-memory pipeline \
         (16-row tiles); bf16"
    );
    let own_t = LaunchForm {
        shared_shrink: Some(false),
        ..LaunchForm::default()
    };
    let form = |deep| LaunchForm {
        deep_decode: Some(deep),
        k_splits: Some(1),
        ..own_t
    };
    let forms = [
        ("base", form(false)),
        ("deep", form(true)),
        ("own t", own_t),
        ("default", LaunchForm::default()),
        (
            "direct",
            LaunchForm {
                direct_decode: true,
                ..LaunchForm::default()
            },
        ),
    ];
    forms_table(dev, blas, Regime::Decode, &[1, 16, 64], &forms, "launch")
}

/// The fused forward in `regime` at each of `ms` tokens, in each launch form
/// of `forms` (labelled under `key` in the JSON), at n = k = 4096,
/// 4096 -> 14336 and 4096 -> 1024 (a GQA k or v projection: few column
/// tiles, so split-K at decode, and at prefill a quarter of n = 4096's
/// tiles, below the wgmma limit at m = 4096), ranks 16 and 64, beside cuBLAS
/// base-only. A form the device can't launch prints why.
pub fn forms_table(
    dev: &Device,
    blas: &CublasBaseline,
    regime: Regime,
    ms: &[usize],
    forms: &[(&str, LaunchForm)],
    key: &str,
) -> Res<Vec<serde_json::Value>> {
    println!(
        "   {:>5} {:>5} {:>5} {:>3} {:>8} {:>10} {:>10} {:>9} {:>9}",
        "m", "n", "k", "r", key, "ours us", "base us", "ours/base", "vs first"
    );
    let shapes = [(4096usize, 4096usize), (14336, 4096), (1024, 4096)];
    let max_m = ms.iter().copied().max().unwrap_or(1);
    let mut rows = Vec::new();
    for (n, k) in shapes {
        let mut inputs = Inputs::<bf16>::new(dev, n, k, max_m)?;
        let copies = inputs.ws.len();
        let mut i = 0;
        for &m in ms {
            let dims = Dims::new(m, n, k);
            let base = time_base(dev, blas, &mut inputs, dims, &mut i)?;
            for r in [16usize, 64] {
                let stream = dev.cuda_stream().expect("a CUDA device");
                let a = stream.clone_htod(&data::<bf16>(r * k, 3))?;
                let b = stream.clone_htod(&data::<bf16>(n * r, 4))?;
                let adapter = DeviceAdapter::new(&a, &b, r, 0.5);
                let mut first = None;
                for &(label, form) in forms {
                    let mut run = |i: usize| {
                        fused_forward_tuned(
                            regime,
                            form,
                            dev,
                            dims,
                            (
                                inputs.x.slice(..m * k).into(),
                                (&inputs.ws[i % copies]).into(),
                            ),
                            &adapter,
                            0.0,
                            (inputs.y.slice_mut(..m * n).into(), None),
                        )
                    };
                    if let Err(e) = run(0) {
                        println!("   {m:>5} {n:>5} {k:>5} {r:>3} {label:>8} not launched: {e}");
                        continue;
                    }
                    let ours = time_on_stream(dev, WARMUP, RUNS, || {
                        i += 1;
                        run(i)
                    })?;
                    let first_us = *first.get_or_insert(ours.median_us);
                    println!(
                        "   {m:>5} {n:>5} {k:>5} {r:>3} {label:>8} {:>10.1} {:>10.1} {:>9.3} {:>9.3}",
                        ours.median_us,
                        base.median_us,
                        ours.median_us / base.median_us,
                        ours.median_us / first_us
                    );
                    rows.push(json!({
                        "dtype": "bf16", "m": m, "n": n, "k": k, "r": r, key: label,
                        "ours_us": ours.median_us, "cublas_base_us": base.median_us,
                        "ours_over_base": ours.median_us / base.median_us,
                    }));
                }
            }
        }
    }
    Ok(rows)
}

/// cuBLAS base-only `x w^T` at `dims`, rotating the copies of `w` (`i`
/// counts the calls across timings).
pub fn time_base<T: KernelElement>(
    dev: &Device,
    blas: &CublasBaseline,
    inputs: &mut Inputs<T>,
    dims: Dims,
    i: &mut usize,
) -> Res<Timing>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let Dims { m, n, k } = dims;
    let copies = inputs.ws.len();
    let x = inputs.x.slice(..m * k);
    Ok(time_on_stream(dev, WARMUP, RUNS, || {
        *i += 1;
        blas.base(
            dims,
            &x,
            &inputs.ws[*i % copies],
            &mut inputs.y.slice_mut(..m * n),
        )
    })?)
}
