//! Criterion benchmarks of the fused forward beside cuBLAS (base only and the
//! unfused three-GEMM LoRA), timed with CUDA events on the device's stream
//! (docs/DESIGN.md section 4). Without a GPU this prints why and measures nothing.
//!
//!     cargo bench --bench fused_forward
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use half::bf16;
use lora_kernels::cublas_baseline::CublasBaseline;
use lora_kernels::ops::fused_forward::fused_forward;
use lora_kernels::{Buffer, Device, DeviceAdapter, Dims};

/// Runs `f` `iters` times between two CUDA events and returns the GPU time.
fn gpu_time(dev: &Device, iters: u64, mut f: impl FnMut()) -> Duration {
    let stream = dev.cuda_stream().unwrap();
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end) = (
        stream.context().new_event(flags).unwrap(),
        stream.context().new_event(flags).unwrap(),
    );
    start.record(stream).unwrap();
    for _ in 0..iters {
        f();
    }
    end.record(stream).unwrap();
    end.synchronize().unwrap();
    Duration::from_secs_f64(start.elapsed_ms(&end).unwrap() as f64 / 1e3)
}

fn random_bf16(dev: &Device, len: usize, seed: u64) -> Buffer<bf16> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data: Vec<bf16> = (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            bf16::from_f32(((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect();
    dev.upload(&data).unwrap()
}

fn main() {
    let dev = match (lora_kernels::kernels_built(), Device::cuda(0)) {
        (true, Ok(dev)) => dev,
        (false, _) => {
            return println!(
                "fused_forward bench: skipped, the crate was built without CUDA kernels"
            );
        }
        (_, Err(e)) => return println!("fused_forward bench: skipped, no GPU ({e})"),
    };
    let blas = CublasBaseline::new(&dev).unwrap();
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let (n, k, r) = (4096usize, 4096usize, 16usize);
    let mut group = c.benchmark_group(format!(
        "fused_forward bf16 k=n=4096 r=16 on {}",
        dev.name()
    ));
    for m in [1usize, 16, 512, 4096] {
        let dims = Dims::new(m, n, k);
        group.throughput(Throughput::Elements(
            (2 * m * n * (k + r) + 2 * m * k * r) as u64,
        ));
        let (x, w) = (random_bf16(&dev, m * k, 1), random_bf16(&dev, n * k, 2));
        let (a, b) = (random_bf16(&dev, r * k, 3), random_bf16(&dev, n * r, 4));
        let (mut y, mut t) = (random_bf16(&dev, m * n, 5), random_bf16(&dev, m * r, 6));
        group.bench_function(BenchmarkId::new("ours", m), |bench| {
            bench.iter_custom(|iters| {
                gpu_time(&dev, iters, || {
                    fused_forward(
                        &dev,
                        dims,
                        &x,
                        &w,
                        &DeviceAdapter::new(&a, &b, r, 0.5),
                        0.0,
                        &mut y,
                    )
                    .unwrap()
                })
            })
        });
        let (
            Buffer::Cuda(xs),
            Buffer::Cuda(ws),
            Buffer::Cuda(as_),
            Buffer::Cuda(bs),
            Buffer::Cuda(ys),
            Buffer::Cuda(ts),
        ) = (&x, &w, &a, &b, &mut y, &mut t)
        else {
            unreachable!("CUDA device buffers")
        };
        group.bench_function(BenchmarkId::new("cublas_base", m), |bench| {
            bench
                .iter_custom(|iters| gpu_time(&dev, iters, || blas.base(dims, xs, ws, ys).unwrap()))
        });
        group.bench_function(BenchmarkId::new("cublas_unfused", m), |bench| {
            bench.iter_custom(|iters| {
                gpu_time(&dev, iters, || {
                    blas.unfused(dims, xs, ws, (as_, bs, r, 0.5), ts, ys)
                        .unwrap()
                })
            })
        });
    }
    group.finish();
    c.final_summary();
}
