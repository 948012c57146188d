//! Adapters written by HF PEFT itself (tests/fixtures/peft, made by
//! `scripts/peft-interop.py make-fixtures` with PEFT 0.21.2 and torch on the
//! CPU): each loads into an `AdapterSet`, and PEFT's own outputs for the
//! fixture's inputs agree with the reference computed from what the set
//! loaded (DESIGN.md section 3's bound, which PEFT's f32 matmuls meet too);
//! the kernels serve the same within the same bound; a 0.01% scale error is
//! caught. The crate's save of each fixture is left in the temp directory
//! for `scripts/peft-interop.py check-saved`, where PEFT loads it back.
mod common;

use std::path::{Path, PathBuf};

use common::peft_files::{Expect, Lora, check_serves};
use common::{compare_within, devices, forward_bound};
use lora_kernels::Dims;
use lora_kernels::peft::{AdapterSet, LoadOptions, ModuleSpec, PeftAdapter};
use lora_kernels::reference::{self, Adapter};
use safetensors::SafeTensors;

/// The fixture's directory: in the source tree the binary was built from,
/// else under the current directory (a test binary copied to another
/// machine, as scripts/gpu-check does, runs from the repository root).
fn fixture(case: &str) -> PathBuf {
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft");
    let dir = if built_from.is_dir() {
        built_from
    } else {
        PathBuf::from("tests/fixtures/peft")
    };
    dir.join(case)
}

fn f32s(st: &SafeTensors, key: &str) -> Vec<f32> {
    let view = st
        .tensor(key)
        .unwrap_or_else(|_| panic!("{key} in expected.safetensors"));
    view.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// PEFT's outputs against the reference from what the set loaded, and the
/// kernels' against the same reference.
fn matches_peft(case: &str, conv1d: bool, scales: &[(&str, f32)]) {
    let dir = fixture(case);
    let adapter = PeftAdapter::read_dir(&dir).unwrap();
    let modules: Vec<(String, ModuleSpec)> = (adapter.modules.iter())
        .map(|(p, m)| {
            let spec = if conv1d {
                ModuleSpec::conv1d
            } else {
                ModuleSpec::linear
            };
            (p.clone(), spec(m.in_features, m.out_features))
        })
        .collect();
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let expected = SafeTensors::deserialize(&bytes).unwrap();
    for dev in devices() {
        let mut set = AdapterSet::<f32>::new(&dev, 3, 8, modules.clone()).unwrap();
        let report = set.load(2, &adapter, LoadOptions::default()).unwrap();
        assert!(report.warnings.is_empty(), "{report:?}");
        for (path, pool) in modules.iter().map(|(p, _)| (p, set.pool(p).unwrap())) {
            let loaded = pool.adapter(2).unwrap().unwrap();
            // PEFT's scale for this module, worked out by hand from the config.
            let scale = scales.iter().find(|(p, _)| path.ends_with(p)).unwrap().1;
            assert_eq!(loaded.scale, scale, "{path}");
            let (x, w, y_peft) = (
                f32s(&expected, &format!("{path}.x")),
                f32s(&expected, &format!("{path}.weight_out_in")),
                f32s(&expected, &format!("{path}.y")),
            );
            let cfg = pool.config();
            let dims = Dims::new(x.len() / cfg.k, cfg.n, cfg.k);
            let agree = |factor: f32| {
                let ad = Adapter {
                    a: &loaded.a,
                    b: &loaded.b,
                    rank: loaded.rank,
                    scale: scale * factor,
                };
                let mut want = vec![f32::NAN; dims.m * dims.n];
                reference::fused_forward(dims, &x, &w, &ad, 0.0, &mut want).unwrap();
                let bound = forward_bound(dims, &x, &w, &vec![Some(ad); dims.m], 0.0, &[], &want);
                compare_within(&format!("{case} {path}: PEFT's y"), &y_peft, &want, &bound)
            };
            agree(1.0).unwrap();
            assert!(
                agree(1.0001).is_err(),
                "{path}: an off-scale reference passed"
            );
            let lora = Lora {
                path: path.clone(),
                rank: loaded.rank,
                in_features: cfg.k,
                out_features: cfg.n,
                a: loaded.a.clone(),
                b: loaded.b.clone(),
            };
            let e = [Expect {
                slot: 2,
                lora: &lora,
                scale,
            }];
            check_serves(&set, path, &w, &[2, -1, 2, 2], &e, 1.0, 3).unwrap();
        }
        let saved = std::env::temp_dir()
            .join("lora-kernels-peft-resave")
            .join(case);
        set.save(2, &saved).unwrap();
        assert_eq!(
            PeftAdapter::read_dir(&saved).unwrap().modules,
            adapter.modules
        );
    }
}

#[test]
fn llama_adapter_with_rank_and_alpha_patterns_matches_peft() {
    // r 8, alpha 16; rank_pattern layers.1.self_attn.q_proj: 4, down_proj: 3;
    // alpha_pattern v_proj: 5.
    matches_peft(
        "llama_patterns",
        false,
        &[
            ("layers.0.self_attn.q_proj", 2.0),
            ("layers.1.self_attn.q_proj", 4.0),
            ("v_proj", (5.0f64 / 8.0) as f32),
            ("down_proj", (16.0f64 / 3.0) as f32),
        ],
    );
}

#[test]
fn gpt2_conv1d_adapter_with_rslora_matches_peft() {
    // r 6, alpha 9, rsLoRA: 9 / sqrt(6).
    matches_peft(
        "gpt2_fan_in_fan_out_rslora",
        true,
        &[("c_attn", (9.0 / 6f64.sqrt()) as f32)],
    );
}
