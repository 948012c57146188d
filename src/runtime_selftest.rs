//! Kernels that check the execution environment rather than LoRA math
//! (kernels/runtime_selftest.cu). Each has a correct form (variant 0) and
//! planted bugs; the unit tests (runtime_selftest/tests.rs) require the host runtime to turn
//! every planted bug into a wrong answer, and on a GPU the correct forms check
//! that the host emulation of the fragment instructions matches the hardware.
use crate::buffer::{BufMut, BufRef};
use crate::device::Device;
use crate::error::Result;
use crate::launch::{Kernel, LaunchDims, kernel};
use crate::ops::KernelElement;
use crate::params::SelftestParams;
use crate::shape::check_matrix;

kernel!(SMEM_NEIGHBORS = lk_selftest_smem_neighbors in "runtime_selftest": SelftestParams;);
kernel!(WARP_SLOTS = lk_selftest_warp_slots in "runtime_selftest": SelftestParams;);
kernel!(MMA_F16 = lk_selftest_mma_f16 in "runtime_selftest": SelftestParams;);
kernel!(MMA_BF16 = lk_selftest_mma_bf16 in "runtime_selftest": SelftestParams;);
kernel!(LDMATRIX_F16 = lk_selftest_ldmatrix_f16 in "runtime_selftest": SelftestParams;);
kernel!(WARP_REDUCE = lk_selftest_warp_reduce in "runtime_selftest": SelftestParams;);
kernel!(CP_ASYNC = lk_selftest_cp_async in "runtime_selftest": SelftestParams;);
kernel!(ROUND_TRIP_F16 = lk_selftest_round_trip_f16 in "runtime_selftest": SelftestParams;);
kernel!(ROUND_TRIP_BF16 = lk_selftest_round_trip_bf16 in "runtime_selftest": SelftestParams;);

/// Planted bugs, by the variant number the kernels understand.
pub mod variant {
    pub const CORRECT: i32 = 0;
    /// No barrier between the shared-memory store and the neighbour's load.
    pub const MISSING_BARRIER_BEFORE_READ: i32 = 1;
    /// No barrier before the shared buffer is overwritten for the next chunk.
    pub const MISSING_BARRIER_BEFORE_REUSE: i32 = 2;
    /// A fragment registers `a[1]` and `a[2]` swapped.
    pub const WRONG_FRAGMENT_INDEX: i32 = 3;
    /// ldmatrix given the rows of the wrong 8x8 matrices.
    pub const WRONG_LDMATRIX_ROWS: i32 = 4;
    /// cp.async data read without waiting for it.
    pub const MISSING_CP_ASYNC_WAIT: i32 = 5;
    /// Half of each warp leaves before a full-warp shuffle (host runtime only:
    /// undefined behaviour on a GPU).
    pub const DIVERGENT_SHUFFLE: i32 = 6;
    /// Warps that share one shared-memory slot between two warp barriers,
    /// with no block barrier (caught by the interleaved schedule).
    pub const SHARED_WARP_SLOT: i32 = 7;
}

/// `out[i] = in[i] + in[(i + 1) % 64]` for two chunks of 64 (`input`: 128 values),
/// through shared memory in one 64-thread block.
pub fn smem_neighbors(dev: &Device, input: &[f32], variant: i32) -> Result<Vec<f32>> {
    check_matrix("input", 2, 64, input.len())?;
    run(dev, &SMEM_NEIGHBORS, 64, input, &[], 128, 128, variant)
}

/// `out[t] = in[t] + in[32 * (t / 32)]` for 128 values: each of 4 warps
/// publishes its first value in shared memory to its own lanes, with warp
/// barriers only.
pub fn warp_slots(dev: &Device, input: &[f32], variant: i32) -> Result<Vec<f32>> {
    check_matrix("input", 4, 32, input.len())?;
    run(dev, &WARP_SLOTS, 128, input, &[], 128, 128, variant)
}

/// `D[16x8] = A[16x16] B` with `bt` = B^T `[8][16]`, one mma.sync, fragments
/// loaded from global memory by the documented layout.
pub fn mma<T: KernelElement>(dev: &Device, a: &[T], bt: &[T], variant: i32) -> Result<Vec<f32>> {
    check_matrix("a", 16, 16, a.len())?;
    check_matrix("bt", 8, 16, bt.len())?;
    let kernel = match T::DTYPE {
        crate::DType::BF16 => &MMA_BF16,
        _ => &MMA_F16,
    };
    run(dev, kernel, 32, a, bt, 128, 0, variant)
}

/// The same product with operands staged in shared memory and read by ldmatrix (f16).
pub fn ldmatrix(dev: &Device, a: &[half::f16], bt: &[half::f16], variant: i32) -> Result<Vec<f32>> {
    check_matrix("a", 16, 16, a.len())?;
    check_matrix("bt", 8, 16, bt.len())?;
    run(dev, &LDMATRIX_F16, 32, a, bt, 128, 0, variant)
}

/// Per warp of `input` (`32 * warps` values): the sum (shuffles), then the
/// count of positive values (ballot): `2 * warps` outputs.
pub fn warp_reduce(dev: &Device, input: &[f32], warps: usize, variant: i32) -> Result<Vec<f32>> {
    check_matrix("input", warps, 32, input.len())?;
    run(
        dev,
        &WARP_REDUCE,
        32 * warps as u32,
        input,
        &[],
        2 * warps,
        0,
        variant,
    )
}

/// Stages `input[..n]` (n <= 128, rest zero-filled) through cp.async and
/// returns it rotated left by 4; the 16-byte chunks 7, 15, 23 and 31 are
/// copies not issued (`cp_async_16_if`) and read -1.
pub fn cp_async(dev: &Device, input: &[f32], variant: i32) -> Result<Vec<f32>> {
    if input.len() > 128 {
        return Err(crate::shape::invalid(
            "input",
            input.len(),
            "at most 128 values",
        ));
    }
    let mut padded = input.to_vec();
    padded.resize(128, f32::NAN); // never read: zero-fill covers it
    run(
        dev,
        &CP_ASYNC,
        32,
        &padded,
        &[],
        128,
        input.len() as i32,
        variant,
    )
}

/// Rounds each value to `dtype` (f16 or bf16) and back, with the kernels'
/// own conversion functions.
pub fn round_trip(dev: &Device, dtype: crate::DType, input: &[f32]) -> Result<Vec<f32>> {
    let kernel = match dtype {
        crate::DType::F16 => &ROUND_TRIP_F16,
        crate::DType::BF16 => &ROUND_TRIP_BF16,
        other => {
            return Err(crate::shape::invalid(
                "dtype",
                format!("{other:?}"),
                "must be F16 or BF16",
            ));
        }
    };
    if input.is_empty() || input.len() > i32::MAX as usize {
        return Err(crate::shape::invalid(
            "input",
            input.len(),
            "must hold 1..=i32::MAX values",
        ));
    }
    run(
        dev,
        kernel,
        256,
        input,
        &[],
        input.len(),
        input.len() as i32,
        variant::CORRECT,
    )
}

#[allow(clippy::too_many_arguments)] // one private helper for six fixed-shape test kernels
fn run<T: KernelElement>(
    dev: &Device,
    kernel: &Kernel<SelftestParams>,
    threads: u32,
    input: &[T],
    input2: &[T],
    out_len: usize,
    n: i32,
    variant: i32,
) -> Result<Vec<f32>> {
    let input = dev.upload(input)?;
    // An empty second input still gets a valid (1-element) allocation.
    let placeholder = [T::default()];
    let input2 = dev.upload(if input2.is_empty() {
        &placeholder[..]
    } else {
        input2
    })?;
    // Poisoned so that an output the kernel fails to write shows as NaN.
    let mut out = dev.upload(&vec![f32::NAN; out_len])?;
    let launched = {
        let i1 = BufRef::from(&input);
        let i2 = BufRef::from(&input2);
        let mut o = BufMut::from(&mut out);
        let (p1, _g1) = crate::ops::in_ptr(dev, &i1);
        let (p2, _g2) = crate::ops::in_ptr(dev, &i2);
        let (po, _go) = crate::ops::out_ptr(dev, &mut o);
        let params = SelftestParams {
            input: p1,
            input2: p2,
            out: po,
            n,
            variant,
        };
        let dims = LaunchDims {
            grid: [1, 1, 1],
            block: [threads, 1, 1],
            dynamic_smem_bytes: 0,
        };
        // SAFETY: buffers were just allocated on `dev` with the sizes each
        // self-test kernel indexes (checked by the public wrappers above);
        // one block of `threads` threads is the configuration they expect.
        unsafe { kernel.launch(dev, dims, &params) }
    };
    launched?;
    dev.download(&out)
}

#[cfg(all(test, feature = "host"))]
mod tests;
