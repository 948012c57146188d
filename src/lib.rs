//! lora-kernels: CUDA kernels for low-rank (LoRA) adapters, with a CPU
//! reference of every operation and a host runtime that runs the kernels'
//! own source on the CPU. Conventions: `../shared/DESIGN.md`.
//!
//! - [`ops`]: the kernels behind a safe API, on a [`Device`] (GPU or host runtime);
//! - [`reference`]: the CPU reference of every operation (f64 accumulation);
//! - [`runtime_selftest`]: checks of the execution environment itself.
pub mod adapter_pool;
pub mod buffer;
pub mod cublas_baseline;
pub mod device;
pub mod element;
pub mod error;
pub mod launch;
pub mod ops;
pub mod params;
pub mod reference;
pub mod runtime_selftest;
pub mod shape;
pub mod slot_map;
pub mod timing;

pub use adapter_pool::{AdapterPool, PoolConfig};
pub use buffer::{BufMut, BufRef, Buffer};
pub use device::Device;
pub use element::{DType, Element};
pub use error::{Error, Result};
pub use launch::{HostSchedule, kernels_built, with_host_schedule};
pub use ops::merge::MergeOp;
pub use ops::{DeviceAdapter, KernelElement};
pub use reference::Adapter;
pub use shape::{Dims, MAX_RANK};
