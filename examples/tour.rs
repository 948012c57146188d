//! The crate's main job in one run: what the fused LoRA forward computes, run
//! through the kernels on a GPU when there is one (timed beside cuBLAS), or on
//! the host runtime (the kernels' own source on the CPU) when there is not.
//!
//!     cargo run --release --example tour
use half::bf16;
use lora_kernels::cublas_baseline::CublasBaseline;
use lora_kernels::ops::fused_forward::fused_forward;
use lora_kernels::timing::time_on_stream;
use lora_kernels::{Adapter, Buffer, Device, DeviceAdapter, Dims, Element, reference};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("lora-kernels tour: y = x w^T + s (x a^T) b^T\n");
    let gpu = if !lora_kernels::kernels_built() {
        println!(
            "GPU: not used: this build has no CUDA kernels (nvcc was not found at build time)"
        );
        None
    } else {
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
    };

    // 1. A small example through the CPU reference and the kernel.
    let dims = Dims::new(3, 5, 8);
    let rank = 2;
    let data = |len: usize, seed: u32| -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32 * 2654435761u32) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    };
    let (x, w, a, b) = (data(24, 1), data(40, 2), data(16, 3), data(10, 4));
    let adapter = Adapter {
        a: &a,
        b: &b,
        rank,
        scale: 2.0,
    };
    let mut y_ref = vec![0f32; 15];
    reference::fused_forward(dims, &x, &w, &adapter, 0.0, &mut y_ref)?;
    println!(
        "\n1. m={} n={} k={} r={rank}, s=2, f32: reference y row 0 = {:?}",
        dims.m,
        dims.n,
        dims.k,
        &y_ref[..5]
    );
    let host = Device::host()?;
    for dev in std::iter::once(&host).chain(gpu.as_ref()) {
        let y = run_kernel(dev, dims, (&x, &w, &a, &b), rank, 2.0)?;
        let err = y
            .iter()
            .zip(&y_ref)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        println!(
            "   kernel on {}: row 0 = {:?}, max |kernel - reference| = {err:.2e}",
            dev.name(),
            &y[..5]
        );
    }

    // 2. Real shapes: timed on the GPU beside cuBLAS, or a note that they were not.
    let Some(dev) = gpu else {
        println!("\n2. timings: skipped, no GPU (this machine ran the kernels on the CPU only)");
        return Ok(());
    };
    println!(
        "\n2. bf16, k = n = 4096, r = 16 on {} (median of 50 runs, CUDA events)",
        dev.name()
    );
    println!(
        "   {:>6} {:>11} {:>13} {:>15} {:>9} {:>9}",
        "m", "ours (us)", "cuBLAS base", "cuBLAS unfused", "ours/base", "ours/unf"
    );
    let blas = CublasBaseline::new(&dev)?;
    for m in [1usize, 16, 512, 4096] {
        let dims = Dims::new(m, 4096, 4096);
        let r = 16;
        let upload = |len: usize, seed: u32| {
            dev.upload(
                &data(len, seed)
                    .iter()
                    .map(|&v| bf16::from_f32(v))
                    .collect::<Vec<_>>(),
            )
        };
        let (x, w, a, b) = (
            upload(m * 4096, 5)?,
            upload(4096 * 4096, 6)?,
            upload(r * 4096, 7)?,
            upload(4096 * r, 8)?,
        );
        let (mut y, mut t) = (dev.zeros::<bf16>(m * 4096)?, dev.zeros::<bf16>(m * r)?);
        let (Buffer::Cuda(xs), Buffer::Cuda(ws), Buffer::Cuda(as_), Buffer::Cuda(bs)) =
            (&x, &w, &a, &b)
        else {
            unreachable!()
        };
        let ours = time_on_stream(&dev, 5, 50, || {
            fused_forward(
                &dev,
                dims,
                &x,
                &w,
                &DeviceAdapter::new(&a, &b, r, 0.5),
                0.0,
                &mut y,
            )
        })?;
        let (Buffer::Cuda(ys), Buffer::Cuda(ts)) = (&mut y, &mut t) else {
            unreachable!()
        };
        let base = time_on_stream(&dev, 5, 50, || blas.base(dims, xs, ws, ys))?;
        let unfused = time_on_stream(&dev, 5, 50, || {
            blas.unfused(dims, xs, ws, (as_, bs, r, 0.5), ts, ys)
        })?;
        println!(
            "   {m:>6} {:>11.1} {:>13.1} {:>15.1} {:>9.2} {:>9.2}",
            ours.median_us,
            base.median_us,
            unfused.median_us,
            ours.median_us / base.median_us,
            ours.median_us / unfused.median_us
        );
    }
    Ok(())
}

fn run_kernel<T: lora_kernels::KernelElement + Element>(
    dev: &Device,
    dims: Dims,
    (x, w, a, b): (&[T], &[T], &[T], &[T]),
    rank: usize,
    scale: f32,
) -> lora_kernels::Result<Vec<T>> {
    let (x, w, a, b) = (
        dev.upload(x)?,
        dev.upload(w)?,
        dev.upload(a)?,
        dev.upload(b)?,
    );
    let mut y = dev.zeros::<T>(dims.m * dims.n)?;
    fused_forward(
        dev,
        dims,
        &x,
        &w,
        &DeviceAdapter::new(&a, &b, rank, scale),
        0.0,
        &mut y,
    )?;
    dev.download(&y)
}
