//! What the examples share: picking the device (a GPU when there is one, else
//! the host runtime, saying why) and deterministic pseudo-random data.
#![allow(dead_code)] // each example uses its own part

use lora_kernels::{Device, Element};

/// The GPU when the crate has kernels and a GPU is there; else the host
/// runtime, after printing why. The bool says whether it is a GPU.
pub fn pick_device() -> (Device, bool) {
    let why = if !lora_kernels::kernels_built() {
        "this build has no CUDA kernels (nvcc was not found at build time)".to_string()
    } else {
        match Device::cuda(0) {
            Ok(dev) => return (dev, true),
            Err(e) => e.to_string(),
        }
    };
    println!("no GPU ({why}): running on the host runtime (CPU)\n");
    (
        Device::host().expect("examples build with the `host` feature"),
        false,
    )
}

/// `len` values uniform in [-scale, scale) from `seed` (never zeros: docs/DESIGN.md
/// section 3), rounded to `T`.
pub fn values<T: Element>(len: usize, seed: u64, scale: f64) -> Vec<T> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            T::from_f64(scale * ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0))
        })
        .collect()
}
