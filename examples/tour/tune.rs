//! `tour --tune`: every launch form of the fused and the multi-adapter
//! forward on the shapes of the tour's tables, each timed, then the best
//! form per shape beside the default's time. Those winners are what the
//! dispatch (`regime_for`, the `LaunchForm` defaults, the split counts) should
//! take; a form the device can't launch says why and is left out.
use half::bf16;
use lora_kernels::cublas_baseline::CublasBaseline;
use lora_kernels::ops::fused_forward::{LaunchForm, Regime, regime_for};
use lora_kernels::ops::multi_adapter_forward::{self as multi_op, Routing};
use lora_kernels::{DType, Device, Dims};
use serde_json::json;

use crate::fused::forms_table;
use crate::multi::{loaded_pool, time_tuned};
use crate::report::{Table, table};
use crate::{Inputs, Res};

/// The sweep's tables (report.rs), each written as it ends: the fused
/// forward at decode and at prefill, then the multi-adapter forward at each
/// n (k = 4096).
pub fn tables<'a>(dev: &'a Device, blas: &'a CublasBaseline) -> Vec<Table<'a>> {
    let mut tables = vec![
        table("fused_decode", move || {
            fused_sweep(dev, blas, Regime::Decode)
        }),
        table("fused_prefill", move || {
            fused_sweep(dev, blas, Regime::Prefill)
        }),
    ];
    for n in [4096, 14336, 1024] {
        tables.push(table(&format!("multi_n{n}"), move || {
            multi_sweep(dev, n, 4096)
        }));
    }
    tables
}

/// The fused forward in `regime` at the tables' token counts, in every form
/// of [`fused_forms`]: each timed, then the best per shape.
fn fused_sweep(dev: &Device, blas: &CublasBaseline, regime: Regime) -> Res<serde_json::Value> {
    let ms = match regime {
        Regime::Decode => &[1usize, 4, 16, 64][..],
        // 1024 and 2048 tokens: the wgmma limit (528 tiles on 132 SMs,
        // ops::wgmma_dispatch) lies between them at n = 4096 and below them
        // at n = 14336.
        _ => &[256, 512, 1024, 2048, 4096][..],
    };
    let forms = fused_forms(regime);
    let forms: Vec<(&str, LaunchForm)> = forms.iter().map(|(l, f)| (l.as_str(), *f)).collect();
    let rows = forms_table(dev, blas, regime, ms, &forms, "form")?;
    let best = best_per_shape(&rows, &["n", "k", "m", "r"], "form");
    Ok(json!({ "rows": rows, "best": best }))
}

/// The fused forward's forms, the default first: at decode, the fused kernel
/// (`t` in every column tile) at either depth and each split count, and the
/// shared shrink (the multi-adapter kernel) with `w` loaded straight into
/// registers at each split count; at prefill, 1, 2 and 4 column tiles a
/// block, the shared shrink (mma.sync) split along k where it splits (256
/// tokens) and unsplit, and the wgmma kernel at 1, 2 and 4 column tiles.
fn fused_forms(regime: Regime) -> Vec<(String, LaunchForm)> {
    let own_t = LaunchForm {
        shared_shrink: Some(false),
        ..LaunchForm::default()
    };
    let mut forms = vec![("default".to_string(), LaunchForm::default())];
    let splits_label = |s: Option<usize>| s.map_or("auto".to_string(), |s| s.to_string());
    if regime == Regime::Decode {
        for deep in [false, true] {
            for splits in [None, Some(1), Some(2), Some(4), Some(8)] {
                let depth = if deep { "deep" } else { "base" };
                let form = LaunchForm {
                    deep_decode: Some(deep),
                    k_splits: splits,
                    ..own_t
                };
                forms.push((format!("{depth} split {}", splits_label(splits)), form));
            }
        }
        for splits in [None, Some(1), Some(2), Some(4)] {
            let form = LaunchForm {
                direct_decode: true,
                k_splits: splits,
                ..LaunchForm::default()
            };
            forms.push((format!("direct split {}", splits_label(splits)), form));
        }
        return forms;
    }
    // The shared shrink on the mma.sync tiles, whatever the dispatch picks.
    let shared = LaunchForm {
        wgmma: Some(false),
        ..LaunchForm::default()
    };
    let unsplit = LaunchForm {
        k_splits: Some(1),
        ..LaunchForm::default()
    };
    forms.push(("shared".to_string(), shared));
    forms.push(("split 1".to_string(), unsplit));
    for col_tiles in [1, 2, 4] {
        let own = LaunchForm {
            col_tiles: Some(col_tiles),
            ..own_t
        };
        let wgmma = LaunchForm {
            col_tiles: Some(col_tiles),
            wgmma: Some(true),
            ..LaunchForm::default()
        };
        forms.push((format!("own t {col_tiles}"), own));
        forms.push((format!("wgmma {col_tiles}"), wgmma));
    }
    forms
}

/// The multi-adapter forward's forms: with and without shrink blocks; at
/// decode, 16- or 64-row tiles and each split count, and the 16-row tiles
/// with `w` loaded straight into registers; at prefill, the wgmma
/// tile blocks, each shrink unit's passes on one warp (one share), and the
/// mma.sync tiles unsplit.
/// At n x k, rank 16, tokens on adapters in contiguous groups.
fn multi_sweep(dev: &Device, n: usize, k: usize) -> Res<serde_json::Value> {
    println!(
        "   {:>5} {:>5} {:>6} {:>8} {:>24} {:>10}",
        "n", "k", "tokens", "adapters", "form", "ours us"
    );
    let mut rows = Vec::new();
    let mut inputs = Inputs::<bf16>::new(dev, n, k, 4096)?;
    // 1024 and 4096 tokens: either side of the wgmma tile blocks' limit
    // (528 tiles on 132 SMs, ops::wgmma_dispatch) at n = 4096 and 14336.
    let shapes = [
        (16usize, 8usize),
        (16, 16),
        (64, 8),
        (64, 64),
        (256, 64),
        (1024, 64),
        (4096, 64),
    ];
    for (m, distinct) in shapes {
        let regime = regime_for(DType::BF16, m);
        let pool = loaded_pool(dev, n, k, distinct, Some(16))?;
        pool.reserve_tokens(m)?;
        let ids: Vec<i32> = (0..m).map(|i| (i * distinct / m) as i32).collect();
        let ids = dev.upload(&ids)?;
        let routing = Routing::Tokens((&ids).into());
        let mut i = 0;
        for (label, form) in multi_forms(regime) {
            let dims = Dims::new(m, n, k);
            let launch = (regime, form, &pool, &routing);
            match time_tuned(dev, &mut inputs, dims, launch, &mut i) {
                Ok(t) => {
                    println!(
                        "   {n:>5} {k:>5} {m:>6} {distinct:>8} {label:>24} {:>10.1}",
                        t.median_us
                    );
                    rows.push(json!({
                        "n": n, "k": k, "tokens": m, "adapters": distinct, "rank": 16,
                        "form": label, "ours_us": t.median_us,
                    }));
                }
                Err(e) => {
                    println!("   {n:>5} {k:>5} {m:>6} {distinct:>8} {label:>24} not launched: {e}")
                }
            }
        }
    }
    let best = best_per_shape(&rows, &["n", "k", "tokens", "adapters"], "form");
    Ok(json!({ "rows": rows, "best": best }))
}

/// Every multi-adapter launch form worth timing in `regime`, labelled.
fn multi_forms(regime: Regime) -> Vec<(String, multi_op::LaunchForm)> {
    let mut forms = vec![("default".to_string(), multi_op::LaunchForm::default())];
    for shrink_blocks in [true, false] {
        let blocks = if shrink_blocks {
            "shrink blocks"
        } else {
            "no shrink blocks"
        };
        let plain = multi_op::LaunchForm {
            shrink_blocks,
            ..multi_op::LaunchForm::default()
        };
        if regime == Regime::Prefill {
            // The mma.sync tiles, whatever the dispatch picks.
            let plain = multi_op::LaunchForm {
                wgmma: Some(false),
                ..plain
            };
            forms.push((blocks.to_string(), plain));
            let wgmma = multi_op::LaunchForm {
                wgmma: Some(true),
                ..plain
            };
            forms.push((format!("{blocks}, wgmma"), wgmma));
            if shrink_blocks {
                // A shrink unit's passes on one warp, as before they were
                // shared out, and the mma.sync tiles unsplit: what the
                // shares and split-K are worth.
                let one_share = |form| multi_op::LaunchForm {
                    shrink_shares: Some(1),
                    ..form
                };
                forms.push((format!("{blocks}, 1 share"), one_share(plain)));
                forms.push((format!("{blocks}, wgmma, 1 share"), one_share(wgmma)));
                let unsplit = multi_op::LaunchForm {
                    k_splits: Some(1),
                    ..plain
                };
                forms.push((format!("{blocks}, split 1"), unsplit));
            }
            continue;
        }
        for wide in [false, true] {
            for splits in [None, Some(1), Some(2), Some(4)] {
                let label = format!(
                    "{blocks}, {} rows, split {}",
                    if wide { 64 } else { 16 },
                    splits.map_or("auto".to_string(), |s| s.to_string())
                );
                let form = multi_op::LaunchForm {
                    wide_tiles: Some(wide),
                    k_splits: splits,
                    ..plain
                };
                forms.push((label, form));
            }
        }
        for splits in [None, Some(1), Some(2), Some(4)] {
            let label = format!(
                "{blocks}, direct, split {}",
                splits.map_or("auto".to_string(), |s| s.to_string())
            );
            let form = multi_op::LaunchForm {
                direct_loads: true,
                k_splits: splits,
                ..plain
            };
            forms.push((label, form));
        }
    }
    forms
}

/// For each shape (the values of `keys`), the fastest form and the
/// default's time beside it; printed and returned.
fn best_per_shape(rows: &[serde_json::Value], keys: &[&str], form: &str) -> Vec<serde_json::Value> {
    let mut shapes: Vec<Vec<serde_json::Value>> = Vec::new();
    for row in rows {
        let shape: Vec<_> = keys.iter().map(|k| row[*k].clone()).collect();
        if !shapes.contains(&shape) {
            shapes.push(shape);
        }
    }
    println!(
        "   best per shape ({}): form, us, default us, default / best",
        keys.join(", ")
    );
    let mut best = Vec::new();
    for shape in shapes {
        let of_shape = rows
            .iter()
            .filter(|row| keys.iter().zip(&shape).all(|(k, v)| &row[*k] == v));
        let us = |row: &serde_json::Value| row["ours_us"].as_f64().unwrap_or(f64::INFINITY);
        let Some(fastest) = of_shape.clone().min_by(|a, b| us(a).total_cmp(&us(b))) else {
            continue;
        };
        let default_us = of_shape
            .clone()
            .find(|row| row[form] == "default")
            .map_or(f64::NAN, us);
        let label = fastest[form].as_str().unwrap_or("?");
        println!(
            "   {:>24} {label:>28} {:>10.1} {default_us:>10.1} {:>7.2}",
            shape
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(" "),
            us(fastest),
            default_us / us(fastest)
        );
        let mut entry = serde_json::Map::new();
        for (k, v) in keys.iter().zip(&shape) {
            entry.insert((*k).to_string(), v.clone());
        }
        entry.insert("best".into(), json!(label));
        entry.insert("best_us".into(), json!(us(fastest)));
        entry.insert("default_us".into(), json!(default_us));
        best.push(serde_json::Value::Object(entry));
    }
    best
}
