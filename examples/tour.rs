//! The crate's main job in one run: what the fused LoRA forward computes, run
//! through the kernels on a GPU when there is one, benchmarked beside cuBLAS,
//! or on the host runtime (the kernels' own source on the CPU) when there is not.
//!
//!     cargo run --release --example tour
//!
//! On a GPU it measures the copy bandwidth and a large cuBLAS bf16 GEMM first
//! (the ceilings), then for each shape: ours, cuBLAS base-only, cuBLAS unfused
//! LoRA, the floor, and the ratios (DESIGN.md section 4), printed and written
//! as JSON to `$LORA_KERNELS_BENCH_JSON` (default target/bench-fused_forward.json).
use half::{bf16, f16};
use lora_kernels::cublas_baseline::CublasBaseline;
use lora_kernels::ops::fused_forward::{fused_forward, regime_for};
use lora_kernels::timing::time_on_stream;
use lora_kernels::{
    Adapter, Buffer, Device, DeviceAdapter, Dims, Element, KernelElement, reference,
};
use serde_json::json;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    println!("lora-kernels tour: y = x w^T + s (x a^T) b^T\n");
    let gpu = open_gpu();
    small_example(gpu.as_ref())?;
    let Some(dev) = gpu else {
        println!("\n2. benchmarks: skipped, no GPU (this machine ran the kernels on the CPU only)");
        return Ok(());
    };
    benchmark(&dev)
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
fn data<T: Element>(len: usize, seed: u64) -> Vec<T> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            T::from_f64((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
        })
        .collect()
}

/// 1. A small example through the CPU reference and the kernels.
fn small_example(gpu: Option<&Device>) -> Res<()> {
    let (dims, rank, scale) = (Dims::new(3, 5, 8), 2, 2.0);
    let (x, w, a, b) = (
        data::<bf16>(24, 1),
        data::<bf16>(40, 2),
        data::<bf16>(16, 3),
        data::<bf16>(10, 4),
    );
    let mut y_ref = vec![bf16::ZERO; 15];
    reference::fused_forward(
        dims,
        &x,
        &w,
        &Adapter {
            a: &a,
            b: &b,
            rank,
            scale,
        },
        0.0,
        &mut y_ref,
    )?;
    let show = |v: &[bf16]| {
        v[..5]
            .iter()
            .map(|e| format!("{:.4}", e.to_f32()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "\n1. m={} n={} k={} r={rank}, s={scale}, bf16; reference y[0, :] = [{}]",
        dims.m,
        dims.n,
        dims.k,
        show(&y_ref)
    );
    let host = Device::host()?;
    for dev in std::iter::once(&host).chain(gpu) {
        let (xd, wd, ad, bd) = (
            dev.upload(&x)?,
            dev.upload(&w)?,
            dev.upload(&a)?,
            dev.upload(&b)?,
        );
        let mut yd = dev.upload(&[bf16::NAN; 15])?;
        fused_forward(
            dev,
            dims,
            &xd,
            &wd,
            &DeviceAdapter::new(&ad, &bd, rank, scale),
            0.0,
            &mut yd,
        )?;
        let y = dev.download(&yd)?;
        let err = y
            .iter()
            .zip(&y_ref)
            .map(|(p, q)| (p.to_f32() - q.to_f32()).abs())
            .fold(0f32, f32::max);
        println!(
            "   {:?} kernel on {}: y[0, :] = [{}], max |kernel - reference| = {err:.2e}",
            regime_for(lora_kernels::DType::BF16, dims.m),
            dev.name(),
            show(&y)
        );
    }
    Ok(())
}

/// Device buffers of one shape; `w` is rotated among copies so repeated runs
/// read it from memory, not from L2.
struct Operands<T> {
    x: Buffer<T>,
    ws: Vec<Buffer<T>>,
    a: Buffer<T>,
    b: Buffer<T>,
    y: Buffer<T>,
    t: Buffer<T>,
}

fn cuda<T>(b: &Buffer<T>) -> &cudarc::driver::CudaSlice<T> {
    match b {
        Buffer::Cuda(s) => s,
        Buffer::Host(_) => unreachable!("benchmark buffers are on the GPU"),
    }
}

fn cuda_mut<T>(b: &mut Buffer<T>) -> &mut cudarc::driver::CudaSlice<T> {
    match b {
        Buffer::Cuda(s) => s,
        Buffer::Host(_) => unreachable!("benchmark buffers are on the GPU"),
    }
}

const WARMUP: usize = 5;
const RUNS: usize = 30;
/// Rotate w until the copies span this many bytes (several times any L2).
const ROTATE_BYTES: usize = 256 << 20;

/// The two ceilings of DESIGN.md section 4: copy bandwidth (bytes read +
/// written per second) and a large cuBLAS bf16 GEMM's rate.
fn ceilings(dev: &Device, blas: &CublasBaseline) -> Res<(f64, f64)> {
    let stream = dev.cuda_stream().unwrap();
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
    let rate = 2.0 * (s as f64).powi(3) / (gemm.median_us * 1e-6);
    Ok((copy_bw, rate))
}

fn benchmark(dev: &Device) -> Res<()> {
    let blas = CublasBaseline::new(dev)?;
    let (copy_bw, gemm_rate) = ceilings(dev, &blas)?;
    println!(
        "\n2. on {}: copy bandwidth {:.2} TB/s (read + write), cuBLAS bf16 8192^3 GEMM {:.0} TFLOP/s",
        dev.name(),
        copy_bw / 1e12,
        gemm_rate / 1e12
    );
    println!(
        "   median of {RUNS} runs after {WARMUP} warm-up, CUDA events; w rotated across copies (> L2); floor = max(bytes / copy bw, flops / GEMM rate)"
    );
    println!(
        "   {:>5} {:>5} {:>5} {:>6} {:>3} {:>8} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>8}",
        "dtype",
        "n",
        "k",
        "m",
        "r",
        "regime",
        "ours us",
        "base us",
        "unfused us",
        "floor us",
        "ours/base",
        "ours/unf",
        "% floor"
    );
    let mut rows = Vec::new();
    for dtype in ["bf16", "f16"] {
        for (n, k) in [(4096usize, 4096usize), (14336, 4096)] {
            for m in [1usize, 4, 16, 64, 512, 4096, 16384] {
                for r in [8usize, 16, 64] {
                    let row = match dtype {
                        "bf16" => measure::<bf16>(
                            dev,
                            &blas,
                            Dims::new(m, n, k),
                            r,
                            (copy_bw, gemm_rate),
                        )?,
                        _ => {
                            measure::<f16>(dev, &blas, Dims::new(m, n, k), r, (copy_bw, gemm_rate))?
                        }
                    };
                    rows.push(row);
                }
            }
        }
    }
    let report = json!({
        "gpu": dev.name(),
        "copy_bandwidth_bytes_per_s": copy_bw,
        "cublas_bf16_gemm_flops_per_s": gemm_rate,
        "warmup": WARMUP,
        "runs": RUNS,
        "rows": rows,
    });
    let path = std::env::var("LORA_KERNELS_BENCH_JSON")
        .unwrap_or_else(|_| "target/bench-fused_forward.json".into());
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("\n   written: {path}");
    Ok(())
}

fn measure<T: KernelElement>(
    dev: &Device,
    blas: &CublasBaseline,
    dims: Dims,
    r: usize,
    (copy_bw, gemm_rate): (f64, f64),
) -> Res<serde_json::Value>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let Dims { m, n, k } = dims;
    let copies = ROTATE_BYTES.div_ceil(n * k * 2).max(1);
    let mut ops = Operands {
        x: dev.upload(&data::<T>(m * k, 1))?,
        ws: (0..copies)
            .map(|i| dev.upload(&data::<T>(n * k, 2 + i as u64)))
            .collect::<Result<_, _>>()?,
        a: dev.upload(&data::<T>(r * k, 3))?,
        b: dev.upload(&data::<T>(n * r, 4))?,
        y: dev.upload(&data::<T>(m * n, 5))?,
        t: dev.upload(&data::<T>(m * r, 6))?,
    };
    let scale = 0.5;
    let mut i = 0;
    let ours = time_on_stream(dev, WARMUP, RUNS, || {
        i += 1;
        let adapter = DeviceAdapter::new(&ops.a, &ops.b, r, scale);
        fused_forward(
            dev,
            dims,
            &ops.x,
            &ops.ws[i % copies],
            &adapter,
            0.0,
            &mut ops.y,
        )
    })?;
    let base = time_on_stream(dev, WARMUP, RUNS, || {
        i += 1;
        blas.base(
            dims,
            cuda(&ops.x),
            cuda(&ops.ws[i % copies]),
            cuda_mut(&mut ops.y),
        )
    })?;
    let unfused = time_on_stream(dev, WARMUP, RUNS, || {
        i += 1;
        let lora = (cuda(&ops.a), cuda(&ops.b), r, scale);
        blas.unfused(
            dims,
            cuda(&ops.x),
            cuda(&ops.ws[i % copies]),
            lora,
            cuda_mut(&mut ops.t),
            cuda_mut(&mut ops.y),
        )
    })?;
    let bytes = 2.0 * (m * k + n * k + r * k + n * r + m * n) as f64;
    let flops = 2.0 * (m * n * k + m * k * r + m * r * n) as f64;
    let floor_us = (bytes / copy_bw).max(flops / gemm_rate) * 1e6;
    let regime = format!("{:?}", regime_for(T::DTYPE, m));
    let dtype = format!("{:?}", T::DTYPE).to_lowercase();
    println!(
        "   {dtype:>5} {n:>5} {k:>5} {m:>6} {r:>3} {regime:>8} {:>10.1} {:>10.1} {:>10.1} {floor_us:>9.1} {:>9.2} {:>9.2} {:>7.0}%",
        ours.median_us,
        base.median_us,
        unfused.median_us,
        ours.median_us / base.median_us,
        ours.median_us / unfused.median_us,
        100.0 * floor_us / ours.median_us
    );
    Ok(json!({
        "dtype": dtype, "m": m, "n": n, "k": k, "r": r, "regime": regime,
        "ours_us": ours.median_us, "cublas_base_us": base.median_us, "cublas_unfused_us": unfused.median_us,
        "floor_us": floor_us, "ours_over_base": ours.median_us / base.median_us,
        "ours_over_unfused": ours.median_us / unfused.median_us, "pct_of_floor": 100.0 * floor_us / ours.median_us,
    }))
}
