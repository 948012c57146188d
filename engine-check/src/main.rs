//! An engine's smallest use of both crates: candle tensors on candle's CUDA
//! device (its CPU when there is no GPU) through lora-kernels' fused forward,
//! beside candle's own unfused computation. CI only builds it; on a GPU
//! machine `cargo run --release` in this folder prints the difference.
use candle_core::{DType, Device, Result, Tensor};
use half::bf16;
use lora_kernels::candle::fused_forward::fused_forward;

fn main() -> Result<()> {
    let dev = Device::cuda_if_available(0)?;
    let (m, n, k, rank, scale) = (5, 19, 40, 4, 0.5);
    let uniform = |rows: usize, cols: usize| -> Result<Tensor> {
        Tensor::rand(-1f32, 1f32, (rows, cols), &dev)?.to_dtype(DType::BF16)
    };
    let (x, w) = (uniform(m, k)?, uniform(n, k)?);
    let (a, b) = (uniform(rank, k)?, uniform(n, rank)?);

    let y = fused_forward::<bf16>(&x, &w, &a, &b, scale)?;
    let unfused = (x.matmul(&w.t()?)? + (x.matmul(&a.t()?)?.matmul(&b.t()?)? * scale as f64)?)?;
    let diff = (y.to_dtype(DType::F32)? - unfused.to_dtype(DType::F32)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    println!("on {:?}: max |fused - candle unfused| = {diff:.3e}", dev.location());
    Ok(())
}
