//! LoRA's own cost: the multi-adapter kernel with its tokens on adapters
//! against the same kernel with every token on none (rank 0: no shrink, no
//! expand), so that only what the adapters add is in the ratio. The fused
//! forward's prefill and small decode run on this kernel (its shared
//! shrink), so the same ratios are its own.
//! - Prefill, m 4096, one adapter: the goal is at most 1.03x.
//! - Decode, 1 to 64 tokens on one adapter or each on its own: where the
//!   decode targets' time goes. `r0 / base` is the kernel's base product
//!   alone against cuBLAS's (the k-loop's pace), `ours / r0` what the shrink
//!   and the expand add on top.
use half::bf16;
use lora_kernels::cublas_baseline::CublasBaseline;
use lora_kernels::ops::fused_forward::Regime;
use lora_kernels::ops::multi_adapter_forward::{LaunchForm, Routing};
use lora_kernels::{AdapterPool, Device, Dims};
use serde_json::json;

use crate::fused::time_base;
use crate::multi::{loaded_pool, time_tuned};
use crate::{Inputs, Res};

/// One row's launches: the kernel with the tokens on `ids` against the same
/// kernel with every token on none, in microseconds.
fn ours_and_r0(
    dev: &Device,
    inputs: &mut Inputs<bf16>,
    dims: Dims,
    (regime, form): (Regime, LaunchForm),
    pool: &AdapterPool<bf16>,
    ids: &[i32],
    i: &mut usize,
) -> Res<(f64, f64)> {
    let (on_slots, on_none) = (dev.upload(ids)?, dev.upload(&vec![-1i32; ids.len()])?);
    let mut time = |ids| {
        let routing = Routing::Tokens(ids);
        let launch = (regime, form, pool, &routing);
        time_tuned(dev, inputs, dims, launch, i).map(|t| t.median_us)
    };
    let ours = time((&on_slots).into())?;
    let r0 = time((&on_none).into())?;
    Ok((ours, r0))
}

pub fn prefill_table(dev: &Device, blas: &CublasBaseline) -> Res<Vec<serde_json::Value>> {
    println!(
        "\n   prefill, LoRA's own cost: every token on one adapter (rank r) over the same kernel with \
         every token on none (r 0); mma.sync and wgmma (Hopper, the default there at m 4096); bf16, m 4096"
    );
    println!(
        "   {:>5} {:>5} {:>3} {:>9} {:>10} {:>10} {:>9} {:>10}",
        "n", "k", "r", "kernel", "ours us", "r 0 us", "ours/r0", "base us"
    );
    let wgmma = LaunchForm {
        wgmma: Some(true),
        ..LaunchForm::default()
    };
    let mma_sync = LaunchForm {
        wgmma: Some(false),
        ..LaunchForm::default()
    };
    let mut forms = vec![("mma.sync", mma_sync)];
    if dev.compute_capability() == Some((9, 0)) {
        forms.push(("wgmma", wgmma));
    }
    let m = 4096;
    let mut rows = Vec::new();
    for (n, k) in [(4096usize, 4096usize), (14336, 4096)] {
        let dims = Dims::new(m, n, k);
        let mut inputs = Inputs::<bf16>::new(dev, n, k, m)?;
        let mut i = 0;
        let base = time_base(dev, blas, &mut inputs, dims, &mut i)?;
        for r in [16usize, 64] {
            let pool = loaded_pool(dev, n, k, 1, Some(r))?;
            pool.reserve_tokens(m)?;
            for &(label, form) in &forms {
                let launch = (Regime::Prefill, form);
                let (ours, r0) =
                    ours_and_r0(dev, &mut inputs, dims, launch, &pool, &vec![0; m], &mut i)?;
                println!(
                    "   {n:>5} {k:>5} {r:>3} {label:>9} {ours:>10.1} {r0:>10.1} {:>9.3} {:>10.1}",
                    ours / r0,
                    base.median_us
                );
                rows.push(json!({
                    "m": m, "n": n, "k": k, "r": r, "kernel": label, "ours_us": ours, "r0_us": r0,
                    "ours_over_r0": ours / r0, "cublas_base_us": base.median_us,
                }));
            }
        }
    }
    Ok(rows)
}

/// The decode's split of its time: for 1, 16 and 64 tokens on one adapter,
/// and 16 and 64 tokens each on its own (rank 16), the default launch and
/// the direct-load form (`LaunchForm::direct_loads`), each against itself
/// with every token on none and against cuBLAS's base product.
pub fn decode_table(dev: &Device, blas: &CublasBaseline) -> Res<Vec<serde_json::Value>> {
    println!(
        "\n   decode, where the time goes: tokens on adapters (rank 16) over the same kernel with every \
         token on none (r 0), and r 0 over cuBLAS's base product; default and direct loads; bf16"
    );
    println!(
        "   {:>5} {:>5} {:>6} {:>8} {:>8} {:>10} {:>10} {:>9} {:>10} {:>8}",
        "n",
        "k",
        "tokens",
        "adapters",
        "form",
        "ours us",
        "r 0 us",
        "ours/r0",
        "base us",
        "r0/base"
    );
    let direct = LaunchForm {
        direct_loads: true,
        ..LaunchForm::default()
    };
    let forms = [("default", LaunchForm::default()), ("direct", direct)];
    let (r, k) = (16, 4096);
    let mut rows = Vec::new();
    for n in [4096usize, 14336] {
        let mut inputs = Inputs::<bf16>::new(dev, n, k, 64)?;
        let mut i = 0;
        for (m, distinct) in [(1usize, 1usize), (16, 1), (16, 16), (64, 1), (64, 64)] {
            let dims = Dims::new(m, n, k);
            let base = time_base(dev, blas, &mut inputs, dims, &mut i)?.median_us;
            let pool = loaded_pool(dev, n, k, distinct, Some(r))?;
            pool.reserve_tokens(m)?;
            let ids: Vec<i32> = (0..m).map(|t| (t * distinct / m) as i32).collect();
            for &(label, form) in &forms {
                let launch = (Regime::Decode, form);
                let (ours, r0) =
                    match ours_and_r0(dev, &mut inputs, dims, launch, &pool, &ids, &mut i) {
                        Ok(times) => times,
                        Err(e) => {
                            println!(
                                "   {n:>5} {k:>5} {m:>6} {distinct:>8} {label:>8} not launched: {e}"
                            );
                            continue;
                        }
                    };
                println!(
                    "   {n:>5} {k:>5} {m:>6} {distinct:>8} {label:>8} {ours:>10.1} {r0:>10.1} {:>9.3} {base:>10.1} {:>8.2}",
                    ours / r0,
                    r0 / base
                );
                rows.push(json!({
                    "m": m, "n": n, "k": k, "r": r, "adapters": distinct, "form": label,
                    "ours_us": ours, "r0_us": r0, "ours_over_r0": ours / r0,
                    "cublas_base_us": base, "r0_over_base": r0 / base,
                }));
            }
        }
    }
    Ok(rows)
}
