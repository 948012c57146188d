//! The fused-forward kernel against the CPU reference: on the host runtime
//! (always, small shapes including every tile tail) and on the GPU (when there
//! is one; also at real model shapes). Small shapes are checked element by
//! element against docs/DESIGN.md section 3's per-element bound, with a
//! negative control per type and regime.
mod common;

use common::*;
use half::{bf16, f16};
use lora_kernels::ops::fused_forward::{
    LaunchForm, Regime, fused_forward, fused_forward_in, fused_forward_tuned,
};
use lora_kernels::reference;
use lora_kernels::reference::Adapter;
use lora_kernels::{Device, DeviceAdapter, Dims, HostSchedule, KernelElement};

struct Case<T> {
    dims: Dims,
    x: Vec<T>,
    w: Vec<T>,
    a: Vec<T>,
    b: Vec<T>,
    rank: usize,
    scale: f32,
    beta: f32,
    y0: Vec<T>,
}

impl<T: KernelElement> Case<T> {
    fn new(dims: Dims, rank: usize, beta: f32, seed: u64) -> Self {
        let mut g = rng(seed);
        let Dims { m, n, k } = dims;
        Case {
            dims,
            x: random(&mut g, m * k),
            w: random(&mut g, n * k),
            a: random(&mut g, rank * k),
            b: random(&mut g, n * rank),
            rank,
            scale: 0.25 + (seed % 5) as f32 * 0.5,
            beta,
            // With beta = 0, y starts as NaN: an element the kernel fails to
            // write, or reads although it must not, shows.
            y0: if beta == 0.0 {
                vec![T::from_f64(f64::NAN); m * n]
            } else {
                random(&mut g, m * n)
            },
        }
    }

    /// The case's adapter, as the reference takes it.
    fn adapter(&self) -> Adapter<'_, T> {
        Adapter {
            a: &self.a,
            b: &self.b,
            rank: self.rank,
            scale: self.scale,
        }
    }

    /// The reference's t = x a^T (`[m, rank]`).
    fn reference_t(&self) -> Vec<f32> {
        reference::lora_intermediate(self.dims, &self.x, &self.adapter()).unwrap()
    }

    fn expected(&self) -> Vec<T> {
        let mut y = self.y0.clone();
        reference::fused_forward(
            self.dims,
            &self.x,
            &self.w,
            &self.adapter(),
            self.beta,
            &mut y,
        )
        .unwrap();
        y
    }

    /// Absolute tolerance: rtol times sqrt(k + r) times the largest term of
    /// the sums (base products and scaled low-rank products). Only the
    /// comparison with cuBLAS uses it (docs/DESIGN.md section 3): cuBLAS rounds t
    /// to the storage type, so its error is not the per-element bound's.
    #[cfg(feature = "bench")]
    fn atol(&self) -> f64 {
        let t = self.reference_t();
        let t_max = t.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        let terms =
            (max_abs(&self.x) * max_abs(&self.w)).max(self.scale as f64 * t_max * max_abs(&self.b));
        rtol::<T>() * ((self.dims.k + self.rank) as f64).sqrt() * terms + 1e-30
    }

    /// Runs the op (`regime` None: the dispatcher's choice).
    fn run(&self, dev: &Device, regime: Option<Regime>) -> lora_kernels::Result<Vec<T>> {
        let (x, w) = (dev.upload(&self.x)?, dev.upload(&self.w)?);
        let (a, b) = (dev.upload(&self.a)?, dev.upload(&self.b)?);
        let mut y = dev.upload(&self.y0)?;
        let adapter = DeviceAdapter::new(&a, &b, self.rank, self.scale);
        match regime {
            Some(regime) => {
                fused_forward_in(regime, dev, self.dims, &x, &w, &adapter, self.beta, &mut y)?
            }
            None => fused_forward(dev, self.dims, &x, &w, &adapter, self.beta, &mut y)?,
        }
        dev.download(&y)
    }

    /// Runs the op in `regime` and launch `form`, saving `t`: `(y, t)`.
    fn run_tuned(
        &self,
        dev: &Device,
        regime: Regime,
        form: LaunchForm,
    ) -> lora_kernels::Result<(Vec<T>, Vec<f32>)> {
        let (x, w) = (dev.upload(&self.x)?, dev.upload(&self.w)?);
        let (a, b) = (dev.upload(&self.a)?, dev.upload(&self.b)?);
        let mut y = dev.upload(&self.y0)?;
        let mut t = dev.upload(&vec![f32::NAN; self.dims.m * self.rank])?;
        fused_forward_tuned(
            regime,
            form,
            dev,
            self.dims,
            ((&x).into(), (&w).into()),
            &DeviceAdapter::new(&a, &b, self.rank, self.scale),
            self.beta,
            ((&mut y).into(), Some((&mut t).into())),
        )?;
        Ok((dev.download(&y)?, dev.download(&t)?))
    }

    /// Runs the case in `regime` in the `first` launch form and checks `y`
    /// against the reference, then in each of `others`, which must give the
    /// same `y` and saved `t`, bit for bit.
    fn forms_agree(
        &self,
        dev: &Device,
        regime: Regime,
        first: (&str, LaunchForm),
        others: &[(&str, LaunchForm)],
    ) {
        let Dims { m, n, k } = self.dims;
        let what = format!("{:?} m={m} n={n} k={k} r={}", T::DTYPE, self.rank);
        let run0 = self.run_tuned(dev, regime, first.1).unwrap();
        let want = self.expected();
        let label = format!("{what}, {}", first.0);
        compare_within(&label, &run0.0, &want, &self.bound(&want)).unwrap();
        for (name, form) in others {
            let run = self.run_tuned(dev, regime, *form).unwrap();
            assert_same_run(&format!("{what}, {name} against {}", first.0), &run, &run0);
        }
    }

    /// Runs the case in `regime` and `form`: `y` and the saved `t` within
    /// their bounds, and a second run the same bits (counters back at 0, a
    /// fixed order of sums). Returns the run.
    fn check_twice(
        &self,
        dev: &Device,
        regime: Regime,
        form: LaunchForm,
        what: &str,
    ) -> (Vec<T>, Vec<f32>) {
        let (want, want_t) = (self.expected(), self.reference_t());
        let run = self.run_tuned(dev, regime, form).unwrap();
        compare_within(what, &run.0, &want, &self.bound(&want)).unwrap();
        compare_within(&format!("{what}: t"), &run.1, &want_t, &self.t_bound()).unwrap();
        let again = self.run_tuned(dev, regime, form).unwrap();
        assert_same_run(&format!("{what}, a second run"), &again, &run);
        run
    }

    /// Asserts that launching in `regime` and `form` on the host runtime is
    /// an `InvalidArgument` naming `name` that leaves `y` as it was.
    fn rejects(&self, regime: Regime, form: LaunchForm, name: &str) {
        let host = Device::host().unwrap();
        let (x, w) = (host.upload(&self.x).unwrap(), host.upload(&self.w).unwrap());
        let (a, b) = (host.upload(&self.a).unwrap(), host.upload(&self.b).unwrap());
        let mut y = host.upload(&self.y0).unwrap();
        let err = fused_forward_tuned(
            regime,
            form,
            &host,
            self.dims,
            ((&x).into(), (&w).into()),
            &DeviceAdapter::new(&a, &b, self.rank, self.scale),
            self.beta,
            ((&mut y).into(), None),
        )
        .unwrap_err();
        assert!(
            matches!(&err, lora_kernels::Error::InvalidArgument { name: got, .. } if *got == name),
            "{err}"
        );
        assert!(same_bits(&host.download(&y).unwrap(), &self.y0));
    }

    fn check(&self, dev: &Device, regime: Option<Regime>) -> Result<(), String> {
        let got = self.run(dev, regime).map_err(|e| e.to_string())?;
        let Dims { m, n, k } = self.dims;
        let what = format!(
            "{:?} {regime:?} m={m} n={n} k={k} r={} beta={} on {}",
            T::DTYPE,
            self.rank,
            self.beta,
            dev.name()
        );
        let want = self.expected();
        compare_within(&what, &got, &want, &self.bound(&want))
    }

    /// `y` of a launch in `regime` and `form` within its bound, and its
    /// negative control: against a reference with the scale off by `off` the
    /// same output must fail the bound.
    fn check_form_with_control(
        &self,
        dev: &Device,
        regime: Regime,
        form: LaunchForm,
        off: f32,
        what: &str,
    ) {
        let got = self.run_tuned(dev, regime, form).unwrap().0;
        let want = self.expected();
        compare_within(what, &got, &want, &self.bound(&want)).unwrap();
        let wrong = self.with_scale_times(1.0 + off);
        let want = wrong.expected();
        compare_within("control", &got, &want, &wrong.bound(&want))
            .expect_err("a reference with the scale off must fail the check");
    }

    /// [`Case::check`] in `regime`, and its negative control: the same output
    /// against the reference with the scale off by `off` must fail the bound.
    fn check_with_control(&self, dev: &Device, regime: Regime, off: f32) {
        self.check(dev, Some(regime)).unwrap();
        let got = self.run(dev, Some(regime)).unwrap();
        let wrong = self.with_scale_times(1.0 + off);
        let want = wrong.expected();
        let err = compare_within("control", &got, &want, &wrong.bound(&want))
            .expect_err("a reference with the scale off must fail the check");
        let Dims { m, n, k } = self.dims;
        eprintln!(
            "negative control {:?} {regime:?} m={m} n={n} k={k} r={}, scale x (1 + {off}): {err}",
            T::DTYPE,
            self.rank
        );
    }

    /// docs/DESIGN.md section 3's per-element bound ([`forward_bound`]).
    fn bound(&self, want: &[T]) -> Vec<f64> {
        let adapters = vec![Some(self.adapter()); self.dims.m];
        forward_bound(
            self.dims, &self.x, &self.w, &adapters, self.beta, &self.y0, want,
        )
    }

    /// The per-element bound of `t` = x a^T, an f32 sum over k: over
    /// sum_k |x a_j| (docs/DESIGN.md section 3).
    fn t_bound(&self) -> Vec<f64> {
        let (want_t, r, k) = (self.reference_t(), self.rank, self.dims.k);
        (0..self.dims.m * r)
            .map(|e| {
                let (i, j) = (e / r, e % r);
                let abs_sum = self.x[i * k..(i + 1) * k]
                    .iter()
                    .zip(&self.a[j * k..(j + 1) * k])
                    .map(|(p, q)| (p.to_f64() * q.to_f64()).abs())
                    .sum();
                f32_sum_bound::<f32>(want_t[e] as f64, abs_sum)
            })
            .collect()
    }

    /// Per row, the largest |scale * t| (the reference's t).
    fn scaled_t_row_max(&self) -> Vec<f64> {
        self.reference_t()
            .chunks(self.rank)
            .map(|row| {
                row.iter()
                    .fold(0f64, |m, v| m.max((self.scale * v).abs() as f64))
            })
            .collect()
    }

    /// The same case with the adapter's scale multiplied by `factor`.
    fn with_scale_times(&self, factor: f32) -> Self {
        Case {
            scale: self.scale * factor,
            x: self.x.clone(),
            w: self.w.clone(),
            a: self.a.clone(),
            b: self.b.clone(),
            y0: self.y0.clone(),
            ..*self
        }
    }
}

/// Asserts that a run's `y` and saved `t` are the same bits as another's.
fn assert_same_run<T: KernelElement>(
    what: &str,
    (y, t): &(Vec<T>, Vec<f32>),
    (y0, t0): &(Vec<T>, Vec<f32>),
) {
    assert!(same_bits(y, y0), "{what}: y differs");
    assert!(
        t.len() == t0.len() && t.iter().zip(t0).all(|(u, v)| u.to_bits() == v.to_bits()),
        "{what}: t differs"
    );
}

/// A shape: (m, n, k, r).
type Shape = (usize, usize, usize, usize);

/// Runs a check at every shape on every device, in bf16 and f16, with
/// beta 0.5 at the third shape and 0 at the others.
fn every_shape_and_type(
    shapes: &[Shape],
    bf16_check: fn(&Device, Shape, f32),
    f16_check: fn(&Device, Shape, f32),
) {
    for (i, &shape) in shapes.iter().enumerate() {
        let beta = if i == 2 { 0.5 } else { 0.0 };
        for dev in devices() {
            bf16_check(&dev, shape, beta);
            f16_check(&dev, shape, beta);
        }
    }
}

/// Negative control, per type and regime: the kernel's output checked against
/// the reference with the scale off by `off` (1% bf16, 0.3% f16, 0.01% f32,
/// docs/DESIGN.md section 3) must fail, so the bound sees a wrong low-rank
/// term. With uniform data, the low-rank term is `s sqrt(r / 3)` = 1.5 times
/// the base term here.
fn negative_control<T: KernelElement>(regime: Regime, off: f32) {
    negative_control_at::<T>(19, regime, off);
}

fn negative_control_at<T: KernelElement>(m: usize, regime: Regime, off: f32) {
    let case = Case::<T>::new(Dims::new(m, 37, 45), 12, 0.0, 1);
    assert_eq!(case.scale, 0.75);
    for dev in devices() {
        case.check_with_control(&dev, regime, off);
    }
}

#[test]
fn negative_control_per_type_and_regime() {
    negative_control::<f32>(Regime::Simt, 1e-4);
    negative_control::<f16>(Regime::Simt, 3e-3);
    negative_control::<bf16>(Regime::Simt, 1e-2);
    for regime in [Regime::Decode, Regime::Prefill] {
        negative_control::<f16>(regime, 3e-3);
        negative_control::<bf16>(regime, 1e-2);
    }
    // Decode's 16-row tiles (m <= 16; m = 19 above takes its 64-row tiles),
    // here with the shared shrink (the default; the fused kernel's own:
    // one_adapter_decode_matches_reference).
    negative_control_at::<f16>(5, Regime::Decode, 3e-3);
    negative_control_at::<bf16>(5, Regime::Decode, 1e-2);
}

type CaseSpec = (Dims, usize, bool, u64);

/// Shapes for a regime: m in `ms`, n and k never tied to a tile size (k both
/// a multiple of 8, for the 16-byte load path, and not), ranks 1, small, one
/// past a rank chunk (65), and 256 (four chunks).
fn case(ms: std::ops::Range<usize>, max_n: usize, max_k: usize) -> impl Strategy<Value = CaseSpec> {
    (
        (
            ms,
            1usize..max_n,
            prop_oneof![1usize..max_k, (1usize..max_k / 8).prop_map(|k| 8 * k)],
        )
            .prop_map(|(m, n, k)| Dims::new(m, n, k)),
        prop_oneof![Just(1usize), 2usize..40, Just(65usize), Just(256usize)],
        any::<bool>(),
        any::<u64>(),
    )
}

fn check_all<T: KernelElement>(
    regime: Option<Regime>,
    (dims, rank, with_beta, seed): CaseSpec,
) -> Result<(), TestCaseError> {
    let beta = if with_beta { 0.75 } else { 0.0 };
    let case = Case::<T>::new(dims, rank, beta, seed);
    for dev in devices() {
        case.check(&dev, regime).map_err(TestCaseError::fail)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(16))]

    #[test]
    fn dispatch_f32_matches_reference(c in case(0..70, 150, 100)) { check_all::<f32>(None, c)?; }

    #[test]
    fn dispatch_f16_matches_reference(c in case(0..150, 150, 100)) { check_all::<f16>(None, c)?; }

    #[test]
    fn dispatch_bf16_matches_reference(c in case(0..150, 150, 100)) { check_all::<bf16>(None, c)?; }

    #[test]
    fn simt_half_types_match_reference(c in case(1..70, 150, 100), bf in any::<bool>()) {
        if bf { check_all::<bf16>(Some(Regime::Simt), c)? } else { check_all::<f16>(Some(Regime::Simt), c)? }
    }

    #[test]
    fn decode_matches_reference(c in case(1..40, 100, 200), bf in any::<bool>()) {
        if bf { check_all::<bf16>(Some(Regime::Decode), c)? } else { check_all::<f16>(Some(Regime::Decode), c)? }
    }

    #[test]
    fn prefill_matches_reference(c in case(1..200, 600, 80), bf in any::<bool>()) {
        if bf { check_all::<bf16>(Some(Regime::Prefill), c)? } else { check_all::<f16>(Some(Regime::Prefill), c)? }
    }
}

/// Shapes that hit every tile edge at once, in every regime.
#[test]
fn tile_edges_in_every_regime() {
    let shapes = [
        (1, 1, 1, 1),
        (16, 32, 64, 16),
        (17, 33, 65, 17),
        // Decode's 64-row tiles: full, one row short (16-byte path), and two of them.
        (64, 32, 64, 16),
        (63, 31, 72, 64),
        (65, 40, 24, 3),
        (128, 128, 32, 64),
        (129, 129, 33, 65),
        // One 256-wide tile, then one row and column past it: two 128 x 128
        // tiles of the multi-adapter kernel at rank 64, the fused kernel's
        // 128 x 256 tiles at rank 65.
        (128, 256, 32, 64),
        (129, 257, 33, 65),
        (127, 8, 8, 256),
        // More than 8 row tiles at prefill (grouped tile order: a full group
        // of 8 and a partial one) over several column tiles.
        (1100, 260, 16, 4),
    ];
    for (m, n, k, r) in shapes {
        let case = Case::<bf16>::new(Dims::new(m, n, k), r, 0.0, (m * n + k) as u64);
        for regime in [Regime::Simt, Regime::Decode, Regime::Prefill] {
            for dev in devices() {
                case.check(&dev, Some(regime)).unwrap();
            }
        }
    }
}

#[test]
fn f32_has_no_tensor_core_regime() {
    let case = Case::<f32>::new(Dims::new(2, 3, 4), 1, 0.0, 0);
    let err = case
        .run(&Device::host().unwrap(), Some(Regime::Prefill))
        .unwrap_err();
    assert!(
        matches!(
            err,
            lora_kernels::Error::InvalidArgument { name: "regime", .. }
        ),
        "{err}"
    );
}

/// Under the reverse thread schedule too (a missing barrier in the kernel
/// would show under one of the two).
#[test]
fn reverse_schedule_matches_reference() {
    let host = Device::host_with_schedule(HostSchedule::Reverse).unwrap();
    let shapes = [
        (33, 65, 33, 33),
        (1, 1, 1, 1),
        (64, 128, 64, 64),
        (130, 40, 72, 70),
    ];
    for (i, (m, n, k, r)) in shapes.into_iter().enumerate() {
        let case = Case::<f32>::new(Dims::new(m, n, k), r, 0.0, i as u64);
        case.check(&host, None).unwrap();
        let case = Case::<bf16>::new(Dims::new(m, n, k), r, 0.0, i as u64);
        for regime in [Regime::Decode, Regime::Prefill] {
            case.check(&host, Some(regime)).unwrap();
        }
    }
}

#[test]
fn empty_batch_launches_nothing() {
    for dev in devices() {
        let case = Case::<bf16>::new(Dims::new(0, 17, 9), 3, 0.0, 1);
        for regime in [Regime::Simt, Regime::Decode, Regime::Prefill] {
            assert!(case.run(&dev, Some(regime)).unwrap().is_empty());
        }
    }
}

#[test]
fn nan_and_inf_propagate_like_the_reference() {
    fn check<T: KernelElement>(regime: Regime) {
        for dev in devices() {
            for r in [1, 4] {
                let mut case = Case::<T>::new(Dims::new(5, 70, 40), r, 0.0, 3);
                case.x[2 * 40 + 7] = T::from_f64(f64::NAN); // row 2
                case.x[4 * 40] = T::from_f64(f64::INFINITY); // row 4
                case.b[3 * r] = T::from_f64(f64::NAN); // column 3 of every row
                case.check(&dev, Some(regime)).unwrap();
                let got = case.run(&dev, Some(regime)).unwrap();
                assert!(got[2 * 70..3 * 70].iter().all(|v| v.to_f64().is_nan()));
                assert!(got[4 * 70..].iter().all(|v| !v.to_f64().is_finite()));
                assert!(got[3].to_f64().is_nan() && got[70 + 3].to_f64().is_nan());
                assert!(
                    got[1].to_f64().is_finite(),
                    "only poisoned rows and column 3 may be non-finite"
                );
            }
        }
    }
    check::<f32>(Regime::Simt);
    check::<bf16>(Regime::Decode);
    check::<f16>(Regime::Prefill);
}

/// Real model shapes on the GPU, checked on a sample of rows (the f64
/// reference of a whole 4096 x 4096 product is slow).
#[test]
fn gpu_real_shapes_match_reference() {
    let Some(dev) = gpu() else { return };
    for (m, n, k, r) in [
        (1, 4096, 4096, 16),
        (16, 4096, 4096, 64),
        (77, 14336, 4096, 16),
        (5, 4096, 14336, 8),
    ] {
        let full = Case::<bf16>::new(Dims::new(m, n, k), r, 0.0, m as u64);
        let got = full.run(&dev, None).unwrap();
        for row in [0, m / 2, m - 1] {
            let mut one = Case::<bf16>::new(Dims::new(1, n, k), r, 0.0, 0);
            one.x = full.x[row * k..(row + 1) * k].to_vec();
            (one.w, one.a, one.b, one.scale) =
                (full.w.clone(), full.a.clone(), full.b.clone(), full.scale);
            one.y0 = vec![bf16::NAN; n];
            let want = one.expected();
            compare_within(
                &format!("row {row} of m={m} n={n} k={k} r={r}"),
                &got[row * n..(row + 1) * n],
                &want,
                &one.bound(&want),
            )
            .unwrap();
        }
    }
}

/// On the GPU: the fused kernels against cuBLAS's unfused three GEMMs on the
/// same rounded inputs (cuBLAS rounds t to the storage type, so the bound is
/// the storage type's tolerance).
#[cfg(feature = "bench")] // the cuBLAS baseline is behind the `bench` feature
#[test]
fn gpu_matches_cublas_unfused() {
    use lora_kernels::Buffer;
    use lora_kernels::cublas_baseline::CublasBaseline;
    let Some(dev) = gpu() else { return };
    let blas = CublasBaseline::new(&dev).unwrap();
    for (m, n, k, r) in [
        (7, 4096, 4096, 16),
        (300, 1000, 4096, 64),
        (64, 14336, 4096, 8),
    ] {
        let case = Case::<bf16>::new(Dims::new(m, n, k), r, 0.0, 42);
        let got = case.run(&dev, None).unwrap();
        let up = |v: &Vec<bf16>| match dev.upload(v).unwrap() {
            Buffer::Cuda(s) => s,
            Buffer::Host(_) => unreachable!(),
        };
        let (x, w, a, b) = (up(&case.x), up(&case.w), up(&case.a), up(&case.b));
        let (mut t, mut y) = (up(&vec![bf16::NAN; m * r]), up(&vec![bf16::NAN; m * n]));
        blas.unfused(case.dims, &x, &w, (&a, &b, r, case.scale), &mut t, &mut y)
            .unwrap();
        let want = dev.download(&Buffer::Cuda(y)).unwrap();
        // Both sides carry their own error against the exact result (ours
        // within atol of it, cuBLAS too), so they agree within twice that.
        compare(
            &format!("vs cuBLAS unfused m={m} n={n} k={k} r={r}"),
            &got,
            &want,
            2.0 * case.atol(),
            rtol::<bf16>(),
        )
        .unwrap();
    }
}

/// The training forward saves t = x a^T (unscaled, f32) for the backward pass.
#[test]
fn forward_saving_t_matches_the_reference_intermediate() {
    use lora_kernels::ops::fused_forward::fused_forward_saving_t;
    for (m, n, k, r) in [(5, 70, 40, 3), (100, 30, 24, 70), (1, 8, 8, 1)] {
        let case = Case::<bf16>::new(Dims::new(m, n, k), r, 0.0, 7);
        let want_t = case.reference_t();
        for dev in devices() {
            let (x, w) = (dev.upload(&case.x).unwrap(), dev.upload(&case.w).unwrap());
            let (a, b) = (dev.upload(&case.a).unwrap(), dev.upload(&case.b).unwrap());
            let mut y = dev.upload(&case.y0).unwrap();
            let mut t = dev.upload(&vec![f32::NAN; m * r]).unwrap();
            fused_forward_saving_t(
                &dev,
                case.dims,
                &x,
                &w,
                &DeviceAdapter::new(&a, &b, r, case.scale),
                &mut y,
                &mut t,
            )
            .unwrap();
            compare_within(
                "saved t",
                &dev.download(&t).unwrap(),
                &want_t,
                &case.t_bound(),
            )
            .unwrap();
            let want = case.expected();
            compare_within("y", &dev.download(&y).unwrap(), &want, &case.bound(&want)).unwrap();
        }
    }
}

/// f16's range in the hi/lo split (docs/DESIGN.md section 2): with scale
/// 4096 and every third row of x times 64, |s t| reaches about 1e6 in those
/// rows (far above f16's 65504) and stays below 2^15 in most others; b is
/// small, so y is finite and the reference's y is too. Decode and prefill,
/// shapes off every tile, a rank not a multiple of 16 and one of two rank
/// chunks; the per-element bound holds and a scale off by 0.3% still fails it.
#[test]
fn f16_scaled_t_beyond_the_f16_range_matches_reference() {
    for (regime, m, n, k) in [
        (Regime::Decode, 21, 45, 70),
        (Regime::Prefill, 150, 140, 40),
    ] {
        for rank in [13, 70] {
            let mut case = Case::<f16>::new(Dims::new(m, n, k), rank, 0.0, 11);
            case.scale = 4096.0;
            for i in (0..m).step_by(3) {
                for v in &mut case.x[i * k..(i + 1) * k] {
                    *v = f16::from_f64(v.to_f64() * 64.0);
                }
            }
            for v in &mut case.b {
                *v = f16::from_f64(v.to_f64() / 1024.0);
            }
            let row_max = case.scaled_t_row_max();
            assert!(row_max.iter().any(|&v| v > 4.0 * 65504.0), "{row_max:?}");
            assert!(row_max.iter().any(|&v| v < 32768.0), "{row_max:?}");
            for dev in devices() {
                case.check_with_control(&dev, regime, 3e-3);
            }
        }
    }
}

/// Infinite weights (docs/DESIGN.md section 2: NaN and Inf propagate as in
/// the reference): +Inf and -Inf in b, also in the second rank chunk and two
/// of opposite signs in one column; a row of x that is all zeros (t = 0, so
/// 0 * Inf = NaN) and one holding an Inf (Inf * Inf). Every element is the
/// reference's: the same infinity, NaN where it has NaN, and within the
/// per-element bound where finite.
#[test]
fn infinite_b_gives_the_references_infinities_and_nans() {
    fn check<T: KernelElement>(regime: Regime, dims: Dims) {
        let (inf, k) = (f64::INFINITY, dims.k);
        for rank in [5, 70] {
            let mut case = Case::<T>::new(dims, rank, 0.0, 5);
            case.b[3 * rank] = T::from_f64(inf);
            case.b[7 * rank + rank - 1] = T::from_f64(-inf);
            case.b[9 * rank] = T::from_f64(inf);
            case.b[9 * rank + rank / 2] = T::from_f64(-inf);
            case.x[2 * k..3 * k].fill(T::from_f64(0.0));
            case.x[4 * k + 1] = T::from_f64(inf);
            let want = case.expected();
            let has = |p: &dyn Fn(f64) -> bool| want.iter().any(|v| p(v.to_f64()));
            assert!(has(&|v| v == inf) && has(&|v| v == -inf) && has(&f64::is_nan));
            for dev in devices() {
                case.check(&dev, Some(regime)).unwrap();
            }
        }
    }
    for regime in [Regime::Decode, Regime::Prefill] {
        let dims = match regime {
            Regime::Decode => Dims::new(9, 45, 40),
            _ => Dims::new(130, 70, 24),
        };
        check::<f16>(regime, dims);
        check::<bf16>(regime, dims);
    }
}

/// The fused decode kernels' deep pipelines (more stages of `w` in flight,
/// where the device's blocks may take the shared memory) only issue the
/// copies further ahead: the k-steps are the same, so `y` and the saved `t`
/// match the base pipelines bit for bit, and the base ones match the
/// reference (the fused kernel's own shrink, also where the dispatcher would
/// take the shared one: [`one_adapter_decode_matches_reference`]). Shapes:
/// the 16-row and the 64-row decode tiles, k with more k-tiles than the deep
/// ring's stages (it wraps) and with one k-tile (fewer than its stages), on
/// and off the 16-byte path, ranks 1, 3, 16, 64 and 65 (two chunks), column
/// counts off the 32-column tile; both thread schedules.
#[test]
fn decode_pipelines_of_either_depth_agree_bit_for_bit() {
    fn check<T: KernelElement>(dev: &Device, (m, n, k, r): Shape, beta: f32) {
        let case = Case::<T>::new(Dims::new(m, n, k), r, beta, (m * n + k + r) as u64);
        let depth = |deep_decode| LaunchForm {
            deep_decode,
            shared_shrink: Some(false),
            ..LaunchForm::default()
        };
        let others = [("deep", depth(Some(true))), ("default", depth(None))];
        case.forms_agree(dev, Regime::Decode, ("base", depth(Some(false))), &others);
    }
    let shapes = [
        (1, 70, 840, 16),
        (16, 96, 45, 1),
        (5, 40, 1000, 64),
        (17, 70, 776, 65),
        (64, 33, 837, 3),
        (40, 64, 40, 16),
    ];
    every_shape_and_type(&shapes, check::<bf16>, check::<f16>);
    let reverse = Device::host_with_schedule(HostSchedule::Reverse).unwrap();
    check::<bf16>(&reverse, (1, 70, 840, 16), 0.0);
    check::<f16>(&reverse, (17, 70, 776, 65), 0.0);
}

/// Split-K at decode: the blocks of a tile each sum their range of k and the
/// last to finish adds the ranges up in split order, then runs the expand;
/// on the fused kernel and on the shared shrink's (the multi-adapter kernel,
/// the default for up to 16 tokens and ranks up to 64).
/// Every split count gives `y` and the saved `t` within their per-element
/// bounds, the same bits on a second run (the counters are back at 0 and the
/// sum's order is fixed whichever block ends last), and `y` is written once
/// (it starts as NaN with beta 0; beta 0.5 reads it once). Shapes: the
/// 16-row and 64-row decode tiles, k on and off the 16-byte path and off the
/// 64-wide k-tile, ranges of unequal length, ranks 1, 16 and 64; the host's
/// workspace is kept per thread like a stream's, so every launch here reuses
/// the previous one's counters. Forced counts the launch can't take are
/// errors that change nothing.
#[test]
fn decode_split_k_matches_reference_for_every_split_count() {
    fn check<T: KernelElement>(dev: &Device, (m, n, k, r): Shape, beta: f32) {
        let case = Case::<T>::new(Dims::new(m, n, k), r, beta, (m + n * k + r) as u64);
        let ktiles = k.div_ceil(64);
        let splits = [None, Some(1), Some(2), Some(3), Some(ktiles.min(8))];
        for (splits, shared_shrink) in splits
            .into_iter()
            .flat_map(|s| [(s, Some(false)), (s, None)])
        {
            let form = LaunchForm {
                k_splits: splits,
                shared_shrink,
                ..LaunchForm::default()
            };
            let what = format!(
                "{:?} m={m} n={n} k={k} r={r} k_splits {splits:?} shared_shrink {shared_shrink:?}",
                T::DTYPE
            );
            case.check_twice(dev, Regime::Decode, form, &what);
        }
    }
    let shapes = [
        (1, 70, 840, 16),
        (16, 96, 1000, 1),
        (5, 40, 2050, 64),
        (17, 70, 776, 16),
        (64, 33, 837, 3),
    ];
    every_shape_and_type(&shapes, check::<bf16>, check::<f16>);
    let reverse = Device::host_with_schedule(HostSchedule::Reverse).unwrap();
    check::<bf16>(&reverse, (1, 70, 840, 16), 0.0);

    // Counts past the k-tiles, a split of a rank above 64 or of the fused
    // kernel's own prefill, and 0: errors naming k_splits, y unchanged.
    for (m, k, r, splits, regime, shared_shrink) in [
        (1, 840, 16, 15, Regime::Decode, None),
        (1, 840, 65, 2, Regime::Decode, None),
        (1, 840, 16, 0, Regime::Decode, None),
        (100, 840, 16, 2, Regime::Prefill, Some(false)),
    ] {
        let form = LaunchForm {
            k_splits: Some(splits),
            shared_shrink,
            ..LaunchForm::default()
        };
        Case::<bf16>::new(Dims::new(m, 70, k), r, 0.5, 5).rejects(regime, form, "k_splits");
    }
}

/// Runs a case in `regime` with the shared shrink (`t` computed once, on
/// the multi-adapter kernel with every token on the one adapter) and with
/// the fused kernel's own: `y` and the saved `t` within their bounds on
/// either, a second run the same bits (counters back at 0), the default the
/// shared shrink, and `y` without `t` saved (`t` in the stream's workspace)
/// the same bits.
fn check_both_shrinks<T: KernelElement>(
    dev: &Device,
    regime: Regime,
    (m, n, k, r): Shape,
    beta: f32,
) {
    let case = Case::<T>::new(Dims::new(m, n, k), r, beta, (3 * m + n + k + r) as u64);
    let form = |shared_shrink| LaunchForm {
        shared_shrink,
        ..LaunchForm::default()
    };
    let what = format!("{:?} {regime:?} m={m} n={n} k={k} r={r}", T::DTYPE);
    let run = case.check_twice(dev, regime, form(Some(true)), &format!("{what}, shared"));
    case.check_twice(dev, regime, form(Some(false)), &format!("{what}, own t"));
    let default = case.run_tuned(dev, regime, LaunchForm::default()).unwrap();
    assert_same_run(&format!("{what}: the default"), &default, &run);
    let unsaved = case.run(dev, Some(regime)).unwrap();
    assert!(same_bits(&unsaved, &run.0), "{what}: y without t saved");
}

/// The shared shrink's `y` against a reference with the scale off by `off`
/// must fail (m tokens in `regime`).
fn shared_shrink_control<T: KernelElement>(regime: Regime, m: usize, off: f32) {
    let case = Case::<T>::new(Dims::new(m, 37, 45), 12, 0.0, 1);
    let shared = LaunchForm {
        shared_shrink: Some(true),
        ..LaunchForm::default()
    };
    for dev in devices() {
        case.check_form_with_control(&dev, regime, shared, off, "shared shrink");
    }
}

/// Decode launches of up to 64 tokens at ranks up to 64 compute `t` once
/// (the shared shrink, the default there: [`check_both_shrinks`]) instead of
/// in every column tile, and a reference with the scale off by 1% (bf16) or
/// 0.3% (f16) fails the shared shrink's `y`. Shapes: 1, 3, 5 and 16 tokens
/// (16-row tiles), 17, 33 and 64 (64-row tiles); ranks 1, 3, 16 and 64; k
/// off the 16-byte path (45) and on it, with 1 to 5 chunks of 1024 values
/// (a few tokens' shrink units cut k into chunks); both thread schedules (in
/// reverse the tile blocks start first and take the shrink work
/// themselves). Asking for the shared shrink where it doesn't apply (65
/// tokens, rank 65) is an error naming `shared_shrink` that changes nothing.
#[test]
fn one_adapter_decode_matches_reference() {
    fn check<T: KernelElement>(dev: &Device, shape: Shape, beta: f32) {
        check_both_shrinks::<T>(dev, Regime::Decode, shape, beta);
    }
    let shapes = [
        (1, 70, 840, 16),
        (16, 96, 45, 1),
        (5, 40, 1000, 64),
        (1, 40, 2050, 16),
        (3, 33, 4104, 3),
        (17, 70, 840, 16),
        (33, 45, 45, 3),
        (64, 40, 1000, 64),
    ];
    every_shape_and_type(&shapes, check::<bf16>, check::<f16>);
    let reverse = Device::host_with_schedule(HostSchedule::Reverse).unwrap();
    check::<bf16>(&reverse, (1, 40, 2050, 16), 0.0);
    check::<f16>(&reverse, (5, 40, 1000, 64), 0.5);
    check::<bf16>(&reverse, (40, 40, 1000, 16), 0.5);
    shared_shrink_control::<bf16>(Regime::Decode, 5, 1e-2);
    shared_shrink_control::<f16>(Regime::Decode, 5, 3e-3);
    shared_shrink_control::<bf16>(Regime::Decode, 40, 1e-2);
    shared_shrink_control::<f16>(Regime::Decode, 40, 3e-3);

    for (m, r) in [(65, 16), (1, 65)] {
        let form = LaunchForm {
            shared_shrink: Some(true),
            ..LaunchForm::default()
        };
        let case = Case::<bf16>::new(Dims::new(m, 70, 64), r, 0.5, 5);
        case.rejects(Regime::Decode, form, "shared_shrink");
    }
}

/// Prefill launches compute `t` once per 16 tokens on tensor cores (the
/// shared shrink, the default: [`check_both_shrinks`]), not in the main loop
/// of every block, and a reference with the scale off fails its `y`. Shapes:
/// rows off the 128-row tile, several column tiles (300: 3 of the shared
/// shrink's 128, 2 of the fused kernel's 256), k off the 16-byte
/// path and on it (200: groups of 3 k-steps and a cut one; 840: one tile
/// whose k-loop the shared shrink's launch splits over 6 blocks), ranks 1,
/// 16, 64, 80 (two chunks of ranks) and 256; both thread schedules.
#[test]
fn one_adapter_prefill_matches_reference() {
    fn check<T: KernelElement>(dev: &Device, shape: Shape, beta: f32) {
        check_both_shrinks::<T>(dev, Regime::Prefill, shape, beta);
    }
    let shapes = [
        (70, 300, 72, 16),
        (100, 70, 840, 16),
        (150, 130, 45, 1),
        (129, 96, 40, 64),
        (130, 70, 200, 80),
        (65, 40, 24, 256),
    ];
    every_shape_and_type(&shapes, check::<bf16>, check::<f16>);
    let reverse = Device::host_with_schedule(HostSchedule::Reverse).unwrap();
    check::<bf16>(&reverse, (70, 300, 72, 16), 0.0);
    shared_shrink_control::<bf16>(Regime::Prefill, 70, 1e-2);
    shared_shrink_control::<f16>(Regime::Prefill, 70, 3e-3);
}

/// A prefill block takes `col_tiles` column tiles side by side and computes
/// `t` once for them (one chunk of ranks; above, every tile recomputes it).
/// The reused `t` is the same f32 sum, so `y` and the saved `t` match the
/// one-tile blocks bit for bit, for any count (the last block of a row short
/// of it), and the one-tile blocks match the reference. Shapes: 3 to 5
/// column tiles of 256, rows off the 128-row tile, k on and off the 16-byte
/// path, rank 1, exactly one chunk (64), and two chunks (65); both thread
/// schedules (a missing barrier between a block's tiles shows under one).
#[test]
fn prefill_blocks_of_several_column_tiles_reuse_t_bit_for_bit() {
    fn check<T: KernelElement>(dev: &Device, (m, n, k, r): Shape, beta: f32) {
        let case = Case::<T>::new(Dims::new(m, n, k), r, beta, (m + n + k + r) as u64);
        let tiles = |col_tiles| LaunchForm {
            col_tiles: Some(col_tiles),
            shared_shrink: Some(false),
            ..LaunchForm::default()
        };
        let others = [
            ("2 tiles", tiles(2)),
            ("3 tiles", tiles(3)),
            ("7 tiles", tiles(7)),
        ];
        case.forms_agree(dev, Regime::Prefill, ("1 tile", tiles(1)), &others);
    }
    let shapes = [
        (70, 600, 72, 16),
        (150, 1040, 45, 1),
        (129, 780, 40, 64),
        (65, 520, 24, 65),
    ];
    every_shape_and_type(&shapes, check::<bf16>, check::<f16>);
    let reverse = Device::host_with_schedule(HostSchedule::Reverse).unwrap();
    check::<bf16>(&reverse, (70, 600, 72, 16), 0.0);

    // No tiles per block is an error, and the failed call writes nothing.
    let form = LaunchForm {
        col_tiles: Some(0),
        ..LaunchForm::default()
    };
    Case::<bf16>::new(Dims::new(70, 300, 72), 4, 0.5, 3).rejects(
        Regime::Prefill,
        form,
        "col_tiles",
    );
}

// ---- The one-adapter decode with w loaded straight into registers ----

fn direct(shared_shrink: Option<bool>) -> LaunchForm {
    LaunchForm {
        direct_decode: true,
        shared_shrink,
        ..LaunchForm::default()
    }
}

/// The shared-shrink decode with direct loads (`LaunchForm::direct_decode`):
/// `y` and the saved `t` within their bounds and the same bits on a second
/// run, for 1 to 64 tokens (one to four 16-row tiles), n off the 32-column
/// tile, k a multiple of 8 but not of 32 (and shorter than a round of
/// chunks: 24), ranks 1 to 64, on the host runtime and a GPU; a reference
/// with the scale off by 1% (bf16) or 0.3% (f16) fails. Asking for it where
/// the launch is not a shared-shrink decode (65 tokens, the fused kernel's
/// own shrink, prefill,
/// the wgmma prefill, rank 65) or where 16-byte loads can't serve (k = 45)
/// is an error naming `direct_decode` that changes nothing.
#[test]
fn direct_decode_matches_reference_and_refuses_other_launches() {
    fn check<T: KernelElement>(dev: &Device, (m, n, k, r): Shape, beta: f32) {
        let case = Case::<T>::new(Dims::new(m, n, k), r, beta, (5 * m + n + k + r) as u64);
        let what = format!(
            "{:?} direct decode m={m} n={n} k={k} r={r} on {}",
            T::DTYPE,
            dev.name()
        );
        case.check_twice(dev, Regime::Decode, direct(None), &what);
    }
    let shapes = [
        (1, 70, 840, 16),
        (16, 96, 1000, 1),
        (5, 40, 2056, 64),
        (3, 33, 24, 3),
        (17, 70, 840, 16),
        (64, 40, 1000, 64),
    ];
    every_shape_and_type(&shapes, check::<bf16>, check::<f16>);
    for dev in devices() {
        let case = Case::<bf16>::new(Dims::new(5, 37, 48), 12, 0.0, 1);
        case.check_form_with_control(&dev, Regime::Decode, direct(None), 1e-2, "direct decode");
        let case = Case::<f16>::new(Dims::new(5, 37, 48), 12, 0.0, 1);
        case.check_form_with_control(&dev, Regime::Decode, direct(None), 3e-3, "direct decode");
    }

    let refused = [
        (Regime::Decode, (65, 64, 16), direct(None)),
        (Regime::Decode, (4, 64, 16), direct(Some(false))),
        (Regime::Decode, (4, 64, 65), direct(None)),
        (Regime::Prefill, (130, 64, 16), direct(None)),
        (
            Regime::Prefill,
            (130, 64, 16),
            LaunchForm {
                wgmma: Some(true),
                ..direct(None)
            },
        ),
        (Regime::Decode, (4, 45, 16), direct(None)),
    ];
    for (regime, (m, k, r), form) in refused {
        Case::<bf16>::new(Dims::new(m, 70, k), r, 0.5, 5).rejects(regime, form, "direct_decode");
    }
}

// ---- The prefill on Hopper's wgmma and TMA (`LaunchForm::wgmma`) ----

fn wgmma(col_tiles: usize) -> LaunchForm {
    LaunchForm {
        wgmma: Some(true),
        col_tiles: Some(col_tiles),
        ..LaunchForm::default()
    }
}

/// y and the saved t within their per-element bounds, the same bits on a
/// second run and with other column tiles per block: shapes off every tile
/// (m past 128, n past 128, k past 64, all multiples of 8), ranks 1, 5, 16
/// and 64, beta 0, 0.5 and -1, one and several column tiles a block; n a
/// multiple of 8 or not (the store's 16-byte path, with and without beta, or
/// element by element).
#[test]
fn wgmma_prefill_matches_reference_and_saves_t() {
    fn check<T: KernelElement>(dev: &Device, (m, n, k, r): Shape, beta: f32, tiles: usize) {
        let case = Case::<T>::new(Dims::new(m, n, k), r, beta, (m + n + k + r) as u64);
        let what = format!(
            "wgmma {:?} m={m} n={n} k={k} r={r} beta={beta} tiles={tiles} on {}",
            T::DTYPE,
            dev.name()
        );
        let run = case.check_twice(dev, Regime::Prefill, wgmma(tiles), &what);
        for other in [1, 3] {
            let again = case.run_tuned(dev, Regime::Prefill, wgmma(other)).unwrap();
            assert_same_run(
                &format!("{what}, against {other} tiles a block"),
                &again,
                &run,
            );
        }
    }
    for dev in wgmma_devices() {
        for ((m, n, k, r), beta, tiles) in [
            ((200, 300, 136, 5), 0.0, 2),
            ((130, 129, 64, 1), 0.5, 1),
            ((64, 256, 200, 64), 0.0, 4),
            ((129, 390, 72, 16), -1.0, 2),
            ((100, 120, 64, 3), 0.5, 1),
        ] {
            check::<bf16>(&dev, (m, n, k, r), beta, tiles);
            check::<f16>(&dev, (m, n, k, r), beta, tiles);
        }
    }
}

/// The grid is persistent (at most one block per SM: 132 on the host
/// runtime): with 135 work units (5 row tiles by 27 column tiles, the last
/// of each partial) blocks 0, 1 and 2 take a second unit of other rows
/// (units 132 to 134: row tiles 2, 3 and 4), computing its t again and
/// running the ring on across units; y and t within their bounds and the
/// same bits on a second run, on the host runtime and a Hopper GPU.
#[test]
fn wgmma_prefill_blocks_take_several_work_units() {
    let devs: Vec<Device> = wgmma_devices().into_iter().skip(1).collect(); // interleaved and a GPU
    let case = Case::<bf16>::new(Dims::new(600, 26 * 128 + 40, 64), 5, 0.5, 91);
    for dev in &devs {
        let what = format!("wgmma, 135 units on {}", dev.name());
        case.check_twice(dev, Regime::Prefill, wgmma(1), &what);
    }
}

/// The check of the wgmma kernel's output is no formality: against a
/// reference with the scale off by 1% (bf16) or 0.3% (f16) it fails.
#[test]
fn wgmma_prefill_negative_control() {
    fn control<T: KernelElement>(dev: &Device, off: f32) {
        let case = Case::<T>::new(Dims::new(150, 200, 96), 16, 0.0, 77);
        case.check_form_with_control(dev, Regime::Prefill, wgmma(2), off, "wgmma");
    }
    for dev in wgmma_devices() {
        control::<bf16>(&dev, 1e-2);
        control::<f16>(&dev, 3e-3);
    }
}

/// NaN and Inf in x and b, infinite weights of both signs, a zero row of x
/// (0 * Inf = NaN) and f16's scale * t past f16's range (the expand's range
/// scaling): every element as the reference has it.
#[test]
fn wgmma_prefill_non_finite_values_and_f16_range_match_reference() {
    fn check<T: KernelElement>(dev: &Device) {
        let (inf, k) = (f64::INFINITY, 40);
        let mut case = Case::<T>::new(Dims::new(130, 140, k), 5, 0.0, 3);
        case.x[2 * k + 7] = T::from_f64(f64::NAN);
        case.x[4 * k] = T::from_f64(inf);
        case.x[6 * k..7 * k].fill(T::from_f64(0.0));
        case.b[3 * 5] = T::from_f64(inf);
        case.b[7 * 5 + 4] = T::from_f64(-inf);
        case.b[9 * 5 + 1] = T::from_f64(f64::NAN);
        let (got, _) = case.run_tuned(dev, Regime::Prefill, wgmma(1)).unwrap();
        let want = case.expected();
        compare_within("wgmma non-finite", &got, &want, &case.bound(&want)).unwrap();
    }
    for dev in wgmma_devices() {
        check::<bf16>(&dev);
        check::<f16>(&dev);
        let (m, n, k) = (150, 140, 40);
        let mut case = Case::<f16>::new(Dims::new(m, n, k), 13, 0.0, 11);
        case.scale = 4096.0;
        for i in (0..m).step_by(3) {
            for v in &mut case.x[i * k..(i + 1) * k] {
                *v = f16::from_f64(v.to_f64() * 64.0);
            }
        }
        for v in &mut case.b {
            *v = f16::from_f64(v.to_f64() / 1024.0);
        }
        assert!(case.scaled_t_row_max().iter().any(|&v| v > 4.0 * 65504.0));
        let (got, _) = case.run_tuned(&dev, Regime::Prefill, wgmma(2)).unwrap();
        let want = case.expected();
        compare_within("wgmma f16 range", &got, &want, &case.bound(&want)).unwrap();
    }
}

/// What the wgmma kernel can't run is an error naming why, and y is left
/// as it was: a rank above 64, k not a multiple of 8, another regime.
#[test]
fn wgmma_prefill_refuses_what_it_cannot_run() {
    Case::<bf16>::new(Dims::new(130, 64, 64), 65, 0.0, 1).rejects(
        Regime::Prefill,
        wgmma(1),
        "rank",
    );
    Case::<bf16>::new(Dims::new(130, 64, 60), 8, 0.0, 2).rejects(Regime::Prefill, wgmma(1), "k");
    Case::<f16>::new(Dims::new(30, 64, 64), 8, 0.0, 3).rejects(Regime::Decode, wgmma(1), "regime");
}

// ---- The default's choice between the mma.sync and wgmma prefills ----

/// `fused_forward` takes the wgmma prefill where its 128 x 128 tiles fill
/// every SM 4 times (528 tiles on the host runtime's 132 SMs) on a device
/// that runs it (the host runtime, compute capability 9.0), and the shared
/// shrink on the mma.sync tiles below: one row past 4 x SMs - 1 row tiles
/// tips it. `y` is within its bound either way. Past the limit, what the
/// wgmma kernel can't run (k not a multiple of 8, rank 65) runs on the
/// mma.sync tiles instead of failing, as does a form that forces a split
/// count; `wgmma: Some(false)` keeps it off.
#[test]
fn default_prefill_takes_wgmma_from_four_waves_of_tiles() {
    let (aligned, any) = (
        "lk_multi_adapter_prefill_bf16_aligned",
        "lk_multi_adapter_prefill_bf16_any",
    );
    let (off, unsplit) = (
        LaunchForm {
            wgmma: Some(false),
            ..LaunchForm::default()
        },
        LaunchForm {
            k_splits: Some(1),
            ..LaunchForm::default()
        },
    );
    for dev in devices() {
        let wgmma = if runs_wgmma(&dev) {
            "lk_fused_forward_wgmma_bf16"
        } else {
            aligned
        };
        let limit = wgmma_prefill_rows(&dev);
        for (m, k, r, form, kernel) in [
            (limit - 1, 64, 8, None, aligned),
            (limit, 64, 8, None, wgmma),
            (limit, 60, 8, None, any),
            (limit, 64, 65, None, aligned),
            (limit, 64, 8, Some(off), aligned),
            (limit, 64, 8, Some(unsplit), aligned),
        ] {
            let case = Case::<bf16>::new(Dims::new(m, 8, k), r, 0.0, (m + k + r) as u64);
            let what = format!("m={m} k={k} r={r} {form:?} on {}", dev.name());
            lora_kernels::take_recent_launches();
            let y = match form {
                None => case.run(&dev, None).unwrap(),
                Some(form) => case.run_tuned(&dev, Regime::Prefill, form).unwrap().0,
            };
            let launched = lora_kernels::take_recent_launches();
            assert_eq!(launched, [kernel], "{what}");
            let want = case.expected();
            compare_within(&what, &y, &want, &case.bound(&want)).unwrap();
        }
    }
}
