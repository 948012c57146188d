//! The crate's main job in one run. First every operation and path is checked
//! against the CPU reference at small shapes (check.rs): on the host runtime
//! (the kernels' own source on the CPU) always, and on the GPU too when there
//! is one. Then, with a GPU, the kernels are benchmarked beside cuBLAS; without
//! one the tour says that nothing was timed and how to get timings.
//!
//!     cargo run --release --features bench --example tour
//!
//! It exits with an error when a check fails. With `--tune` (GPU only), the
//! checks are followed by the tuning sweep alone (tune.rs: every launch form
//! on the tables' shapes, the best per shape), written as JSON to
//! `$LORA_KERNELS_TUNE_JSON` (default target/tune.json). `--tables a,b` (GPU
//! only) runs only the named timing tables of the tour or of the sweep
//! (report.rs: each table's JSON is written as it ends, with its seconds, so
//! a run cut short says what it did not reach). With `--profile CASE`
//! (GPU only) it launches one case a few times and nothing else, for Nsight
//! Compute (profile.rs; `--profile` alone lists the cases). On a GPU it measures the copy
//! bandwidth and a large cuBLAS bf16 GEMM first (the ceilings), then times the
//! fused forward (fused.rs: beside cuBLAS base-only and unfused LoRA) and the
//! multi-adapter forward (multi.rs: beside cuBLAS base-only and a per-adapter
//! cuBLAS loop), LoRA's own cost (lora_cost.rs: the kernel over itself with
//! every token on no adapter, at decode and prefill), the backward
//! (training.rs: beside cuBLAS's unfused backward)
//! and the optimizer step: each row gives the floor and the ratios (docs/DESIGN.md
//! section 4); then whole steps over Llama-3-8B's projections (model.rs: decode,
//! prefill, learning while serving), all printed and written as JSON to `$LORA_KERNELS_BENCH_JSON`
//! (default target/bench-tour.json). Last, with or without a GPU, the static
//! counts of every kernel's machine code that `scripts/sass-check` wrote
//! (sass.rs).
mod check;
#[path = "../common/mod.rs"]
mod common;
mod fused;
mod lora_cost;
mod model;
mod multi;
mod profile;
mod report;
mod sass;
mod traffic;
mod training;
mod tune;

use cudarc::driver::CudaSlice;
use half::bf16;
use lora_kernels::cublas_baseline::CublasBaseline;
use lora_kernels::timing::time_on_stream;
use lora_kernels::{Buffer, Device, Dims, Element};
use serde_json::json;

use report::{Report, table};

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Untimed runs before, and timed runs of, every measurement.
pub const WARMUP: usize = 5;
pub const RUNS: usize = 30;
/// Rotate w until the copies span this many bytes (several times any L2).
pub const ROTATE_BYTES: usize = 256 << 20;

/// The measured ceilings: copy bandwidth (bytes read + written per second)
/// and a large cuBLAS bf16 GEMM's rate (FLOP/s).
#[derive(Clone, Copy)]
pub struct Ceilings {
    pub copy_bw: f64,
    pub gemm_rate: f64,
}

impl Ceilings {
    /// The floor of docs/DESIGN.md section 4, in microseconds.
    pub fn floor_us(&self, bytes: f64, flops: f64) -> f64 {
        (bytes / self.copy_bw).max(flops / self.gemm_rate) * 1e6
    }
}

fn main() -> Res<()> {
    println!("lora-kernels tour: y = x w^T + s (x a^T) b^T\n");
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--profile") {
        let name = args.get(at + 1).map(String::as_str);
        let gpu = if name.is_some() { open_gpu() } else { None };
        return profile::section(gpu.as_ref(), name);
    }
    let tune = args.iter().any(|a| a == "--tune");
    let only = report::selection(&args)?;
    let gpu = open_gpu();
    let checks_passed = check::section(gpu.as_ref())?;
    let Some(dev) = gpu else {
        if tune || only.is_some() {
            println!(
                "\n--tune and --tables: the tables time launches on a GPU, and there is none here"
            );
        }
        check::no_timings();
        sass::section(3);
        traffic::section(4);
        return finish(checks_passed);
    };
    let blas = CublasBaseline::new(&dev)?;
    if tune {
        println!(
            "\n   tuning sweep, bf16: every launch form, the best per shape beside the default"
        );
        let path =
            std::env::var("LORA_KERNELS_TUNE_JSON").unwrap_or_else(|_| "target/tune.json".into());
        let head = [
            ("gpu", json!(dev.name())),
            ("warmup", json!(WARMUP)),
            ("runs", json!(RUNS)),
        ];
        let report = Report::run(path, &head, tune::tables(&dev, &blas), only.as_deref())?;
        report.exit_if_failed();
        return finish(checks_passed);
    }
    let ceilings = ceilings(&dev, &blas)?;
    println!(
        "\n2. on {}: copy bandwidth {:.2} TB/s (read + write), cuBLAS bf16 8192^3 GEMM {:.0} TFLOP/s",
        dev.name(),
        ceilings.copy_bw / 1e12,
        ceilings.gemm_rate / 1e12
    );
    println!(
        "   every time: median of {RUNS} runs after {WARMUP} warm-ups, CUDA events, w rotated across copies (> L2); \
         floor = max(bytes / copy bandwidth, flops / GEMM rate)"
    );
    let path = std::env::var("LORA_KERNELS_BENCH_JSON")
        .unwrap_or_else(|_| "target/bench-tour.json".into());
    let head = [
        ("gpu", json!(dev.name())),
        ("copy_bandwidth_bytes_per_s", json!(ceilings.copy_bw)),
        ("cublas_bf16_gemm_flops_per_s", json!(ceilings.gemm_rate)),
        ("warmup", json!(WARMUP)),
        ("runs", json!(RUNS)),
    ];
    let (dev, blas) = (&dev, &blas);
    let tables = vec![
        table("fused_forward", move || fused::table(dev, blas, ceilings)),
        table("fused_prefill_col_tiles", move || {
            fused::col_tiles_table(dev, blas)
        }),
        table("fused_decode_launch", move || {
            fused::decode_launch_table(dev, blas)
        }),
        table("multi_adapter_forward", move || {
            multi::table(dev, blas, ceilings)
        }),
        table("wgmma_base_gemm", move || {
            multi::wgmma_base_table(dev, blas)
        }),
        table("decode_lora_cost", move || {
            lora_cost::decode_table(dev, blas)
        }),
        table("prefill_lora_cost", move || {
            lora_cost::prefill_table(dev, blas)
        }),
        table("backward", move || {
            training::backward_table(dev, blas, ceilings)
        }),
        table("optimizer", move || {
            training::optimizer_table(dev, ceilings)
        }),
        // The model steps hold the tour's largest allocations (about 15 GB).
        table("model_steps", move || model::table(dev, blas)),
    ];
    let report = Report::run(path, &head, tables, only.as_deref())?;
    sass::section(3);
    traffic::section(4);
    report.exit_if_failed();
    finish(checks_passed)
}

/// A failed check fails the run (after the rest has been printed).
fn finish(checks_passed: bool) -> Res<()> {
    if !checks_passed {
        eprintln!("\ntour: some checks of section 1 failed (FAIL or NO in the table)");
        std::process::exit(1);
    }
    Ok(())
}

/// Measures the two ceilings of docs/DESIGN.md section 4.
fn ceilings(dev: &Device, blas: &CublasBaseline) -> Res<Ceilings> {
    let stream = dev.cuda_stream().expect("a CUDA device");
    let len = 1usize << 29; // 2^29 bf16 values: 1 GiB
    let src = stream.clone_htod(&data::<bf16>(len, 9))?;
    let mut dst = stream.alloc_zeros::<bf16>(len)?;
    let copy = time_on_stream(dev, 3, 20, || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    let copy_bw = 2.0 * (len * 2) as f64 / (copy.median_us * 1e-6);
    drop((src, dst));
    let s = 8192;
    let dims = Dims::new(s, s, s);
    let (x, w) = (
        stream.clone_htod(&data::<bf16>(s * s, 10))?,
        stream.clone_htod(&data::<bf16>(s * s, 11))?,
    );
    let mut y = stream.alloc_zeros::<bf16>(s * s)?;
    let gemm = time_on_stream(dev, 3, 10, || blas.base(dims, &x, &w, &mut y))?;
    let gemm_rate = 2.0 * (s as f64).powi(3) / (gemm.median_us * 1e-6);
    Ok(Ceilings { copy_bw, gemm_rate })
}

/// The operands one (n, k) shape of a table shares across its rows, made once:
/// `x` and `y` for the largest m, and copies of `w` spanning ROTATE_BYTES so
/// repeated runs read w from memory, not from L2 (the copies are device
/// copies of one random w: different addresses are what matters).
pub struct Inputs<T> {
    pub x: CudaSlice<T>,
    pub ws: Vec<CudaSlice<T>>,
    pub y: CudaSlice<T>,
}

impl<T: lora_kernels::KernelElement> Inputs<T> {
    pub fn new(dev: &Device, n: usize, k: usize, max_m: usize) -> Res<Self> {
        let stream = dev.cuda_stream().expect("a CUDA device");
        let w = stream.clone_htod(&data::<T>(n * k, 2))?;
        let copies = ROTATE_BYTES
            .div_ceil(n * k * std::mem::size_of::<T>())
            .max(1);
        let mut ws = vec![w];
        for _ in 1..copies {
            ws.push(stream.clone_dtod(&ws[0])?);
        }
        Ok(Inputs {
            x: stream.clone_htod(&data::<T>(max_m * k, 1))?,
            ws,
            y: stream.alloc_zeros(max_m * n)?,
        })
    }
}

/// The CUDA slice inside a buffer the benchmarks made on the GPU.
pub fn cuda<T>(b: &Buffer<T>) -> &cudarc::driver::CudaSlice<T> {
    match b {
        Buffer::Cuda(s) => s,
        Buffer::Host(_) => unreachable!("benchmark buffers are on the GPU"),
    }
}

pub fn cuda_mut<T>(b: &mut Buffer<T>) -> &mut cudarc::driver::CudaSlice<T> {
    match b {
        Buffer::Cuda(s) => s,
        Buffer::Host(_) => unreachable!("benchmark buffers are on the GPU"),
    }
}

fn open_gpu() -> Option<Device> {
    if !lora_kernels::kernels_built() {
        println!(
            "GPU: not used: this build has no CUDA kernels (nvcc was not found at build time)"
        );
        return None;
    }
    match Device::cuda(0) {
        Ok(dev) => {
            println!("GPU: {}", dev.name());
            Some(dev)
        }
        Err(e) => {
            println!("GPU: none ({e}); kernels run on the host runtime (CPU) instead");
            None
        }
    }
}

/// Deterministic pseudo-random values in [-1, 1) (never zeros, never timed on zeros).
pub fn data<T: Element>(len: usize, seed: u64) -> Vec<T> {
    common::values(len, seed, 1.0)
}
