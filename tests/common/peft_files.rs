//! PEFT adapter directories written the way PEFT writes them, by the tests
//! themselves (serde_json and the safetensors crate, not the crate's own
//! writer), and a check of what a pool of an `AdapterSet` serves.
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use lora_kernels::ops::multi_adapter_forward::{Routing, multi_adapter_forward};
use lora_kernels::peft::AdapterSet;
use lora_kernels::reference::{self, Adapter};
use lora_kernels::{Dims, KernelElement};
use proptest::test_runner::TestRng;
use rand::RngExt;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::Value;

use super::{compare_within, forward_bound, random};

/// One tensor of a weights file: key, dtype, shape and values (rounded to
/// the dtype when written).
pub struct Tensor {
    pub key: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// A fresh, empty directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lora-kernels-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `values` as stored in a file of `dtype`, read back as f32.
pub fn rounded(values: &[f32], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F16 => values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        Dtype::BF16 => values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        _ => values.to_vec(),
    }
}

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F64 => values
            .iter()
            .flat_map(|&v| (v as f64).to_le_bytes())
            .collect(),
        Dtype::I32 => values
            .iter()
            .flat_map(|&v| (v as i32).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        other => panic!("the tests don't write {other:?}"),
    }
}

/// The bytes of a safetensors file holding `tensors` (PEFT's metadata).
pub fn safetensors_bytes(tensors: &[Tensor]) -> Vec<u8> {
    let data: Vec<Vec<u8>> = tensors.iter().map(|t| encode(&t.values, t.dtype)).collect();
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .zip(&data)
        .map(|(t, d)| {
            (
                t.key.as_str(),
                TensorView::new(t.dtype, t.shape.clone(), d).unwrap(),
            )
        })
        .collect();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta)).unwrap()
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`.
pub fn write_dir(dir: &Path, config: &Value, weights: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    let json = serde_json::to_string_pretty(config).unwrap();
    std::fs::write(dir.join("adapter_config.json"), json).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), weights).unwrap();
}

/// A module's LoRA weights as a test made them (f32, rounded to the file's
/// dtype): `a` `[rank, in]`, `b` `[out, rank]`.
#[derive(Clone, Debug)]
pub struct Lora {
    pub path: String,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

impl Lora {
    /// Random weights (uniform in [-1, 1), never zero), rounded to `dtype`.
    pub fn random(
        rng: &mut TestRng,
        path: &str,
        in_f: usize,
        out_f: usize,
        rank: usize,
        dtype: Dtype,
    ) -> Self {
        let mut values = |len: usize| -> Vec<f32> {
            let v: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            rounded(&v, dtype)
        };
        Lora {
            path: path.to_string(),
            rank,
            in_features: in_f,
            out_features: out_f,
            a: values(rank * in_f),
            b: values(out_f * rank),
        }
    }

    /// Its two tensors under PEFT's keys (`infix`: an adapter name, as
    /// some files carry).
    pub fn tensors(&self, dtype: Dtype, infix: Option<&str>) -> Vec<Tensor> {
        let infix = infix.map(|n| format!(".{n}")).unwrap_or_default();
        let key = |half: &str| format!("base_model.model.{}.lora_{half}{infix}.weight", self.path);
        vec![
            Tensor {
                key: key("A"),
                dtype,
                shape: vec![self.rank, self.in_features],
                values: self.a.clone(),
            },
            Tensor {
                key: key("B"),
                dtype,
                shape: vec![self.out_features, self.rank],
                values: self.b.clone(),
            },
        ]
    }
}

/// What a slot of a pool must serve: a module's weights and its scale.
pub struct Expect<'a> {
    pub slot: i32,
    pub lora: &'a Lora,
    pub scale: f32,
}

/// Serves `ids` from `path`'s pool (random x, base weight `w` `[n, k]`) and
/// compares with the reference built from `expect` (scales times
/// `scale_factor`), within docs/DESIGN.md section 3's bound.
pub fn check_serves<T: KernelElement>(
    set: &AdapterSet<T>,
    path: &str,
    w: &[T],
    ids: &[i32],
    expect: &[Expect<'_>],
    scale_factor: f32,
    seed: u64,
) -> Result<(), String> {
    let pool = set.pool(path).expect("a module of the set");
    let cfg = pool.config();
    let (m, n, k) = (ids.len(), cfg.n, cfg.k);
    let dims = Dims::new(m, n, k);
    let x: Vec<T> = random(&mut super::rng(seed), m * k);
    let dev = set.device();
    let (xd, wd, idd) = (
        dev.upload(&x).unwrap(),
        dev.upload(w).unwrap(),
        dev.upload(ids).unwrap(),
    );
    let mut y = dev.upload(&vec![T::from_f64(f64::NAN); m * n]).unwrap();
    multi_adapter_forward(
        pool,
        m,
        &xd,
        &wd,
        &Routing::Tokens((&idd).into()),
        0.0,
        &mut y,
    )
    .map_err(|e| e.to_string())?;
    let got = dev.download(&y).unwrap();

    let weights: Vec<(Vec<T>, Vec<T>)> = expect
        .iter()
        .map(|e| {
            let to_t = |v: &[f32]| v.iter().map(|&f| T::from_f32(f)).collect::<Vec<T>>();
            (to_t(&e.lora.a), to_t(&e.lora.b))
        })
        .collect();
    let adapter = |e: usize| Adapter {
        a: &weights[e].0,
        b: &weights[e].1,
        rank: expect[e].lora.rank,
        scale: expect[e].scale * scale_factor,
    };
    let slot_of = |id: i32| expect.iter().position(|e| e.slot == id);
    // The reference routes by index into its own adapter list.
    let ref_ids: Vec<i32> = ids
        .iter()
        .map(|&id| slot_of(id).map_or(-1, |e| e as i32))
        .collect();
    let adapters: Vec<Adapter<'_, T>> = (0..expect.len()).map(adapter).collect();
    let mut want = vec![T::from_f64(f64::NAN); m * n];
    reference::multi_adapter_forward(dims, &x, w, &adapters, &ref_ids, 0.0, &mut want)
        .map_err(|e| e.to_string())?;
    // The low-rank term must matter: at least half the base term's size.
    let base_only: Vec<Adapter<'_, T>> = (0..expect.len())
        .map(|e| Adapter {
            scale: 0.0,
            ..adapter(e)
        })
        .collect();
    let mut base = vec![T::from_f64(f64::NAN); m * n];
    reference::multi_adapter_forward(dims, &x, w, &base_only, &ref_ids, 0.0, &mut base)
        .map_err(|e| e.to_string())?;
    let (mut low2, mut base2) = (0.0, 0.0);
    for (i, (wv, bv)) in want.iter().zip(&base).enumerate() {
        if ref_ids[i / n] >= 0 {
            low2 += (wv.to_f64() - bv.to_f64()).powi(2);
            base2 += bv.to_f64().powi(2);
        }
    }
    assert!(
        low2 >= 0.25 * base2,
        "{path}: the low-rank term is too small to test"
    );
    let per_token: Vec<Option<Adapter<'_, T>>> =
        ids.iter().map(|&id| slot_of(id).map(adapter)).collect();
    let bound = forward_bound(dims, &x, w, &per_token, 0.0, &[], &want);
    compare_within(&format!("{path} y"), &got, &want, &bound)
}
