//! lora-kernels: CUDA kernels for low-rank (LoRA) adapters, with a CPU
//! reference of every operation and a host runtime that runs the kernels'
//! own source on the CPU. Conventions: `../shared/DESIGN.md`.
pub mod element;
pub mod error;
pub mod reference;
pub mod shape;

pub use element::{DType, Element};
pub use error::{Error, Result};
pub use reference::Adapter;
pub use shape::{Dims, MAX_RANK};
