//! Kernels that check the emulation of Hopper's asynchronous instructions
//! (`kernels/hopper_selftest.cu`) rather than LoRA math: one warpgroup
//! computes `out[64][64] = A[64][128] B[64][128]^T` with wgmma, its operands
//! loaded by TMA or stored by the threads. Each has a correct form and planted
//! bugs ([`variant`]); the unit tests (`hopper_selftest/tests.rs`) require the
//! host runtime to turn every planted bug into a wrong answer or a failed
//! launch, and on a Hopper GPU the correct forms check the emulation against
//! the hardware.
use crate::buffer::{BufMut, BufRef};
use crate::device::Device;
use crate::element::DType;
use crate::error::Result;
use crate::launch::{Kernel, LaunchDims, kernel};
use crate::ops::KernelElement;
use crate::params::{HopperSelftestParams, LkTensorMap};
use crate::shape::{check_matrix, invalid};
use crate::tensor_map::{TileMap2d, tensor_map_2d};

kernel!(TMA_WGMMA_F16 = lk_hopper_selftest_tma_wgmma_f16 in "hopper_selftest": HopperSelftestParams;);
kernel!(TMA_WGMMA_BF16 = lk_hopper_selftest_tma_wgmma_bf16 in "hopper_selftest": HopperSelftestParams;);
kernel!(STAGED_F16 = lk_hopper_selftest_staged_f16 in "hopper_selftest": HopperSelftestParams;);
kernel!(STAGED_BF16 = lk_hopper_selftest_staged_bf16 in "hopper_selftest": HopperSelftestParams;);
kernel!(REGISTER_A_F16 = lk_hopper_selftest_register_a_f16 in "hopper_selftest": HopperSelftestParams;);
kernel!(REGISTER_A_BF16 = lk_hopper_selftest_register_a_bf16 in "hopper_selftest": HopperSelftestParams;);

/// Rows of A and of the result.
pub const ROWS: usize = 64;
/// Rows of B (columns of the result).
pub const N: usize = 64;
/// The shared dimension.
pub const K: usize = 128;

/// Planted bugs, by the variant number the kernels understand (`HopperVariant`).
pub mod variant {
    pub const CORRECT: i32 = 0;
    /// Descriptors name the next smaller swizzle than TMA wrote (none: 32 bytes).
    pub const WRONG_SWIZZLE: i32 = 1;
    /// The accumulators stored before `wgmma.wait_group` (host runtime only:
    /// on a GPU ptxas inserts the wait itself).
    pub const ACCUMULATORS_BEFORE_WAIT: i32 = 2;
    /// The consumer waits on the other mbarrier phase parity.
    pub const WRONG_PARITY: i32 = 3;
    /// `expect_tx` announces 16 bytes fewer than the loads bring.
    pub const EXPECT_TX_SHORT: i32 = 4;
    /// `expect_tx` announces 16 bytes more than the loads bring.
    pub const EXPECT_TX_LONG: i32 = 5;
    /// Operands stored by the threads with no `fence.proxy.async` before wgmma reads them.
    pub const MISSING_PROXY_FENCE: i32 = 6;
    /// No `wgmma.fence` before the first wgmma (host runtime only).
    pub const MISSING_WGMMA_FENCE: i32 = 7;
    /// A's registers `a[1]` and `a[2]` swapped.
    pub const WRONG_FRAGMENT_INDEX: i32 = 8;
}

/// How the operands reach the wgmma.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Staging {
    /// Both by TMA, in stages of `swizzle / 2` k (16 without swizzle),
    /// double-buffered on two mbarriers; `swizzle`: 0, 32, 64 or 128 bytes.
    Tma { swizzle: u32 },
    /// Both stored by the threads (no swizzle), then `fence.proxy.async`.
    Stores,
    /// A from registers (mma's A fragment); B stored by the threads.
    RegisterA,
}

/// `out[64][64] = a[64][128] b[64][128]^T` (f32), the operands staged as `staging` says.
pub fn wgmma<T: KernelElement>(
    dev: &Device,
    staging: Staging,
    a: &[T],
    b: &[T],
    variant: i32,
) -> Result<Vec<f32>> {
    check_matrix("a", ROWS, K, a.len())?;
    check_matrix("b", N, K, b.len())?;
    let bf16 = match T::DTYPE {
        DType::BF16 => true,
        DType::F16 => false,
        other => {
            return Err(invalid(
                "dtype",
                format!("{other:?}"),
                "must be F16 or BF16",
            ));
        }
    };
    let kernel: &Kernel<HopperSelftestParams> = match (staging, bf16) {
        (Staging::Tma { .. }, false) => &TMA_WGMMA_F16,
        (Staging::Tma { .. }, true) => &TMA_WGMMA_BF16,
        (Staging::Stores, false) => &STAGED_F16,
        (Staging::Stores, true) => &STAGED_BF16,
        (Staging::RegisterA, false) => &REGISTER_A_F16,
        (Staging::RegisterA, true) => &REGISTER_A_BF16,
    };
    // Shared memory past the 1024 bytes the kernels spend on alignment: two
    // stages of A and B tiles (TMA), or all of A and B (stores).
    let swizzle = match staging {
        Staging::Tma { swizzle } => swizzle,
        _ => 0,
    };
    if ![0, 32, 64, 128].contains(&swizzle) {
        return Err(invalid(
            "swizzle",
            swizzle,
            "must be 0, 32, 64 or 128 bytes",
        ));
    }
    let stage_k = if swizzle == 0 {
        16
    } else {
        swizzle as usize / 2
    };
    let operands = match staging {
        Staging::Tma { .. } => 2 * 2 * ROWS * stage_k * 2,
        _ => 2 * ROWS * K * 2,
    };
    let a_buf = dev.upload(a)?;
    let b_buf = dev.upload(b)?;
    // Poisoned so that an output the kernel fails to write shows as NaN.
    let mut out = dev.upload(&vec![f32::NAN; ROWS * N])?;
    let launched = {
        let (ra, rb) = (BufRef::from(&a_buf), BufRef::from(&b_buf));
        let mut ro = BufMut::from(&mut out);
        let (pa, _ga) = crate::ops::in_ptr(dev, &ra);
        let (pb, _gb) = crate::ops::in_ptr(dev, &rb);
        let (po, _go) = crate::ops::out_ptr(dev, &mut ro);
        let map = |ptr: u64, rows: usize| -> Result<LkTensorMap> {
            match staging {
                Staging::Tma { swizzle } => tensor_map_2d(
                    dev,
                    &TileMap2d {
                        ptr,
                        dtype: T::DTYPE,
                        rows,
                        cols: K,
                        box_rows: rows as u32,
                        box_cols: if swizzle == 0 { 8 } else { swizzle / 2 },
                        swizzle,
                    },
                ),
                _ => Ok(LkTensorMap::default()),
            }
        };
        let params = HopperSelftestParams {
            a_map: map(pa, ROWS)?,
            b_map: map(pb, N)?,
            a: pa,
            b: pb,
            out: po,
            n: N as i32,
            k: K as i32,
            swizzle: swizzle as i32,
            variant,
        };
        let dims = LaunchDims {
            grid: [1, 1, 1],
            block: [128, 1, 1],
            dynamic_smem_bytes: (1024 + operands) as u32,
        };
        // SAFETY: a and b were just uploaded with the 64 x 128 and 64 x 128
        // elements the kernels read (checked above), out holds the 64 x 64
        // they write; the tensor maps describe exactly those buffers; one
        // block of one warpgroup with the shared memory the kernel lays out
        // (1024 alignment bytes + its tiles) is the configuration they expect.
        unsafe { kernel.launch(dev, dims, &params) }
    };
    launched?;
    dev.download(&out)
}

#[cfg(all(test, feature = "host"))]
mod tests;
