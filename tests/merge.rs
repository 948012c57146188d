//! Merge / unmerge kernels against the reference (one rounding of the f32
//! product), the bound on how exactly unmerge restores w, and merged base =
//! fused forward.
mod common;

use common::*;
use half::{bf16, f16};
use lora_kernels::ops::fused_forward::{Regime, fused_forward_in};
use lora_kernels::ops::merge::merge;
use lora_kernels::reference::{self, Adapter};
use lora_kernels::{Device, DeviceAdapter, Dims, Error, KernelElement, MergeOp};

/// Random `w` `[n, k]`, `a` `[r, k]`, `b` `[n, r]` from `seed`.
fn weights<T: KernelElement>(
    (n, k, r): (usize, usize, usize),
    seed: u64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut g = rng(seed);
    (
        random(&mut g, n * k),
        random(&mut g, r * k),
        random(&mut g, n * r),
    )
}

/// Runs the kernel on a copy of `w` (`[n, k]`) with adapter (a, b, rank,
/// scale). The batch size m is 0 here: merge ignores it.
fn run<T: KernelElement>(
    dev: &Device,
    (n, k): (usize, usize),
    w: &[T],
    (a, b, r, s): (&[T], &[T], usize, f32),
    op: MergeOp,
) -> Vec<T> {
    let (ad, bd) = (dev.upload(a).unwrap(), dev.upload(b).unwrap());
    let mut wd = dev.upload(w).unwrap();
    let adapter = DeviceAdapter::new(&ad, &bd, r, s);
    merge(dev, Dims::new(0, n, k), &mut wd, &adapter, op).unwrap();
    dev.download(&wd).unwrap()
}

/// `got` against the reference: one rounding to T, plus the f32
/// accumulation of the r products (at most r * u32 * sum |s b a|, the
/// standard bound).
fn check_against_reference<T: KernelElement>(
    dev: &Device,
    (n, k): (usize, usize),
    w: &[T],
    adapter: &Adapter<'_, T>,
    op: MergeOp,
    got: &[T],
) -> Result<(), String> {
    let (a, b, r, s) = (adapter.a, adapter.b, adapter.rank, adapter.scale);
    let mut want = w.to_vec();
    reference::merge(n, k, &mut want, adapter, op).unwrap();
    for (i, (p, q)) in got.iter().zip(&want).enumerate() {
        let (c, col) = (i / k, i % k);
        let abs_sum: f64 = (0..r)
            .map(|j| (b[c * r + j].to_f64() * a[j * k + col].to_f64()).abs())
            .sum();
        let bound = 2.0 * T::UNIT_ROUNDOFF * q.to_f64().abs()
            + 2.0 * r as f64 * f32::EPSILON as f64 * s.abs() as f64 * abs_sum;
        if (p.to_f64() - q.to_f64()).abs() > bound {
            return Err(format!(
                "{:?} {op:?} n={n} k={k} r={r} index {i} (row {c}, column {col}): {p:?} vs {q:?} on {}",
                T::DTYPE,
                dev.name()
            ));
        }
    }
    Ok(())
}

fn check<T: KernelElement>(n: usize, k: usize, r: usize, seed: u64) -> Result<(), TestCaseError> {
    let (w, a, b) = weights::<T>((n, k, r), seed);
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
            check_against_reference(&dev, (n, k), &w, &adapter, op, &got)
                .map_err(TestCaseError::fail)?;
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

/// Negative control, per type: the kernel's merge checked against the
/// reference with the scale off by `off` (1% bf16, 0.3% f16, 0.01% f32,
/// docs/DESIGN.md section 3) must fail. Rank 16 with s = 0.75 makes `s b a`
/// about as large as `w` (uniform data).
#[test]
fn negative_control_per_type() {
    fn control<T: KernelElement>(off: f32) {
        let (n, k, r) = (23, 37, 16);
        let (w, a, b) = weights::<T>((n, k, r), 3);
        let adapter = Adapter {
            a: &a,
            b: &b,
            rank: r,
            scale: 0.75,
        };
        let wrong = Adapter {
            scale: 0.75 * (1.0 + off),
            ..adapter
        };
        for dev in devices() {
            for op in [MergeOp::Merge, MergeOp::Unmerge] {
                let got = run(&dev, (n, k), &w, (&a, &b, r, 0.75), op);
                check_against_reference(&dev, (n, k), &w, &adapter, op, &got).unwrap();
                assert!(
                    check_against_reference(&dev, (n, k), &w, &wrong, op, &got).is_err(),
                    "{:?} {op:?}: a scale off by {off} passed the check",
                    T::DTYPE
                );
            }
        }
    }
    control::<f32>(1e-4);
    control::<f16>(3e-3);
    control::<bf16>(1e-2);
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

/// An lm_head-sized n: more rows than CUDA's grid.y allows (65535), which a
/// grid with a row per grid.y could not launch. Small k and rank 1 keep the
/// host runtime fast.
#[test]
fn merge_more_rows_than_grid_y_allows() {
    let (n, k, r) = (70_000, 3, 1);
    let (w, a, b) = weights::<bf16>((n, k, r), 11);
    let adapter = Adapter {
        a: &a,
        b: &b,
        rank: r,
        scale: 0.75,
    };
    for dev in devices() {
        let (ad, bd) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
        let mut wd = dev.upload(&w).unwrap();
        merge(
            &dev,
            Dims::new(0, n, k),
            &mut wd,
            &DeviceAdapter::new(&ad, &bd, r, 0.75),
            MergeOp::Merge,
        )
        .unwrap();
        let got = dev.download(&wd).unwrap();
        check_against_reference(&dev, (n, k), &w, &adapter, MergeOp::Merge, &got).unwrap();
        // The last rows changed (they are not left for a grid that stopped early).
        assert_ne!(got[(n - 1) * k..], w[(n - 1) * k..]);
    }
}

/// Columns beyond one block's width, m ignored, and bad n, k or w as errors.
#[test]
fn merge_wide_rows_and_bad_dims() {
    check::<f16>(3, 1000, 2, 21).unwrap();
    let dev = Device::host().unwrap();
    let (a, b) = (vec![f16::ONE; 4], vec![f16::ONE; 4]);
    let adapter = DeviceAdapter::new(&a, &b, 1, 1.0);
    let mut w = vec![f16::ONE; 16];
    // A weight has no batch dimension: m is not looked at, not even validated.
    merge(
        &dev,
        Dims::new(usize::MAX, 4, 4),
        &mut w,
        &adapter,
        MergeOp::Merge,
    )
    .unwrap();
    assert!(w.iter().all(|&v| v == f16::from_f32(2.0)));
    for dims in [Dims::new(0, 0, 4), Dims::new(0, 4, 0)] {
        let err = merge(&dev, dims, &mut w, &adapter, MergeOp::Merge).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    }
    let err = merge(&dev, Dims::new(0, 4, 5), &mut w, &adapter, MergeOp::Merge).unwrap_err();
    assert!(matches!(err, Error::Shape { operand: "w", .. }), "{err}");
}

/// A row longer than grid.y's 65535 chunks of 256 columns: the kernel's
/// threads stride over the columns beyond (one row keeps the host runtime
/// fast; it refuses a grid.y over 65535, as a GPU does).
#[test]
fn merge_rows_longer_than_the_grid() {
    let (n, k, r) = (1, 65535 * 256 + 77, 1);
    let (w, a, b) = weights::<f16>((n, k, r), 12);
    let adapter = Adapter {
        a: &a,
        b: &b,
        rank: r,
        scale: -1.25,
    };
    for dev in devices() {
        let got = run(&dev, (n, k), &w, (&a, &b, r, -1.25), MergeOp::Unmerge);
        check_against_reference(&dev, (n, k), &w, &adapter, MergeOp::Unmerge, &got).unwrap();
    }
}
