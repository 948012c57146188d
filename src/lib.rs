//! CUDA kernels for low-rank (LoRA) adapters behind a safe API, with a CPU
//! reference of every operation and a host runtime that runs the kernels' own
//! source on the CPU. The design (shapes, math, precision, how to measure) is
//! in `docs/DESIGN.md` in the repository.
//!
//! - [`ops`]: the kernels, on a [`Device`]: a GPU, or the host runtime
//!   ([`Device::host`]), which executes the same CUDA source on the CPU;
//! - [`AdapterPool`] and [`SlotMap`]: many users' adapters on one device;
//! - [`reference`](mod@reference): the CPU reference of every operation (f64 accumulation),
//!   which the kernels are tested against.
//!
//! # Example
//!
//! Every operation takes a [`Device`] (or an [`AdapterPool`], which knows its
//! device) and operands on that device. The same code runs on a GPU and on
//! the host runtime:
//!
//! ```
//! use lora_kernels::{Device, DeviceAdapter, Dims, ops::fused_forward::fused_forward};
//!
//! let dev = Device::cuda(0).or_else(|_| Device::host())?;
//! let (dims, rank) = (Dims::new(2, 3, 4), 1);
//! let x = dev.upload(&[0.5f32; 8])?; // [m, k]
//! let w = dev.upload(&[1.0f32; 12])?; // [n, k]
//! let a = dev.upload(&[1.0f32; 4])?; // [rank, k]
//! let b = dev.upload(&[2.0f32; 3])?; // [n, rank]
//! let mut y = dev.zeros::<f32>(6)?; // [m, n]
//! fused_forward(&dev, dims, &x, &w, &DeviceAdapter::new(&a, &b, rank, 0.5), 0.0, &mut y)?;
//! // x w^T = 2, (x a^T) = 2, s t b^T = 0.5 * 2 * 2 = 2.
//! assert_eq!(dev.download(&y)?, vec![4.0; 6]);
//! # Ok::<(), lora_kernels::Error>(())
//! ```
//!
//! # Features
//!
//! - `host` (default): compile the kernels for the host runtime too, so
//!   [`Device::host`] works. Turn it off (`default-features = false`) in an
//!   engine that only launches on GPUs.
//! - `peft` (default): read and write PEFT adapter directories across a
//!   whole model ([`peft`]).
//! - `bench`: cuBLAS baselines of every operation and CUDA-event timing, as
//!   the tour and the benches use them (not part of the stable API).
#![warn(missing_docs)]

// Lets the crate's own unit tests share helpers written against the public
// paths (`lora_kernels::...`).
extern crate self as lora_kernels;

pub mod adapter_pool;
pub mod buffer;
#[cfg(feature = "candle")]
pub mod candle;
#[cfg(feature = "bench")]
pub mod cublas_baseline;
pub mod device;
pub mod element;
pub mod error;
#[cfg(test)]
mod hopper_selftest;
// The integration tests' helpers (tests/common), for the self-test kernels' unit tests.
pub(crate) mod launch;
pub mod ops;
pub(crate) mod params;
#[cfg(feature = "peft")]
pub mod peft;
pub mod pool_grads;
pub mod reference;
#[cfg(test)]
mod runtime_selftest;
pub mod shape;
pub mod slot_map;
mod tensor_map;
#[cfg(all(test, feature = "host"))]
#[path = "../tests/common/mod.rs"]
mod test_common;
#[cfg(feature = "bench")]
pub mod timing;

pub use adapter_pool::{AdapterPool, PoolConfig, SlotAdapter};
pub use buffer::{BufMut, BufRef, Buffer};
pub use device::{Device, HostSchedule};
pub use element::{DType, Element};
pub use error::{Error, Result};
pub use launch::{kernels_built, take_recent_launches};
pub use ops::merge::MergeOp;
pub use ops::{DeviceAdapter, KernelElement};
pub use pool_grads::PoolGrads;
pub use shape::{Dims, MAX_RANK};
pub use slot_map::SlotMap;

// Engines share these between threads (docs/DESIGN.md section 13): this stops
// compiling if one of them stops being `Send + Sync`.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Device>();
    send_sync::<Buffer<half::bf16>>();
    send_sync::<AdapterPool<half::bf16>>();
    send_sync::<SlotMap<u64>>();
    send_sync::<ops::adamw::SlotOptimizer>();
    send_sync::<ops::lora_backward::BackwardScratch>();
    send_sync::<PoolGrads>();
    #[cfg(feature = "peft")]
    send_sync::<peft::AdapterSet<half::bf16>>();
};
