//! The backward kernels against the CPU reference (whose gradients are
//! checked against finite differences in tests/reference.rs), on the host
//! runtime and the GPU: every output optional, accumulate mode, deterministic
//! mode bit-identical across runs, and the multi-adapter backward equal to a
//! per-slot loop of single-adapter references.
mod common;

use common::pool_model::{PoolCase, dx_bound, u_terms};
use common::*;
use half::{bf16, f16};
use lora_kernels::ops::lora_backward::{
    BackwardOptions, BackwardScratch, DeviceBackwardInputs, Grads, lora_backward,
    multi_adapter_backward,
};
use lora_kernels::reference::Adapter;
use lora_kernels::reference::{self, BackwardInputs, Gradients};
use lora_kernels::{Device, DeviceAdapter, Dims, KernelElement};

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
    /// Only the comparison with cuBLAS uses them: cuBLAS rounds t, u and the
    /// gradients to the storage type, so its error is not the per-element bound's.
    #[cfg(feature = "bench")]
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
    /// the prior value when accumulating; dx also the split of u
    /// ([`dx_bound`]).
    fn bounds(
        &self,
        accumulate: bool,
        prior: &(Vec<T>, Vec<f32>, Vec<f32>),
        want: &(Vec<T>, Vec<f32>, Vec<f32>),
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let Dims { m, n, k } = self.dims;
        let (r, s) = (self.rank, self.scale.abs() as f64);
        let adapters = vec![Some(self.adapter()); m];
        let dx = dx_bound(
            self.dims,
            &self.g,
            &self.w,
            &adapters,
            accumulate.then_some(&prior.0[..]),
            &want.0,
        );
        // |u|[i * r + j] <= s sum_c |g b| (its own terms).
        let u_abs: Vec<f64> = (0..m)
            .flat_map(|i| u_terms(&self.g[i * n..(i + 1) * n], &self.adapter()).1)
            .collect();
        let prior_term = |v: f64| if accumulate { v.abs() } else { 0.0 };
        let mut da = Vec::with_capacity(r * k);
        for j in 0..r {
            for q in 0..k {
                let abs_sum: f64 = (0..m)
                    .map(|i| u_abs[i * r + j] * self.x[i * k + q].to_f64().abs())
                    .sum::<f64>()
                    + prior_term(prior.1[j * k + q] as f64);
                da.push(f32_sum_bound::<f32>(want.1[j * k + q] as f64, abs_sum));
            }
        }
        let mut db = Vec::with_capacity(n * r);
        for c in 0..n {
            for j in 0..r {
                let abs_sum: f64 = (0..m)
                    .map(|i| s * (self.g[i * n + c].to_f64() * self.t[i * r + j] as f64).abs())
                    .sum::<f64>()
                    + prior_term(prior.2[c * r + j] as f64);
                db.push(f32_sum_bound::<f32>(want.2[c * r + j] as f64, abs_sum));
            }
        }
        (dx, da, db)
    }

    /// The same case with a new scale and `a` multiplied by `a_factor` (t,
    /// which depends on a, recomputed).
    fn rescaled(mut self, scale: f32, a_factor: f64) -> Self {
        for v in &mut self.a {
            *v = T::from_f64(v.to_f64() * a_factor);
        }
        self.scale = scale;
        self.t = reference::lora_intermediate(self.dims, &self.x, &self.adapter()).unwrap();
        self
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
    check_data(&case, &case.prior(seed ^ 9), accumulate, deterministic)
}

/// Every output of `case` against the reference, under the per-element bounds.
fn check_data<T: KernelElement>(
    case: &Case<T>,
    prior: &(Vec<T>, Vec<f32>, Vec<f32>),
    accumulate: bool,
    deterministic: bool,
) -> Result<(), String> {
    let opts = BackwardOptions {
        accumulate,
        deterministic,
        ..Default::default()
    };
    check_data_on(&devices(), case, prior, opts)
}

/// [`check_data`] on the given devices, with any options.
fn check_data_on<T: KernelElement>(
    devs: &[Device],
    case: &Case<T>,
    prior: &(Vec<T>, Vec<f32>, Vec<f32>),
    opts: BackwardOptions,
) -> Result<(), String> {
    let (dims, rank) = (case.dims, case.rank);
    let want = case.expected(opts.accumulate, prior);
    let (bdx, bda, bdb) = case.bounds(opts.accumulate, prior, &want);
    for dev in devs {
        let (dx, da, db) = case.run(dev, [true, true, true], opts, prior);
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
    negative_control_on::<T>(
        &devices(),
        BackwardOptions::default(),
        off,
        Dims::new(m, 37, 45),
    );
}

/// [`negative_control`] on the given devices, options and shape.
fn negative_control_on<T: KernelElement>(
    devs: &[Device],
    opts: BackwardOptions,
    off: f64,
    dims: Dims,
) {
    let m = dims.m;
    let case = Case::<T>::new(dims, 12, 1);
    let wrong = case.with_scale_times(1.0 + off as f32);
    let prior = case.prior(2);
    let want = case.expected(false, &prior);
    let bounds = case.bounds(false, &prior, &want);
    let off_want = wrong.expected(false, &prior);
    let off_bounds = wrong.bounds(false, &prior, &off_want);
    for dev in devs {
        let got = case.run(dev, [true, true, true], opts, &prior);
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
    // Decode (16-row and 64-row dx tiles) and prefill.
    for m in [9, 40, 70] {
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
    let want = case.expected(false, &prior);
    let (bdx, bda, bdb) = case.bounds(false, &prior, &want);
    for dev in devices() {
        for which in [
            [true, false, false],
            [false, true, false],
            [false, false, true],
        ] {
            let (dx, da, db) = case.run(&dev, which, BackwardOptions::default(), &prior);
            let check = |on: bool, got: &[f32], want: &[f32], prior: &[f32], bound: &[f64]| {
                if on {
                    compare_within("grad", got, want, bound).unwrap()
                } else {
                    assert_eq!(got, prior)
                }
            };
            if which[0] {
                compare_within("dx", &dx, &want.0, &bdx).unwrap()
            } else {
                assert_eq!(dx, prior.0)
            }
            check(which[1], &da, &want.1, &prior.1, &bda);
            check(which[2], &db, &want.2, &prior.2, &bdb);
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
        ..Default::default()
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

impl<T: KernelElement> PoolCase<T> {
    /// All three gradients; `prior`: da and db start at this value and the
    /// run accumulates onto them (else they start as NaN and are written).
    fn run(
        &self,
        dev: &Device,
        deterministic: bool,
        prior: Option<f32>,
    ) -> (Vec<T>, Vec<f32>, Vec<f32>) {
        let opts = BackwardOptions {
            accumulate: prior.is_some(),
            deterministic,
            ..Default::default()
        };
        self.run_with(dev, opts, prior)
    }

    /// [`Self::run`] with any options (`opts.accumulate` when `prior` is set).
    fn run_with(
        &self,
        dev: &Device,
        opts: BackwardOptions,
        prior: Option<f32>,
    ) -> (Vec<T>, Vec<f32>, Vec<f32>) {
        let Dims { m, n, k } = self.dims;
        let pool = self.pool(dev);
        let up = |v: &Vec<T>| dev.upload(v).unwrap();
        let (gd, xd, wd) = (up(&self.g), up(&self.x), up(&self.w));
        let (idd, td) = (dev.upload(&self.ids).unwrap(), dev.upload(&self.t).unwrap());
        let mut dx = dev.upload(&vec![T::from_f64(f64::NAN); m * k]).unwrap();
        let start = prior.unwrap_or(f32::NAN);
        let mut da = dev
            .upload(&vec![start; self.slots.len() * self.max_rank * k])
            .unwrap();
        let mut db = dev
            .upload(&vec![start; self.slots.len() * n * self.max_rank])
            .unwrap();
        let grads = Grads {
            dx: Some((&mut dx).into()),
            da: Some((&mut da).into()),
            db: Some((&mut db).into()),
        };
        let mut scratch = BackwardScratch::new(dev).unwrap();
        let inputs = DeviceBackwardInputs::new(&gd, &xd, &wd, &td);
        multi_adapter_backward(&pool, m, &idd, inputs, grads, opts, &mut scratch).unwrap();
        (
            dev.download(&dx).unwrap(),
            dev.download(&da).unwrap(),
            dev.download(&db).unwrap(),
        )
    }

    /// Runs on every device and mode and checks every output; returns the
    /// first run's results.
    fn check(&self, what: &str) -> (Vec<T>, Vec<f32>, Vec<f32>) {
        self.check_on(&devices(), what)
    }

    /// [`Self::check`] on the given devices.
    fn check_on(&self, devs: &[Device], what: &str) -> (Vec<T>, Vec<f32>, Vec<f32>) {
        self.check_with(devs, what, BackwardOptions::default())
    }

    /// [`Self::check_on`] with `base`'s other options (each run sets its
    /// own `deterministic`, and never `accumulate`).
    fn check_with(
        &self,
        devs: &[Device],
        what: &str,
        base: BackwardOptions,
    ) -> (Vec<T>, Vec<f32>, Vec<f32>) {
        let want = self.expected();
        let (bdx, bda, bdb) = self.bounds(&want);
        for dev in devs {
            for deterministic in [false, true] {
                let opts = BackwardOptions {
                    accumulate: false,
                    deterministic,
                    ..base
                };
                let got = self.run_with(dev, opts, None);
                let what = format!(
                    "{what} {:?} on {} (deterministic {deterministic})",
                    T::DTYPE,
                    dev.name()
                );
                compare_within(&format!("dx {what}"), &got.0, &want.0, &bdx).unwrap();
                compare_within(&format!("da {what}"), &got.1, &want.1, &bda).unwrap();
                compare_within(&format!("db {what}"), &got.2, &want.2, &bdb).unwrap();
            }
        }
        want
    }
}

/// Multi-adapter backward = the single-adapter reference applied per slot
/// to that slot's tokens (dx per token, da/db summed per slot).
#[test]
fn multi_adapter_backward_equals_a_per_slot_loop() {
    let ids: Vec<i32> = (0..37).map(|i| [0, 2, -1, 3, 2, 0, 7][i % 7]).collect(); // 7: out of range
    PoolCase::<bf16>::new(Dims::new(37, 26, 19), 12, &[5, 0, 12, 1], ids, 21)
        .check("per-slot loop");
}

/// The dx of 17 to 64 tokens takes 64-row tiles (`w` read once per column
/// tile), each warp expanding its own 16 rows' adapters one after another:
/// 8 slots of ranks 1 to 80 (two rank chunks), tokens without an adapter, an
/// out-of-range id, several adapters in every warp's rows, f16 and bf16, `k`
/// on and off the 16-byte path. Each matches the per-slot reference, also
/// with the host runtime's warps taking turns (a warp's expand state reaching
/// another warp shows there).
#[test]
fn dx_of_17_to_64_tokens_expands_per_warp() {
    let devs = devices_and_interleaved();
    let ranks = [1, 16, 80, 3, 33, 64, 0, 12];
    for (m, k) in [(17, 19), (64, 24), (40, 32)] {
        let ids: Vec<i32> = (0..m as i32)
            .map(|i| match i % 11 {
                10 => 9, // out of range
                j => [0, 1, 2, 3, 4, 5, -1, 7, 2, 5][j as usize],
            })
            .collect();
        let dims = Dims::new(m, 45, k);
        PoolCase::<bf16>::new(dims, 80, &ranks, ids.clone(), m as u64)
            .check_on(&devs, "64-row dx tiles");
        PoolCase::<f16>::new(dims, 80, &ranks, ids, k as u64).check_on(&devs, "64-row dx tiles");
    }
}

/// f16's range in dx's split of u = s g b (docs/DESIGN.md section 2): with
/// s = 2^16 and g's rows other than every third one divided by 16, |u|
/// reaches about 1e5 in some rows and stays below 2^15 in others; a is small
/// so dx stays finite. Both tensor-core regimes (m <= 64 decode), shapes off
/// every tile, ranks 13 and 70 (two rank chunks); a scale off by 0.3% fails
/// the dx bound.
#[test]
fn f16_dx_with_u_beyond_the_f16_range_matches_reference() {
    for (m, n, k) in [(21, 45, 70), (70, 37, 45)] {
        for rank in [13, 70] {
            let mut case =
                Case::<f16>::new(Dims::new(m, n, k), rank, 3).rescaled(65536.0, 1.0 / 4096.0);
            for i in (0..m).filter(|i| i % 3 != 0) {
                for v in &mut case.g[i * n..(i + 1) * n] {
                    *v = f16::from_f64(v.to_f64() / 16.0);
                }
            }
            let u_max: Vec<f64> = (0..m)
                .map(|i| {
                    u_terms(&case.g[i * n..(i + 1) * n], &case.adapter())
                        .0
                        .iter()
                        .fold(0f64, |a, v| a.max(v.abs()))
                })
                .collect();
            assert!(
                u_max.iter().any(|&v| v > 65504.0) && u_max.iter().any(|&v| v < 32768.0),
                "{u_max:?}"
            );
            let prior = case.prior(4);
            check_data(&case, &prior, false, false).unwrap();
            let wrong = case.with_scale_times(1.003);
            let off_want = wrong.expected(false, &prior);
            let off_bound = wrong.bounds(false, &prior, &off_want).0;
            for dev in devices() {
                let got = case.run(
                    &dev,
                    [true, false, false],
                    BackwardOptions::default(),
                    &prior,
                );
                let err = compare_within("dx", &got.0, &off_want.0, &off_bound)
                    .expect_err("scale off by 0.3%");
                eprintln!("negative control f16 dx m={m} r={rank}, large u: {err}");
            }
        }
    }
}

/// The same for the pool backward: slot 1 has scale 2^16 and a small `a`,
/// the others are ordinary, tokens of all of them share tiles.
#[test]
fn f16_pool_backward_with_a_huge_scale_matches_reference() {
    for m in [21, 70] {
        let ids: Vec<i32> = (0..m).map(|i| [1, 0, 2, -1][i % 4]).collect();
        let mut case =
            PoolCase::<f16>::new(Dims::new(m, 45, 37), 70, &[13, 70, 5], ids.clone(), 23);
        let (_, scale, a, _) = &mut case.slots[1];
        *scale = 65536.0;
        for v in a.iter_mut() {
            *v = f16::from_f64(v.to_f64() / 4096.0);
        }
        case.save_t();
        let u_max = (0..m)
            .filter_map(|i| {
                case.adapter_of(i)
                    .filter(|ad| ad.scale > 1e4)
                    .map(|ad| u_terms(&case.g[i * 45..(i + 1) * 45], &ad).0)
            })
            .flatten()
            .fold(0f64, |a, v| a.max(v.abs()));
        assert!(u_max > 65504.0, "{u_max}");
        case.check("huge scale");
    }
}

/// Infinite weights in `a` (docs/DESIGN.md section 2): +Inf and -Inf in a,
/// also in the second rank chunk and two of opposite signs in one column of
/// dx; a row of g that is all zeros (u = 0, so 0 * Inf = NaN). Every element
/// of dx (tensor cores for f16 and bf16, decode and prefill), da and db is
/// the reference's: the same infinity, NaN where it has NaN, and within the
/// per-element bound where finite.
#[test]
fn infinite_a_gives_the_references_infinities_and_nans() {
    fn check<T: KernelElement>(m: usize) {
        let (n, k, inf) = (37, 45, f64::INFINITY);
        for rank in [5, 70] {
            let mut case = Case::<T>::new(Dims::new(m, n, k), rank, 9);
            case.a[3] = T::from_f64(inf);
            case.a[(rank - 1) * k + 7] = T::from_f64(-inf);
            case.a[9] = T::from_f64(inf);
            case.a[(rank / 2) * k + 9] = T::from_f64(-inf);
            case.g[2 * n..3 * n].fill(T::from_f64(0.0));
            let scale = case.scale;
            let case = case.rescaled(scale, 1.0); // t from the new a
            let want = case.expected(false, &case.prior(1));
            let has = |p: &dyn Fn(f64) -> bool| want.0.iter().any(|v| p(v.to_f64()));
            assert!(has(&|v| v == inf) && has(&|v| v == -inf) && has(&f64::is_nan));
            check_data(&case, &case.prior(1), false, false).unwrap();
        }
    }
    for m in [9, 70] {
        check::<f16>(m);
        check::<bf16>(m);
    }
}

/// Infinite weights in `b`, which only u = s g b reads (on tensor cores for
/// f16 and bf16): +Inf and -Inf in b, at rank 0 and at the last rank (the
/// second 64-rank chunk at rank 70), one of them past the first 64-wide
/// stage of n; a row of g that is all zeros (0 * Inf = NaN in u). Every
/// element of dx, da and db is the reference's.
#[test]
fn infinite_b_gives_the_references_infinities_and_nans() {
    fn check<T: KernelElement>(m: usize) {
        let (n, k, inf) = (70, 45, f64::INFINITY);
        for rank in [5, 70] {
            let mut case = Case::<T>::new(Dims::new(m, n, k), rank, 19);
            case.b[3 * rank] = T::from_f64(inf);
            case.b[66 * rank + rank - 1] = T::from_f64(-inf);
            case.g[2 * n..3 * n].fill(T::from_f64(0.0));
            let want = case.expected(false, &case.prior(1));
            let dx_has = |p: fn(f64) -> bool| want.0.iter().any(|v| p(v.to_f64()));
            assert!(dx_has(f64::is_nan) && dx_has(f64::is_infinite));
            assert!(want.1.iter().any(|v| v.is_nan()));
            check_data(&case, &case.prior(1), false, false).unwrap();
        }
    }
    for m in [9, 70] {
        check::<f16>(m);
        check::<bf16>(m);
    }
}

/// Non-finite values in g, then in x: +Inf, -Inf and NaN. Each reduction
/// meets them in its gathered operand (g for db, x for da), where only the
/// columns they sit in turn non-finite, and in its f32 one (u = s g b for
/// da, t = x a^T for db), where a whole row does. On the tensor-core path
/// those are the two halves of the slow path (kernels/include/lk_token_gemm.cuh).
/// Every element of dx, da and db is the reference's.
#[test]
fn infinite_g_or_x_give_the_references_infinities_and_nans() {
    fn check<T: KernelElement>(m: usize, rank: usize, in_g: bool) {
        let (n, k, inf) = (37, 45, f64::INFINITY);
        let mut case = Case::<T>::new(Dims::new(m, n, k), rank, 12);
        let (v, len) = if in_g {
            (&mut case.g, n)
        } else {
            (&mut case.x, k)
        };
        v[len + 4] = T::from_f64(inf);
        v[(m - 1) * len + 4] = T::from_f64(-inf);
        v[(m / 2) * len + 30] = T::from_f64(f64::NAN);
        let scale = case.scale;
        let case = case.rescaled(scale, 1.0); // t from the new x
        let want = case.expected(false, &case.prior(1));
        // g's columns are db's rows, x's columns da's.
        let (cols, rows) = if in_g {
            (&want.2, &want.1)
        } else {
            (&want.1, &want.2)
        };
        assert!(cols.iter().any(|v| v.is_nan()) && cols.iter().any(|v| v.is_finite()));
        assert!(rows.iter().any(|v| !v.is_finite()));
        check_data(&case, &case.prior(1), false, false).unwrap();
    }
    for (m, rank) in [(9, 5), (70, 40)] {
        for in_g in [true, false] {
            check::<f32>(m, rank, in_g);
            check::<f16>(m, rank, in_g);
            check::<bf16>(m, rank, in_g);
        }
    }
}

/// The reductions' tensor-core tiles at their edges: several 128-column
/// tiles with a partial last one, a row length that allows 16-byte copies
/// and one that does not (n for db, k for da), several token ranges of
/// several 32-token tiles, ranks 1, 16 and 33 (two rank passes).
#[test]
fn reductions_cover_column_tiles_and_both_copy_paths() {
    for (m, n, k) in [(300, 264, 260), (200, 130, 136)] {
        for rank in [1, 16, 33] {
            for deterministic in [false, true] {
                check_case::<bf16>(Dims::new(m, n, k), rank, 31, false, deterministic).unwrap();
                check_case::<f16>(Dims::new(m, n, k), rank, 32, true, deterministic).unwrap();
            }
        }
    }
}

/// A pool whose token range is longer than a block's token window (512): 264
/// slots make one range the whole batch; slot 0 takes most of the 1100 tokens
/// (many 32-token tiles in each window), the rest are spread over the other
/// slots, -1 and an out-of-range id.
#[test]
fn pool_reductions_walk_their_tokens_window_by_window() {
    let slots = 264;
    let ranks: Vec<usize> = (0..slots).map(|s| [16, 3, 0, 1][s % 4]).collect();
    let ids: Vec<i32> = (0..1100)
        .map(|i| match i % 10 {
            0..=6 => 0,
            7 => -1,
            8 => (i * 7 % slots) as i32,
            _ => [1, 5, 300][i % 3],
        })
        .collect();
    PoolCase::<bf16>::new(Dims::new(1100, 26, 19), 16, &ranks, ids, 41).check("windows");
}

/// u = s g b's tensor-core tiles at their edges (dx and da carry u): n past
/// a 64-wide stage with 16-byte copies (n = 264, rank 72, so b's second
/// 64-rank chunk is 8 wide) and without (n = 130, rank 70); several 32-token
/// tiles per block in a pool whose one token range is the whole batch, with
/// 16-byte copies of gathered g rows (n = 72, max_rank 72).
#[test]
fn u_tiles_cover_rank_chunks_token_tiles_and_both_copy_paths() {
    for (n, rank) in [(264, 72), (130, 70)] {
        check_case::<bf16>(Dims::new(100, n, 24), rank, 51, false, false).unwrap();
        check_case::<f16>(Dims::new(100, n, 24), rank, 52, true, true).unwrap();
    }
    let slots = 264;
    let ranks: Vec<usize> = (0..slots).map(|s| [72, 8, 0, 1, 33][s % 5]).collect();
    let ids: Vec<i32> = (0..300)
        .map(|i| {
            if i % 4 == 3 {
                (i * 11 % slots) as i32
            } else {
                0
            }
        })
        .collect();
    PoolCase::<f16>::new(Dims::new(300, 72, 19), 72, &ranks, ids, 53).check("u tiles");
}

/// Few tokens over a long n (decode): u reduces over several ranges of n in
/// separate blocks and adds their partials in range order (the last range
/// shorter, both copy paths, two rank chunks), for one adapter and a pool;
/// bit for bit the same run to run.
#[test]
fn decode_u_sums_ranges_of_n_in_order() {
    for (m, n, rank) in [(1, 1000, 16), (3, 999, 70), (2, 520, 1)] {
        check_case::<bf16>(Dims::new(m, n, 24), rank, 71, false, true).unwrap();
        check_case::<f16>(Dims::new(m, n, 24), rank, 72, true, false).unwrap();
    }
    let ids = vec![2, -1, 0, 2];
    let case = PoolCase::<bf16>::new(Dims::new(4, 776, 24), 24, &[24, 0, 5], ids, 73);
    case.check("decode u");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for dev in devices() {
        let (first, again) = (case.run(&dev, true, None), case.run(&dev, true, None));
        assert_eq!(first.0, again.0, "dx on {}", dev.name());
        assert_eq!(bits(&first.1), bits(&again.1), "da on {}", dev.name());
        assert_eq!(bits(&first.2), bits(&again.2), "db on {}", dev.name());
    }
}

/// A pool larger than the batch (300 slots, 40 tokens): u, da and db get a
/// grid layer per token, each slot the batch uses at its first token's
/// layer (slot 5 trained by five tokens; the empty slot 2, -1 and an id
/// out of range as well), with and without 16-byte copies. Every other
/// slot's gradient is written as zeros, or left bit for bit as it was when
/// accumulating (five layers working for slot 5 would add its gradient five
/// times).
#[test]
fn pool_larger_than_the_batch_gets_a_layer_per_token() {
    let slots = 300;
    let ranks: Vec<usize> = (0..slots).map(|s| [16, 3, 0, 1, 8][s % 5]).collect();
    let ids: Vec<i32> = (0..40)
        .map(|i| match i % 8 {
            0 => 5,
            1 => -1,
            2 => 300,
            3 => 2,
            _ => (i * 37 % slots) as i32,
        })
        .collect();
    PoolCase::<f16>::new(Dims::new(40, 72, 24), 16, &ranks, ids.clone(), 62).check("pool > batch");
    let case = PoolCase::<bf16>::new(Dims::new(40, 26, 19), 16, &ranks, ids, 61);
    let want = case.check("pool > batch");
    let (_, bda, bdb) = case.bounds(&want);
    let (mr, Dims { n, k, .. }) = (case.max_rank, case.dims);
    let trained: Vec<bool> = (0..slots)
        .map(|s| (0..40).any(|i| case.slot_of(i) == Some(s)))
        .collect();
    let prior = 0.5f32;
    for dev in devices() {
        for deterministic in [false, true] {
            let got = case.run(&dev, deterministic, Some(prior));
            let grads = [
                ("da", &got.1, &want.1, &bda, mr * k),
                ("db", &got.2, &want.2, &bdb, n * mr),
            ];
            for (name, got, want, bound, per_slot) in grads {
                for (e, &v) in got.iter().enumerate() {
                    let expect = prior as f64 + want[e] as f64;
                    let ok = if trained[e / per_slot] {
                        (v as f64 - expect).abs() <= bound[e] + expect.abs() * f32::EPSILON as f64
                    } else {
                        v.to_bits() == prior.to_bits()
                    };
                    assert!(
                        ok,
                        "{name}[{e}] (slot {}) = {v}, want {expect} on {} (deterministic {deterministic})",
                        e / per_slot,
                        dev.name()
                    );
                }
            }
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
    let want = case.expected(true, &prior);
    let (bdx, bda, bdb) = case.bounds(true, &prior, &want);
    for deterministic in [false, true] {
        let opts = BackwardOptions {
            accumulate: true,
            deterministic,
            ..Default::default()
        };
        let (dx, da, db) = case.run(&dev, [true, true, true], opts, &prior);
        compare_within("dx", &dx, &want.0, &bdx).unwrap();
        compare_within("da", &da, &want.1, &bda).unwrap();
        compare_within("db", &db, &want.2, &bdb).unwrap();
    }
}

// ---- dx on Hopper's wgmma and TMA (`BackwardOptions::wgmma`) ----

fn wgmma_opts(accumulate: bool, deterministic: bool) -> BackwardOptions {
    BackwardOptions {
        accumulate,
        deterministic,
        wgmma: Some(true),
    }
}

/// The wgmma dx (and da, db beside it) matches the reference within
/// docs/DESIGN.md section 3's bounds on shapes off every tile: m off the
/// 128-row tile, k off the 128-column tile and not a multiple of w's 64-wide
/// boxes, n (the reduction) off the 64-wide tiles and past the 4 stages so
/// the ring wraps; ranks 1, 5, 16, 64 and 70 (two chunks of the expand);
/// written and accumulated, on the host runtime under each schedule and on
/// a Hopper GPU.
#[test]
fn wgmma_dx_matches_reference_off_every_tile() {
    let devs = wgmma_devices();
    for (i, ((m, n, k), r)) in [
        ((200, 328, 136), 5),
        ((130, 64, 72), 1),
        ((64, 136, 264), 64),
        ((129, 40, 128), 16),
        ((70, 96, 200), 70),
    ]
    .into_iter()
    .enumerate()
    {
        let dims = Dims::new(m, n, k);
        let accumulate = i % 2 == 1;
        for seed in [40 + i as u64, 50 + i as u64] {
            let prior_seed = seed ^ 9;
            let case = Case::<bf16>::new(dims, r, seed);
            check_data_on(
                &devs,
                &case,
                &case.prior(prior_seed),
                wgmma_opts(accumulate, true),
            )
            .unwrap();
            let case = Case::<f16>::new(dims, r, seed);
            check_data_on(
                &devs,
                &case,
                &case.prior(prior_seed),
                wgmma_opts(accumulate, false),
            )
            .unwrap();
        }
    }
}

/// A scale off by 1% (bf16) or 0.3% (f16) fails the wgmma dx's check.
#[test]
fn wgmma_dx_negative_control() {
    let devs = wgmma_devices();
    let dims = Dims::new(150, 40, 136);
    negative_control_on::<bf16>(&devs, wgmma_opts(false, true), 1e-2, dims);
    negative_control_on::<f16>(&devs, wgmma_opts(false, true), 3e-3, dims);
}

/// A pool: tokens of 6 slots of ranks 1 to 80 (two rank chunks), tokens
/// without an adapter and an out-of-range id, several adapters in every
/// 128-row tile; each token's dx matches the per-slot reference.
#[test]
fn wgmma_dx_of_a_pool_matches_a_per_slot_loop() {
    let devs = wgmma_devices();
    let ranks = [1, 16, 80, 3, 0, 64];
    let m = 150;
    let ids: Vec<i32> = (0..m as i32)
        .map(|i| [0, 1, 2, 3, 4, 5, -1, 2, 9][(i % 9) as usize])
        .collect();
    let dims = Dims::new(m, 72, 136);
    let wgmma = wgmma_opts(false, false);
    PoolCase::<bf16>::new(dims, 80, &ranks, ids.clone(), 61).check_with(&devs, "wgmma dx", wgmma);
    PoolCase::<f16>::new(dims, 80, &ranks, ids, 62).check_with(&devs, "wgmma dx", wgmma);
}

/// Infinite weights in a and a row of g that is all zeros (0 * Inf = NaN in
/// u a): the wgmma dx has the reference's infinities and NaNs, and is within
/// the bound elsewhere.
#[test]
fn wgmma_dx_with_infinite_a_gives_the_references_infinities_and_nans() {
    let devs = wgmma_devices();
    let (n, k, inf) = (40, 72, f64::INFINITY);
    for rank in [5, 70] {
        let mut case = Case::<bf16>::new(Dims::new(130, n, k), rank, 9);
        case.a[3] = bf16::from_f64(inf);
        case.a[(rank - 1) * k + 7] = bf16::from_f64(-inf);
        case.g[2 * n..3 * n].fill(bf16::from_f64(0.0));
        let scale = case.scale;
        let case = case.rescaled(scale, 1.0);
        let want = case.expected(false, &case.prior(1));
        let has = |p: &dyn Fn(f64) -> bool| want.0.iter().any(|v| p(v.to_f64()));
        assert!(has(&|v| v == inf) && has(&|v| v == -inf) && has(&f64::is_nan));
        check_data_on(&devs, &case, &case.prior(1), wgmma_opts(false, true)).unwrap();
    }
}

/// What the wgmma dx can't take is an error naming why, and the failed call
/// leaves every gradient as it was: n or k not a multiple of 8, f32, and a
/// GPU other than compute capability 9.0.
#[test]
fn wgmma_dx_refuses_what_it_cannot_load_and_changes_nothing() {
    fn refused<T: KernelElement>(dev: &Device, dims: Dims, what: &str) {
        let case = Case::<T>::new(dims, 3, 70);
        let prior = case.prior(71);
        let up = |v: &Vec<T>| dev.upload(v).unwrap();
        let (g, x, w, a, b) = (
            up(&case.g),
            up(&case.x),
            up(&case.w),
            up(&case.a),
            up(&case.b),
        );
        let t = dev.upload(&case.t).unwrap();
        let (mut dx, mut da, mut db) = (
            up(&prior.0),
            dev.upload(&prior.1).unwrap(),
            dev.upload(&prior.2).unwrap(),
        );
        let grads = Grads {
            dx: Some((&mut dx).into()),
            da: Some((&mut da).into()),
            db: Some((&mut db).into()),
        };
        let mut scratch = BackwardScratch::new(dev).unwrap();
        let adapter = DeviceAdapter::new(&a, &b, case.rank, case.scale);
        let inputs = DeviceBackwardInputs::new(&g, &x, &w, &t);
        let err = lora_backward(
            dev,
            dims,
            &adapter,
            inputs,
            grads,
            wgmma_opts(false, false),
            &mut scratch,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(what), "{dims:?} {:?}: {err}", T::DTYPE);
        assert!(dev.download(&dx).unwrap() == prior.0, "dx changed");
        assert!(dev.download(&da).unwrap() == prior.1, "da changed");
        assert!(dev.download(&db).unwrap() == prior.2, "db changed");
    }
    for dev in devices() {
        match dev.compute_capability() {
            Some(cc) if cc != (9, 0) => {
                refused::<bf16>(&dev, Dims::new(130, 64, 64), "compute capability")
            }
            _ => {
                refused::<bf16>(&dev, Dims::new(130, 60, 64), "n = 60, k = 64");
                refused::<f16>(&dev, Dims::new(130, 64, 68), "n = 64, k = 68");
                refused::<f32>(&dev, Dims::new(130, 64, 64), "`dtype`");
            }
        }
    }
}

// ---- The default's choice between the mma.sync and wgmma dx ----

/// `lora_backward` takes the wgmma dx from 512 tokens where it can run (the
/// host runtime, compute capability 9.0), and the mma.sync dx below; n or k
/// not a multiple of 8 (no TMA rows) keeps the mma.sync dx instead of
/// failing, as does `wgmma: Some(false)`. One dx kernel runs, and dx, da
/// and db are within their bounds either way.
#[test]
fn default_dx_takes_wgmma_from_512_tokens() {
    for dev in devices() {
        let hopper = runs_wgmma(&dev);
        for (m, n, k, wgmma, on_wgmma) in [
            (511, 40, 72, None, false),
            (512, 40, 72, None, hopper),
            (700, 42, 72, None, false),
            (700, 40, 70, None, false),
            (700, 40, 72, Some(false), false),
        ] {
            let case = Case::<bf16>::new(Dims::new(m, n, k), 16, (m + n + k) as u64);
            let what = format!("m={m} n={n} k={k} {wgmma:?} on {}", dev.name());
            let prior = case.prior(3);
            let want = case.expected(false, &prior);
            let (bdx, bda, bdb) = case.bounds(false, &prior, &want);
            let opts = BackwardOptions {
                wgmma,
                ..Default::default()
            };
            lora_kernels::take_recent_launches();
            let (dx, da, db) = case.run(&dev, [true, true, true], opts, &prior);
            let launched = lora_kernels::take_recent_launches();
            let dx_kernels: Vec<_> = launched
                .iter()
                .filter(|k| k.starts_with("lk_backward_dx_"))
                .collect();
            assert_eq!(dx_kernels.len(), 1, "{what}: {launched:?}");
            let on = *dx_kernels[0] == "lk_backward_dx_wgmma_bf16";
            assert_eq!(on, on_wgmma, "{what}: {launched:?}");
            compare_within(&format!("{what}: dx"), &dx, &want.0, &bdx).unwrap();
            compare_within(&format!("{what}: da"), &da, &want.1, &bda).unwrap();
            compare_within(&format!("{what}: db"), &db, &want.2, &bdb).unwrap();
        }
    }
}
