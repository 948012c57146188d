//! PEFT adapter directories across a model (`lora_kernels::peft`): what a
//! loaded directory serves, against the reference computed from the same
//! files; rsLoRA, rank and alpha patterns, fan_in_fan_out; saving from the
//! pools and from the optimizer's masters; round trips bit for bit.
//! Bad input: tests/peft_errors.rs.
mod common;

use std::collections::BTreeMap;

use common::peft_files::{Expect, Lora, check_serves, safetensors_bytes, temp_dir, write_dir};
use common::{devices, random, rng};
use half::{bf16, f16};
use lora_kernels::ops::adamw::{AdamWConfig, SlotHyper, SlotOptimizer};
use lora_kernels::peft::{
    AdapterSet, LoadOptions, ModuleAdapter, ModuleSpec, PeftAdapter, PeftConfig, STATE_FILE,
    lora_scale,
};
use lora_kernels::{DType, Device, Element, KernelElement};
use safetensors::Dtype;
use serde_json::json;

/// A two-layer Llama-shaped model: q (K -> K), v (K -> KV), down (I -> K),
/// sizes that are multiples of no tile.
const K: usize = 40;
const KV: usize = 24;
const I: usize = 56;

fn llama_modules() -> Vec<(String, ModuleSpec)> {
    (0..2)
        .flat_map(|l| {
            [
                (
                    format!("model.layers.{l}.self_attn.q_proj"),
                    ModuleSpec::linear(K, K),
                ),
                (
                    format!("model.layers.{l}.self_attn.v_proj"),
                    ModuleSpec::linear(K, KV),
                ),
                (
                    format!("model.layers.{l}.mlp.down_proj"),
                    ModuleSpec::linear(I, K),
                ),
            ]
        })
        .collect()
}

/// The config of the test adapter: r 8, alpha 16, a rank pattern on layer
/// 1's q_proj and on every down_proj, an alpha pattern on v_proj.
fn patterned_config(use_rslora: bool) -> serde_json::Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-llama",
        "r": 8,
        "lora_alpha": 16,
        "use_rslora": use_rslora,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {"layers.1.self_attn.q_proj": 4, "down_proj": 3},
        "alpha_pattern": {"v_proj": 5},
        "lora_dropout": 0.05,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_dora": false,
        "modules_to_save": null,
        "init_lora_weights": true
    })
}

/// Rank and alpha per module as PEFT resolves `patterned_config`.
fn patterned_rank_alpha(path: &str) -> (usize, f64) {
    if path.ends_with("down_proj") {
        (3, 16.0)
    } else if path == "model.layers.1.self_attn.q_proj" {
        (4, 16.0)
    } else if path.ends_with("v_proj") {
        (8, 5.0)
    } else {
        (8, 16.0)
    }
}

/// Random weights for every module of the model, ranks from
/// `patterned_rank_alpha`, values as a `dtype` file holds them.
fn model_loras(seed: u64, dtype: Dtype) -> Vec<Lora> {
    let mut r = rng(seed);
    llama_modules()
        .iter()
        .map(|(path, spec)| {
            let rank = patterned_rank_alpha(path).0;
            Lora::random(
                &mut r,
                path,
                spec.in_features,
                spec.out_features,
                rank,
                dtype,
            )
        })
        .collect()
}

fn write_patterned(dir: &std::path::Path, loras: &[Lora], use_rslora: bool, infix: Option<&str>) {
    let tensors: Vec<_> = loras
        .iter()
        .flat_map(|l| l.tensors(Dtype::BF16, infix))
        .collect();
    write_dir(
        dir,
        &patterned_config(use_rslora),
        &safetensors_bytes(&tensors),
    );
}

/// Base weights `[n, k]` per module.
fn base_weights<T: Element>(seed: u64) -> BTreeMap<String, Vec<T>> {
    let mut r = rng(seed);
    (llama_modules().into_iter())
        .map(|(p, s)| (p, random(&mut r, s.out_features * s.in_features)))
        .collect()
}

/// The scale off by the smallest error each dtype must catch.
fn off_factor<T: Element>() -> f32 {
    match T::DTYPE {
        DType::BF16 => 1.01,
        DType::F16 => 1.003,
        _ => 1.0001,
    }
}

/// Loads the patterned adapter (bf16 file, adapter-name infix) into slot 3
/// of a set whose slot 1 holds another adapter, and serves a batch mixing
/// slot 3, slot 1 and the base model from every module: each within the
/// bound of the reference computed from the file's own values and PEFT's
/// scales, and each off-scale reference rejected.
fn patterned_adapter_serves<T: KernelElement>(dev: &Device, use_rslora: bool) {
    let dir = temp_dir(&format!("serve-{:?}-{use_rslora}", T::DTYPE));
    let loras = model_loras(7, Dtype::BF16);
    write_patterned(&dir, &loras, use_rslora, Some("default"));

    let mut set = AdapterSet::<T>::new(dev, 5, 16, llama_modules()).unwrap();
    // Slot 1: another user's adapter (rank 2 everywhere, scale 0.75).
    let other: Vec<Lora> = {
        let mut r = rng(99);
        (llama_modules().iter())
            .map(|(p, s)| Lora::random(&mut r, p, s.in_features, s.out_features, 2, Dtype::F32))
            .collect()
    };
    let other_adapter = adapter_of(&other, 0.75);
    set.load(1, &other_adapter, LoadOptions::default()).unwrap();
    // Slot 3 first held the other adapter too: the load replaces it everywhere.
    set.load(3, &other_adapter, LoadOptions::default()).unwrap();
    let report = set.load_dir(3, &dir, LoadOptions::default()).unwrap();
    assert_eq!(report.loaded.len(), 6);
    assert!(
        report.emptied.is_empty() && report.warnings.is_empty(),
        "{report:?}"
    );

    let w = base_weights::<T>(11);
    let ids = [3, 1, -1, 3, 3, 1, -1];
    for (i, lora) in loras.iter().enumerate() {
        let (rank, alpha) = patterned_rank_alpha(&lora.path);
        let scale = (if use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }) as f32;
        assert_eq!(set.pool(&lora.path).unwrap().rank(3), Some(rank));
        let expect = |factor: f32| {
            let e = [
                Expect {
                    slot: 3,
                    lora,
                    scale,
                },
                Expect {
                    slot: 1,
                    lora: &other[i],
                    scale: 0.75,
                },
            ];
            check_serves(
                &set,
                &lora.path,
                &w[&lora.path],
                &ids,
                &e,
                factor,
                20 + i as u64,
            )
        };
        expect(1.0).unwrap();
        assert!(
            expect(off_factor::<T>()).is_err(),
            "{}: off-scale reference passed",
            lora.path
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// An adapter of these modules, one scale for all.
fn adapter_of(loras: &[Lora], scale: f32) -> PeftAdapter {
    let modules = loras
        .iter()
        .map(|l| {
            let m = ModuleAdapter {
                rank: l.rank,
                in_features: l.in_features,
                out_features: l.out_features,
                scale,
                a: l.a.clone(),
                b: l.b.clone(),
            };
            (l.path.clone(), m)
        })
        .collect();
    PeftAdapter::from_modules(modules, false, false).unwrap()
}

#[test]
fn a_peft_directory_serves_like_its_reference_f32() {
    for dev in devices() {
        patterned_adapter_serves::<f32>(&dev, false);
    }
}

#[test]
fn a_peft_directory_serves_like_its_reference_f16() {
    for dev in devices() {
        patterned_adapter_serves::<f16>(&dev, false);
    }
}

#[test]
fn a_peft_directory_serves_like_its_reference_bf16() {
    for dev in devices() {
        patterned_adapter_serves::<bf16>(&dev, false);
    }
}

#[test]
fn rslora_directory_serves_like_its_reference() {
    for dev in devices() {
        patterned_adapter_serves::<bf16>(&dev, true);
        patterned_adapter_serves::<f32>(&dev, true);
    }
}

/// The scale arithmetic, and the patterns matched as PEFT matches them:
/// `^(.*\.)?(key)$`, first key in file order.
#[test]
fn ranks_alphas_and_targets_resolve_like_peft() {
    assert_eq!(lora_scale(16.0, 8, false), 2.0);
    assert_eq!(lora_scale(8.0, 16, true), 2.0);
    assert_eq!(lora_scale(5.0, 3, false), (5.0f64 / 3.0) as f32);
    let config = PeftConfig::from_json(
        &json!({
            "r": 8, "lora_alpha": 32,
            "target_modules": ["q_proj", "v_proj"],
            "rank_pattern": {"layers.1.self_attn.q_proj": 4, "q_proj": 2, "^model.layers.2.*": 6},
            "alpha_pattern": {"model\\.layers\\.0\\.self_attn\\.v_proj": 7.5},
            "layers_to_transform": [0, 1, 3],
            "layers_pattern": "layers",
            "exclude_modules": ["model.layers.3.self_attn.q_proj"]
        })
        .to_string(),
        "adapter_config.json",
    )
    .unwrap();
    let ra = |p: &str| config.rank_and_alpha(p);
    assert_eq!(ra("model.layers.1.self_attn.q_proj"), (4, 32.0)); // first match wins
    assert_eq!(ra("model.layers.0.self_attn.q_proj"), (2, 32.0));
    assert_eq!(ra("model.layers.11.self_attn.q_proj"), (2, 32.0)); // "layers.1." is not "layers.11."
    assert_eq!(ra("model.layers.0.self_attn.xq_proj"), (8, 32.0)); // whole components only
    assert_eq!(ra("model.layers.0.self_attn.v_proj"), (8, 7.5));
    assert_eq!(ra("model.layers.2.self_attn.q_proj"), (2, 32.0)); // "q_proj" comes before "^model.layers.2.*"
    assert_eq!(ra("model.layers.2.self_attn.k_proj"), (6, 32.0));
    assert!(config.targets("model.layers.0.self_attn.q_proj"));
    assert!(config.targets("model.layers.1.self_attn.v_proj"));
    assert!(!config.targets("model.layers.2.self_attn.q_proj")); // layers_to_transform
    assert!(!config.targets("model.layers.3.self_attn.q_proj")); // exclude_modules
    assert!(config.targets("model.layers.3.self_attn.v_proj"));
    assert!(!config.targets("model.layers.0.self_attn.k_proj"));
    let regex = PeftConfig::from_json(
        r#"{"r": 4, "target_modules": ".*\\.(q|v)_proj"}"#,
        "adapter_config.json",
    )
    .unwrap();
    assert!(regex.targets("model.layers.0.self_attn.q_proj"));
    assert!(!regex.targets("model.layers.0.self_attn.q_proj.base")); // fullmatch
    assert!(!regex.targets("model.layers.0.self_attn.k_proj"));
}

/// Load, save, load: the second load is the first bit for bit (pools and
/// files), with rsLoRA and rank and alpha patterns; the saved config gives
/// PEFT's r, alpha and patterns back.
#[test]
fn save_and_load_round_trip_bit_for_bit() {
    for dev in devices() {
        for use_rslora in [false, true] {
            let dir = temp_dir(&format!("round-trip-{use_rslora}"));
            let loras = model_loras(3, Dtype::BF16);
            write_patterned(&dir.join("original"), &loras, use_rslora, None);
            let mut set = AdapterSet::<bf16>::new(&dev, 4, 8, llama_modules()).unwrap();
            set.load_dir(0, dir.join("original"), LoadOptions::default())
                .unwrap();
            set.save(0, dir.join("saved")).unwrap();
            set.load_dir(2, dir.join("saved"), LoadOptions::default())
                .unwrap();
            for (path, _, pool) in set.modules() {
                assert_eq!(pool.adapter(0).unwrap(), pool.adapter(2).unwrap(), "{path}");
            }
            set.save(2, dir.join("again")).unwrap();
            for file in ["adapter_model.safetensors", "adapter_config.json"] {
                let read = |d: &str| std::fs::read(dir.join(d).join(file)).unwrap();
                assert_eq!(read("saved"), read("again"), "{file}");
            }
            // The saved files hold the original's values, ranks and scales.
            let original = PeftAdapter::read_dir(dir.join("original")).unwrap();
            let saved = PeftAdapter::read_dir(dir.join("saved")).unwrap();
            assert_eq!(original.modules, saved.modules);
            assert_eq!(saved.config.use_rslora, use_rslora);
            let json: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir.join("saved/adapter_config.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(json["r"], 8);
            assert_eq!(json["peft_type"], "LORA");
            let rank_pattern = json["rank_pattern"].as_object().unwrap();
            assert_eq!(rank_pattern.len(), 3, "{rank_pattern:?}"); // 2 down_proj + layer 1 q_proj
            std::fs::remove_dir_all(&dir).ok();
        }
    }
}

/// GPT-2's Conv1D keeps its weight `[in, out]` (fan_in_fan_out); lora_A and
/// lora_B keep their usual shapes. Served with the base weight transposed by
/// `ModuleSpec::kernel_weight`, y = x W_conv + s (x A^T) B^T.
#[test]
fn fan_in_fan_out_modules_serve_the_conv1d_product() {
    let (path, in_f, out_f, rank) = ("transformer.h.0.attn.c_attn", 40, 72, 4);
    for dev in devices() {
        let dir = temp_dir("conv1d");
        let mut r = rng(5);
        let lora = Lora::random(&mut r, path, in_f, out_f, rank, Dtype::F32);
        let config = json!({"r": rank, "lora_alpha": 6, "target_modules": ["c_attn"], "fan_in_fan_out": true});
        write_dir(
            &dir,
            &config,
            &safetensors_bytes(&lora.tensors(Dtype::F32, None)),
        );
        let spec = ModuleSpec::conv1d(in_f, out_f);
        let mut set = AdapterSet::<f32>::new(&dev, 2, 8, [(path.to_string(), spec)]).unwrap();
        let report = set.load_dir(1, &dir, LoadOptions::default()).unwrap();
        assert!(report.warnings.is_empty(), "{report:?}");
        // Conv1D's weight [in, out], and the same transposed by hand.
        let w_conv: Vec<f32> = random(&mut r, in_f * out_f);
        let w_kernel = spec.kernel_weight(&w_conv).unwrap();
        for o in 0..out_f {
            for i in 0..in_f {
                assert_eq!(w_kernel[o * in_f + i], w_conv[i * out_f + o]);
            }
        }
        let e = [Expect {
            slot: 1,
            lora: &lora,
            scale: 1.5,
        }];
        check_serves(&set, path, &w_kernel, &[1, -1, 1], &e, 1.0, 8).unwrap();
        assert!(check_serves(&set, path, &w_kernel, &[1, -1, 1], &e, 1.0001, 8).is_err());
        // Saving keeps the flag.
        set.save(1, dir.join("saved")).unwrap();
        assert!(
            PeftAdapter::read_dir(dir.join("saved"))
                .unwrap()
                .config
                .fan_in_fan_out
        );
        // A set that calls the module a Linear is told the flag disagrees.
        let mut linear = AdapterSet::<f32>::new(
            &dev,
            2,
            8,
            [(path.to_string(), ModuleSpec::linear(in_f, out_f))],
        )
        .unwrap();
        let report = linear.load_dir(0, &dir, LoadOptions::default()).unwrap();
        assert_eq!(report.warnings.len(), 1, "{report:?}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// A set with every module's adapter in slot 2, loaded through an optimizer
/// per pool that has taken one step from random gradients.
fn trained_set(dev: &Device) -> (AdapterSet<bf16>, BTreeMap<String, SlotOptimizer>, Vec<Lora>) {
    let loras = model_loras(4, Dtype::F32);
    let mut set = AdapterSet::<bf16>::new(dev, 3, 8, llama_modules()).unwrap();
    let mut optimizers = BTreeMap::new();
    for lora in &loras {
        let pool = set.pool_mut(&lora.path).unwrap();
        let mut opt = SlotOptimizer::new(pool, AdamWConfig::default()).unwrap();
        opt.load_adapter(pool, 2, &lora.a, &lora.b, lora.rank, 1.25, TRAIN)
            .unwrap();
        let cfg = pool.config();
        let mut r = rng(lora.rank as u64);
        let ga = dev
            .upload(&random::<f32>(&mut r, cfg.slots * cfg.max_rank * cfg.k))
            .unwrap();
        let gb = dev
            .upload(&random::<f32>(&mut r, cfg.slots * cfg.n * cfg.max_rank))
            .unwrap();
        opt.step(pool, &ga, &gb).unwrap();
        optimizers.insert(lora.path.clone(), opt);
    }
    (set, optimizers, loras)
}

const TRAIN: SlotHyper = SlotHyper {
    lr: 0.01,
    weight_decay: 0.0,
    max_grad_norm: 0.0,
    anchor_pull: 0.0,
};

/// A trained adapter saved from the optimizer's f32 masters holds exactly
/// the masters; saved from the pools, their storage-type rounding.
#[test]
fn trained_adapters_save_from_masters_and_from_pools() {
    for dev in devices() {
        let dir = temp_dir("masters");
        let (set, optimizers, loras) = trained_set(&dev);
        let masters = set.masters(2, |p| optimizers.get(p)).unwrap().unwrap();
        masters.write_dir(dir.join("masters"), DType::F32).unwrap();
        let back = PeftAdapter::read_dir(dir.join("masters")).unwrap();
        for (path, opt) in &optimizers {
            let (a, b) = opt.master(set.pool(path).unwrap(), 2).unwrap();
            let m = &back.modules[path];
            assert_eq!((&m.a, &m.b, m.scale), (&a, &b, 1.25), "{path}");
            // The step moved the weights: the file is not the initial adapter.
            assert_ne!(m.a, loras.iter().find(|l| &l.path == path).unwrap().a);
            let pool_copy = set.pool(path).unwrap().adapter(2).unwrap().unwrap();
            let rounded_a: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
            assert_eq!(pool_copy.a, rounded_a, "{path}");
        }
        // A module whose optimizer is missing is named.
        let one_short = set.masters(2, |p| {
            optimizers.get(p).filter(|_| !p.ends_with("down_proj"))
        });
        let err = one_short.unwrap_err().to_string();
        assert!(err.contains("down_proj"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// Masters saved in f32 and loaded for training into another slot continue
/// from the very same weights (masters bit for bit, the pools' rounding
/// too), with the step count restarted; a missing optimizer is an error
/// naming the module that changes nothing.
#[test]
fn saved_masters_load_for_training_bit_for_bit() {
    for dev in devices() {
        let dir = temp_dir("resume");
        let (mut set, mut optimizers, _) = trained_set(&dev);
        let saved = set.masters(2, |p| optimizers.get(p)).unwrap().unwrap();
        saved.write_dir(&dir, DType::F32).unwrap();
        let back = PeftAdapter::read_dir(&dir).unwrap();

        let mut one_short: BTreeMap<_, _> = std::mem::take(&mut optimizers);
        let (down, down_opt) = one_short.pop_last().unwrap();
        let err = set
            .load_for_training(0, &back, LoadOptions::default(), TRAIN, &mut one_short)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&down), "{err}");
        assert!(
            set.adapter(0).unwrap().is_none(),
            "a failed load wrote slot 0"
        );
        one_short.insert(down, down_opt);
        optimizers = one_short;

        let report = set
            .load_for_training(0, &back, LoadOptions::default(), TRAIN, &mut optimizers)
            .unwrap();
        assert_eq!(report.loaded.len(), optimizers.len());
        for (path, opt) in &optimizers {
            let pool = set.pool(path).unwrap();
            assert_eq!(opt.master(pool, 0).unwrap(), opt.master(pool, 2).unwrap());
            let (at0, at2) = (pool.adapter(0).unwrap(), pool.adapter(2).unwrap());
            assert_eq!(at0.unwrap().a, at2.unwrap().a, "{path}");
            assert_eq!(opt.steps().unwrap()[..], [0, 0, 1], "{path}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// A slot saved for training (masters + optimizer state) and loaded back
/// into another slot continues exactly as the original under the same
/// gradients. A directory without the state file starts the moments afresh
/// and says so; a state file with a stray key or a wrong shape is an error
/// naming the file and key that changes nothing.
#[test]
fn saved_training_resumes_exactly() {
    for dev in devices() {
        let dir = temp_dir("resume-state");
        let (mut set, mut optimizers, _) = trained_set(&dev);
        set.save_for_training(2, &dir, &optimizers).unwrap();
        let report = set
            .load_dir_for_training(0, &dir, LoadOptions::default(), TRAIN, &mut optimizers)
            .unwrap();
        assert!(report.optimizer_state);
        for (path, opt) in &mut optimizers {
            let pool = set.pool_mut(path).unwrap();
            assert_eq!(
                opt.state(pool, 0).unwrap(),
                opt.state(pool, 2).unwrap(),
                "{path}"
            );
            // The same gradient for slots 0 and 2.
            let cfg = pool.config();
            let (sa, sb) = (cfg.max_rank * cfg.k, cfg.n * cfg.max_rank);
            let mut r = rng(9);
            let (one_a, one_b) = (random::<f32>(&mut r, sa), random::<f32>(&mut r, sb));
            let ga: Vec<f32> = [&one_a[..], &vec![0.0; sa], &one_a[..]].concat();
            let gb: Vec<f32> = [&one_b[..], &vec![0.0; sb], &one_b[..]].concat();
            opt.step(pool, &dev.upload(&ga).unwrap(), &dev.upload(&gb).unwrap())
                .unwrap();
            assert_eq!(
                opt.master(pool, 0).unwrap(),
                opt.master(pool, 2).unwrap(),
                "{path}"
            );
            assert_eq!(opt.steps().unwrap()[..], [2, 0, 2], "{path}");
        }

        // Without the state file: fresh moments, reported.
        let weights_only = dir.join("weights-only");
        set.masters(2, |p| optimizers.get(p))
            .unwrap()
            .unwrap()
            .write_dir(&weights_only, DType::F32)
            .unwrap();
        let report = set
            .load_dir_for_training(
                1,
                &weights_only,
                LoadOptions::default(),
                TRAIN,
                &mut optimizers,
            )
            .unwrap();
        assert!(!report.optimizer_state);
        assert!(optimizers.values().all(|o| o.steps().unwrap()[1] == 0));
        set.evict(1).unwrap();

        // A broken state file (a part with the wrong shape; a stray key):
        // an error naming file and key, and nothing changes.
        let state_path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&state_path).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let entries = tensors.tensors();
        let victim = entries
            .iter()
            .position(|(k, _)| k.ends_with("lora_B.exp_avg"))
            .unwrap();
        let view = &entries[victim].1;
        let mut shape = view.shape().to_vec();
        shape.swap(0, 1);
        let transposed =
            safetensors::tensor::TensorView::new(view.dtype(), shape, view.data()).unwrap();
        let stray_key = "base_model.model.lm_head.lora_A.exp_avg".to_string();
        let mut wrong_shape = entries.clone();
        wrong_shape[victim].1 = transposed;
        let mut stray = entries.clone();
        stray.push((stray_key.clone(), entries[0].1.clone()));
        for (broken, key) in [(wrong_shape, entries[victim].0.clone()), (stray, stray_key)] {
            std::fs::write(&state_path, safetensors::serialize(broken, None).unwrap()).unwrap();
            let err = set
                .load_dir_for_training(1, &dir, LoadOptions::default(), TRAIN, &mut optimizers)
                .unwrap_err()
                .to_string();
            assert!(err.contains(STATE_FILE) && err.contains(&key), "{err}");
            assert!(
                set.adapter(1).unwrap().is_none(),
                "a refused load wrote slot 1"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// Loading into a slot empties it in the pools the adapter does not cover
/// (no earlier adapter stays mixed in); other slots serve bit-identical
/// results before and after; evict empties every pool.
#[test]
fn loads_replace_a_slot_everywhere_and_touch_no_other_slot() {
    for dev in devices() {
        let mut set = AdapterSet::<f16>::new(&dev, 3, 8, llama_modules()).unwrap();
        let everywhere = model_loras(8, Dtype::F16);
        set.load(1, &adapter_of(&everywhere, 1.5), LoadOptions::default())
            .unwrap();
        set.load(0, &adapter_of(&everywhere, 0.5), LoadOptions::default())
            .unwrap();
        let serve = |set: &AdapterSet<f16>, path: &str| {
            let pool = set.pool(path).unwrap();
            let cfg = pool.config();
            let m = 5;
            let x = dev.upload(&random::<f16>(&mut rng(1), m * cfg.k)).unwrap();
            let w = dev
                .upload(&random::<f16>(&mut rng(2), cfg.n * cfg.k))
                .unwrap();
            let ids = dev.upload(&[0i32, 0, -1, 0, -1]).unwrap();
            let mut y = dev.zeros::<f16>(m * cfg.n).unwrap();
            lora_kernels::ops::multi_adapter_forward::multi_adapter_forward(
                pool,
                m,
                &x,
                &w,
                &lora_kernels::ops::multi_adapter_forward::Routing::Tokens((&ids).into()),
                0.0,
                &mut y,
            )
            .unwrap();
            dev.download(&y).unwrap()
        };
        let before: Vec<_> = llama_modules()
            .iter()
            .map(|(p, _)| serve(&set, p))
            .collect();
        // Only the q_proj modules.
        let q_only: Vec<Lora> = everywhere
            .iter()
            .filter(|l| l.path.ends_with("q_proj"))
            .cloned()
            .collect();
        let report = set
            .load(1, &adapter_of(&q_only, 2.0), LoadOptions::default())
            .unwrap();
        assert_eq!(report.loaded.len(), 2);
        assert_eq!(report.emptied.len(), 4);
        for (path, _, pool) in set.modules() {
            assert_eq!(pool.rank(1).is_some(), path.ends_with("q_proj"), "{path}");
        }
        let after: Vec<_> = llama_modules()
            .iter()
            .map(|(p, _)| serve(&set, p))
            .collect();
        assert_eq!(before, after, "slot 0's tokens changed");
        set.evict(1).unwrap();
        assert!(set.modules().all(|(_, _, pool)| pool.rank(1).is_none()));
        assert!(set.adapter(1).unwrap().is_none());
        assert!(set.save(1, temp_dir("empty-slot")).is_err());
    }
}
