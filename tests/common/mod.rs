//! Shared test helpers: random data, comparison against the reference with
//! docs/DESIGN.md section 3's tolerances, and the GPU harness (one context per test
//! binary; GPU-only tests skip, saying so in the test output, when there is no GPU; fail instead when
//! LORA_KERNELS_REQUIRE_GPU=1).
#![allow(dead_code)]

pub mod adamw_model;
#[cfg(feature = "peft")]
pub mod peft_files;
pub mod pool_model;

use std::sync::OnceLock;

use lora_kernels::reference::Adapter;
use lora_kernels::{DType, Device, Dims, Element};
use proptest::test_runner::{Config, RngAlgorithm, TestRng};
use rand::RngExt;

#[allow(unused_imports)] // not every test file uses the proptest macros
pub use proptest::prelude::*;

/// Proptest settings for kernel tests: no fork/timeout (unsafe after CUDA
/// init), no persistence files, a modest number of cases (the host runtime is
/// an interpreter of sorts).
pub fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        fork: false,
        timeout: 0,
        ..Config::default()
    }
}

/// A seeded RNG for data inside a proptest case (the seed is part of the case).
pub fn rng(seed: u64) -> TestRng {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
}

/// `len` values uniform in [-1, 1) (never zeros), rounded to `T`.
pub fn random<T: Element>(rng: &mut TestRng, len: usize) -> Vec<T> {
    (0..len)
        .map(|_| T::from_f64(rng.random_range(-1.0..1.0)))
        .collect()
}

/// The GPU for this test binary, or None when there is none; the caller is a
/// GPU-only test, which is then skipped (said in the test output, by name).
/// With LORA_KERNELS_REQUIRE_GPU=1 a missing GPU is a test failure.
pub fn gpu() -> Option<Device> {
    let dev = usable_gpu();
    if dev.is_none() {
        let test = std::thread::current().name().unwrap_or("?").to_string();
        say(&format!("{test}: skipped (needs a GPU)"));
    }
    dev
}

/// The host runtime (always) and the GPU (when there is one). Without a GPU
/// the binary says once that the GPU half of its tests was skipped.
pub fn devices() -> Vec<Device> {
    let mut devs = vec![Device::host().expect("tests build with the `host` feature")];
    let gpu = usable_gpu();
    if gpu.is_none() {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| say("tests run on the host runtime only: their GPU half is skipped"));
    }
    devs.extend(gpu);
    devs
}

/// [`devices`] and the host runtime with its threads taking turns
/// (`HostSchedule::Interleaved`): for kernels whose warps work on their own
/// between block barriers, where one warp's shared memory reaching another
/// shows only when the warps interleave.
#[allow(dead_code)] // not every test binary has such kernels
pub fn devices_and_interleaved() -> Vec<Device> {
    let mut devs = devices();
    devs.push(Device::host_with_schedule(lora_kernels::HostSchedule::Interleaved).unwrap());
    devs
}

/// Whether two results are the same bits, element by element (NaN included).
pub fn same_bits<T: Element>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(p, q)| p.to_f64().to_bits() == q.to_f64().to_bits())
}

/// The devices the wgmma kernels run on: the host runtime (which emulates
/// wgmma, TMA and mbarrier) under each schedule, and a GPU of compute
/// capability 9.0.
pub fn wgmma_devices() -> Vec<Device> {
    use lora_kernels::HostSchedule;
    let mut devs = vec![
        Device::host_with_schedule(HostSchedule::Reverse).unwrap(),
        Device::host_with_schedule(HostSchedule::Interleaved).unwrap(),
    ];
    devs.extend(devices().into_iter().filter(runs_wgmma));
    devs
}

/// Whether `dev` runs the wgmma kernels: the host runtime, or a GPU of
/// compute capability 9.0 (the tests' builds hold sm_90a for it).
pub fn runs_wgmma(dev: &Device) -> bool {
    dev.compute_capability().is_none_or(|cc| cc == (9, 0))
}

/// The fewest tokens (`n` up to 128) whose 128 x 128 prefill tiles fill
/// every SM of `dev` 4 times: from here a default prefill takes the wgmma
/// kernel where `dev` runs it (src/ops/wgmma_dispatch.rs).
#[allow(dead_code)] // the forward tests' only
pub fn wgmma_prefill_rows(dev: &Device) -> usize {
    (4 * dev.sm_count() - 1) * 128 + 1
}

fn usable_gpu() -> Option<Device> {
    static GPU: OnceLock<Result<Device, String>> = OnceLock::new();
    let gpu = GPU.get_or_init(|| {
        if !lora_kernels::kernels_built() {
            return Err("the crate was built without nvcc (no CUDA kernels)".into());
        }
        Device::cuda(0).map_err(|e| e.to_string())
    });
    match gpu {
        Ok(dev) => Some(dev.clone()),
        Err(why) => {
            if std::env::var("LORA_KERNELS_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("LORA_KERNELS_REQUIRE_GPU=1 but no GPU is usable: {why}");
            }
            static WHY: std::sync::Once = std::sync::Once::new();
            WHY.call_once(|| say(&format!("no GPU: {why}")));
            None
        }
    }
}

/// A line in the output of `cargo test` itself: written to stderr directly,
/// because the test harness captures `eprintln!` of passing tests.
fn say(line: &str) {
    use std::io::Write;
    let binary = std::env::args().next().unwrap_or_default();
    let binary = std::path::Path::new(&binary)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let binary = binary.split('-').next().unwrap_or_default();
    let _ = writeln!(std::io::stderr(), "note [{binary}]: {line}");
}

/// Relative tolerance of docs/DESIGN.md section 3 for a storage type.
pub fn rtol<T: Element>() -> f64 {
    match T::DTYPE {
        lora_kernels::DType::F32 => 1e-5,
        lora_kernels::DType::F16 => 2e-3,
        lora_kernels::DType::BF16 => 1.6e-2,
        lora_kernels::DType::F64 => 1e-12,
    }
}

/// Checks `|got - want| <= atol + rtol |want|` elementwise; NaN must meet NaN
/// and Inf the same Inf. On failure returns the shape, the worst index, got,
/// expected and the normwise error.
pub fn compare<T: Element>(
    what: &str,
    got: &[T],
    want: &[T],
    atol: f64,
    rtol: f64,
) -> Result<(), String> {
    compare_by(what, got, want, |_, w| atol + rtol * w.abs())
}

/// docs/DESIGN.md section 3's per-element check, `|got - want| <= bound[i]`, for
/// bounds built from each element's own sum of |terms| (see [`f32_sum_bound`]).
pub fn compare_within<T: Element>(
    what: &str,
    got: &[T],
    want: &[T],
    bound: &[f64],
) -> Result<(), String> {
    if bound.len() != want.len() {
        return Err(format!(
            "{what}: {} bounds for {} elements",
            bound.len(),
            want.len()
        ));
    }
    compare_by(what, got, want, |i, _| bound[i])
}

/// One unit in the last place of `T` at `v` (the subnormal spacing near 0).
pub fn ulp<T: Element>(v: f64) -> f64 {
    let smallest = match T::DTYPE {
        lora_kernels::DType::F32 => 2f64.powi(-149),
        lora_kernels::DType::F16 => 2f64.powi(-24),
        lora_kernels::DType::BF16 => 2f64.powi(-133),
        lora_kernels::DType::F64 => 2f64.powi(-1074),
    };
    if v == 0.0 || !v.is_finite() {
        return smallest;
    }
    let exponent = v.abs().log2().floor() as i32;
    (2.0 * T::UNIT_ROUNDOFF * 2f64.powi(exponent)).max(smallest)
}

/// The bound on an element computed with f32 accumulation and rounded once to
/// `T` (docs/DESIGN.md section 3): `ulp_T(ref) + 4 eps_f32 A`, where `abs_sum` (A)
/// is the sum of the absolute values of every term behind the element.
pub fn f32_sum_bound<T: Element>(reference: f64, abs_sum: f64) -> f64 {
    ulp::<T>(reference) + 4.0 * f32::EPSILON as f64 * abs_sum
}

/// The comparison loop: `bound(i, want[i])` is the allowed |got - want|.
fn compare_by<T: Element>(
    what: &str,
    got: &[T],
    want: &[T],
    bound: impl Fn(usize, f64) -> f64,
) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: length {} != expected {}",
            got.len(),
            want.len()
        ));
    }
    let (mut worst, mut worst_excess) = (None, 0.0f64);
    let (mut diff2, mut ref2) = (0.0f64, 0.0f64);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.to_f64(), w.to_f64());
        if w.is_nan() || g.is_nan() || w.is_infinite() || g.is_infinite() {
            let same = (w.is_nan() && g.is_nan()) || (w.is_infinite() && g == w);
            if !same {
                return Err(format!("{what}: index {i}: got {g}, expected {w}"));
            }
            continue;
        }
        let err = (g - w).abs();
        diff2 += err * err;
        ref2 += w * w;
        let allowed = bound(i, w);
        let excess = err - allowed;
        if excess > worst_excess {
            worst_excess = excess;
            worst = Some((i, g, w, allowed));
        }
    }
    match worst {
        None => Ok(()),
        Some((i, g, w, allowed)) => Err(format!(
            "{what}: index {i}: got {g}, expected {w} (|diff| {:.3e} > allowed {allowed:.3e}); \
             normwise error {:.3e}",
            (g - w).abs(),
            (diff2 / ref2.max(f64::MIN_POSITIVE)).sqrt()
        )),
    }
}

pub fn max_abs<T: Element>(v: &[T]) -> f64 {
    v.iter()
        .map(|x| x.to_f64().abs())
        .filter(|x| x.is_finite())
        .fold(0.0, f64::max)
}

/// Rank columns the tensor-core kernels expand at a time (`RC` in
/// kernels/include/lk_tile_gemm.cuh): the f16 split's scale is per row and chunk.
pub const RANK_CHUNK: usize = 64;

/// The power of two sigma the f16 tensor-core kernels divide one row's rank
/// chunk of `v` (`s t` in the forward, `u` in dx) by before splitting it into
/// hi + lo, given the chunk's largest finite |v|: 1 below 2^15, else the
/// smallest power of two with `max / sigma < 2^15` (lk::scale_split_rows).
/// The kernel's `v` is an f32 that may differ from the f64 one here in the
/// last bits: `max` is taken 2^-10 larger, so a value just below a power of
/// two gets the kernel's sigma or twice it (a looser bound, never a tighter one).
pub fn f16_split_sigma(max: f64) -> f64 {
    let max = max * (1.0 + 2f64.powi(-10));
    if max < 32768.0 {
        return 1.0;
    }
    2f64.powi(max.log2().floor() as i32 - 14)
}

/// The split's error terms for one row of `v` (f64, one per rank): the
/// relative term's factor and, per rank j, the absolute term's factor, to
/// multiply by `|v_j w_j|` and `|w_j|`. bf16: 2^-15 |v w|. f16: 2^-20 |v w|,
/// plus half f16's subnormal spacing times the row chunk's sigma per |w_j|
/// where lo is subnormal ([`f16_split_sigma`]).
pub fn split_terms<T: Element>(v: &[f64]) -> (f64, Vec<f64>) {
    match T::DTYPE {
        DType::BF16 => (2f64.powi(-15), vec![0.0; v.len()]),
        DType::F16 => {
            let sub = v
                .chunks(RANK_CHUNK)
                .flat_map(|chunk| {
                    let max = chunk
                        .iter()
                        .map(|x| x.abs())
                        .filter(|x| x.is_finite())
                        .fold(0.0, f64::max);
                    let sigma = f16_split_sigma(max);
                    std::iter::repeat_n(sigma * 2f64.powi(-25), chunk.len())
                })
                .collect();
            (2f64.powi(-20), sub)
        }
        _ => (0.0, vec![0.0; v.len()]),
    }
}

/// docs/DESIGN.md section 3's bound for each element of a forward's `y`
/// (`[m, n]`), token `i` using `adapters[i]` (None: the base product only):
/// one ulp of T plus 4 eps_f32 times the sum of |terms| behind the element,
/// `sum_k |x w| + |s| sum_j |b_j| sum_k |x a_j| (+ |beta y0|)` (t's own f32
/// sum counted term by term, as cancellation in t makes |t| smaller than its
/// error allows), plus the tensor-core kernels' hi + lo split of `s t`
/// ([`split_terms`]).
#[allow(clippy::too_many_arguments)] // the forward's operands and its result
pub fn forward_bound<T: Element>(
    dims: Dims,
    x: &[T],
    w: &[T],
    adapters: &[Option<Adapter<'_, T>>],
    beta: f32,
    y0: &[T],
    want: &[T],
) -> Vec<f64> {
    let Dims { m, n, k } = dims;
    let mut bound = Vec::with_capacity(m * n);
    for (i, adapter) in adapters.iter().enumerate().take(m) {
        let xi = &x[i * k..(i + 1) * k];
        // Per rank row j: s t_j and sum_k |x a_j|.
        let (st, t_abs): (Vec<f64>, Vec<f64>) = adapter.as_ref().map_or((vec![], vec![]), |ad| {
            (0..ad.rank)
                .map(|j| {
                    let aj = &ad.a[j * k..(j + 1) * k];
                    let prods = xi.iter().zip(aj).map(|(p, q)| p.to_f64() * q.to_f64());
                    (
                        ad.scale as f64 * prods.clone().sum::<f64>(),
                        prods.map(f64::abs).sum::<f64>(),
                    )
                })
                .unzip()
        });
        let (split, subnormal) = split_terms::<T>(&st);
        for c in 0..n {
            let wc = &w[c * k..(c + 1) * k];
            let mut abs_sum: f64 = xi
                .iter()
                .zip(wc)
                .map(|(p, q)| (p.to_f64() * q.to_f64()).abs())
                .sum();
            let mut extra = 0.0;
            if let Some(ad) = adapter {
                let s = ad.scale.abs() as f64;
                for j in 0..ad.rank {
                    let bj = ad.b[c * ad.rank + j].to_f64().abs();
                    abs_sum += s * bj * t_abs[j];
                    extra += split * (st[j] * bj).abs() + subnormal[j] * bj;
                }
            }
            if beta != 0.0 {
                abs_sum += (beta as f64 * y0[i * n + c].to_f64()).abs();
            }
            bound.push(f32_sum_bound::<T>(want[i * n + c].to_f64(), abs_sum) + extra);
        }
    }
    bound
}
