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
    LaunchForm, Regime, fused_forward_in, fused_forward_saving_t, fused_forward_tuned, regime_for,
};
use lora_kernels::ops::lora_backward::{
    BackwardOptions, BackwardScratch, DeviceBackwardInputs, Grads, lora_backward,
    multi_adapter_backward,
};
use lora_kernels::ops::merge::merge;
use lora_kernels::ops::multi_adapter_forward::{
    LaunchForm as MultiLaunchForm, Routing, multi_adapter_forward_in, multi_adapter_forward_tuned,
};
use lora_kernels::reference::{self, Adapter, BackwardInputs, Gradients, SlotStep};
use lora_kernels::{
    AdapterPool, DType, Device, DeviceAdapter, Dims, Element, Error, KernelElement, MergeOp,
    PoolConfig,
};

use crate::{Res, common, data};

/// Batch sizes: a decode batch (a partial 64-row tile, below the decode limit
/// of 64), a smaller one, and a prefill batch (one full 128-row tile and a
/// 2-row tail).
const M_DECODE: usize = 37;
const M_SMALL: usize = 5;
const M_PREFILL: usize = 130;
/// Output width: no multiple of any tile (16, 32, 64, 128, 256) nor of 8.
const N: usize = 45;
/// Widths for the backward's 16-byte `dx` path, which also needs n % 8 == 0.
const N_ALIGNED: usize = 40;
/// k % 8 == 0 takes the 16-byte loads, yet is no multiple of the k-tiles.
const K_ALIGNED: usize = 72;
/// Element loads.
const K_ANY: usize = 70;
/// A k long enough for split-K at decode (16 k-tiles of 64): at n = 45 the
/// decode launches split each tile's k-loop across blocks (on 132 SMs or the
/// host runtime).
const K_SPLIT: usize = 1000;
/// f16's split-K rows (odd: element loads): 9 k-tiles, 2 splits. Longer k
/// hides f16's control: the accumulation term of the bound grows as k^1.5
/// against the low-rank term's k^0.5, and with mma.sync's truncating
/// additions on a GPU (2^-23 each) it passes 0.3% of the low-rank term near
/// k = 1000 (the control's ratio there is 0.6 on an H200; 1.5 at 521).
const K_SPLIT_F16: usize = 521;

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

// The optimizer's reference trajectory and drift model, shared with tests/adamw.rs.
#[path = "../../../tests/common/adamw_model.rs"]
mod adamw_model;
mod backward;
mod forward;
mod merge;
mod multi;
mod optimizer;

use backward::{backward_rows, multi_backward_rows};
use forward::{fused_forward_rows, saving_t_rows};
use merge::merge_rows;
use multi::{multi_f32_rows, multi_rows};
use optimizer::optimizer_rows;

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
