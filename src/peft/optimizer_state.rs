//! The optimizer's state saved beside an adapter, so that training resumes
//! exactly where it stopped: `optimizer_state.safetensors` in the adapter's
//! directory (PEFT itself ignores the file). Per module, f32:
//! `base_model.model.<path>.lora_A.exp_avg`, `.exp_avg_sq` and `.anchor`
//! (`[r, in_features]`), the same for `lora_B` (`[out_features, r]`), and
//! `base_model.model.<path>.step` (I32, `[1]`). AdamW's moments are named
//! as PyTorch's AdamW names them.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use super::adapter_file::{PREFIX, PeftAdapter, decode, io_error, matrix};
use super::config::peft_error;
use crate::error::Result;
use crate::ops::adamw::SlotState;

/// Name of the optimizer-state file in an adapter directory.
pub const STATE_FILE: &str = "optimizer_state.safetensors";

/// The parts of a [`SlotState`] stored per module, by key suffix.
const PARTS: [&str; 6] = [
    "lora_A.exp_avg",
    "lora_A.exp_avg_sq",
    "lora_A.anchor",
    "lora_B.exp_avg",
    "lora_B.exp_avg_sq",
    "lora_B.anchor",
];

/// The file's bytes for `states` (per module path) of `adapter`'s modules.
pub(super) fn to_bytes(
    adapter: &PeftAdapter,
    states: &BTreeMap<String, SlotState>,
) -> Result<Vec<u8>> {
    let mut data: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (path, state) in states {
        let m = &adapter.modules[path];
        for (suffix, values) in PARTS.iter().zip(parts(state)) {
            let shape = part_shape(suffix, m.rank, m.in_features, m.out_features);
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            data.push((format!("{PREFIX}{path}.{suffix}"), Dtype::F32, shape, bytes));
        }
        let step = state.step.to_le_bytes().to_vec();
        data.push((format!("{PREFIX}{path}.step"), Dtype::I32, vec![1], step));
    }
    let views = (data.iter())
        .map(|(key, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes).map(|v| (key.as_str(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| peft_error(STATE_FILE, "(tensors)", &e.to_string()))?;
    let metadata = HashMap::from([("format".to_string(), "lora-kernels".to_string())]);
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| peft_error(STATE_FILE, "(tensors)", &e.to_string()))
}

/// The state file in `dir` for `adapter` (read from the same directory):
/// None when there is none. Every module of the adapter must have all of
/// its parts, with the shapes of its rank, finite; no other key may be
/// there. (Moments' signs and the step count are checked where the state
/// is set.)
pub(super) fn read(
    dir: &Path,
    adapter: &PeftAdapter,
) -> Result<Option<BTreeMap<String, SlotState>>> {
    let path = dir.join(STATE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(&path).map_err(io_error(&path))?;
    let file = path.display().to_string();
    let tensors = SafeTensors::deserialize(&bytes)
        .map_err(|e| peft_error(&file, "(header)", &e.to_string()))?;
    let mut states = BTreeMap::new();
    let mut expected = Vec::new();
    for (module, m) in &adapter.modules {
        let mut values = Vec::with_capacity(PARTS.len());
        for suffix in PARTS {
            let key = format!("{PREFIX}{module}.{suffix}");
            let view = tensor(&tensors, &key, &file)?;
            let want = part_shape(suffix, m.rank, m.in_features, m.out_features);
            let shape = matrix(&key, &view, &file)?;
            if shape[..] != want[..] {
                let why = format!("has shape {shape:?}: the adapter's module needs {want:?}");
                return Err(peft_error(&file, &key, &why));
            }
            values.push(decode(&key, &view, &file)?);
        }
        let key = format!("{PREFIX}{module}.step");
        let view = tensor(&tensors, &key, &file)?;
        let step = match (view.dtype(), view.data()) {
            (Dtype::I32, &[a, b, c, d]) => i32::from_le_bytes([a, b, c, d]),
            _ => return Err(peft_error(&file, &key, "must be one I32")),
        };
        expected.extend(PARTS.iter().map(|p| format!("{PREFIX}{module}.{p}")));
        expected.push(key);
        let [m1a, m2a, anchor_a, m1b, m2b, anchor_b]: [Vec<f32>; 6] =
            values.try_into().expect("a value per part");
        let state = SlotState {
            step,
            m1: (m1a, m1b),
            m2: (m2a, m2b),
            anchor: (anchor_a, anchor_b),
        };
        states.insert(module.clone(), state);
    }
    if let Some(stray) = tensors
        .names()
        .into_iter()
        .find(|k| !expected.iter().any(|e| e == *k))
    {
        return Err(peft_error(
            &file,
            stray,
            "not a part of any module of the adapter",
        ));
    }
    Ok(Some(states))
}

fn tensor<'a>(tensors: &'a SafeTensors, key: &str, file: &str) -> Result<TensorView<'a>> {
    tensors
        .tensor(key)
        .map_err(|_| peft_error(file, key, "missing: the adapter has this module"))
}

/// A state's six parts in the order of [`PARTS`].
fn parts(s: &SlotState) -> [&Vec<f32>; 6] {
    [&s.m1.0, &s.m2.0, &s.anchor.0, &s.m1.1, &s.m2.1, &s.anchor.1]
}

fn part_shape(suffix: &str, rank: usize, in_features: usize, out_features: usize) -> Vec<usize> {
    if suffix.starts_with("lora_A") {
        vec![rank, in_features]
    } else {
        vec![out_features, rank]
    }
}
