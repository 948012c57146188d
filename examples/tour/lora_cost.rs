//! LoRA's own cost at prefill: the multi-adapter kernel with every token on
//! one adapter against the same kernel with every token on none (rank 0: no
//! shrink, no expand), so that only what the adapter adds is in the ratio
//! (the goal is at most 1.03x). The fused forward's prefill runs on this
//! kernel (its shared shrink), so the same ratio is its own.
use half::bf16;
use lora_kernels::cublas_baseline::CublasBaseline;
use lora_kernels::ops::fused_forward::Regime;
use lora_kernels::ops::multi_adapter_forward::{LaunchForm, Routing};
use lora_kernels::{Device, Dims};
use serde_json::json;

use crate::fused::time_base;
use crate::multi::{loaded_pool, time_tuned};
use crate::{Inputs, Res};

pub fn table(dev: &Device, blas: &CublasBaseline) -> Res<Vec<serde_json::Value>> {
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
        let (on_slot, on_none) = (dev.upload(&vec![0i32; m])?, dev.upload(&vec![-1i32; m])?);
        for r in [16usize, 64] {
            let pool = loaded_pool(dev, n, k, 1, Some(r))?;
            pool.reserve_tokens(m)?;
            for &(label, form) in &forms {
                let mut time = |ids| {
                    let routing = Routing::Tokens(ids);
                    let launch = (Regime::Prefill, form, &pool, &routing);
                    time_tuned(dev, &mut inputs, dims, launch, &mut i).map(|t| t.median_us)
                };
                let ours = time((&on_slot).into())?;
                let r0 = time((&on_none).into())?;
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
