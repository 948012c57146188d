//! Bad PEFT input: every case gives an `Err` that names the file and the key
//! (or field) at fault, and leaves every pool of the set as it was (all or
//! nothing), including the slot the load aimed at.
mod common;

use common::peft_files::{Lora, Tensor, safetensors_bytes, temp_dir, write_dir};
use common::rng;
use half::f16;
use lora_kernels::peft::{AdapterSet, LoadOptions, ModuleSpec, PeftAdapter};
use lora_kernels::{Device, Error, KernelElement, SlotAdapter};
use safetensors::Dtype;
use serde_json::{Value, json};

const Q: &str = "model.layers.0.self_attn.q_proj";
const V: &str = "model.layers.0.self_attn.v_proj";

fn modules() -> Vec<(String, ModuleSpec)> {
    vec![
        (Q.into(), ModuleSpec::linear(20, 20)),
        (V.into(), ModuleSpec::linear(20, 12)),
    ]
}

fn good_config() -> Value {
    json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
}

fn good_loras() -> Vec<Lora> {
    let mut r = rng(1);
    vec![
        Lora::random(&mut r, Q, 20, 20, 4, Dtype::F32),
        Lora::random(&mut r, V, 20, 12, 4, Dtype::F32),
    ]
}

fn tensors(loras: &[Lora]) -> Vec<Tensor> {
    loras
        .iter()
        .flat_map(|l| l.tensors(Dtype::F32, None))
        .collect()
}

/// Every slot of every pool, copied to the host.
fn snapshot<T: KernelElement>(set: &AdapterSet<T>) -> Vec<Option<SlotAdapter<T>>> {
    set.modules()
        .flat_map(|(_, _, pool)| (0..pool.config().slots).map(|s| pool.adapter(s).unwrap()))
        .collect()
}

/// A set whose slots 0 and 1 hold the good adapter (slot 1 is the target
/// of the bad loads).
fn loaded_set<T: KernelElement>(dev: &Device, dir: &std::path::Path) -> AdapterSet<T> {
    write_dir(
        &dir.join("good"),
        &good_config(),
        &safetensors_bytes(&tensors(&good_loras())),
    );
    let mut set = AdapterSet::<T>::new(dev, 3, 8, modules()).unwrap();
    for slot in [0, 1] {
        set.load_dir(slot, dir.join("good"), LoadOptions::default())
            .unwrap();
    }
    set
}

/// Loads `config` + `weights` into slot 1 of a loaded set: must fail with
/// a message holding every one of `says`, and change nothing.
fn refused<T: KernelElement>(
    name: &str,
    config: &Value,
    weights: &[u8],
    options: LoadOptions,
    says: &[&str],
) {
    let dev = Device::host().unwrap();
    let dir = temp_dir(&format!("bad-{name}"));
    let mut set = loaded_set::<T>(&dev, &dir);
    let before = snapshot(&set);
    write_dir(&dir.join("bad"), config, weights);
    let err = set.load_dir(1, dir.join("bad"), options).expect_err(name);
    let message = err.to_string();
    for s in says {
        assert!(
            message.contains(s),
            "{name}: `{message}` does not say `{s}`"
        );
    }
    assert!(matches!(err, Error::Peft { .. }), "{name}: {err:?}");
    assert!(
        snapshot(&set) == before,
        "{name}: a failed load changed a pool"
    );
    std::fs::remove_dir_all(&dir).ok();
}

fn refused_f32(name: &str, config: &Value, weights: &[u8], says: &[&str]) {
    refused::<f32>(name, config, weights, LoadOptions::default(), says);
}

fn with(config: Value, key: &str, value: Value) -> Value {
    let mut config = config;
    config[key] = value;
    config
}

#[test]
fn corrupt_and_truncated_files_are_refused() {
    let good = safetensors_bytes(&tensors(&good_loras()));
    refused_f32(
        "truncated",
        &good_config(),
        &good[..good.len() - 10],
        &["adapter_model.safetensors", "(header)"],
    );
    refused_f32(
        "garbage",
        &good_config(),
        b"not a safetensors file at all",
        &["adapter_model.safetensors"],
    );
    refused_f32(
        "empty",
        &good_config(),
        &safetensors_bytes(&[]),
        &["no lora_A / lora_B"],
    );
    refused_f32(
        "not json",
        &Value::String("{".into()),
        &good,
        &["adapter_config.json"],
    );
}

#[test]
fn missing_and_unpaired_tensors_are_refused() {
    let loras = good_loras();
    let mut only_a = tensors(&loras);
    only_a.remove(3); // v_proj's lora_B
    refused_f32(
        "lora_A without lora_B",
        &good_config(),
        &safetensors_bytes(&only_a),
        &[V, "lora_A", "no lora_B partner"],
    );
    // target_modules covers v_proj, whose weights are missing.
    refused_f32(
        "missing module",
        &good_config(),
        &safetensors_bytes(&tensors(&loras[..1])),
        &[V, "missing"],
    );
    let mut stray = tensors(&loras);
    stray.push(Tensor {
        key: format!("base_model.model.{Q}.weight"),
        dtype: Dtype::F32,
        shape: vec![2, 2],
        values: vec![1.0; 4],
    });
    refused_f32(
        "stray tensor",
        &good_config(),
        &safetensors_bytes(&stray),
        &[&format!("{Q}.weight"), "not a LoRA weight"],
    );
    let mut dora = tensors(&loras);
    dora.push(Tensor {
        key: format!("base_model.model.{Q}.lora_magnitude_vector"),
        dtype: Dtype::F32,
        shape: vec![20],
        values: vec![1.0; 20],
    });
    refused_f32(
        "DoRA tensor",
        &good_config(),
        &safetensors_bytes(&dora),
        &["lora_magnitude_vector", "unsupported"],
    );
    let mut two_names: Vec<Tensor> = loras[0].tensors(Dtype::F32, Some("user1"));
    two_names.extend(loras[1].tensors(Dtype::F32, Some("user2")));
    refused_f32(
        "two adapters",
        &good_config(),
        &safetensors_bytes(&two_names),
        &["user2", "one adapter"],
    );
}

#[test]
fn shapes_and_ranks_that_disagree_are_refused() {
    let mut r = rng(2);
    let wide = Lora::random(&mut r, Q, 24, 20, 4, Dtype::F32); // in_features 24, the set's q_proj has 20
    let loras = vec![wide, good_loras()[1].clone()];
    refused_f32(
        "in_features",
        &good_config(),
        &safetensors_bytes(&tensors(&loras)),
        &[Q, "24 inputs", "20 -> 20"],
    );
    let rank6 = vec![
        Lora::random(&mut r, Q, 20, 20, 6, Dtype::F32),
        good_loras()[1].clone(),
    ];
    refused_f32(
        "rank vs config",
        &good_config(),
        &safetensors_bytes(&tensors(&rank6)),
        &[Q, "rank 6", "r = 4"],
    );
    let mut mismatched = tensors(&good_loras());
    mismatched[1] = Tensor {
        shape: vec![20, 2],
        values: vec![0.5; 40],
        ..mismatched.remove(1)
    };
    refused_f32(
        "lora_B rank",
        &good_config(),
        &safetensors_bytes(&mismatched),
        &["lora_B", "rank 4"],
    );
    let rank12: Vec<Lora> = [(Q, 20), (V, 12)]
        .iter()
        .map(|&(p, out)| Lora::random(&mut r, p, 20, out, 12, Dtype::F32))
        .collect();
    let config12 = with(good_config(), "r", json!(12));
    refused_f32(
        "above max_rank",
        &config12,
        &safetensors_bytes(&tensors(&rank12)),
        &["rank 12", "max_rank 8"],
    );
    let mut three_d = tensors(&good_loras());
    three_d[0].shape = vec![4, 20, 1];
    refused_f32(
        "3-d tensor",
        &good_config(),
        &safetensors_bytes(&three_d),
        &["[4, 20, 1]", "2 dimensions"],
    );
}

#[test]
fn bad_values_and_dtypes_are_refused() {
    let mut nan = tensors(&good_loras());
    nan[2].values[7] = f32::NAN;
    refused_f32(
        "NaN",
        &good_config(),
        &safetensors_bytes(&nan),
        &[V, "NaN at index 7", "finite"],
    );
    let mut inf = tensors(&good_loras());
    inf[1].dtype = Dtype::BF16;
    inf[1].values[0] = f32::INFINITY;
    refused_f32(
        "Inf in bf16",
        &good_config(),
        &safetensors_bytes(&inf),
        &["lora_B", "inf"],
    );
    let mut f64s = tensors(&good_loras());
    f64s[0].dtype = Dtype::F64;
    refused_f32(
        "f64 tensor",
        &good_config(),
        &safetensors_bytes(&f64s),
        &["F64", "F32, F16 or BF16"],
    );
    let mut ints = tensors(&good_loras());
    ints[0].dtype = Dtype::I32;
    refused_f32(
        "i32 tensor",
        &good_config(),
        &safetensors_bytes(&ints),
        &["I32"],
    );
    // Finite in f32 but not in an f16 pool.
    let mut big = tensors(&good_loras());
    big[0].values[3] = 1.0e6;
    refused::<f16>(
        "f16 overflow",
        &good_config(),
        &safetensors_bytes(&big),
        LoadOptions::default(),
        &[Q, "F16"],
    );
}

#[test]
fn config_fields_of_the_wrong_type_are_refused() {
    let weights = safetensors_bytes(&tensors(&good_loras()));
    let cases = [
        ("r", json!("4"), "integer"),
        ("r", json!(0), "integer in 1..="),
        ("r", json!(4.5), "integer"),
        ("lora_alpha", json!("8"), "finite number"),
        ("use_rslora", json!("yes"), "true or false"),
        ("fan_in_fan_out", json!(1), "true or false"),
        ("target_modules", json!(5), "string or a list"),
        ("target_modules", json!(["q_proj", 3]), "list of strings"),
        ("rank_pattern", json!([1, 2]), "object"),
        ("rank_pattern", json!({"q_proj": "4"}), "integer"),
        ("alpha_pattern", json!({"v_proj": null}), "finite number"),
        ("layers_to_transform", json!("0"), "non-negative integer"),
        (
            "target_modules",
            json!("(?<=x)q_proj"),
            "regular expression",
        ),
        ("peft_type", json!("IA3"), "only \"LORA\""),
    ];
    for (field, value, says) in cases {
        let name = format!("{field} = {value}");
        refused_f32(
            &name,
            &with(good_config(), field, value),
            &weights,
            &["adapter_config.json", field, says],
        );
    }
    let mut no_targets = good_config();
    no_targets.as_object_mut().unwrap().remove("target_modules");
    refused_f32(
        "no target_modules",
        &no_targets,
        &weights,
        &["target_modules", "missing"],
    );
}

#[test]
fn features_the_kernels_do_not_compute_are_refused() {
    let weights = safetensors_bytes(&tensors(&good_loras()));
    for (field, value) in [
        ("use_dora", json!(true)),
        ("bias", json!("all")),
        ("bias", json!("lora_only")),
        ("lora_bias", json!(true)),
        ("init_lora_weights", json!("pissa_niter_4")),
        ("init_lora_weights", json!("olora")),
        ("layer_replication", json!([[0, 1]])),
        ("target_parameters", json!(["experts.down_proj"])),
    ] {
        refused_f32(
            &format!("{field} = {value}"),
            &with(good_config(), field, value),
            &weights,
            &[field, "unsupported"],
        );
    }
}

/// `modules_to_save` tensors: refused by default, served without them when
/// asked (and listed); modules without a pool: refused, or skipped.
#[test]
fn modules_to_save_and_modules_without_pools_follow_the_options() {
    let dev = Device::host().unwrap();
    let mut with_head = tensors(&good_loras());
    with_head.push(Tensor {
        key: "base_model.model.lm_head.modules_to_save.weight".into(),
        dtype: Dtype::F32,
        shape: vec![2, 20],
        values: vec![0.5; 40],
    });
    let config = with(good_config(), "modules_to_save", json!(["lm_head"]));
    let weights = safetensors_bytes(&with_head);
    refused::<f32>(
        "modules_to_save",
        &config,
        &weights,
        LoadOptions::default(),
        &["lm_head", "modules_to_save"],
    );
    let dir = temp_dir("modules-to-save");
    write_dir(&dir, &config, &weights);
    let mut set = AdapterSet::<f32>::new(&dev, 2, 8, modules()).unwrap();
    let options = LoadOptions {
        ignore_modules_to_save: true,
        ..LoadOptions::default()
    };
    let report = set.load_dir(0, &dir, options).unwrap();
    assert_eq!(
        report.ignored_tensors,
        ["base_model.model.lm_head.modules_to_save.weight"]
    );

    // An adapter with a module the set has no pool for.
    let mut r = rng(3);
    let mut loras = good_loras();
    loras.push(Lora::random(
        &mut r,
        "model.layers.0.self_attn.k_proj",
        20,
        12,
        4,
        Dtype::F32,
    ));
    let config = with(
        good_config(),
        "target_modules",
        json!(["q_proj", "k_proj", "v_proj"]),
    );
    let weights = safetensors_bytes(&tensors(&loras));
    refused::<f32>(
        "no pool",
        &config,
        &weights,
        LoadOptions::default(),
        &["k_proj", "no pool"],
    );
    write_dir(&dir, &config, &weights);
    let options = LoadOptions {
        skip_modules_without_pool: true,
        ..LoadOptions::default()
    };
    let report = set.load_dir(1, &dir, options).unwrap();
    assert_eq!(report.skipped_modules, ["model.layers.0.self_attn.k_proj"]);
    assert_eq!(report.loaded.len(), 2);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_files_bad_slots_and_empty_sets_are_refused() {
    let dev = Device::host().unwrap();
    let dir = temp_dir("missing-files");
    let mut set = loaded_set::<f32>(&dev, &dir);
    let before = snapshot(&set);
    let err = set
        .load_dir(1, dir.join("nowhere"), LoadOptions::default())
        .unwrap_err();
    assert!(
        matches!(err, Error::Io { .. }) && err.to_string().contains("adapter_config.json"),
        "{err}"
    );
    let adapter = PeftAdapter::read_dir(dir.join("good")).unwrap();
    let err = set.load(3, &adapter, LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("slot"), "{err}");
    assert!(set.evict(3).is_err());
    assert!(snapshot(&set) == before);
    assert!(AdapterSet::<f32>::new(&dev, 2, 8, Vec::new()).is_err());
    let twice = vec![(Q.to_string(), ModuleSpec::linear(20, 20)); 2];
    assert!(
        AdapterSet::<f32>::new(&dev, 2, 8, twice)
            .unwrap_err()
            .to_string()
            .contains("twice")
    );
    std::fs::remove_dir_all(&dir).ok();
}
