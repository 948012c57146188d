//! The backward kernels against the CPU reference (whose gradients are
//! checked against finite differences in tests/reference.rs), on the host
//! runtime and the GPU: every output optional, accumulate mode, deterministic
//! mode bit-identical across runs, and the multi-adapter backward equal to a
//! per-slot loop of single-adapter references.
mod common;

use common::*;
use half::{bf16, f16};
use lora_kernels::ops::lora_backward::{
    BackwardOptions, BackwardScratch, DeviceBackwardInputs, Grads, lora_backward,
    multi_adapter_backward,
};
use lora_kernels::reference::Adapter;
use lora_kernels::reference::{self, BackwardInputs, Gradients};
use lora_kernels::{AdapterPool, Device, DeviceAdapter, Dims, KernelElement, PoolConfig};

struct Case<T> {
    dims: Dims,
    g: Vec<T>,
    x: Vec<T>,
    w: Vec<T>,
    a: Vec<T>,
    b: Vec<T>,
    rank: usize,
    scale: f32,
    t: Vec<f32>,
}

impl<T: KernelElement> Case<T> {
    fn new(dims: Dims, rank: usize, seed: u64) -> Self {
        let mut r = rng(seed);
        let Dims { m, n, k } = dims;
        let (g, x, w, a, b) = (
            random(&mut r, m * n),
            random(&mut r, m * k),
            random(&mut r, n * k),
            random(&mut r, rank * k),
            random(&mut r, n * rank),
        );
        let scale = 0.5 + (seed % 3) as f32;
        let t = reference::lora_intermediate(
            dims,
            &x,
            &Adapter {
                a: &a,
                b: &b,
                rank,
                scale,
            },
        )
        .unwrap();
        Case {
            dims,
            g,
            x,
            w,
            a,
            b,
            rank,
            scale,
            t,
        }
    }

    fn adapter(&self) -> Adapter<'_, T> {
        Adapter {
            a: &self.a,
            b: &self.b,
            rank: self.rank,
            scale: self.scale,
        }
    }

    /// Reference gradients, starting from `prior` when accumulating.
    fn expected(
        &self,
        accumulate: bool,
        prior: &(Vec<T>, Vec<f32>, Vec<f32>),
    ) -> (Vec<T>, Vec<f32>, Vec<f32>) {
        let (mut dx, mut da, mut db) = prior.clone();
        let inputs = BackwardInputs {
            g: &self.g,
            x: &self.x,
            w: &self.w,
            adapter: self.adapter(),
            t: &self.t,
        };
        let grads = Gradients {
            dx: Some(&mut dx),
            da: Some(&mut da),
            db: Some(&mut db),
            accumulate,
        };
        reference::backward(self.dims, &inputs, grads).unwrap();
        (dx, da, db)
    }

    /// Tolerances for (dx, da, db): rtol * sqrt(reduction length) * the
    /// largest product in each sum (docs/DESIGN.md section 3; da, db are f32).
    fn atols(&self) -> (f64, f64, f64) {
        let Dims { m, n, .. } = self.dims;
        let u_max = self.scale as f64 * n as f64 * max_abs(&self.g) * max_abs(&self.b);
        let t_max = self.t.iter().fold(0f64, |acc, v| acc.max(v.abs() as f64));
        let dx = rtol::<T>()
            * ((n + self.rank) as f64).sqrt()
            * (max_abs(&self.g) * max_abs(&self.w)).max(u_max * max_abs(&self.a));
        let da = 1e-5 * (m as f64).sqrt() * u_max * max_abs(&self.x) + 1e-30;
        let db = 1e-5 * (m as f64).sqrt() * self.scale as f64 * max_abs(&self.g) * t_max + 1e-30;
        (dx, da, db)
    }

    /// docs/DESIGN.md section 3's per-element bounds for (dx, da, db): one
    /// ulp of the output type plus 4 eps_f32 times the sum of |terms| behind
    /// each element, counting u = s g b term by term (u is an f32 sum), and
    /// the prior value when accumulating. The tensor-core dx expands u as a
    /// hi + lo pair of the storage type, as the forward does t: bf16 adds
    /// 2^-15 sum_j |u_j a_j|; f16 2^-20 of it, plus half f16's subnormal
    /// spacing per |a_j|.
    fn bounds(
        &self,
        accumulate: bool,
        prior: &(Vec<T>, Vec<f32>, Vec<f32>),
        want: &(Vec<T>, Vec<f32>, Vec<f32>),
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let Dims { m, n, k } = self.dims;
        let (r, s) = (self.rank, self.scale.abs() as f64);
        let (split, subnormal) = match T::DTYPE {
            lora_kernels::DType::BF16 => (2f64.powi(-15), 0.0),
            lora_kernels::DType::F16 => (2f64.powi(-20), 2f64.powi(-25)),
            _ => (0.0, 0.0),
        };
        let f = |v: &T| v.to_f64();
        // |u|[i][j] <= s sum_c |g b| (its own terms), and u itself.
        let mut u_abs = vec![0f64; m * r];
        let mut u = vec![0f64; m * r];
        for i in 0..m {
            for j in 0..r {
                for c in 0..n {
                    let p = f(&self.g[i * n + c]) * f(&self.b[c * r + j]);
                    u_abs[i * r + j] += s * p.abs();
                    u[i * r + j] += self.scale as f64 * p;
                }
            }
        }
        let prior_term = |v: f64| if accumulate { v.abs() } else { 0.0 };
        let mut dx = Vec::with_capacity(m * k);
        for i in 0..m {
            for q in 0..k {
                let mut abs_sum: f64 = (0..n)
                    .map(|c| (f(&self.g[i * n + c]) * f(&self.w[c * k + q])).abs())
                    .sum();
                let mut extra = 0.0;
                for j in 0..r {
                    let aj = f(&self.a[j * k + q]).abs();
                    abs_sum += u_abs[i * r + j] * aj;
                    extra += split * (u[i * r + j] * aj).abs() + subnormal * aj;
                }
                abs_sum += prior_term(prior.0[i * k + q].to_f64());
                dx.push(f32_sum_bound::<T>(want.0[i * k + q].to_f64(), abs_sum) + extra);
            }
        }
        let mut da = Vec::with_capacity(r * k);
        for j in 0..r {
            for q in 0..k {
                let abs_sum: f64 = (0..m)
                    .map(|i| u_abs[i * r + j] * f(&self.x[i * k + q]).abs())
                    .sum::<f64>()
                    + prior_term(prior.1[j * k + q] as f64);
                da.push(f32_sum_bound::<f32>(want.1[j * k + q] as f64, abs_sum));
            }
        }
        let mut db = Vec::with_capacity(n * r);
        for c in 0..n {
            for j in 0..r {
                let abs_sum: f64 = (0..m)
                    .map(|i| s * (f(&self.g[i * n + c]) * self.t[i * r + j] as f64).abs())
                    .sum::<f64>()
                    + prior_term(prior.2[c * r + j] as f64);
                db.push(f32_sum_bound::<f32>(want.2[c * r + j] as f64, abs_sum));
            }
        }
        (dx, da, db)
    }

    /// The same case with the adapter's scale multiplied by `factor` (t, the
    /// unscaled x a^T, is unchanged).
    fn with_scale_times(&self, factor: f32) -> Self {
        Case {
            g: self.g.clone(),
            x: self.x.clone(),
            w: self.w.clone(),
            a: self.a.clone(),
            b: self.b.clone(),
            t: self.t.clone(),
            scale: self.scale * factor,
            ..*self
        }
    }

    fn prior(&self, seed: u64) -> (Vec<T>, Vec<f32>, Vec<f32>) {
        let Dims { m, n, k } = self.dims;
        let mut r = rng(seed);
        (
            random(&mut r, m * k),
            random(&mut r, self.rank * k),
            random(&mut r, n * self.rank),
        )
    }

    /// Runs the kernels; `which` picks the outputs (dx, da, db).
    fn run(
        &self,
        dev: &Device,
        which: [bool; 3],
        opts: BackwardOptions,
        prior: &(Vec<T>, Vec<f32>, Vec<f32>),
    ) -> (Vec<T>, Vec<f32>, Vec<f32>) {
        let up = |v: &Vec<T>| dev.upload(v).unwrap();
        let (g, x, w, a, b) = (
            up(&self.g),
            up(&self.x),
            up(&self.w),
            up(&self.a),
            up(&self.b),
        );
        let t = dev.upload(&self.t).unwrap();
        let (mut dx, mut da, mut db) = (
            dev.upload(&prior.0).unwrap(),
            dev.upload(&prior.1).unwrap(),
            dev.upload(&prior.2).unwrap(),
        );
        let grads = Grads {
            dx: which[0].then(|| (&mut dx).into()),
            da: which[1].then(|| (&mut da).into()),
            db: which[2].then(|| (&mut db).into()),
        };
        let mut scratch = BackwardScratch::new(dev).unwrap();
        let adapter = DeviceAdapter::new(&a, &b, self.rank, self.scale);
        lora_backward(
            dev,
            self.dims,
            &adapter,
            DeviceBackwardInputs::new(&g, &x, &w, &t),
            grads,
            opts,
            &mut scratch,
        )
        .unwrap();
        (
            dev.download(&dx).unwrap(),
            dev.download(&da).unwrap(),
            dev.download(&db).unwrap(),
        )
    }
}

fn check_case<T: KernelElement>(
    dims: Dims,
    rank: usize,
    seed: u64,
    accumulate: bool,
    deterministic: bool,
) -> Result<(), String> {
    let case = Case::<T>::new(dims, rank, seed);
    let prior = case.prior(seed ^ 9);
    let want = case.expected(accumulate, &prior);
    let (bdx, bda, bdb) = case.bounds(accumulate, &prior, &want);
    let opts = BackwardOptions {
        accumulate,
        deterministic,
    };
    for dev in devices() {
        let (dx, da, db) = case.run(&dev, [true, true, true], opts, &prior);
        let what = |name: &str| {
            format!(
                "{name} {:?} {dims:?} r={rank} {opts:?} on {}",
                T::DTYPE,
                dev.name()
            )
        };
        compare_within(&what("dx"), &dx, &want.0, &bdx)?;
        compare_within(&what("da"), &da, &want.1, &bda)?;
        compare_within(&what("db"), &db, &want.2, &bdb)?;
    }
    Ok(())
}

/// Negative control, per type: each gradient checked against the reference
/// with the scale off by `off` (1% bf16, 0.3% f16, 0.01% f32, docs/DESIGN.md
/// section 3) must fail. Every gradient depends on the scale: dx through
/// u a, da through u, db directly. With uniform data and s = 0.5 + 1 (seed
/// 1: 1.5), rank 12, the low-rank part of dx is as large as g w.
fn negative_control<T: KernelElement>(off: f64, m: usize) {
    let case = Case::<T>::new(Dims::new(m, 37, 45), 12, 1);
    let wrong = case.with_scale_times(1.0 + off as f32);
    let prior = case.prior(2);
    let opts = BackwardOptions::default();
    let want = case.expected(false, &prior);
    let bounds = case.bounds(false, &prior, &want);
    let off_want = wrong.expected(false, &prior);
    let off_bounds = wrong.bounds(false, &prior, &off_want);
    for dev in devices() {
        let got = case.run(&dev, [true, true, true], opts, &prior);
        compare_within("dx", &got.0, &want.0, &bounds.0).unwrap();
        compare_within("da", &got.1, &want.1, &bounds.1).unwrap();
        compare_within("db", &got.2, &want.2, &bounds.2).unwrap();
        let name = format!("{:?} m={m} on {}", T::DTYPE, dev.name());
        assert!(
            compare_within("dx", &got.0, &off_want.0, &off_bounds.0).is_err(),
            "dx {name}"
        );
        assert!(
            compare_within("da", &got.1, &off_want.1, &off_bounds.1).is_err(),
            "da {name}"
        );
        assert!(
            compare_within("db", &got.2, &off_want.2, &off_bounds.2).is_err(),
            "db {name}"
        );
    }
}

#[test]
fn negative_control_per_type() {
    for m in [9, 70] {
        negative_control::<f32>(1e-4, m);
        negative_control::<f16>(3e-3, m);
        negative_control::<bf16>(1e-2, m);
    }
}

fn shape() -> impl Strategy<Value = (Dims, usize, u64, bool, bool)> {
    (
        (0usize..120, 1usize..90, 1usize..90).prop_map(|(m, n, k)| Dims::new(m, n, k)),
        prop_oneof![Just(1usize), 2usize..40, Just(70usize)],
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
    )
}

proptest! {
    #![proptest_config(config(16))]

    #[test]
    fn f32_matches_reference((dims, r, seed, acc, det) in shape()) {
        check_case::<f32>(dims, r, seed, acc, det).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn bf16_matches_reference((dims, r, seed, acc, det) in shape()) {
        check_case::<bf16>(dims, r, seed, acc, det).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn f16_matches_reference((dims, r, seed, acc, det) in shape()) {
        check_case::<f16>(dims, r, seed, acc, det).map_err(TestCaseError::fail)?;
    }
}

/// An empty batch: overwrite mode leaves zero gradients for a and b (the
/// gradient of an empty sum), accumulate mode leaves them as they were.
#[test]
fn empty_batch_gives_zero_or_unchanged_gradients() {
    for accumulate in [false, true] {
        for deterministic in [false, true] {
            let dims = Dims::new(0, 33, 17);
            check_case::<f32>(dims, 3, 5, accumulate, deterministic).unwrap();
            check_case::<bf16>(dims, 1, 6, accumulate, deterministic).unwrap();
            check_case::<f16>(dims, 70, 7, accumulate, deterministic).unwrap();
        }
    }
}

#[test]
fn each_output_is_optional_and_untouched_when_skipped() {
    let case = Case::<bf16>::new(Dims::new(40, 30, 20), 5, 3);
    let prior = case.prior(4);
    let (want_dx, want_da, want_db) = case.expected(false, &prior);
    let (adx, ada, adb) = case.atols();
    for dev in devices() {
        for which in [
            [true, false, false],
            [false, true, false],
            [false, false, true],
        ] {
            let (dx, da, db) = case.run(&dev, which, BackwardOptions::default(), &prior);
            let check = |on: bool, got: &[f32], want: &[f32], prior: &[f32], atol: f64| {
                if on {
                    compare("grad", got, want, atol, 1e-5).unwrap()
                } else {
                    assert_eq!(got, prior)
                }
            };
            if which[0] {
                compare("dx", &dx, &want_dx, adx, rtol::<bf16>()).unwrap()
            } else {
                assert_eq!(dx, prior.0)
            }
            check(which[1], &da, &want_da, &prior.1, ada);
            check(which[2], &db, &want_db, &prior.2, adb);
        }
    }
}

#[test]
fn deterministic_mode_is_bit_identical_run_to_run() {
    // Many tokens over a small adapter: several token ranges per output.
    let case = Case::<bf16>::new(Dims::new(700, 48, 40), 16, 5);
    let prior = case.prior(6);
    let opts = BackwardOptions {
        accumulate: false,
        deterministic: true,
    };
    for dev in devices() {
        let first = case.run(&dev, [true, true, true], opts, &prior);
        for _ in 0..3 {
            let again = case.run(&dev, [true, true, true], opts, &prior);
            assert!(
                first
                    .1
                    .iter()
                    .zip(&again.1)
                    .all(|(p, q)| p.to_bits() == q.to_bits()),
                "da differs on {}",
                dev.name()
            );
            assert!(
                first
                    .2
                    .iter()
                    .zip(&again.2)
                    .all(|(p, q)| p.to_bits() == q.to_bits()),
                "db differs on {}",
                dev.name()
            );
            assert_eq!(first.0, again.0);
        }
    }
}

/// Multi-adapter backward = the single-adapter reference applied per slot
/// to that slot's tokens (dx per token, da/db summed per slot).
#[test]
fn multi_adapter_backward_equals_a_per_slot_loop() {
    let (m, n, k, max_rank) = (37, 26, 19, 12);
    let ranks = [5usize, 0, 12, 1];
    let mut r = rng(21);
    let weights: Vec<(Vec<bf16>, Vec<bf16>)> = ranks
        .iter()
        .map(|&rk| (random(&mut r, rk * k), random(&mut r, n * rk)))
        .collect();
    let (g, x, w): (Vec<bf16>, Vec<bf16>, Vec<bf16>) = (
        random(&mut r, m * n),
        random(&mut r, m * k),
        random(&mut r, n * k),
    );
    let ids: Vec<i32> = (0..m as i32)
        .map(|i| [0, 2, -1, 3, 2, 0, 7][i as usize % 7])
        .collect(); // 7: out of range
    let slot_of = |i: usize| -> Option<usize> {
        let id = ids[i];
        (id >= 0 && (id as usize) < ranks.len() && ranks[id as usize] > 0).then_some(id as usize)
    };
    // t as the pool forward saves it: [m, max_rank], unscaled, zero past each rank.
    let mut t = vec![0f32; m * max_rank];
    for i in 0..m {
        if let Some(s) = slot_of(i) {
            for j in 0..ranks[s] {
                let a_row = &weights[s].0[j * k..(j + 1) * k];
                t[i * max_rank + j] = x[i * k..(i + 1) * k]
                    .iter()
                    .zip(a_row)
                    .map(|(p, q)| p.to_f64() * q.to_f64())
                    .sum::<f64>() as f32;
            }
        }
    }
    // Reference: per slot over its tokens; tokens without a slot get dx = g w.
    let mut want_dx = vec![bf16::ZERO; m * k];
    let mut want_da = vec![0f32; ranks.len() * max_rank * k];
    let mut want_db = vec![0f32; ranks.len() * n * max_rank];
    for i in 0..m {
        let rows = Dims::new(1, n, k);
        let (gi, xi) = (&g[i * n..(i + 1) * n], &x[i * k..(i + 1) * k]);
        let (a, b, rk, scale) = match slot_of(i) {
            Some(s) => (
                &weights[s].0[..],
                &weights[s].1[..],
                ranks[s],
                0.5 + s as f32,
            ),
            None => (&weights[0].0[..], &weights[0].1[..], ranks[0], 0.0), // s = 0: the base term only
        };
        let ti: Vec<f32> = t[i * max_rank..i * max_rank + rk].to_vec();
        let (mut dx, mut da, mut db) =
            (vec![bf16::ZERO; k], vec![0f32; rk * k], vec![0f32; n * rk]);
        let inputs = BackwardInputs {
            g: gi,
            x: xi,
            w: &w,
            adapter: Adapter {
                a,
                b,
                rank: rk,
                scale,
            },
            t: &ti,
        };
        reference::backward(
            rows,
            &inputs,
            Gradients {
                dx: Some(&mut dx),
                da: Some(&mut da),
                db: Some(&mut db),
                accumulate: false,
            },
        )
        .unwrap();
        want_dx[i * k..(i + 1) * k].copy_from_slice(&dx);
        if let Some(s) = slot_of(i) {
            for j in 0..rk {
                for q in 0..k {
                    want_da[(s * max_rank + j) * k + q] += da[j * k + q];
                }
                for c in 0..n {
                    want_db[(s * n + c) * max_rank + j] += db[c * rk + j];
                }
            }
        }
    }
    for dev in devices() {
        let mut pool = AdapterPool::<bf16>::new(
            &dev,
            PoolConfig {
                slots: ranks.len(),
                max_rank,
                n,
                k,
            },
        )
        .unwrap();
        for (s, (a, b)) in weights.iter().enumerate() {
            if ranks[s] > 0 {
                pool.load(s, a, b, ranks[s], 0.5 + s as f32).unwrap();
            }
        }
        let up = |v: &Vec<bf16>| dev.upload(v).unwrap();
        let (gd, xd, wd) = (up(&g), up(&x), up(&w));
        let (idd, td) = (dev.upload(&ids).unwrap(), dev.upload(&t).unwrap());
        for deterministic in [false, true] {
            let mut dx = dev.upload(&vec![bf16::NAN; m * k]).unwrap();
            let mut da = dev.upload(&vec![f32::NAN; want_da.len()]).unwrap();
            let mut db = dev.upload(&vec![f32::NAN; want_db.len()]).unwrap();
            let grads = Grads {
                dx: Some((&mut dx).into()),
                da: Some((&mut da).into()),
                db: Some((&mut db).into()),
            };
            let mut scratch = BackwardScratch::new(&dev).unwrap();
            let opts = BackwardOptions {
                accumulate: false,
                deterministic,
            };
            multi_adapter_backward(
                &pool,
                m,
                &idd,
                DeviceBackwardInputs::new(&gd, &xd, &wd, &td),
                grads,
                opts,
                &mut scratch,
            )
            .unwrap();
            let what = format!(
                "multi-adapter backward on {} (deterministic {deterministic})",
                dev.name()
            );
            compare(
                &format!("dx {what}"),
                &dev.download(&dx).unwrap(),
                &want_dx,
                0.05,
                rtol::<bf16>(),
            )
            .unwrap();
            compare(
                &format!("da {what}"),
                &dev.download(&da).unwrap(),
                &want_da,
                1e-3,
                1e-5,
            )
            .unwrap();
            compare(
                &format!("db {what}"),
                &dev.download(&db).unwrap(),
                &want_db,
                1e-3,
                1e-5,
            )
            .unwrap();
        }
    }
}

/// On the GPU: cuBLAS's unfused backward (the benchmark baseline) and ours
/// agree with the reference on the same rounded inputs.
#[cfg(feature = "bench")] // the cuBLAS baseline is behind the `bench` feature
#[test]
fn gpu_unfused_cublas_baseline_matches_ours() {
    use lora_kernels::Buffer;
    use lora_kernels::cublas_baseline::CublasBaseline;
    let Some(dev) = gpu() else { return };
    let blas = CublasBaseline::new(&dev).unwrap();
    let case = Case::<bf16>::new(Dims::new(300, 1000, 768), 16, 11);
    let (m, n, k, r) = (300, 1000, 768, 16);
    let prior = (
        vec![bf16::ZERO; m * k],
        vec![0f32; r * k],
        vec![0f32; n * r],
    );
    let (want_dx, want_da, want_db) = case.expected(false, &prior);
    let cuda = |b: Buffer<bf16>| match b {
        Buffer::Cuda(s) => s,
        Buffer::Host(_) => unreachable!(),
    };
    let up = |v: &Vec<bf16>| cuda(dev.upload(v).unwrap());
    let t16: Vec<bf16> = case.t.iter().map(|&v| bf16::from_f32(v)).collect();
    let (g, x, w, a, b, t) = (
        up(&case.g),
        up(&case.x),
        up(&case.w),
        up(&case.a),
        up(&case.b),
        up(&t16),
    );
    let (mut u, mut dx, mut da, mut db) = (
        up(&vec![bf16::ZERO; m * r]),
        up(&prior.0),
        up(&vec![bf16::ZERO; r * k]),
        up(&vec![bf16::ZERO; n * r]),
    );
    blas.backward_unfused(
        case.dims,
        (&g, &x, &w),
        (&a, &b, r, case.scale),
        &t,
        &mut u,
        (&mut dx, &mut da, &mut db),
    )
    .unwrap();
    let down = |s| dev.download(&Buffer::Cuda(s)).unwrap();
    let as_f32 = |v: Vec<bf16>| v.iter().map(|e| e.to_f32()).collect::<Vec<f32>>();
    // The baseline rounds t, u and the gradients to bf16: the same bounds with
    // bf16's rtol in place of the f32 one (atols() uses 1e-5 for da, db).
    let (adx, ada, adb) = case.atols();
    let (ada, adb) = (ada / 1e-5 * rtol::<bf16>(), adb / 1e-5 * rtol::<bf16>());
    compare("cuBLAS dx", &down(dx), &want_dx, 2.0 * adx, rtol::<bf16>()).unwrap();
    compare(
        "cuBLAS da",
        &as_f32(down(da)),
        &want_da,
        ada,
        rtol::<bf16>(),
    )
    .unwrap();
    compare(
        "cuBLAS db",
        &as_f32(down(db)),
        &want_db,
        adb,
        rtol::<bf16>(),
    )
    .unwrap();
}

/// On the GPU at a real shape (hidden 4096, rank 16), against the reference.
#[test]
fn gpu_real_shape_matches_reference() {
    let Some(dev) = gpu() else { return };
    let case = Case::<bf16>::new(Dims::new(48, 4096, 4096), 16, 13);
    let prior = case.prior(14);
    let (want_dx, want_da, want_db) = case.expected(true, &prior);
    let (adx, ada, adb) = case.atols();
    for deterministic in [false, true] {
        let opts = BackwardOptions {
            accumulate: true,
            deterministic,
        };
        let (dx, da, db) = case.run(&dev, [true, true, true], opts, &prior);
        compare("dx", &dx, &want_dx, adx, rtol::<bf16>()).unwrap();
        compare("da", &da, &want_da, ada, 1e-5).unwrap();
        compare("db", &db, &want_db, adb, 1e-5).unwrap();
    }
}
