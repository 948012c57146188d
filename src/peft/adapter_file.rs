//! A PEFT adapter directory on the host: `adapter_config.json` and
//! `adapter_model.safetensors` read into one [`ModuleAdapter`] per module,
//! every tensor checked against the config and against its partner; and the
//! same written back in PEFT's layout.
//!
//! Tensor keys are PEFT's: `base_model.model.<module path>.lora_A.weight`
//! (`[r, in_features]`) and `.lora_B.weight` (`[out_features, r]`), with or
//! without an adapter-name infix (`.lora_A.default.weight`). Weights are f32,
//! f16 or bf16 in the file and held as f32 here (exact for all three).
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use super::config::{CONFIG_FILE, ModuleMatch, PeftConfig, has_module, peft_error};
use crate::element::DType;
use crate::error::{Error, Result};

/// Name of the weights file in a PEFT adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// What PEFT prefixes to every module path in the weights file.
pub(super) const PREFIX: &str = "base_model.model.";

/// One module's adapter: `y += scale * (x a^T) b^T`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleAdapter {
    /// The adapter's rank.
    pub rank: usize,
    /// Input features of the module (columns of `a`).
    pub in_features: usize,
    /// Output features of the module (rows of `b`).
    pub out_features: usize,
    /// The scale PEFT computes for it (alpha / r, or alpha / sqrt(r)).
    pub scale: f32,
    /// `lora_A`, `[rank, in_features]`.
    pub a: Vec<f32>,
    /// `lora_B`, `[out_features, rank]`.
    pub b: Vec<f32>,
}

/// A PEFT LoRA adapter across a model, on the host.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    /// Its config.
    pub config: PeftConfig,
    /// Per module path (e.g. `model.layers.7.self_attn.q_proj`), its weights.
    pub modules: BTreeMap<String, ModuleAdapter>,
    /// Tensors of the file that are not LoRA weights but whole modules
    /// trained beside them (`modules_to_save`); the kernels don't serve them.
    pub modules_to_save_tensors: Vec<String>,
    /// Where it was read from (for error messages).
    pub source: String,
}

impl PeftAdapter {
    /// Reads a PEFT adapter directory.
    pub fn read_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join(CONFIG_FILE);
        let weights_path = dir.join(WEIGHTS_FILE);
        let config = std::fs::read_to_string(&config_path).map_err(io_error(&config_path))?;
        let weights = std::fs::read(&weights_path).map_err(io_error(&weights_path))?;
        Self::from_parts(&config, &weights, &dir.display().to_string())
    }

    /// Reads an adapter from the two files' contents; `source` names the
    /// directory in error messages.
    pub fn from_parts(config_json: &str, weights: &[u8], source: &str) -> Result<Self> {
        let config_file = format!("{source}/{CONFIG_FILE}");
        let weights_file = format!("{source}/{WEIGHTS_FILE}");
        let config = PeftConfig::from_json(config_json, &config_file)?;
        let tensors = SafeTensors::deserialize(weights).map_err(|e| {
            peft_error(
                &weights_file,
                "(header)",
                &format!("not a readable safetensors file: {e}"),
            )
        })?;
        let mut halves: BTreeMap<String, [Option<(String, TensorView)>; 2]> = BTreeMap::new();
        let mut modules_to_save_tensors = Vec::new();
        let mut adapter_name: Option<String> = None;
        let mut names: Vec<(&str, TensorView)> = tensors.iter().collect();
        names.sort_by(|x, y| x.0.cmp(y.0));
        for (key, view) in names {
            let path = key.strip_prefix(PREFIX).unwrap_or(key);
            let Some((module, half, name)) = parse_lora_key(path) else {
                if config.modules_to_save.iter().any(|m| has_module(path, m)) {
                    modules_to_save_tensors.push(key.to_string());
                    continue;
                }
                let reason = if path.contains("lora_") {
                    "unsupported LoRA tensor: only lora_A.weight and lora_B.weight are served \
                     (DoRA magnitudes, LoRA biases and embedding adapters are not)"
                } else {
                    "not a LoRA weight (expected <module>.lora_A.weight or <module>.lora_B.weight)"
                };
                return Err(peft_error(&weights_file, key, reason));
            };
            if let Some(name) = name {
                match &adapter_name {
                    Some(seen) if seen != name => {
                        return Err(peft_error(
                            &weights_file,
                            key,
                            &format!(
                                "holds adapter `{name}` beside adapter `{seen}`: one file, one adapter"
                            ),
                        ));
                    }
                    _ => adapter_name = Some(name.to_string()),
                }
            }
            let slot = &mut halves.entry(module.to_string()).or_default()[half];
            if slot.is_some() {
                return Err(peft_error(
                    &weights_file,
                    key,
                    "appears twice (with and without an adapter name)",
                ));
            }
            *slot = Some((key.to_string(), view));
        }
        if halves.is_empty() {
            return Err(peft_error(
                &weights_file,
                "(tensors)",
                "holds no lora_A / lora_B weights",
            ));
        }
        let mut modules = BTreeMap::new();
        for (module, [a, b]) in halves {
            let (a, b) = match (a, b) {
                (Some(a), Some(b)) => (a, b),
                (Some((key, _)), None) | (None, Some((key, _))) => {
                    let missing = if key.contains("lora_A") {
                        "lora_B"
                    } else {
                        "lora_A"
                    };
                    return Err(peft_error(
                        &weights_file,
                        &key,
                        &format!(
                            "has no {missing} partner: every module needs both lora_A and lora_B"
                        ),
                    ));
                }
                (None, None) => unreachable!("a module has at least one half"),
            };
            let m = module_adapter(&config, &module, &weights_file, a, b)?;
            modules.insert(module, m);
        }
        Ok(PeftAdapter {
            config,
            modules,
            modules_to_save_tensors,
            source: source.to_string(),
        })
    }

    /// An adapter of these modules with a config PEFT reads back as the same
    /// ranks and scales: `r` and `lora_alpha` from the most common module,
    /// `rank_pattern` and `alpha_pattern` (each module's path, escaped) for
    /// the rest, `target_modules` listing every module.
    pub fn from_modules(
        modules: BTreeMap<String, ModuleAdapter>,
        use_rslora: bool,
        fan_in_fan_out: bool,
    ) -> Result<Self> {
        let alpha = |m: &ModuleAdapter| super::alpha_for_scale(m.scale, m.rank, use_rslora);
        let most_common = |values: Vec<u64>| -> Option<u64> {
            let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
            for v in values {
                *counts.entry(v).or_default() += 1;
            }
            // Most frequent; ties go to the smallest value (a stable choice).
            let best = counts.values().copied().max()?;
            counts.into_iter().find(|&(_, c)| c == best).map(|(v, _)| v)
        };
        let ranks = modules.values().map(|m| m.rank as u64).collect();
        let r = most_common(ranks).unwrap_or(8) as usize;
        let alphas = modules.values().map(|m| alpha(m).to_bits()).collect();
        let lora_alpha = most_common(alphas).map_or(8.0, f64::from_bits);
        let paths: Vec<String> = modules.keys().cloned().collect();
        let mut config = PeftConfig::new(r, lora_alpha, ModuleMatch::Names(paths));
        config.use_rslora = use_rslora;
        config.fan_in_fan_out = fan_in_fan_out;
        let key = |path: &str| regex::escape(path);
        config.set_rank_pattern(
            (modules.iter())
                .filter(|(_, m)| m.rank != r)
                .map(|(p, m)| (key(p), m.rank))
                .collect(),
        )?;
        config.set_alpha_pattern(
            (modules.iter())
                .filter(|(_, m)| alpha(m).to_bits() != lora_alpha.to_bits())
                .map(|(p, m)| (key(p), alpha(m)))
                .collect(),
        )?;
        Ok(PeftAdapter {
            config,
            modules,
            modules_to_save_tensors: Vec::new(),
            source: "(in memory)".to_string(),
        })
    }

    /// The two files' contents: `adapter_config.json` and the safetensors
    /// bytes, weights stored as `dtype` (f32, f16 or bf16; rounded to nearest
    /// even).
    pub fn to_parts(&self, dtype: DType) -> Result<(String, Vec<u8>)> {
        let st_dtype = match dtype {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            DType::BF16 => Dtype::BF16,
            DType::F64 => {
                return Err(crate::shape::invalid(
                    "dtype",
                    "F64",
                    "PEFT files hold f32, f16 or bf16",
                ));
            }
        };
        let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (path, m) in &self.modules {
            for (half, shape, values) in [
                ("A", vec![m.rank, m.in_features], &m.a),
                ("B", vec![m.out_features, m.rank], &m.b),
            ] {
                let key = format!("{PREFIX}{path}.lora_{half}.weight");
                data.push((key, shape, encode(values, dtype)));
            }
        }
        let views = data
            .iter()
            .map(|(key, shape, bytes)| {
                TensorView::new(st_dtype, shape.clone(), bytes).map(|v| (key.as_str(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| peft_error(WEIGHTS_FILE, "(tensors)", &e.to_string()))?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(views, Some(metadata))
            .map_err(|e| peft_error(WEIGHTS_FILE, "(tensors)", &e.to_string()))?;
        Ok((self.config.to_json(), bytes))
    }

    /// Writes the adapter as a PEFT directory (created if missing): each file
    /// is written beside its final name and then renamed over it.
    pub fn write_dir(&self, dir: impl AsRef<Path>, dtype: DType) -> Result<()> {
        let (config, weights) = self.to_parts(dtype)?;
        write_files(
            dir.as_ref(),
            [(WEIGHTS_FILE, weights), (CONFIG_FILE, config.into_bytes())],
        )
    }
}

/// Writes `files` into `dir` (created if missing), each beside its final
/// name and then renamed over it.
pub(super) fn write_files<'a>(
    dir: &Path,
    files: impl IntoIterator<Item = (&'a str, Vec<u8>)>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    for (name, bytes) in files {
        let path = dir.join(name);
        let partial = dir.join(format!("{name}.partial"));
        std::fs::write(&partial, bytes).map_err(io_error(&partial))?;
        std::fs::rename(&partial, &path).map_err(io_error(&path))?;
    }
    Ok(())
}

/// An I/O error at `path` as the crate's error.
pub(super) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.display().to_string();
    move |source| Error::Io { path, source }
}

/// `<module>.lora_A.weight` or `<module>.lora_A.<adapter>.weight` (and B):
/// the module path, 0 for A or 1 for B, and the adapter name if present.
fn parse_lora_key(path: &str) -> Option<(&str, usize, Option<&str>)> {
    let rest = path.strip_suffix(".weight")?;
    for (marker, half) in [(".lora_A", 0), (".lora_B", 1)] {
        if let Some(at) = rest.rfind(marker) {
            let (module, tail) = (&rest[..at], &rest[at + marker.len()..]);
            if module.is_empty() {
                return None;
            }
            if tail.is_empty() {
                return Some((module, half, None));
            }
            let name = tail.strip_prefix('.')?;
            if !name.is_empty() && !name.contains('.') {
                return Some((module, half, Some(name)));
            }
        }
    }
    None
}

/// Checks one module's pair of tensors against each other and the config.
fn module_adapter(
    config: &PeftConfig,
    module: &str,
    file: &str,
    (a_key, a): (String, TensorView),
    (b_key, b): (String, TensorView),
) -> Result<ModuleAdapter> {
    if !config.targets(module) {
        return Err(peft_error(
            file,
            &a_key,
            &format!("module `{module}` is not among adapter_config.json's target_modules"),
        ));
    }
    let [rank, in_features] = matrix(&a_key, &a, file)?;
    let [out_features, b_rank] = matrix(&b_key, &b, file)?;
    if b_rank != rank {
        return Err(peft_error(
            file,
            &b_key,
            &format!(
                "is [{out_features}, {b_rank}] but lora_A has rank {rank}: expected [{out_features}, {rank}]"
            ),
        ));
    }
    let (config_rank, _) = config.rank_and_alpha(module);
    if rank != config_rank {
        return Err(peft_error(
            file,
            &a_key,
            &format!(
                "has rank {rank} but adapter_config.json gives this module r = {config_rank} (r or rank_pattern)"
            ),
        ));
    }
    if rank > crate::MAX_RANK || in_features == 0 || out_features == 0 {
        return Err(peft_error(
            file,
            &a_key,
            &format!(
                "rank {rank} x {in_features} inputs x {out_features} outputs: ranks are 1..={}, features >= 1",
                crate::MAX_RANK
            ),
        ));
    }
    Ok(ModuleAdapter {
        rank,
        in_features,
        out_features,
        scale: config.scale(module),
        a: decode(&a_key, &a, file)?,
        b: decode(&b_key, &b, file)?,
    })
}

pub(super) fn matrix(key: &str, view: &TensorView, file: &str) -> Result<[usize; 2]> {
    match view.shape() {
        &[rows, cols] => Ok([rows, cols]),
        shape => Err(peft_error(
            file,
            key,
            &format!("has shape {shape:?}: expected a matrix (2 dimensions)"),
        )),
    }
}

/// The tensor's values as f32, each checked finite.
pub(super) fn decode(key: &str, view: &TensorView, file: &str) -> Result<Vec<f32>> {
    let bytes = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(peft_error(
                file,
                key,
                &format!("has dtype {other:?}: expected F32, F16 or BF16"),
            ));
        }
    };
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(peft_error(
            file,
            key,
            &format!(
                "holds {} at index {index}: adapter weights must be finite",
                values[index]
            ),
        ));
    }
    Ok(values)
}

fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F16 => values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_lora_key;

    #[test]
    fn lora_keys_with_and_without_adapter_names() {
        assert_eq!(
            parse_lora_key("model.layers.0.q_proj.lora_A.weight"),
            Some(("model.layers.0.q_proj", 0, None))
        );
        assert_eq!(
            parse_lora_key("model.layers.0.q_proj.lora_B.default.weight"),
            Some(("model.layers.0.q_proj", 1, Some("default")))
        );
        assert_eq!(parse_lora_key("model.q_proj.lora_A.bias"), None);
        assert_eq!(
            parse_lora_key("model.q_proj.lora_magnitude_vector.weight"),
            None
        );
        assert_eq!(parse_lora_key("lora_A.weight"), None);
    }
}
