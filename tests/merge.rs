//! Merge / unmerge kernels against the reference (one rounding of the f32
//! product), the bound on how exactly unmerge restores w, and merged base =
//! fused forward.
mod common;

use common::*;
use half::{bf16, f16};
use lora_kernels::ops::fused_forward::{Regime, fused_forward_in};
use lora_kernels::ops::merge::merge;
use lora_kernels::reference::Adapter;
use lora_kernels::reference::{self, MergeOp};
use lora_kernels::{Device, DeviceAdapter, Dims, KernelElement};

/// Runs the kernel on a copy of `w` (`[n, k]`) with adapter (a, b, rank, scale).
fn run<T: KernelElement>(
    dev: &Device,
    (n, k): (usize, usize),
    w: &[T],
    (a, b, r, s): (&[T], &[T], usize, f32),
    op: MergeOp,
) -> Vec<T> {
    let (ad, bd) = (dev.upload(a).unwrap(), dev.upload(b).unwrap());
    let mut wd = dev.upload(w).unwrap();
    merge(dev, n, k, &mut wd, &DeviceAdapter::new(&ad, &bd, r, s), op).unwrap();
    dev.download(&wd).unwrap()
}

fn check<T: KernelElement>(n: usize, k: usize, r: usize, seed: u64) -> Result<(), TestCaseError> {
    let mut g = rng(seed);
    let (w, a, b): (Vec<T>, Vec<T>, Vec<T>) = (
        random(&mut g, n * k),
        random(&mut g, r * k),
        random(&mut g, n * r),
    );
    let s = 0.75;
    let adapter = Adapter {
        a: &a,
        b: &b,
        rank: r,
        scale: s,
    };
    for dev in devices() {
        for op in [MergeOp::Merge, MergeOp::Unmerge] {
            let got = run(&dev, (n, k), &w, (&a, &b, r, s), op);
            let mut want = w.clone();
            reference::merge(n, k, &mut want, &adapter, op).unwrap();
            // One rounding to T, plus the f32 accumulation of the r products
            // (at most r * u32 * sum |s b a|, the standard bound).
            for (i, (p, q)) in got.iter().zip(&want).enumerate() {
                let (c, col) = (i / k, i % k);
                let abs_sum: f64 = (0..r)
                    .map(|j| (b[c * r + j].to_f64() * a[j * k + col].to_f64()).abs())
                    .sum();
                let bound = 2.0 * T::UNIT_ROUNDOFF * q.to_f64().abs()
                    + 2.0 * r as f64 * f32::EPSILON as f64 * s as f64 * abs_sum;
                prop_assert!(
                    (p.to_f64() - q.to_f64()).abs() <= bound,
                    "{:?} {op:?} n={n} k={k} r={r} index {i}: {p:?} vs {q:?} on {}",
                    T::DTYPE,
                    dev.name()
                );
            }
        }
        // Unmerge after merge: within two roundings of the original.
        let merged = run(&dev, (n, k), &w, (&a, &b, r, s), MergeOp::Merge);
        let back = run(&dev, (n, k), &merged, (&a, &b, r, s), MergeOp::Unmerge);
        for c in 0..n {
            for q in 0..k {
                let products = (0..r).map(|j| b[c * r + j].to_f64() * a[j * k + q].to_f64());
                let d: f64 = s as f64 * products.clone().sum::<f64>();
                let abs_sum: f64 = s as f64 * products.map(f64::abs).sum::<f64>();
                let (orig, restored) = (w[c * k + q].to_f64(), back[c * k + q].to_f64());
                // Two roundings to T, plus the f32 accumulation of the product twice.
                let bound = 2.0 * T::UNIT_ROUNDOFF * (orig.abs() + d.abs())
                    + 4.0 * r as f64 * f32::EPSILON as f64 * abs_sum;
                prop_assert!(
                    (restored - orig).abs() <= bound,
                    "unmerge(merge(w))[{c},{q}] = {restored} vs {orig}"
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(16))]

    #[test]
    fn merge_matches_reference((n, k, r, seed) in (1usize..70, 1usize..300, prop_oneof![Just(1usize), 2usize..40, Just(256usize)], any::<u64>()), t in 0u8..3) {
        match t {
            0 => check::<f32>(n, k, r, seed)?,
            1 => check::<f16>(n, k, r, seed)?,
            _ => check::<bf16>(n, k, r, seed)?,
        }
    }
}

#[test]
fn merged_base_product_equals_the_fused_forward() {
    let (m, n, k, r) = (9, 40, 56, 8);
    let mut g = rng(3);
    let (x, w, a, b): (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) = (
        random(&mut g, m * k),
        random(&mut g, n * k),
        random(&mut g, r * k),
        random(&mut g, n * r),
    );
    for dev in devices() {
        let merged = run(&dev, (n, k), &w, (&a, &b, r, 1.5), MergeOp::Merge);
        let (xd, wd, md, ad, bd) = (
            dev.upload(&x).unwrap(),
            dev.upload(&w).unwrap(),
            dev.upload(&merged).unwrap(),
            dev.upload(&a).unwrap(),
            dev.upload(&b).unwrap(),
        );
        let (zero_a, zero_b) = (
            dev.upload(&vec![0f32; k]).unwrap(),
            dev.upload(&vec![0f32; n]).unwrap(),
        );
        let (mut y_fused, mut y_merged) = (
            dev.zeros::<f32>(m * n).unwrap(),
            dev.zeros::<f32>(m * n).unwrap(),
        );
        let dims = Dims::new(m, n, k);
        fused_forward_in(
            Regime::Simt,
            &dev,
            dims,
            &xd,
            &wd,
            &DeviceAdapter::new(&ad, &bd, r, 1.5),
            0.0,
            &mut y_fused,
        )
        .unwrap();
        fused_forward_in(
            Regime::Simt,
            &dev,
            dims,
            &xd,
            &md,
            &DeviceAdapter::new(&zero_a, &zero_b, 1, 0.0),
            0.0,
            &mut y_merged,
        )
        .unwrap();
        let (f, mm) = (
            dev.download(&y_fused).unwrap(),
            dev.download(&y_merged).unwrap(),
        );
        compare("merged vs fused", &mm, &f, 1e-4, 1e-5).unwrap();
    }
}
