//! CUDA kernels for low-rank (LoRA) adapters behind a safe API, with a CPU
//! reference of every operation and a host runtime that runs the kernels' own
//! source on the CPU. The design (shapes, math, precision, how to measure) is
//! in `docs/DESIGN.md` in the repository.
//!
//! - [`ops`]: the kernels, on a [`Device`]: a GPU, or the host runtime
//!   ([`Device::host`]), which executes the same CUDA source on the CPU;
//! - [`AdapterPool`] and [`SlotMap`]: many users' adapters on one device;
//! - [`reference`]: the CPU reference of every operation (f64 accumulation),
//!   which the kernels are tested against.
//!
//! # Example
//!
//! The fused forward `y = x w^T + s (x a^T) b^T`, on the GPU when there is
//! one and on the host runtime otherwise, checked against the reference:
//!
//! ```
//! use lora_kernels::{Device, DeviceAdapter, Dims, ops::fused_forward::fused_forward, reference};
//!
//! let dims = Dims::new(3, 5, 7); // x [m, k], w [n, k], y [m, n]
//! let rank = 2;
//! let x: Vec<f32> = (0..dims.m * dims.k).map(|i| (i as f32 * 0.37).sin()).collect();
//! let w: Vec<f32> = (0..dims.n * dims.k).map(|i| (i as f32 * 0.11).cos()).collect();
//! let a: Vec<f32> = (0..rank * dims.k).map(|i| (i as f32 * 0.23).sin()).collect();
//! let b: Vec<f32> = (0..dims.n * rank).map(|i| (i as f32 * 0.71).cos()).collect();
//!
//! let dev = Device::cuda(0).or_else(|_| Device::host())?;
//! let (xd, wd, ad, bd) = (dev.upload(&x)?, dev.upload(&w)?, dev.upload(&a)?, dev.upload(&b)?);
//! let mut yd = dev.zeros::<f32>(dims.m * dims.n)?;
//! let adapter = DeviceAdapter::new(&ad, &bd, rank, 0.5);
//! fused_forward(&dev, dims, &xd, &wd, &adapter, 0.0, &mut yd)?;
//! let y = dev.download(&yd)?;
//!
//! let mut want = vec![0f32; dims.m * dims.n];
//! let host_adapter = reference::Adapter { a: &a, b: &b, rank, scale: 0.5 };
//! reference::fused_forward(dims, &x, &w, &host_adapter, 0.0, &mut want)?;
//! for (got, want) in y.iter().zip(&want) {
//!     assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()));
//! }
//! # Ok::<(), lora_kernels::Error>(())
//! ```
//!
//! # Features
//!
//! - `host` (default): compile the kernels for the host runtime too, so
//!   [`Device::host`] works. Turn it off (`default-features = false`) in an
//!   engine that only launches on GPUs.
//! - `bench`: cuBLAS baselines of every operation and CUDA-event timing, as
//!   the tour and the benches use them (not part of the stable API).
#![warn(missing_docs)]

// Lets the crate's own unit tests share helpers written against the public
// paths (`lora_kernels::...`).
extern crate self as lora_kernels;

pub mod adapter_pool;
pub mod buffer;
#[cfg(feature = "bench")]
pub mod cublas_baseline;
pub mod device;
pub mod element;
pub mod error;
pub(crate) mod launch;
pub mod ops;
pub(crate) mod params;
pub mod reference;
#[cfg(test)]
mod runtime_selftest;
pub mod shape;
pub mod slot_map;
#[cfg(feature = "bench")]
pub mod timing;

pub use adapter_pool::{AdapterPool, PoolConfig};
pub use buffer::{BufMut, BufRef, Buffer};
pub use device::{Device, HostSchedule};
pub use element::{DType, Element};
pub use error::{Error, Result};
pub use launch::kernels_built;
pub use ops::{DeviceAdapter, KernelElement};
pub use shape::{Dims, MAX_RANK};
pub use slot_map::SlotMap;
