//! `tour --profile CASE`: one launch form on one shape, launched RUNS times
//! and nothing else on the GPU, for Nsight Compute to read the last launch
//! (`scripts/gpu-check profile` runs every case under ncu). `--profile`
//! alone lists the cases. Each case is a reading the GPU reports asked for
//! (reports/gpu/NOTES.md): the decode's launch forms, the multi-adapter
//! batches that missed their targets, and the prefill that should become the
//! default.
use half::bf16;
use lora_kernels::ops::fused_forward::{LaunchForm, Regime, fused_forward_tuned};
use lora_kernels::ops::multi_adapter_forward::{
    self as multi_op, Routing, multi_adapter_forward_tuned,
};
use lora_kernels::{Device, DeviceAdapter, Dims};

use crate::multi::loaded_pool;
use crate::{Inputs, Res, data};

/// Launches per case: the profiler reads the last (the others warm up).
pub const RUNS: usize = 4;

/// What a case launches.
#[derive(Clone, Copy)]
enum Launch {
    /// The fused forward, one adapter of rank 16.
    Fused(Regime, LaunchForm),
    /// The multi-adapter forward: tokens, distinct adapters (rank 16).
    Multi(Regime, multi_op::LaunchForm, usize),
}

/// Every case's k: Llama-3-8B's hidden size.
const K: usize = 4096;

/// The cases: name, m, n, launch (k = K).
fn cases() -> Vec<(&'static str, usize, usize, Launch)> {
    let fused = LaunchForm::default();
    let direct = LaunchForm {
        direct_decode: true,
        ..fused
    };
    let multi = multi_op::LaunchForm::default();
    let multi_direct = multi_op::LaunchForm {
        direct_loads: true,
        ..multi
    };
    let multi_wgmma = multi_op::LaunchForm {
        wgmma: Some(true),
        ..multi
    };
    let fused_wgmma = LaunchForm {
        wgmma: Some(true),
        col_tiles: Some(4),
        ..fused
    };
    let (d, p) = (Regime::Decode, Regime::Prefill);
    vec![
        ("decode-m1", 1, 4096, Launch::Fused(d, fused)),
        ("decode-m1-direct", 1, 4096, Launch::Fused(d, direct)),
        ("decode-m16-direct", 16, 4096, Launch::Fused(d, direct)),
        ("decode-m1-14336-direct", 1, 14336, Launch::Fused(d, direct)),
        ("multi-64x64", 64, 4096, Launch::Multi(d, multi, 64)),
        (
            "multi-64x64-direct",
            64,
            4096,
            Launch::Multi(d, multi_direct, 64),
        ),
        ("multi-256x64", 256, 4096, Launch::Multi(p, multi, 64)),
        (
            "multi-256x64-wgmma",
            256,
            4096,
            Launch::Multi(p, multi_wgmma, 64),
        ),
        (
            "prefill-m4096-wgmma",
            4096,
            4096,
            Launch::Fused(p, fused_wgmma),
        ),
    ]
}

/// Lists the cases (no name) or runs one.
pub fn section(dev: Option<&Device>, name: Option<&str>) -> Res<()> {
    let Some(name) = name else {
        println!("--profile cases ({RUNS} launches each):");
        for (case, ..) in cases() {
            println!("{case}");
        }
        return Ok(());
    };
    let Some((_, m, n, launch)) = cases().into_iter().find(|c| c.0 == name) else {
        return Err(format!("--profile: no case {name} (--profile alone lists them)").into());
    };
    let Some(dev) = dev else {
        return Err("--profile launches on a GPU, and there is none here".into());
    };
    let (k, dims) = (K, Dims::new(m, n, K));
    let mut inputs = Inputs::<bf16>::new(dev, n, k, m)?;
    // The op, launched RUNS times, then waited for.
    let launches = |launch: &mut dyn FnMut() -> lora_kernels::Result<()>| -> Res<()> {
        for _ in 0..RUNS {
            launch()?;
        }
        Ok(dev.synchronize()?)
    };
    let (x, w) = (&inputs.x, &inputs.ws[0]);
    let y = &mut inputs.y;
    match launch {
        Launch::Fused(regime, form) => {
            let stream = dev.cuda_stream().expect("a CUDA device");
            let a = stream.clone_htod(&data::<bf16>(16 * k, 3))?;
            let b = stream.clone_htod(&data::<bf16>(n * 16, 4))?;
            let adapter = DeviceAdapter::new(&a, &b, 16, 0.5);
            launches(&mut || {
                let outputs = (y.slice_mut(..m * n).into(), None);
                fused_forward_tuned(
                    regime,
                    form,
                    dev,
                    dims,
                    (x.slice(..m * k).into(), w.into()),
                    &adapter,
                    0.0,
                    outputs,
                )
            })?;
        }
        Launch::Multi(regime, form, distinct) => {
            let pool = loaded_pool(dev, n, k, distinct, Some(16))?;
            pool.reserve_tokens(m)?;
            let ids: Vec<i32> = (0..m).map(|i| (i * distinct / m) as i32).collect();
            let ids = dev.upload(&ids)?;
            let routing = Routing::Tokens((&ids).into());
            launches(&mut || {
                let (operands, outputs) = (
                    (x.slice(..m * k).into(), w.into()),
                    (y.slice_mut(..m * n).into(), None),
                );
                multi_adapter_forward_tuned(
                    regime, form, &pool, m, operands, &routing, 0.0, outputs,
                )
            })?;
        }
    }
    println!("--profile {name}: {RUNS} launches of m {m}, n {n}, k {k}");
    Ok(())
}
