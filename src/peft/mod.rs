//! PEFT adapters in and out (cargo feature `peft`, on by default): read a
//! PEFT LoRA directory (`adapter_config.json` + `adapter_model.safetensors`)
//! into an [`AdapterSet`] that holds a pool per target projection of a
//! model, and save a slot's adapter back as a directory PEFT loads unchanged.
//!
//! - [`PeftConfig`]: the config fields that change the math (`r`,
//!   `lora_alpha`, `use_rslora`, `rank_pattern`, `alpha_pattern`,
//!   `target_modules`, `fan_in_fan_out`, ...), matched the way PEFT matches
//!   them; features the kernels don't compute (DoRA, biases, ...) are refused
//!   with an error naming the field.
//! - [`PeftAdapter`]: the adapter on the host, one [`ModuleAdapter`] per
//!   module path, every tensor checked.
//! - [`AdapterSet`]: loads an adapter into the same slot of every module's
//!   pool in one call (all or nothing), evicts it everywhere, saves it.
//! - [`lora_scale`] and [`alpha_for_scale`]: PEFT's scale arithmetic.
//!
//! ```
//! use std::collections::BTreeMap;
//! use lora_kernels::peft::{AdapterSet, LoadOptions, ModuleAdapter, ModuleSpec, PeftAdapter};
//! use lora_kernels::Device;
//! use half::bf16;
//!
//! let dev = Device::cuda(0).or_else(|_| Device::host())?;
//! // Two projections of one layer; 4 slots of rank up to 16.
//! let modules = [
//!     ("model.layers.0.self_attn.q_proj".to_string(), ModuleSpec::linear(32, 32)),
//!     ("model.layers.0.self_attn.v_proj".to_string(), ModuleSpec::linear(32, 8)),
//! ];
//! let mut set = AdapterSet::<bf16>::new(&dev, 4, 16, modules)?;
//!
//! // A user's adapter as PEFT would save it (here made in memory).
//! let module = |out: usize, rank: usize| ModuleAdapter {
//!     rank, in_features: 32, out_features: out, scale: 2.0,
//!     a: vec![0.25; rank * 32], b: vec![0.5; out * rank],
//! };
//! let adapter = PeftAdapter::from_modules(
//!     BTreeMap::from([
//!         ("model.layers.0.self_attn.q_proj".to_string(), module(32, 8)),
//!         ("model.layers.0.self_attn.v_proj".to_string(), module(8, 4)),
//!     ]),
//!     false, // use_rslora
//!     false, // fan_in_fan_out
//! )?;
//! let dir = std::env::temp_dir().join(format!("lora-kernels-doc-{}", std::process::id()));
//! adapter.write_dir(&dir, lora_kernels::DType::BF16)?;
//!
//! // Load it into slot 2 of every pool; tokens with id 2 now use it in both projections.
//! let report = set.load_dir(2, &dir, LoadOptions::default())?;
//! assert_eq!(report.loaded.len(), 2);
//! assert_eq!(set.pool("model.layers.0.self_attn.v_proj").unwrap().rank(2), Some(4));
//!
//! // Save it back: the same files, bit for bit.
//! let again = dir.join("again");
//! set.save(2, &again)?;
//! assert_eq!(
//!     std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
//!     std::fs::read(again.join("adapter_model.safetensors")).unwrap(),
//! );
//! set.evict(2)?;
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), lora_kernels::Error>(())
//! ```
mod adapter_file;
mod adapter_set;
mod config;
mod optimizer_state;

pub use adapter_file::{ModuleAdapter, PeftAdapter, WEIGHTS_FILE};
pub use adapter_set::{AdapterSet, BaseLayout, LoadOptions, LoadReport, ModuleSpec};
pub use config::{CONFIG_FILE, FullMatch, ModuleMatch, PeftConfig, alpha_for_scale, lora_scale};
pub use optimizer_state::STATE_FILE;
