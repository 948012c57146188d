//! `adapter_config.json`: the fields of PEFT's `LoraConfig` that decide which
//! modules carry an adapter and what rank and scale each one has, read with a
//! clear error for every field of the wrong type and for every feature the
//! kernels don't compute; and the config written when an adapter is saved.
//!
//! Matching follows PEFT (`peft/tuners/tuners_utils.py`,
//! `check_target_module_exists`, and `peft/utils/other.py`, `get_pattern_key`):
//! - `target_modules` as a list: a module path matches when it equals an
//!   entry or ends with `.entry`; as a string: the whole path matches it as a
//!   regular expression; `"all-linear"`: every module;
//! - `layers_to_transform` / `layers_pattern` narrow a list match to layers
//!   by index;
//! - `exclude_modules` and `modules_to_save` exclude modules;
//! - `rank_pattern` / `alpha_pattern`: the first key `key` (in file order)
//!   for which `^(.*\.)?(key)$` matches the path gives the module's r / alpha.
//!
//! Patterns are Python regular expressions; those that use syntax Rust's
//! `regex` crate lacks (look-around, back-references) are refused with an
//! error naming the field.
use regex::Regex;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::shape::invalid;

/// Name of the config file in a PEFT adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// The LoRA scale PEFT gives a module of rank `r` and alpha `alpha`:
/// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA (`use_rslora`). Computed in
/// f64 as Python does, then rounded once to f32 (the pools' type).
pub fn lora_scale(alpha: f64, r: usize, use_rslora: bool) -> f32 {
    let r = r as f64;
    (if use_rslora {
        alpha / r.sqrt()
    } else {
        alpha / r
    }) as f32
}

/// The alpha for which [`lora_scale`] gives back `scale` exactly: the
/// shortest decimal that does (16 for a scale of `(16 / 3) as f32` at rank
/// 3, not 16.000000476837158), else `scale * r` (`scale * sqrt(r)` with
/// rsLoRA) in f64. What a saved config writes, so that PEFT, and this crate
/// reading the file again, compute the slot's scale; for an adapter that
/// came from a PEFT file with a short alpha, PEFT's own f64 scale too.
pub fn alpha_for_scale(scale: f32, r: usize, use_rslora: bool) -> f64 {
    let root = if use_rslora {
        (r as f64).sqrt()
    } else {
        r as f64
    };
    let exact = scale as f64 * root;
    (0..=9)
        .map(|digits| {
            let unit = 10f64.powi(digits);
            (exact * unit).round() / unit
        })
        .find(|&alpha| lora_scale(alpha, r, use_rslora) == scale)
        .unwrap_or(exact)
}

/// Which modules an adapter targets (`target_modules`, `exclude_modules`).
#[derive(Debug, Clone)]
pub enum ModuleMatch {
    /// A list: a path matches an entry it equals or ends with after a `.`.
    Names(Vec<String>),
    /// A regular expression the whole path must match (`re.fullmatch`).
    Regex(FullMatch),
    /// `"all-linear"`: every module.
    AllLinear,
}

/// A regular expression matched against whole module paths, as Python's
/// `re.fullmatch` matches them.
#[derive(Debug, Clone)]
pub struct FullMatch {
    pattern: String,
    regex: Regex,
}

impl FullMatch {
    /// Compiles `pattern` (an error if Rust's `regex` can't: look-around and
    /// back-references are not supported).
    pub fn new(pattern: &str) -> Result<Self> {
        let regex = Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
            invalid(
                "pattern",
                pattern,
                format!("not a regular expression this crate can match: {e}"),
            )
        })?;
        Ok(FullMatch {
            pattern: pattern.to_string(),
            regex,
        })
    }

    /// The pattern as given.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Whether the whole of `path` matches.
    pub fn is_match(&self, path: &str) -> bool {
        self.regex.is_match(path)
    }
}

impl ModuleMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            ModuleMatch::Names(names) => names.iter().any(|name| ends_with_module(path, name)),
            ModuleMatch::Regex(re) => re.is_match(path),
            ModuleMatch::AllLinear => true,
        }
    }
}

/// The parts of a PEFT `LoraConfig` that change what the kernels compute.
#[derive(Debug, Clone)]
pub struct PeftConfig {
    /// Default rank (`r`).
    pub r: usize,
    /// Default alpha (`lora_alpha`).
    pub lora_alpha: f64,
    /// rsLoRA: scale `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Per-module ranks: (pattern, r), in file order ([`Self::rank_pattern`]).
    rank_pattern: Vec<(String, usize)>,
    /// Per-module alphas: (pattern, alpha), in file order.
    alpha_pattern: Vec<(String, f64)>,
    /// `target_modules`.
    pub target_modules: ModuleMatch,
    /// `exclude_modules` (None: none excluded).
    pub exclude_modules: Option<ModuleMatch>,
    /// `layers_to_transform` (None: every layer).
    pub layers_to_transform: Option<Vec<u64>>,
    /// `layers_pattern`: the names of the module lists that hold the layers.
    pub layers_pattern: Vec<String>,
    /// `fan_in_fan_out`: the base layers keep their weights as `[in, out]`
    /// (GPT-2's `Conv1D`). `lora_A` and `lora_B` keep their usual shapes.
    pub fan_in_fan_out: bool,
    /// `modules_to_save`: whole modules trained beside the adapter (the
    /// kernels don't serve them; see `LoadOptions`).
    pub modules_to_save: Vec<String>,
    /// `base_model_name_or_path`, kept when saving.
    pub base_model_name_or_path: Option<String>,
    rank_regex: Vec<Regex>,
    alpha_regex: Vec<Regex>,
}

impl PeftConfig {
    /// A config with PEFT's defaults but for `r`, `lora_alpha` and the target
    /// modules.
    pub fn new(r: usize, lora_alpha: f64, target_modules: ModuleMatch) -> Self {
        PeftConfig {
            r,
            lora_alpha,
            use_rslora: false,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            target_modules,
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: Vec::new(),
            fan_in_fan_out: false,
            modules_to_save: Vec::new(),
            base_model_name_or_path: None,
            rank_regex: Vec::new(),
            alpha_regex: Vec::new(),
        }
    }

    /// Reads `adapter_config.json`'s text; `file` names it in errors.
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Peft {
            file: file.to_string(),
            key: "(document)".to_string(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(map) = value else {
            return Err(peft_error(file, "(document)", "must be a JSON object"));
        };
        Fields { map: &map, file }.config()
    }

    /// The JSON PEFT reads back as this config (`PeftModel.from_pretrained`).
    pub fn to_json(&self) -> String {
        let mut map = Map::new();
        map.insert("peft_type".into(), "LORA".into());
        map.insert("r".into(), self.r.into());
        map.insert("lora_alpha".into(), self.lora_alpha.into());
        map.insert("use_rslora".into(), self.use_rslora.into());
        let patterns = |entries: Vec<(String, Value)>| Value::Object(entries.into_iter().collect());
        map.insert(
            "rank_pattern".into(),
            patterns(
                (self.rank_pattern.iter())
                    .map(|(k, r)| (k.clone(), (*r).into()))
                    .collect(),
            ),
        );
        map.insert(
            "alpha_pattern".into(),
            patterns(
                (self.alpha_pattern.iter())
                    .map(|(k, a)| (k.clone(), (*a).into()))
                    .collect(),
            ),
        );
        map.insert(
            "target_modules".into(),
            module_match_json(&self.target_modules),
        );
        if let Some(exclude) = &self.exclude_modules {
            map.insert("exclude_modules".into(), module_match_json(exclude));
        }
        if let Some(layers) = &self.layers_to_transform {
            map.insert("layers_to_transform".into(), layers.clone().into());
        }
        if !self.layers_pattern.is_empty() {
            map.insert("layers_pattern".into(), self.layers_pattern.clone().into());
        }
        map.insert("fan_in_fan_out".into(), self.fan_in_fan_out.into());
        map.insert("bias".into(), "none".into());
        map.insert("lora_dropout".into(), 0.0.into());
        map.insert("use_dora".into(), false.into());
        map.insert("init_lora_weights".into(), true.into());
        map.insert("inference_mode".into(), true.into());
        map.insert("modules_to_save".into(), Value::Null);
        map.insert(
            "base_model_name_or_path".into(),
            self.base_model_name_or_path.clone().into(),
        );
        serde_json::to_string_pretty(&Value::Object(map)).expect("a JSON map serializes")
    }

    /// `rank_pattern`: (pattern, r), in file order.
    pub fn rank_pattern(&self) -> &[(String, usize)] {
        &self.rank_pattern
    }

    /// `alpha_pattern`: (pattern, alpha), in file order.
    pub fn alpha_pattern(&self) -> &[(String, f64)] {
        &self.alpha_pattern
    }

    /// Sets `rank_pattern` (compiling each key as PEFT matches it).
    pub fn set_rank_pattern(&mut self, pattern: Vec<(String, usize)>) -> Result<()> {
        self.rank_regex = compile_patterns("rank_pattern", pattern.iter().map(|p| &p.0), "")?;
        self.rank_pattern = pattern;
        Ok(())
    }

    /// Sets `alpha_pattern` (compiling each key as PEFT matches it).
    pub fn set_alpha_pattern(&mut self, pattern: Vec<(String, f64)>) -> Result<()> {
        self.alpha_regex = compile_patterns("alpha_pattern", pattern.iter().map(|p| &p.0), "")?;
        self.alpha_pattern = pattern;
        Ok(())
    }

    /// Whether PEFT puts an adapter on the module at `path` (a path in the
    /// base model, e.g. `model.layers.7.self_attn.q_proj`).
    pub fn targets(&self, path: &str) -> bool {
        if let Some(exclude) = &self.exclude_modules
            && exclude.matches(path)
        {
            return false;
        }
        if self.modules_to_save.iter().any(|m| has_module(path, m)) {
            return false;
        }
        let ModuleMatch::Names(_) = &self.target_modules else {
            return self.target_modules.matches(path);
        };
        if !self.target_modules.matches(path) {
            return false;
        }
        match &self.layers_to_transform {
            Some(layers) if !layers.is_empty() => {
                layer_index(path, &self.layers_pattern).is_some_and(|i| layers.contains(&i))
            }
            _ => true,
        }
    }

    /// The rank and alpha of the module at `path` (`rank_pattern` and
    /// `alpha_pattern` first, then `r` and `lora_alpha`).
    pub fn rank_and_alpha(&self, path: &str) -> (usize, f64) {
        let first = |regexes: &[Regex]| regexes.iter().position(|re| re.is_match(path));
        let r = first(&self.rank_regex).map_or(self.r, |i| self.rank_pattern[i].1);
        let alpha = first(&self.alpha_regex).map_or(self.lora_alpha, |i| self.alpha_pattern[i].1);
        (r, alpha)
    }

    /// The scale of the module at `path` ([`lora_scale`] of its rank and alpha).
    pub fn scale(&self, path: &str) -> f32 {
        let (r, alpha) = self.rank_and_alpha(path);
        lora_scale(alpha, r, self.use_rslora)
    }
}

/// Whether `path` is `name` or ends with `.name`.
fn ends_with_module(path: &str, name: &str) -> bool {
    path == name
        || (path.len() > name.len()
            && path.ends_with(name)
            && path.as_bytes()[path.len() - name.len() - 1] == b'.')
}

/// Whether `name` is a run of whole components of `path` (PEFT's
/// `(^|.*\.)name($|\..*)` for `modules_to_save`).
pub(crate) fn has_module(path: &str, name: &str) -> bool {
    format!(".{path}.").contains(&format!(".{name}."))
}

/// The layer index PEFT reads from `path` for `layers_to_transform`: the
/// first number that is a whole path component after a component named in
/// `layers_pattern` (after any component when it is empty) and before
/// another component.
fn layer_index(path: &str, layers_pattern: &[String]) -> Option<u64> {
    let parts: Vec<&str> = path.split('.').collect();
    // PEFT's `.*?\.[^.]*\.(\d+)\.`: the index is never the first or second
    // component, nor the last.
    let index_at = |i: usize| -> Option<u64> {
        let part = parts[i];
        (i >= 2
            && i + 1 < parts.len()
            && !part.is_empty()
            && part.bytes().all(|c| c.is_ascii_digit()))
        .then(|| part.parse().ok())
        .flatten()
    };
    if layers_pattern.is_empty() {
        return (0..parts.len()).find_map(index_at);
    }
    layers_pattern.iter().find_map(|pattern| {
        (1..parts.len())
            .find(|&i| parts[i - 1] == pattern && index_at(i).is_some())
            .and_then(index_at)
    })
}

fn module_match_json(m: &ModuleMatch) -> Value {
    match m {
        ModuleMatch::Names(names) => names.clone().into(),
        ModuleMatch::Regex(re) => re.pattern().into(),
        ModuleMatch::AllLinear => "all-linear".into(),
    }
}

/// Each key compiled the way PEFT's `get_pattern_key` matches it.
fn compile_patterns<'a>(
    field: &str,
    keys: impl Iterator<Item = &'a String>,
    file: &str,
) -> Result<Vec<Regex>> {
    keys.map(|key| {
        Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
            peft_error(
                file,
                &format!("{field}.{key}"),
                &format!("not a regular expression this crate can match: {e}"),
            )
        })
    })
    .collect()
}

pub(crate) fn peft_error(file: &str, key: &str, reason: &str) -> Error {
    Error::Peft {
        file: file.to_string(),
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

/// The config's JSON fields, read with errors that name the file and field.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    file: &'a str,
}

impl Fields<'_> {
    fn config(&self) -> Result<PeftConfig> {
        self.refuse_unsupported()?;
        let r = self.rank("r", self.get("r"))?.unwrap_or(8);
        let lora_alpha = self
            .number("lora_alpha", self.get("lora_alpha"))?
            .unwrap_or(8.0);
        let target_modules = match self.get("target_modules") {
            None => {
                return Err(
                    self.error("target_modules", "missing: which modules carry the adapter")
                );
            }
            Some(v) => self.module_match("target_modules", v)?,
        };
        let exclude_modules = match self.get("exclude_modules") {
            None => None,
            Some(v) => Some(self.module_match("exclude_modules", v)?),
        };
        let mut config = PeftConfig {
            r,
            lora_alpha,
            use_rslora: self.boolean("use_rslora")?,
            target_modules,
            exclude_modules,
            layers_to_transform: self.layers_to_transform()?,
            layers_pattern: self.strings("layers_pattern")?,
            fan_in_fan_out: self.boolean("fan_in_fan_out")?,
            modules_to_save: self.strings("modules_to_save")?,
            base_model_name_or_path: match self.get("base_model_name_or_path") {
                Some(Value::String(s)) => Some(s.clone()),
                _ => None,
            },
            ..PeftConfig::new(0, 0.0, ModuleMatch::AllLinear)
        };
        let rank_pattern = self.pattern("rank_pattern", |key, v| {
            Ok(self.rank(key, Some(v))?.expect("a present value"))
        })?;
        let alpha_pattern = self.pattern("alpha_pattern", |key, v| {
            Ok(self.number(key, Some(v))?.expect("a present value"))
        })?;
        config.rank_regex =
            compile_patterns("rank_pattern", rank_pattern.iter().map(|p| &p.0), self.file)?;
        config.alpha_regex = compile_patterns(
            "alpha_pattern",
            alpha_pattern.iter().map(|p| &p.0),
            self.file,
        )?;
        config.rank_pattern = rank_pattern;
        config.alpha_pattern = alpha_pattern;
        Ok(config)
    }

    /// The field, or None when it is absent or null.
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn error(&self, key: &str, reason: &str) -> Error {
        peft_error(self.file, key, reason)
    }

    fn refuse_unsupported(&self) -> Result<()> {
        if let Some(t) = self.get("peft_type")
            && t.as_str() != Some("LORA")
        {
            return Err(self.error(
                "peft_type",
                &format!("is {t}: only \"LORA\" adapters are supported"),
            ));
        }
        let truthy = |key: &str| match self.get(key) {
            None | Some(Value::Bool(false)) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(_) => true,
        };
        let unsupported = [
            (
                "use_dora",
                "DoRA (a magnitude vector per output) is not computed by these kernels",
            ),
            (
                "lora_bias",
                "a bias on lora_B is not computed by these kernels",
            ),
            (
                "use_qalora",
                "QA-LoRA's pooled inputs are not computed by these kernels",
            ),
            (
                "alora_invocation_tokens",
                "activated LoRA is not computed by these kernels",
            ),
            (
                "target_parameters",
                "LoRA on bare parameters (MoE experts) is not supported",
            ),
            ("layer_replication", "layer replication is not supported"),
            (
                "trainable_token_indices",
                "trainable tokens are not supported",
            ),
            ("use_bdlora", "block-diagonal LoRA is not supported"),
            ("arrow_config", "Arrow routing is not supported"),
            ("kasa_config", "this LoRA variant is not supported"),
            ("velora_config", "this LoRA variant is not supported"),
            ("monteclora_config", "this LoRA variant is not supported"),
        ];
        for (key, reason) in unsupported {
            if truthy(key) {
                return Err(self.error(key, &format!("unsupported: {reason}")));
            }
        }
        match self.get("bias") {
            None => {}
            Some(Value::String(s)) if s == "none" => {}
            Some(v) => {
                return Err(self.error(
                    "bias",
                    &format!("is {v}: unsupported, only \"none\" (trained biases are not served by these kernels)"),
                ));
            }
        }
        if let Some(Value::String(init)) = self.get("init_lora_weights") {
            let lower = init.to_lowercase();
            if ["pissa", "olora", "corda", "loftq", "lora_ga"]
                .iter()
                .any(|p| lower.starts_with(p))
            {
                return Err(self.error(
                    "init_lora_weights",
                    &format!(
                        "is \"{init}\": unsupported, the adapter was trained against a modified base weight; \
                         convert it with PEFT (save_pretrained's path_initial_model_for_weight_conversion) first"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn rank(&self, key: &str, v: Option<&Value>) -> Result<Option<usize>> {
        let Some(v) = v else { return Ok(None) };
        match v.as_u64() {
            Some(r) if r >= 1 && r <= crate::MAX_RANK as u64 => Ok(Some(r as usize)),
            _ => Err(self.error(
                key,
                &format!(
                    "is {v}: a rank must be an integer in 1..={}",
                    crate::MAX_RANK
                ),
            )),
        }
    }

    fn number(&self, key: &str, v: Option<&Value>) -> Result<Option<f64>> {
        let Some(v) = v else { return Ok(None) };
        match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(self.error(key, &format!("is {v}: must be a finite number"))),
        }
    }

    fn boolean(&self, key: &str) -> Result<bool> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.error(key, &format!("is {v}: must be true or false"))),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(self.error(key, &format!("holds {v}: must be a list of strings"))),
                })
                .collect(),
            Some(v) => Err(self.error(
                key,
                &format!("is {v}: must be a string or a list of strings"),
            )),
        }
    }

    fn module_match(&self, key: &str, v: &Value) -> Result<ModuleMatch> {
        match v {
            Value::String(s) if s == "all-linear" => Ok(ModuleMatch::AllLinear),
            Value::String(s) => FullMatch::new(s)
                .map(ModuleMatch::Regex)
                .map_err(|e| match e {
                    Error::InvalidArgument { reason, .. } => self.error(key, &reason),
                    other => other,
                }),
            Value::Array(_) => Ok(ModuleMatch::Names(self.strings(key)?)),
            _ => Err(self.error(
                key,
                &format!("is {v}: must be a string or a list of strings"),
            )),
        }
    }

    fn layers_to_transform(&self) -> Result<Option<Vec<u64>>> {
        let key = "layers_to_transform";
        let bad = || self.error(key, "must be a non-negative integer or a list of them");
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().ok_or_else(bad))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => v.as_u64().map(|i| Some(vec![i])).ok_or_else(bad),
        }
    }

    fn pattern<V>(
        &self,
        key: &str,
        value: impl Fn(&str, &Value) -> Result<V>,
    ) -> Result<Vec<(String, V)>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Object(entries)) => entries
                .iter()
                .map(|(k, v)| Ok((k.clone(), value(&format!("{key}.{k}"), v)?)))
                .collect(),
            Some(v) => Err(self.error(
                key,
                &format!("is {v}: must be an object of module patterns"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_index_follows_peft() {
        let none: Vec<String> = Vec::new();
        assert_eq!(
            layer_index("model.layers.7.self_attn.q_proj", &none),
            Some(7)
        );
        assert_eq!(
            layer_index("model.layers.7.mlp.experts.3.up", &none),
            Some(7)
        );
        assert_eq!(layer_index("layers.7.q_proj", &none), None);
        let h = vec!["h".to_string()];
        assert_eq!(layer_index("transformer.h.11.attn.c_attn", &h), Some(11));
        assert_eq!(layer_index("model.layers.11.attn", &h), None);
    }

    #[test]
    fn ends_with_module_needs_a_dot() {
        assert!(ends_with_module("model.layers.0.q_proj", "q_proj"));
        assert!(ends_with_module("q_proj", "q_proj"));
        assert!(!ends_with_module("model.layers.0.xq_proj", "q_proj"));
    }

    #[test]
    fn alpha_for_scale_inverts_lora_scale() {
        for &(scale, r) in &[
            (2.0f32, 16usize),
            (0.3, 7),
            (1.0e-3, 1),
            (5.5, 256),
            (1e-30, 3),
        ] {
            for rs in [false, true] {
                assert_eq!(lora_scale(alpha_for_scale(scale, r, rs), r, rs), scale);
            }
        }
        // Short alphas come back as themselves.
        assert_eq!(alpha_for_scale((16.0f64 / 3.0) as f32, 3, false), 16.0);
        assert_eq!(alpha_for_scale((9.0 / 6f64.sqrt()) as f32, 6, true), 9.0);
        assert_eq!(alpha_for_scale(lora_scale(0.75, 7, false), 7, false), 0.75);
    }
}
