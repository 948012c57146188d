//! Section 1 of the tour: every operation and every path it has, at small
//! shapes that are no tile's multiple, each output element checked against
//! the CPU reference (`lora_kernels::reference`). It runs on the host runtime
//! (the kernels' own CUDA source on the CPU) always, and on the GPU as well
//! when there is one, so on a GPU machine the tour is also a correctness check.
//!
//! # The bound
//!
//! The reference runs in f64 on the kernel's own inputs (already rounded to
//! the storage type, widened exactly), so what it returns is the exact result
//! up to f64 rounding. A kernel accumulates in f32 and rounds once to its
//! output type (docs/DESIGN.md section 2). For an output element that is a sum of
//! products, the standard running error analysis (Higham, "Accuracy and
//! Stability of Numerical Algorithms", 2nd ed., section 3.1) gives
//!
//! ```text
//! |got - want| <= u_T |want| + gamma(K) * sum |products|  (+ 2 u_T^2 * sum |low-rank terms|)
//! ```
//!
//! - `u_T`: the output type's unit roundoff (`Element::UNIT_ROUNDOFF`);
//! - `gamma(K) = K u / (1 - K u)`, `u = 2^-24`, with `K` the number of f32
//!   roundings on the longest path from a product to the output, counted from
//!   each kernel's arithmetic where the rows are made (for the fused forward
//!   `k + r + 3`: the product, k additions into `t`, the scale, the product
//!   with `b`, r additions into `y`);
//! - `sum |products|`: the same element with every operand replaced by its
//!   absolute value, which is the reference run on `|inputs|`;
//! - the bracket: tensor-core paths carry `s t` (backward: `u`) as a hi + lo
//!   pair of storage-type values, exact to `u_T^2` relative (docs/DESIGN.md section 2).
//!
//! Two things are added that the data here never comes near but a bound must
//! hold for: f16's subnormal range, where rounding is absolute (half the
//! smallest subnormal per rounding), and the f64 reference's own rounding
//! (`gamma(K)` with `u = 2^-53`). On a GPU, `mma.sync` adds with truncation
//! rather than round-to-nearest (Fasi, Higham, Mikaitis, Pranesh, "Numerical
//! behavior of NVIDIA tensor cores", PeerJ CS 2021), so each of its roundings
//! counts `2^-23`; the host runtime's emulation rounds to nearest.
//!
//! docs/DESIGN.md section 3's test tolerance (`atol + rtol_T |ref|`, atol from the
//! case's largest product) is a whole-case tolerance, about 4 `u_T` wide: on
//! these shapes it does not see the 1% (bf16) or 0.3% (f16) scale error that
//! the same section asks every check to catch (the control's ratio is 0.1 to
//! 0.3 of its bound), so the table uses the element-wise bound above.
//!
//! # The negative control
//!
//! Every row also compares the same kernel output with the reference computed
//! with the adapter scale off by 1% (bf16), 0.3% (f16) or 0.01% (f32): the
//! bound must reject it. A row whose control passes the bound fails: a bound
//! that cannot see a wrong scale checks nothing. Where an output has no scale
//! (the saved `t`, the optimizer), the closest equivalent is perturbed and the
//! row says which.
//!
//! # The data
//!
//! Values uniform in [-1, 1), never zero (`common::values`). With x, w, a, b
//! so drawn, `x w^T` has variance k/9 and `s (x a^T) b^T` has s^2 r k / 27:
//! the scale `s = sqrt(3 / r)` makes the low-rank term as large as the base
//! term, so an error in it is not hidden under the base product (the same
//! holds for the backward's `dx` and for merge).
use std::time::Instant;

use half::{bf16, f16};
use lora_kernels::ops::adamw::{AdamWConfig, SlotHyper, SlotOptimizer, SlotStatus};
use lora_kernels::ops::fused_forward::{
    Regime, fused_forward_in, fused_forward_saving_t, regime_for,
};
use lora_kernels::ops::lora_backward::{
    BackwardOptions, BackwardScratch, DeviceBackwardInputs, Grads, lora_backward,
    multi_adapter_backward,
};
use lora_kernels::ops::merge::merge;
use lora_kernels::ops::multi_adapter_forward::{Routing, multi_adapter_forward_in};
use lora_kernels::reference::{self, AdamWState, Adapter, BackwardInputs, Gradients, SlotStep};
use lora_kernels::{
    AdapterPool, DType, Device, DeviceAdapter, Dims, Element, Error, KernelElement, MergeOp,
    PoolConfig,
};

use crate::{Res, common, data};

/// Batch sizes: a decode batch (a partial 16-row tile, below the decode limit
/// of 64), a smaller one, and a prefill batch (one full 128-row tile and a
/// 2-row tail).
const M_DECODE: usize = 37;
const M_SMALL: usize = 5;
const M_PREFILL: usize = 130;
/// Output width: no multiple of any tile (16, 32, 64, 128) nor of 8.
const N: usize = 45;
/// Widths for the backward's 16-byte `dx` path, which also needs n % 8 == 0.
const N_ALIGNED: usize = 40;
/// k % 8 == 0 takes the 16-byte loads, yet is no multiple of the k-tiles.
const K_ALIGNED: usize = 72;
/// Element loads.
const K_ANY: usize = 70;

/// f32's unit roundoff: every kernel accumulates in f32.
const U32: f64 = f32::EPSILON as f64 / 2.0;
/// The f64 reference's unit roundoff.
const U64: f64 = f64::EPSILON / 2.0;

/// The section: the checks on the host runtime, then on the GPU when there
/// is one. Returns whether every check passed.
pub fn section(gpu: Option<&Device>) -> Res<bool> {
    let host = Device::host()?;
    let (mut passed, mut total) = (0, 0);
    for dev in std::iter::once(&host).chain(gpu) {
        println!(
            "\n1. every operation checked against the CPU reference on {}",
            dev.name()
        );
        if total == 0 {
            legend();
        }
        header();
        let start = Instant::now();
        for (op, check) in CHECKS {
            // A launch that fails is a failed check, not the end of the tour.
            let rows = check(dev).unwrap_or_else(|e| vec![Row::error(op, e)]);
            for row in rows {
                row.print();
                passed += row.passed() as usize;
                total += 1;
            }
        }
        println!(
            "   ({:.1} s on {})",
            start.elapsed().as_secs_f64(),
            dev.name()
        );
    }
    println!("\n   {passed} of {total} checks passed");
    Ok(passed == total)
}

/// What is printed instead of timings when there is no GPU.
pub fn no_timings() {
    println!("\n2. timings: none measured, because there is no GPU on this machine");
    println!(
        "   (the host runtime runs the kernels' source on the CPU: right for checking them, meaningless for timing them)."
    );
    println!(
        "   To get them: on a machine with an NVIDIA GPU (sm_80 or newer, driver >= 580) and nvcc, run the same command;"
    );
    println!(
        "   scripts/gpu-check builds and runs the whole GPU check (`scripts/gpu-check build` here, `scripts/gpu-check run` on a GPU machine)."
    );
}

fn legend() {
    for line in [
        "bound on each output element: u_T |ref| + gamma(K) sum|products| (+ 2 u_T^2 sum|low-rank| on tensor cores), where ref is",
        "the CPU reference in f64 on the same inputs and K counts the kernel's f32 roundings (examples/tour/check.rs derives each).",
        "err/bound: the largest ratio over the output, <= 1 passes; f16/bf16 outputs sit just below 1 because their one rounding",
        "alone can reach u_T |ref|. control: the same output against the reference with the scale off by 1% (bf16), 0.3% (f16),",
        "0.01% (f32), or the named stand-in where no scale enters; its largest ratio (shown) must exceed 1, else the bound",
        "cannot see a wrong scale and the row fails.",
    ] {
        println!("   {line}");
    }
}

/// The checks, in table order: each makes the rows of one operation.
type Check = fn(&Device) -> Res<Vec<Row>>;
const CHECKS: [(&str, Check); 8] = [
    ("fused_forward", fused_forward_rows),
    ("fused_forward_saving_t", saving_t_rows),
    ("multi_adapter_forward", multi_rows),
    ("multi_adapter_forward", multi_f32_rows),
    ("lora_backward", backward_rows),
    ("multi_adapter_backward", multi_backward_rows),
    ("SlotOptimizer::step", optimizer_rows),
    ("merge", merge_rows),
];

// ---------------------------------------------------------------------------
// The table and the comparison every row shares.

/// One checked output.
struct Row {
    op: &'static str,
    path: String,
    dtype: String,
    shape: String,
    /// max |got - want| / bound over the output's elements.
    err: f64,
    /// The same against the control reference (must exceed 1).
    control: f64,
    /// Why there is no result (the op returned an error).
    error: Option<String>,
}

impl Row {
    fn error(op: &'static str, e: Box<dyn std::error::Error>) -> Row {
        Row {
            op,
            path: String::new(),
            dtype: String::new(),
            shape: String::new(),
            err: f64::INFINITY,
            control: 0.0,
            error: Some(e.to_string()),
        }
    }

    fn passed(&self) -> bool {
        self.error.is_none() && self.err <= 1.0 && self.control > 1.0
    }

    fn print(&self) {
        if let Some(e) = &self.error {
            println!("   {:<22} FAILED: {e}", self.op);
            return;
        }
        let caught = if self.control > 1.0 { "yes" } else { "NO" };
        println!(
            "   {:<22} {:<45} {:<5} {:<16} {:>9.3} {:>4} {:>7.1} {:>5}",
            self.op,
            self.path,
            self.dtype,
            self.shape,
            self.err,
            caught,
            self.control,
            if self.passed() { "pass" } else { "FAIL" }
        );
    }
}

fn header() {
    println!(
        "   {:<22} {:<45} {:<5} {:<16} {:>9} {:>12} {:>5}",
        "op", "path", "dtype", "m x n x k, r", "err/bound", "control", "pass"
    );
}

/// What a row is called.
struct Label {
    op: &'static str,
    path: String,
    dtype: String,
    shape: String,
}

fn label<T: Element>(op: &'static str, path: impl Into<String>, shape: String) -> Label {
    Label {
        op,
        path: path.into(),
        dtype: dtype_name(T::DTYPE),
        shape,
    }
}

fn shape(dims: Dims, rank: impl std::fmt::Display) -> String {
    format!("{}x{}x{}, r{rank}", dims.m, dims.n, dims.k)
}

/// A row from an output, its reference, the control reference and the bound.
fn judged(label: Label, got: &[f64], want: &[f64], control: &[f64], bound: &[f64]) -> Row {
    assert!(got.len() == want.len() && want.len() == control.len() && control.len() == bound.len());
    Row {
        op: label.op,
        path: label.path,
        dtype: label.dtype,
        shape: label.shape,
        err: worst(got, want, bound),
        control: worst(got, control, bound),
        error: None,
    }
}

/// The largest |got - want| / bound; NaN (an output the kernel did not
/// write: outputs start as NaN) counts as infinite.
fn worst(got: &[f64], want: &[f64], bound: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .zip(bound)
        .map(|((g, w), b)| {
            let r = (g - w).abs() / b;
            if r.is_nan() { f64::INFINITY } else { r }
        })
        .fold(0.0, f64::max)
}

/// A storage type's rounding: unit roundoff, and half its smallest subnormal
/// (below the normal range rounding is absolute, not relative).
#[derive(Clone, Copy)]
struct Rounding {
    u: f64,
    eta: f64,
}

fn rounding<T: Element>() -> Rounding {
    let eta = match T::DTYPE {
        DType::F16 => 2f64.powi(-25),
        DType::BF16 => 2f64.powi(-134),
        DType::F32 => 2f64.powi(-150),
        DType::F64 => 2f64.powi(-1075),
    };
    Rounding {
        u: T::UNIT_ROUNDOFF,
        eta,
    }
}

fn gamma(k: usize, u: f64) -> f64 {
    let ku = k as f64 * u;
    ku / (1.0 - ku)
}

/// How one output is computed, which is what its bound is made of (module doc).
#[derive(Clone, Copy)]
struct Model {
    /// The output's storage type: one rounding at the end.
    out: Rounding,
    /// f32 roundings on the longest path from a product to the output.
    path: usize,
    /// Each of those roundings: 2^-24, or 2^-23 for mma.sync on a GPU.
    acc_u: f64,
    /// Tensor-core paths: the type of the hi + lo pair carrying s t (or u).
    split: Option<Rounding>,
    /// The absolute part: the output's and the split's subnormal rounding.
    floor: f64,
}

/// An output of type `Out` accumulated in f32 along `path` roundings.
fn model<Out: Element>(path: usize) -> Model {
    let out = rounding::<Out>();
    Model {
        out,
        path,
        acc_u: U32,
        split: None,
        floor: out.eta,
    }
}

impl Model {
    /// Accumulated by mma.sync, whose additions truncate on a GPU (module doc).
    fn mma(mut self, dev: &Device) -> Self {
        if dev.cuda_stream().is_some() {
            self.acc_u = 2.0 * U32;
        }
        self
    }

    /// The expand's left operand enters as hi + lo values of `T`; `sum_b`
    /// bounds the sum of |b| it is multiplied with (for the subnormal floor).
    fn split<T: Element>(mut self, sum_b: f64) -> Self {
        let r = rounding::<T>();
        self.split = Some(r);
        self.floor += r.eta * sum_b;
        self
    }

    /// The bound of each element from its exact value, its sum of |products|
    /// and the low-rank part of that sum.
    fn bounds(&self, want: &[f64], abs: &[f64], low_abs: &[f64]) -> Vec<f64> {
        let acc = gamma(self.path, self.acc_u) + gamma(self.path, U64);
        want.iter()
            .zip(abs)
            .zip(low_abs)
            .map(|((w, a), l)| {
                let split = self.split.map_or(0.0, |s| 2.0 * s.u * s.u * l);
                (1.0 + self.out.u) * (self.out.u * w.abs() + acc * a + split) + self.floor
            })
            .collect()
    }
}

/// The control's relative scale error for a storage type (docs/DESIGN.md section 3).
fn control_delta(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 1e-2,
        DType::F16 => 3e-3,
        _ => 1e-4,
    }
}

/// `scale` off by the control's error for `T`.
fn off<T: Element>(scale: f32) -> f32 {
    (scale as f64 * (1.0 + control_delta(T::DTYPE))) as f32
}

/// The scale that makes the low-rank term as large as the base term (module doc).
fn balanced_scale(rank: usize) -> f32 {
    (3.0 / rank as f64).sqrt() as f32
}

fn dtype_name(d: DType) -> String {
    format!("{d:?}").to_lowercase()
}

fn wide<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|e| e.to_f64()).collect()
}

fn abs<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|e| e.to_f64().abs()).collect()
}

fn nans<T: Element>(len: usize) -> Vec<T> {
    vec![T::from_f64(f64::NAN); len]
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, e| m.max(e.abs()))
}

fn minus(p: &[f64], q: &[f64]) -> Vec<f64> {
    p.iter().zip(q).map(|(p, q)| p - q).collect()
}

/// "16-byte loads" or "element loads": what the op picks for this k
/// (the host's and cudarc's allocations are 16-byte aligned).
fn loads(aligned: bool) -> &'static str {
    if aligned {
        "16-byte loads"
    } else {
        "element loads"
    }
}

// ---------------------------------------------------------------------------
// fused_forward: every regime, both load paths, a rank above 64.

fn fused_forward_rows(dev: &Device) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    let (simt, plain) = (Regime::Simt, Forward::Plain);
    let dims = Dims::new(M_DECODE, N, K_ANY);
    rows.extend(fused::<f32>(dev, simt, dims, 8, plain)?);
    rows.extend(fused::<f16>(dev, simt, dims, 8, plain)?);
    rows.extend(fused::<bf16>(dev, simt, dims, 8, plain)?);
    for (regime, m) in [(Regime::Decode, M_DECODE), (Regime::Prefill, M_PREFILL)] {
        for k in [K_ALIGNED, K_ANY] {
            let dims = Dims::new(m, N, k);
            rows.extend(fused::<f16>(dev, regime, dims, 16, plain)?);
            rows.extend(fused::<bf16>(dev, regime, dims, 16, plain)?);
        }
    }
    // Ranks above 64 take one more pass over k per 64-rank chunk.
    let dims = Dims::new(M_PREFILL, N, K_ALIGNED);
    rows.extend(fused::<bf16>(dev, Regime::Prefill, dims, 80, plain)?);
    // beta != 0: the kernels read the old y (with beta 0 they never do).
    let beta = Forward::Beta(0.5);
    rows.extend(fused::<f32>(
        dev,
        simt,
        Dims::new(M_DECODE, N, K_ANY),
        8,
        beta,
    )?);
    rows.extend(fused::<bf16>(
        dev,
        Regime::Decode,
        Dims::new(M_SMALL, N, K_ANY),
        8,
        beta,
    )?);
    rows.extend(fused::<f16>(
        dev,
        Regime::Prefill,
        Dims::new(M_PREFILL, N, K_ALIGNED),
        8,
        beta,
    )?);
    Ok(rows)
}

/// fused_forward_saving_t picks the regime itself: f32 Simt, f16 at m = 5
/// Decode, bf16 at m = 130 Prefill. Rows for y and for the saved t.
fn saving_t_rows(dev: &Device) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    let dims = Dims::new(M_DECODE, N, K_ANY);
    rows.extend(fused::<f32>(dev, Regime::Simt, dims, 8, Forward::SavingT)?);
    let dims = Dims::new(M_SMALL, N, K_ALIGNED);
    rows.extend(fused::<f16>(
        dev,
        Regime::Decode,
        dims,
        3,
        Forward::SavingT,
    )?);
    let dims = Dims::new(M_PREFILL, N, K_ANY);
    rows.extend(fused::<bf16>(
        dev,
        Regime::Prefill,
        dims,
        1,
        Forward::SavingT,
    )?);
    Ok(rows)
}

/// Which fused-forward call a row makes.
#[derive(Clone, Copy, PartialEq)]
enum Forward {
    /// fused_forward_in with beta 0.
    Plain,
    /// fused_forward_in adding beta times the old y.
    Beta(f32),
    /// fused_forward_saving_t (beta 0, also writes t).
    SavingT,
}

/// One fused-forward launch in `regime` (fused_forward_saving_t picks that
/// regime itself): the row of y, and of t when saved.
fn fused<T: KernelElement>(
    dev: &Device,
    regime: Regime,
    dims: Dims,
    rank: usize,
    call: Forward,
) -> Res<Vec<Row>> {
    let Dims { m, n, k } = dims;
    let (x, w) = (data::<T>(m * k, 1), data::<T>(n * k, 2));
    let (a, b) = (data::<T>(rank * k, 3), data::<T>(n * rank, 4));
    let scale = balanced_scale(rank);
    let (beta, save_t) = match call {
        Forward::Beta(beta) => (beta, false),
        Forward::Plain => (0.0, false),
        Forward::SavingT => (0.0, true),
    };
    // The old y: read only with beta != 0; otherwise NaN, so that an element
    // the kernel does not write (or reads) fails. t also starts as NaN.
    let y_old = if beta != 0.0 {
        data::<T>(m * n, 5)
    } else {
        nans::<T>(m * n)
    };

    let (xd, wd) = (dev.upload(&x)?, dev.upload(&w)?);
    let (ad, bd) = (dev.upload(&a)?, dev.upload(&b)?);
    let adapter = DeviceAdapter::new(&ad, &bd, rank, scale);
    let mut yd = dev.upload(&y_old)?;
    let mut td = dev.upload(&nans::<f32>(m * rank))?;
    if save_t {
        assert_eq!(regime, regime_for(T::DTYPE, m), "the regime saving_t picks");
        fused_forward_saving_t(dev, dims, &xd, &wd, &adapter, &mut yd, &mut td)?;
    } else {
        fused_forward_in(regime, dev, dims, &xd, &wd, &adapter, beta, &mut yd)?;
    }

    // The reference: exact, with the control's scale, and on |inputs|.
    let forward = |(x, w, y): (&[f64], &[f64], &[f64]), a: &[f64], b: &[f64], scale, beta| {
        let mut y = y.to_vec();
        let adapter = Adapter { a, b, rank, scale };
        reference::fused_forward(dims, x, w, &adapter, beta, &mut y).map(|()| y)
    };
    let (x64, w64, a64, b64) = (wide(&x), wide(&w), wide(&a), wide(&b));
    let (xa, wa, aa, ba) = (abs(&x), abs(&w), abs(&a), abs(&b));
    let (y64, ya) = (wide(&y_old), abs(&y_old));
    let exact = (&x64[..], &w64[..], &y64[..]);
    let absolute = (&xa[..], &wa[..], &ya[..]);
    let want = forward(exact, &a64, &b64, scale, beta)?;
    let control = forward(exact, &a64, &b64, off::<T>(scale), beta)?;
    let abs_all = forward(absolute, &aa, &ba, scale.abs(), beta.abs())?;
    let abs_low = minus(&abs_all, &forward(absolute, &aa, &ba, 0.0, beta.abs())?);

    // beta y: a product and an addition more.
    let with_beta = if beta != 0.0 { 2 } else { 0 };
    let (y_model, path) = match regime {
        // The product, k additions into t, the scale, the product with b,
        // then r additions into y (after the base terms).
        Regime::Simt => (model::<T>(k + rank + 3 + with_beta), "Simt".to_string()),
        // Products of f16/bf16 are exact in f32: k additions into t, the
        // scale, then the hi and the lo expand, 2r additions into y.
        _ => (
            model::<T>(k + 2 * rank + 1 + with_beta)
                .mma(dev)
                .split::<T>(rank as f64 * max_abs(&b64)),
            format!("{regime:?}, {}", loads(k % 8 == 0)),
        ),
    };
    let (op, y_path) = match call {
        Forward::Plain => ("fused_forward", path.clone()),
        Forward::Beta(beta) => ("fused_forward", format!("{path}, beta {beta}")),
        Forward::SavingT => ("fused_forward_saving_t", format!("{path}: y")),
    };
    let mut rows = vec![judged(
        label::<T>(op, y_path, shape(dims, rank)),
        &wide(&dev.download(&yd)?),
        &want,
        &control,
        &y_model.bounds(&want, &abs_all, &abs_low),
    )];

    if save_t {
        // t = x a^T, f32 and unscaled: no scale enters it, so its control is
        // t off by the same relative amount (as if a were).
        let zero_b = vec![0.0; n * rank];
        let t_of = |x: &[f64], a: &[f64]| -> Res<Vec<f64>> {
            let adapter = Adapter {
                a,
                b: &zero_b,
                rank,
                scale,
            };
            let t = reference::lora_intermediate(dims, x, &adapter)?;
            Ok(t.iter().map(|&v| v as f64).collect())
        };
        let want = t_of(&x64, &a64)?;
        let delta = control_delta(T::DTYPE);
        let control: Vec<f64> = want.iter().map(|v| v * (1.0 + delta)).collect();
        let abs_t = t_of(&xa, &aa)?;
        // The product (rounded for f32 inputs) and k additions; the one
        // rounding to f32 is the reference's.
        let mut t_model = model::<f32>(k + 1);
        if regime != Regime::Simt {
            t_model = t_model.mma(dev);
        }
        rows.push(judged(
            label::<T>(
                op,
                format!("{path}: t (f32; control: t)"),
                shape(dims, rank),
            ),
            &wide(&dev.download(&td)?),
            &want,
            &control,
            &t_model.bounds(&want, &abs_t, &vec![0.0; want.len()]),
        ));
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------
// multi_adapter_forward: token ids and segments, Decode and Prefill, f16 and
// bf16, from one pool of mixed ranks.

/// The pool of the multi-adapter rows: mixed ranks (rank 1 among them) and an
/// empty last slot, which tokens may still name (they get the base model).
const POOL_RANKS: [usize; 5] = [8, 1, 16, 3, 0];
const POOL_MAX_RANK: usize = 16;

/// Per-token slot ids: repeats, -1, and the empty slot.
fn token_ids(m: usize) -> Vec<i32> {
    (0..m).map(|i| [0, 2, -1, 1, 3, 4, 2][i % 7]).collect()
}

/// Sorted segments (offsets, slots): among them an empty segment, a -1
/// segment and one naming the empty slot.
fn segments(m: usize) -> (Vec<i32>, Vec<i32>) {
    // (slot, percent of the batch)
    let parts = [(2, 15), (1, 5), (-1, 20), (0, 0), (4, 10), (0, 30), (3, 20)];
    let mut offsets = vec![0];
    let mut done = 0;
    for (_, percent) in parts {
        done += percent;
        offsets.push((m * done / 100) as i32);
    }
    (offsets, parts.iter().map(|p| p.0).collect())
}

/// Ids as the reference takes them: the empty slot serves the base model
/// only, like -1.
fn served(ids: &[i32]) -> Vec<i32> {
    ids.iter()
        .map(|&id| match id {
            id if id >= 0 && POOL_RANKS[id as usize] == 0 => -1,
            id => id,
        })
        .collect()
}

/// One adapter as host vectors: a, b, rank, scale.
type HostAdapter<T> = (Vec<T>, Vec<T>, usize, f32);

/// The pool's adapters on the host (the empty slot has rank 0).
struct PoolData<T> {
    slots: Vec<HostAdapter<T>>,
    n: usize,
    k: usize,
}

impl<T: KernelElement> PoolData<T> {
    fn new(n: usize, k: usize) -> Self {
        let slots = POOL_RANKS
            .iter()
            .zip(0u64..)
            .map(|(&r, s)| {
                let scale = if r > 0 { balanced_scale(r) } else { 0.0 };
                (data(r * k, 100 + s), data(n * r, 200 + s), r, scale)
            })
            .collect();
        PoolData { slots, n, k }
    }

    fn config(&self) -> PoolConfig {
        PoolConfig {
            slots: POOL_RANKS.len(),
            max_rank: POOL_MAX_RANK,
            n: self.n,
            k: self.k,
        }
    }

    fn load(&self, dev: &Device) -> Res<AdapterPool<T>> {
        let mut pool = AdapterPool::new(dev, self.config())?;
        for (s, (a, b, rank, scale)) in self.slots.iter().enumerate() {
            if *rank > 0 {
                pool.load(s, a, b, *rank, *scale)?;
            }
        }
        Ok(pool)
    }

    /// The occupied slots in f64 (absolute values when `absolute`), with
    /// their scales mapped by `scale`. The empty slot is the last, so ids
    /// index this list.
    fn reference(&self, absolute: bool, scale: impl Fn(f32) -> f32) -> Vec<HostAdapter<f64>> {
        let values = |v: &[T]| if absolute { abs(v) } else { wide(v) };
        self.slots
            .iter()
            .filter(|s| s.2 > 0)
            .map(|(a, b, r, s)| (values(a), values(b), *r, scale(*s)))
            .collect()
    }

    fn max_abs_b(&self) -> f64 {
        self.slots
            .iter()
            .map(|s| max_abs(&wide(&s.1)))
            .fold(0.0, f64::max)
    }
}

fn adapters(host: &[HostAdapter<f64>]) -> Vec<Adapter<'_, f64>> {
    host.iter()
        .map(|(a, b, rank, scale)| Adapter {
            a,
            b,
            rank: *rank,
            scale: *scale,
        })
        .collect()
}

fn multi_rows(dev: &Device) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    for (regime, m) in [(Regime::Decode, M_DECODE), (Regime::Prefill, M_PREFILL)] {
        // Each routing with one load path, so both routings and both load
        // paths meet every regime and type.
        for (segmented, k) in [(false, K_ALIGNED), (true, K_ANY)] {
            rows.push(multi::<f16>(dev, regime, Dims::new(m, N, k), segmented)?);
            rows.push(multi::<bf16>(dev, regime, Dims::new(m, N, k), segmented)?);
        }
    }
    Ok(rows)
}

/// The f32 multi-adapter forward is being added in another branch. Until the
/// op takes f32 this prints why there is no row; once it does, the row is
/// checked here like the others (an f32 hi + lo split is exact to 2^-48 and
/// the path count is that of the tensor-core kernels, so the same bound
/// holds for an f32 SIMT path).
fn multi_f32_rows(dev: &Device) -> Res<Vec<Row>> {
    let dims = Dims::new(M_DECODE, N, K_ANY);
    match multi::<f32>(dev, regime_for(DType::F32, dims.m), dims, false) {
        Ok(row) => Ok(vec![row]),
        Err(e) => match e.downcast_ref::<Error>() {
            Some(Error::InvalidArgument { name: "dtype", .. }) => {
                let op = "multi_adapter_forward";
                println!("   {op:<22} f32: no row yet, this build refuses f32 ({e})");
                Ok(Vec::new())
            }
            _ => Err(e),
        },
    }
}

/// One multi-adapter launch over the pool, routed by ids or by segments.
fn multi<T: KernelElement>(dev: &Device, regime: Regime, dims: Dims, segmented: bool) -> Res<Row> {
    let Dims { m, n, k } = dims;
    let (x, w) = (data::<T>(m * k, 11), data::<T>(n * k, 12));
    let pool_data = PoolData::<T>::new(n, k);
    let pool = pool_data.load(dev)?;
    let (xd, wd) = (dev.upload(&x)?, dev.upload(&w)?);
    let mut yd = dev.upload(&nans::<T>(m * n))?;
    let ids = if segmented {
        let (offsets, slots) = segments(m);
        let (od, sd) = (dev.upload(&offsets)?, dev.upload(&slots)?);
        let routing = Routing::Segments {
            offsets: (&od).into(),
            slots: (&sd).into(),
        };
        multi_adapter_forward_in(regime, &pool, m, &xd, &wd, &routing, 0.0, &mut yd)?;
        reference::segment_ids(m, &offsets, &slots)?
    } else {
        let ids = token_ids(m);
        let idd = dev.upload(&ids)?;
        let routing = Routing::Tokens((&idd).into());
        multi_adapter_forward_in(regime, &pool, m, &xd, &wd, &routing, 0.0, &mut yd)?;
        ids
    };

    let ids = served(&ids);
    let forward = |x: &[f64], w: &[f64], pool: &[HostAdapter<f64>]| -> Res<Vec<f64>> {
        let mut y = vec![0.0; m * n];
        reference::multi_adapter_forward(dims, x, w, &adapters(pool), &ids, 0.0, &mut y)?;
        Ok(y)
    };
    let (x64, w64, xa, wa) = (wide(&x), wide(&w), abs(&x), abs(&w));
    let want = forward(&x64, &w64, &pool_data.reference(false, |s| s))?;
    let control = forward(&x64, &w64, &pool_data.reference(false, off::<T>))?;
    let abs_all = forward(&xa, &wa, &pool_data.reference(true, f32::abs))?;
    let abs_low = minus(
        &abs_all,
        &forward(&xa, &wa, &pool_data.reference(true, |_| 0.0))?,
    );
    // A token's t: k additions (shuffle tree), then the scale, and the hi and
    // lo expands of its adapter (other adapters add exact zeros to its row).
    let model = model::<T>(k + 2 * POOL_MAX_RANK + 1)
        .mma(dev)
        .split::<T>(POOL_MAX_RANK as f64 * pool_data.max_abs_b());
    let routing = if segmented { "segments" } else { "token ids" };
    let path = format!("{regime:?}, {routing}, {}", loads(k % 8 == 0));
    Ok(judged(
        label::<T>("multi_adapter_forward", path, shape(dims, "1-16")),
        &wide(&dev.download(&yd)?),
        &want,
        &control,
        &model.bounds(&want, &abs_all, &abs_low),
    ))
}

// ---------------------------------------------------------------------------
// lora_backward and multi_adapter_backward: dx, da, db.

fn backward_rows(dev: &Device) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    let decode = Dims::new(M_DECODE, N, K_ANY);
    let opts = |deterministic, accumulate| BackwardOptions {
        accumulate,
        deterministic,
    };
    for deterministic in [true, false] {
        rows.extend(backward::<f32>(dev, decode, 8, opts(deterministic, false))?);
        rows.extend(backward::<bf16>(
            dev,
            decode,
            8,
            opts(deterministic, false),
        )?);
    }
    // The prefill tiles and the 16-byte path of the tensor-core dx (n, k % 8 == 0).
    let prefill = Dims::new(M_PREFILL, N_ALIGNED, K_ALIGNED);
    rows.extend(backward::<bf16>(dev, prefill, 16, opts(true, false))?);
    rows.extend(backward::<f16>(dev, prefill, 16, opts(false, false))?);
    // Accumulate: added to the gradients already there.
    rows.extend(backward::<bf16>(dev, decode, 8, opts(true, true))?);
    rows.extend(backward::<f32>(dev, decode, 8, opts(false, true))?);
    Ok(rows)
}

/// The reference gradients (dx, da, db) in f64 of one adapter, added to
/// `prior` when given (accumulate mode; da and db are f32 in the reference).
fn gradients(
    dims: Dims,
    (g, x, w): (&[f64], &[f64], &[f64]),
    (a, b, rank, scale): (&[f64], &[f64], usize, f32),
    t: &[f32],
    prior: Option<&[Vec<f64>; 3]>,
) -> Res<[Vec<f64>; 3]> {
    let Dims { m, n, k } = dims;
    let f32s = |v: &[f64]| v.iter().map(|&e| e as f32).collect::<Vec<f32>>();
    let (mut dx, mut da, mut db) = match prior {
        Some([dx, da, db]) => (dx.clone(), f32s(da), f32s(db)),
        None => (vec![0.0; m * k], vec![0f32; rank * k], vec![0f32; n * rank]),
    };
    let inputs = BackwardInputs {
        g,
        x,
        w,
        adapter: Adapter { a, b, rank, scale },
        t,
    };
    let grads = Gradients {
        dx: Some(&mut dx),
        da: Some(&mut da),
        db: Some(&mut db),
        accumulate: prior.is_some(),
    };
    reference::backward(dims, &inputs, grads)?;
    Ok([dx, wide(&da), wide(&db)])
}

/// The bounds of dx, da, db (pool or single adapter: `rank` is the largest).
fn gradient_models<T: Element>(
    dev: &Device,
    dims: Dims,
    rank: usize,
    max_a: f64,
    opts: BackwardOptions,
) -> [Model; 3] {
    let Dims { m, n, .. } = dims;
    // u = s g b: the product (rounded for f32), n additions, the scale.
    let u = n + 2;
    // Accumulating adds the old value: one more addition.
    let old = opts.accumulate as usize;
    let dx = if T::DTYPE == DType::F32 {
        // SIMT: u's product with a, then r additions after the base terms.
        model::<T>(u + rank + 1 + old)
    } else {
        // Tensor cores: u as hi + lo, 2r additions after the base terms.
        model::<T>(u + 2 * rank + old)
            .mma(dev)
            .split::<T>(rank as f64 * max_a)
    };
    // Token ranges of R tokens, S of them, then their sum (partials in a
    // fixed order, or atomics): R + S <= m + 1 additions.
    let da = model::<f32>(u + 1 + m + 1 + old);
    let db = model::<f32>(1 + m + 1 + 1 + old);
    [dx, da, db]
}

/// The three rows of one backward launch.
fn gradient_rows(
    labels: [Label; 3],
    got: [Vec<f64>; 3],
    [want, control, abs_all, abs_base]: [[Vec<f64>; 3]; 4],
    models: [Model; 3],
) -> Vec<Row> {
    let mut rows = Vec::new();
    for (i, label) in labels.into_iter().enumerate() {
        let abs_low = minus(&abs_all[i], &abs_base[i]);
        let bound = models[i].bounds(&want[i], &abs_all[i], &abs_low);
        rows.push(judged(label, &got[i], &want[i], &control[i], &bound));
    }
    rows
}

fn gradient_labels<T: Element>(
    op: &'static str,
    dims: Dims,
    rank: &str,
    opts: BackwardOptions,
) -> [Label; 3] {
    let Dims { m, n, k } = dims;
    let dx = if T::DTYPE == DType::F32 {
        "dx, Simt".to_string()
    } else {
        let tiles = if m <= 64 { "Decode" } else { "Prefill" };
        format!("dx, {tiles} tiles, {}", loads(n % 8 == 0 && k % 8 == 0))
    };
    let mut mode = if opts.deterministic {
        "fixed-order sum"
    } else {
        "atomics"
    }
    .to_string();
    let dx = if opts.accumulate {
        mode += ", accumulate";
        format!("{dx}, accumulate")
    } else {
        dx
    };
    [
        label::<T>(op, dx, shape(dims, rank)),
        label::<T>(op, format!("da (f32), {mode}"), shape(dims, rank)),
        label::<T>(op, format!("db (f32), {mode}"), shape(dims, rank)),
    ]
}

/// One lora_backward launch: dx, da, db, with t as the forward saves it.
fn backward<T: KernelElement>(
    dev: &Device,
    dims: Dims,
    rank: usize,
    opts: BackwardOptions,
) -> Res<Vec<Row>> {
    let Dims { m, n, k } = dims;
    let (g, x, w) = (
        data::<T>(m * n, 21),
        data::<T>(m * k, 22),
        data::<T>(n * k, 23),
    );
    let (a, b) = (data::<T>(rank * k, 24), data::<T>(n * rank, 25));
    let scale = balanced_scale(rank);
    let adapter = Adapter {
        a: &a,
        b: &b,
        rank,
        scale,
    };
    // t as fused_forward_saving_t saves it: f32, rounded once.
    let t = reference::lora_intermediate(dims, &x, &adapter)?;

    let (gd, xd, wd, td) = (
        dev.upload(&g)?,
        dev.upload(&x)?,
        dev.upload(&w)?,
        dev.upload(&t)?,
    );
    let (ad, bd) = (dev.upload(&a)?, dev.upload(&b)?);
    // The gradients already there when accumulating, else NaN (all overwritten).
    let (dx0, da0, db0) = if opts.accumulate {
        let v = |len, seed| common::values::<f32>(len, seed, 1.0);
        (data::<T>(m * k, 26), v(rank * k, 27), v(n * rank, 28))
    } else {
        (nans(m * k), nans(rank * k), nans(n * rank))
    };
    let mut dx = dev.upload(&dx0)?;
    let mut da = dev.upload(&da0)?;
    let mut db = dev.upload(&db0)?;
    let grads = Grads {
        dx: Some((&mut dx).into()),
        da: Some((&mut da).into()),
        db: Some((&mut db).into()),
    };
    let mut scratch = BackwardScratch::new(dev)?;
    let inputs = DeviceBackwardInputs::new(&gd, &xd, &wd, &td);
    let device_adapter = DeviceAdapter::new(&ad, &bd, rank, scale);
    lora_backward(
        dev,
        dims,
        &device_adapter,
        inputs,
        grads,
        opts,
        &mut scratch,
    )?;
    let got = [
        wide(&dev.download(&dx)?),
        wide(&dev.download(&da)?),
        wide(&dev.download(&db)?),
    ];

    let exact = (wide(&g), wide(&x), wide(&w));
    let exact = (&exact.0[..], &exact.1[..], &exact.2[..]);
    let absolute = (abs(&g), abs(&x), abs(&w));
    let absolute = (&absolute.0[..], &absolute.1[..], &absolute.2[..]);
    let (a64, b64, aa, ba) = (wide(&a), wide(&b), abs(&a), abs(&b));
    let t_abs: Vec<f32> = t.iter().map(|v| v.abs()).collect();
    let prior = [wide(&dx0), wide(&da0), wide(&db0)];
    let prior_abs = prior.clone().map(|v| v.iter().map(|e| e.abs()).collect());
    let (prior, prior_abs) = match opts.accumulate {
        true => (Some(&prior), Some(&prior_abs)),
        false => (None, None),
    };
    let reference = [
        gradients(dims, exact, (&a64, &b64, rank, scale), &t, prior)?,
        gradients(dims, exact, (&a64, &b64, rank, off::<T>(scale)), &t, prior)?,
        gradients(
            dims,
            absolute,
            (&aa, &ba, rank, scale.abs()),
            &t_abs,
            prior_abs,
        )?,
        gradients(dims, absolute, (&aa, &ba, rank, 0.0), &t_abs, prior_abs)?,
    ];
    let models = gradient_models::<T>(dev, dims, rank, max_abs(&a64), opts);
    let labels = gradient_labels::<T>("lora_backward", dims, &rank.to_string(), opts);
    Ok(gradient_rows(labels, got, reference, models))
}

fn multi_backward_rows(dev: &Device) -> Res<Vec<Row>> {
    let mut rows = multi_backward::<bf16>(dev, Dims::new(M_DECODE, N, K_ANY), false)?;
    let prefill = Dims::new(M_PREFILL, N_ALIGNED, K_ALIGNED);
    rows.extend(multi_backward::<bf16>(dev, prefill, true)?);
    Ok(rows)
}

/// The pool backward's reference (docs/DESIGN.md section 12: a per-slot loop):
/// each occupied slot's tokens as one single-adapter batch, in the pool
/// layout; tokens without an adapter get dx = g w (scale 0).
fn pool_gradients(
    dims: Dims,
    (g, x, w): (&[f64], &[f64], &[f64]),
    pool: &[HostAdapter<f64>],
    ids: &[i32],
    t: &[f32],
) -> Res<[Vec<f64>; 3]> {
    let Dims { m, n, k } = dims;
    let (slots, max) = (POOL_RANKS.len(), POOL_MAX_RANK);
    let (mut dx, mut da, mut db) = (
        vec![0.0; m * k],
        vec![0.0; slots * max * k],
        vec![0.0; slots * n * max],
    );
    for slot in -1..pool.len() as i32 {
        let tokens: Vec<usize> = (0..m).filter(|&i| ids[i] == slot).collect();
        if tokens.is_empty() {
            continue;
        }
        let rows = |v: &[f64], width: usize| -> Vec<f64> {
            tokens
                .iter()
                .flat_map(|&i| v[i * width..(i + 1) * width].iter().copied())
                .collect()
        };
        let (a, b, rank, scale) = &pool[slot.max(0) as usize];
        let (rank, scale) = (*rank, if slot < 0 { 0.0 } else { *scale });
        let t_rows: Vec<f32> = tokens
            .iter()
            .flat_map(|&i| t[i * max..i * max + rank].iter().copied())
            .collect();
        let sub = Dims::new(tokens.len(), n, k);
        let [sdx, sda, sdb] = gradients(
            sub,
            (&rows(g, n), &rows(x, k), w),
            (a, b, rank, scale),
            &t_rows,
            None,
        )?;
        for (row, &i) in tokens.iter().enumerate() {
            dx[i * k..(i + 1) * k].copy_from_slice(&sdx[row * k..(row + 1) * k]);
        }
        if slot >= 0 {
            let s = slot as usize;
            for j in 0..rank {
                da[(s * max + j) * k..(s * max + j + 1) * k]
                    .copy_from_slice(&sda[j * k..(j + 1) * k]);
                for c in 0..n {
                    db[(s * n + c) * max + j] = sdb[c * rank + j];
                }
            }
        }
    }
    Ok([dx, da, db])
}

/// One multi_adapter_backward launch over the pool with per-token ids.
fn multi_backward<T: KernelElement>(
    dev: &Device,
    dims: Dims,
    deterministic: bool,
) -> Res<Vec<Row>> {
    let Dims { m, n, k } = dims;
    let (g, x, w) = (
        data::<T>(m * n, 31),
        data::<T>(m * k, 32),
        data::<T>(n * k, 33),
    );
    let pool_data = PoolData::<T>::new(n, k);
    let pool = pool_data.load(dev)?;
    let cfg = pool_data.config();
    let ids = token_ids(m);
    let served_ids = served(&ids);
    // t as multi_adapter_forward_saving_t saves it: [m, max_rank], each
    // token's rank, zero elsewhere (f32, rounded once).
    let mut t = vec![0f32; m * POOL_MAX_RANK];
    for (i, &id) in served_ids.iter().enumerate().filter(|(_, id)| **id >= 0) {
        let (a, b, rank, scale) = &pool_data.slots[id as usize];
        let adapter = Adapter {
            a,
            b,
            rank: *rank,
            scale: *scale,
        };
        let ti =
            reference::lora_intermediate(Dims::new(1, n, k), &x[i * k..(i + 1) * k], &adapter)?;
        t[i * POOL_MAX_RANK..i * POOL_MAX_RANK + rank].copy_from_slice(&ti);
    }

    let (gd, xd, wd) = (dev.upload(&g)?, dev.upload(&x)?, dev.upload(&w)?);
    let (td, idd) = (dev.upload(&t)?, dev.upload(&ids)?);
    let mut dx = dev.upload(&nans::<T>(m * k))?;
    let mut da = dev.upload(&nans::<f32>(cfg.slots * cfg.max_rank * k))?;
    let mut db = dev.upload(&nans::<f32>(cfg.slots * n * cfg.max_rank))?;
    let grads = Grads {
        dx: Some((&mut dx).into()),
        da: Some((&mut da).into()),
        db: Some((&mut db).into()),
    };
    let opts = BackwardOptions {
        accumulate: false,
        deterministic,
    };
    let mut scratch = BackwardScratch::new(dev)?;
    let inputs = DeviceBackwardInputs::new(&gd, &xd, &wd, &td);
    multi_adapter_backward(&pool, m, &idd, inputs, grads, opts, &mut scratch)?;
    let got = [
        wide(&dev.download(&dx)?),
        wide(&dev.download(&da)?),
        wide(&dev.download(&db)?),
    ];

    let exact = (wide(&g), wide(&x), wide(&w));
    let exact = (&exact.0[..], &exact.1[..], &exact.2[..]);
    let absolute = (abs(&g), abs(&x), abs(&w));
    let absolute = (&absolute.0[..], &absolute.1[..], &absolute.2[..]);
    let t_abs: Vec<f32> = t.iter().map(|v| v.abs()).collect();
    let ids = &served_ids;
    let reference = [
        pool_gradients(dims, exact, &pool_data.reference(false, |s| s), ids, &t)?,
        pool_gradients(dims, exact, &pool_data.reference(false, off::<T>), ids, &t)?,
        pool_gradients(
            dims,
            absolute,
            &pool_data.reference(true, f32::abs),
            ids,
            &t_abs,
        )?,
        pool_gradients(
            dims,
            absolute,
            &pool_data.reference(true, |_| 0.0),
            ids,
            &t_abs,
        )?,
    ];
    let max_a = pool_data
        .slots
        .iter()
        .map(|s| max_abs(&wide(&s.0)))
        .fold(0.0, f64::max);
    let models = gradient_models::<T>(dev, dims, POOL_MAX_RANK, max_a, opts);
    let labels = gradient_labels::<T>("multi_adapter_backward", dims, "1-16", opts);
    Ok(gradient_rows(labels, got, reference, models))
}

// ---------------------------------------------------------------------------
// SlotOptimizer::step against reference::adamw_slot_step, over several steps.

/// The optimizer's slots, (rank, settings): weight decay; rank 1, clipped
/// (its gradient norm is far above 1); pulled toward its anchor. A fourth
/// slot of the pool stays empty.
fn optimizer_slots() -> [(usize, SlotHyper); 3] {
    let hyper = |lr, weight_decay, max_grad_norm, anchor_pull| SlotHyper {
        lr,
        weight_decay,
        max_grad_norm,
        anchor_pull,
    };
    [
        (8, hyper(1e-2, 0.01, 0.0, 0.0)),
        (1, hyper(2e-2, 0.0, 1.0, 0.0)),
        (3, hyper(1e-2, 0.1, 0.0, 0.5)),
    ]
}

const OPT_STEPS: u32 = 3;

/// beta2 = 0.99, not the default 0.999: the kernel computes the bias
/// correction 1 - beta2^t in f32 from powf, whose error relative to it is
/// about ulp / (1 - beta2^t). With 0.999 that is ~1e-4 at the first steps, as
/// large as the f32 control: the check could not see a 0.01% error in lr.
const OPT_BETAS: AdamWConfig = AdamWConfig {
    beta1: 0.9,
    beta2: 0.99,
    eps: 1e-8,
};

/// powf's error allowed for in the bias corrections, in ulps: an allowance,
/// not a documented figure (if the f32 masters fail on a GPU alone, compare
/// it with CUDA's accuracy table for powf before suspecting the kernel).
const POWF_ULPS: f64 = 8.0;

fn optimizer_rows(dev: &Device) -> Res<Vec<Row>> {
    // f32 pool: the masters at the f32 control, and the gradient norms;
    // bf16 pool: the masters and the bf16 working copy the forward reads.
    let mut rows = optimizer::<f32>(dev)?;
    rows.extend(optimizer::<bf16>(dev)?);
    Ok(rows)
}

/// One slot's reference state, stepped by reference::adamw_slot_step.
struct Trajectory<T> {
    p: Vec<f32>,
    m1: Vec<f32>,
    m2: Vec<f32>,
    working: Vec<T>,
    hyper: SlotHyper,
}

impl<T: Element> Trajectory<T> {
    fn new(p: Vec<f32>, hyper: SlotHyper) -> Self {
        let len = p.len();
        Trajectory {
            p,
            m1: vec![0.0; len],
            m2: vec![0.0; len],
            working: vec![T::default(); len],
            hyper,
        }
    }

    fn step(&mut self, step: u32, grad: &[f32], anchor: &[f32]) -> Res<SlotStep> {
        let anchor = (self.hyper.anchor_pull > 0.0).then_some(anchor);
        let state = AdamWState {
            p: &mut self.p,
            m1: &mut self.m1,
            m2: &mut self.m2,
            working: &mut self.working,
        };
        Ok(reference::adamw_slot_step(
            &OPT_BETAS,
            &self.hyper,
            step,
            grad,
            anchor,
            state,
        )?)
    }
}

/// Bounds on |kernel - reference| of one parameter's master and moments,
/// carried from step to step.
#[derive(Clone, Copy, Default)]
struct Drift {
    p: f64,
    m1: f64,
    m2: f64,
}

/// What a step of one slot shares: its settings, its clip factor with the
/// kernel's relative error in it, and the bias corrections with theirs.
struct StepTerms {
    hyper: SlotHyper,
    clip: f64,
    clip_err: f64,
    bias: [f64; 2],
    bias_err: [f64; 2],
}

impl StepTerms {
    fn new(hyper: SlotHyper, step: u32, grad: &[f32]) -> Self {
        let norm = grad.iter().map(|&g| (g as f64).powi(2)).sum::<f64>().sqrt();
        let max = hyper.max_grad_norm as f64;
        let clipped = max > 0.0 && norm > max;
        let bias = |beta: f32| {
            let power = (beta as f64).powi(step as i32);
            // powf's error (ulp(P) <= 2 u P), then 1 - P (exact above 1/2).
            (
                1.0 - power,
                POWF_ULPS * 2.0 * U32 * power / (1.0 - power) + U32,
            )
        };
        let ((b1, e1), (b2, e2)) = (bias(OPT_BETAS.beta1), bias(OPT_BETAS.beta2));
        StepTerms {
            hyper,
            clip: if clipped { max / norm } else { 1.0 },
            // The f32 norm (a sum of squares, then sqrtf) and the division.
            clip_err: if clipped {
                norm_err(grad.len()) + U32
            } else {
                0.0
            },
            bias: [b1, b2],
            bias_err: [e1, e2],
        }
    }

    /// One step of adamw.cu's f32 arithmetic on one parameter, to first
    /// order in u: the drift after it, from the drift before it and the
    /// reference's state before it (w, m1, m2), gradient g and anchor.
    fn drift(&self, d: Drift, [w, m1, m2, g, anchor]: [f64; 5]) -> Drift {
        let u = U32;
        let (b1, b2) = (OPT_BETAS.beta1 as f64, OPT_BETAS.beta2 as f64);
        let (lr, wd) = (self.hyper.lr as f64, self.hyper.weight_decay as f64);
        let pull = self.hyper.anchor_pull as f64;
        // g' = g clip + pull (w - anchor): the clip's error, the pull on the
        // kernel's own master, the sum; the reference rounds g' to f32 too.
        let gp = g * self.clip + pull * (w - anchor);
        let dg = g.abs() * self.clip * (self.clip_err + u)
            + pull * ((1.0 + u) * d.p + 2.0 * u * (w - anchor).abs())
            + 2.0 * u * gp.abs();
        // Moments: two products and a sum each (one more product in m2).
        let a1 = b1 * m1 + (1.0 - b1) * gp;
        let a2 = b2 * m2 + (1.0 - b2) * gp * gp;
        let e1 = b1 * d.m1 + (1.0 - b1) * dg + 2.0 * u * (b1 * m1.abs() + (1.0 - b1) * gp.abs());
        let e2 = b2 * d.m2
            + (1.0 - b2) * (2.0 * gp.abs() * dg + dg * dg)
            + 3.0 * u * (b2 * m2 + (1.0 - b2) * gp * gp);
        // (a1 / bias1) / (sqrt(a2 / bias2) + eps) + wd w.
        let [bias1, bias2] = self.bias;
        let mean = a1 / bias1;
        let d_mean = (e1 + a1.abs() * (self.bias_err[0] + u)) / bias1;
        let root = (a2 / bias2).sqrt();
        let rel_root = 0.5 * (e2 / a2 + self.bias_err[1] + u) + u;
        let den = root + OPT_BETAS.eps as f64;
        let ratio = mean / den;
        let d_ratio = d_mean / den + ratio.abs() * (rel_root * root / den + 2.0 * u);
        let update = ratio + wd * w;
        let d_update = d_ratio + wd * (d.p + u * w.abs()) + u * update.abs();
        // p - lr update: the product, the difference, and the reference's
        // own rounding of p, m1, m2 to f32.
        let p = w - lr * update;
        Drift {
            p: d.p + lr * (d_update + u * update.abs()) + 2.0 * u * p.abs(),
            m1: e1 + u * a1.abs(),
            m2: e2 + u * a2,
        }
    }
}

/// Relative error of the kernel's f32 norm of `len` values: the squares and
/// `len` additions, then sqrtf.
fn norm_err(len: usize) -> f64 {
    0.5 * gamma(len + 1, U32) + U32
}

/// A slot's parameters (a then b) from pool-layout gradients.
fn slot_values(cfg: PoolConfig, slot: usize, rank: usize, (ga, gb): (&[f32], &[f32])) -> Vec<f32> {
    let PoolConfig { max_rank, n, k, .. } = cfg;
    let mut v = ga[slot * max_rank * k..][..rank * k].to_vec();
    for c in 0..n {
        v.extend_from_slice(&gb[(slot * n + c) * max_rank..][..rank]);
    }
    v
}

/// OPT_STEPS steps of the optimizer over three slots of a `T` pool, beside
/// the reference (and its control, lr off by the control's error: the step
/// has no adapter scale, lr is its scale).
fn optimizer<T: KernelElement>(dev: &Device) -> Res<Vec<Row>> {
    let cfg = PoolConfig {
        slots: 4,
        max_rank: 8,
        n: N,
        k: K_ANY,
    };
    let (n, k) = (cfg.n, cfg.k);
    let slots = optimizer_slots();
    let mut pool = AdapterPool::<T>::new(dev, cfg)?;
    let mut opt = SlotOptimizer::new(&pool, OPT_BETAS)?;
    let (mut want, mut control, mut drift, mut anchors) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (s, &(rank, hyper)) in slots.iter().enumerate() {
        // Small weights, as early in training: the lr-sized steps then show
        // in the storage-type copy.
        let a: Vec<f32> = common::values(rank * k, 40 + s as u64, 0.02);
        let b: Vec<f32> = common::values(n * rank, 50 + s as u64, 0.02);
        opt.load_adapter(&mut pool, s, &a, &b, rank, 1.0, hyper)?;
        let p: Vec<f32> = a.iter().chain(&b).copied().collect();
        let lr_off = SlotHyper {
            lr: off::<T>(hyper.lr),
            ..hyper
        };
        want.push(Trajectory::<T>::new(p.clone(), hyper));
        control.push(Trajectory::<T>::new(p.clone(), lr_off));
        drift.push(vec![Drift::default(); p.len()]);
        anchors.push(p);
    }

    // The gradient norms each step reports: (kernel, reference) per slot.
    let (mut norms, mut norms_want) = (Vec::new(), Vec::new());
    for step in 1..=OPT_STEPS {
        let ga: Vec<f32> = common::values(cfg.slots * cfg.max_rank * k, 60 + step as u64, 1.0);
        let gb: Vec<f32> = common::values(cfg.slots * n * cfg.max_rank, 70 + step as u64, 1.0);
        opt.step(&mut pool, &dev.upload(&ga)?, &dev.upload(&gb)?)?;
        let statuses = opt.statuses()?;
        if statuses[3] != SlotStatus::Idle {
            return Err(format!("the empty slot stepped: {:?}", statuses[3]).into());
        }
        for (s, &(rank, hyper)) in slots.iter().enumerate() {
            let grad = slot_values(cfg, s, rank, (&ga, &gb));
            let terms = StepTerms::new(hyper, step, &grad);
            let traj = &want[s];
            for (e, d) in drift[s].iter_mut().enumerate() {
                let state = [traj.p[e], traj.m1[e], traj.m2[e], grad[e], anchors[s][e]];
                *d = terms.drift(*d, state.map(|v| v as f64));
            }
            let SlotStep::Updated { grad_norm } = want[s].step(step, &grad, &anchors[s])? else {
                return Err("the reference skipped a finite gradient".into());
            };
            control[s].step(step, &grad, &anchors[s])?;
            norms.push(match statuses[s] {
                SlotStatus::Updated { grad_norm } => grad_norm as f64,
                _ => f64::NAN, // not stepped: fails the row
            });
            norms_want.push((grad_norm, grad.len()));
        }
    }

    let ranks: Vec<String> = slots.iter().map(|s| s.0.to_string()).collect();
    let what = format!("-x{n}x{k}, r{}", ranks.join(","));
    let steps = format!("{OPT_STEPS} steps:");
    let mut rows = Vec::new();
    // The f32 masters after the last step.
    let (mut got, mut p_want, mut p_control, mut bound) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (s, traj) in want.iter().enumerate() {
        let (a, b) = opt.master(&pool, s)?;
        got.extend(a.iter().chain(&b).map(|&v| v as f64));
        p_want.extend(wide(&traj.p));
        p_control.extend(wide(&control[s].p));
        bound.extend(drift[s].iter().map(|d| d.p));
    }
    let path = format!("{steps} masters (f32; control: lr)");
    let masters = label::<T>("SlotOptimizer::step", path, what.clone());
    rows.push(judged(masters, &got, &p_want, &p_control, &bound));

    if T::DTYPE == DType::F32 {
        // The norms: no scale enters them; the control is the gradient off.
        let delta = control_delta(T::DTYPE);
        let want: Vec<f64> = norms_want.iter().map(|w| w.0).collect();
        let control: Vec<f64> = want.iter().map(|w| w * (1.0 + delta)).collect();
        let bound: Vec<f64> = norms_want
            .iter()
            .map(|&(w, len)| (1.0 + U32) * norm_err(len) * w)
            .collect();
        let path = format!("{steps} grad norms (control: g)");
        let label = label::<T>("SlotOptimizer::step", path, what);
        rows.push(judged(label, &norms, &want, &control, &bound));
    } else {
        // The working copy of a (the pool's a rows), rounded from the kernel's
        // master: within the two roundings of the two masters and their drift.
        let working = pool_a_rows(&pool, cfg.slots)?;
        let r = rounding::<T>();
        let (mut got, mut w_want, mut w_control, mut bound) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (s, &(rank, _)) in slots.iter().enumerate() {
            let len = rank * k;
            got.extend(wide(&working[s * cfg.max_rank * k..][..len]));
            w_want.extend(wide(&want[s].working[..len]));
            w_control.extend(wide(&control[s].working[..len]));
            bound.extend(want[s].working[..len].iter().zip(&drift[s]).map(|(w, d)| {
                2.0 * r.u * (1.0 + 2.0 * r.u) * w.to_f64().abs()
                    + (1.0 + 2.0 * r.u) * d.p
                    + 2.0 * r.eta
            }));
        }
        let path = format!("{steps} working copy of a (control: lr)");
        let label = label::<T>("SlotOptimizer::step", path, what);
        rows.push(judged(label, &got, &w_want, &w_control, &bound));
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------
// merge and unmerge.

fn merge_rows(dev: &Device) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    for op in [MergeOp::Merge, MergeOp::Unmerge] {
        rows.push(merge_one::<f32>(dev, op)?);
        rows.push(merge_one::<f16>(dev, op)?);
        rows.push(merge_one::<bf16>(dev, op)?);
    }
    Ok(rows)
}

/// w <- w +/- s b a on a copy of w.
/// The pool's `a` of every slot in its layout `[slots][max_rank][k]` (rows
/// past a slot's rank, and empty slots, as zeros).
fn pool_a_rows<T: KernelElement>(pool: &AdapterPool<T>, slots: usize) -> Res<Vec<T>> {
    let PoolConfig { max_rank, k, .. } = pool.config();
    let mut rows = vec![T::default(); slots * max_rank * k];
    for s in 0..slots {
        if let Some(adapter) = pool.adapter(s)? {
            rows[s * max_rank * k..][..adapter.a.len()].copy_from_slice(&adapter.a);
        }
    }
    Ok(rows)
}

fn merge_one<T: KernelElement>(dev: &Device, op: MergeOp) -> Res<Row> {
    let (n, k, rank) = (N, K_ANY, 8);
    let (w, a, b) = (
        data::<T>(n * k, 41),
        data::<T>(rank * k, 42),
        data::<T>(n * rank, 43),
    );
    let scale = balanced_scale(rank);
    let (ad, bd) = (dev.upload(&a)?, dev.upload(&b)?);
    let mut wd = dev.upload(&w)?;
    merge(
        dev,
        Dims::new(0, n, k),
        &mut wd,
        &DeviceAdapter::new(&ad, &bd, rank, scale),
        op,
    )?;

    let merged = |w: &[f64], a: &[f64], b: &[f64], scale, op| -> Res<Vec<f64>> {
        let mut w = w.to_vec();
        let adapter = Adapter { a, b, rank, scale };
        reference::merge(n, k, &mut w, &adapter, op)?;
        Ok(w)
    };
    let (w64, a64, b64) = (wide(&w), wide(&a), wide(&b));
    let want = merged(&w64, &a64, &b64, scale, op)?;
    let control = merged(&w64, &a64, &b64, off::<T>(scale), op)?;
    let abs_all = merged(&abs(&w), &abs(&a), &abs(&b), scale.abs(), MergeOp::Merge)?;
    // The products (rounded for f32), r additions, the scale, the add to w.
    let bound = model::<T>(rank + 3).bounds(&want, &abs_all, &vec![0.0; want.len()]);
    let label = label::<T>("merge", format!("{op:?}"), format!("-x{n}x{k}, r{rank}"));
    Ok(judged(
        label,
        &wide(&dev.download(&wd)?),
        &want,
        &control,
        &bound,
    ))
}
