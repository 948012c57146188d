//! Kernels that check the emulation of Hopper's asynchronous instructions
//! (`kernels/hopper_selftest.cu`) rather than LoRA math: one warpgroup
//! computes `out[64][n] = A[64][k] B[b_rows][k]^T` with wgmma over k = 128
//! (zeros past `k` and past `b_rows`), its operands loaded by TMA or stored
//! by the threads. Each has a correct form and planted bugs ([`variant`]);
//! the unit tests (`hopper_selftest/tests.rs`) require the host runtime to
//! turn every planted bug into a wrong answer or a failed launch, and on a
//! Hopper GPU the correct forms check the emulation against the hardware.
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

/// The staged kernels, one per wgmma form: a module per entry point holds
/// its `Kernel` (`K`), and `STAGED` lists them by N.
macro_rules! staged_kernels {
    ($($n:literal => [$($entry:ident),*]),* $(,)?) => {
        $($(
            mod $entry {
                use super::*;
                kernel!(pub(super) K = $entry in "hopper_selftest": HopperSelftestParams;);
            }
        )*)*
        /// (N, [staged f16, staged bf16, register_a f16, register_a bf16]).
        const STAGED: &[(usize, [&Kernel<HopperSelftestParams>; 4])] = &[$(($n, [$(&$entry::K),*])),*];
    };
}
staged_kernels! {
    8 => [lk_hopper_selftest_staged_f16_n8, lk_hopper_selftest_staged_bf16_n8,
          lk_hopper_selftest_register_a_f16_n8, lk_hopper_selftest_register_a_bf16_n8],
    16 => [lk_hopper_selftest_staged_f16_n16, lk_hopper_selftest_staged_bf16_n16,
           lk_hopper_selftest_register_a_f16_n16, lk_hopper_selftest_register_a_bf16_n16],
    32 => [lk_hopper_selftest_staged_f16_n32, lk_hopper_selftest_staged_bf16_n32,
           lk_hopper_selftest_register_a_f16_n32, lk_hopper_selftest_register_a_bf16_n32],
    64 => [lk_hopper_selftest_staged_f16_n64, lk_hopper_selftest_staged_bf16_n64,
           lk_hopper_selftest_register_a_f16_n64, lk_hopper_selftest_register_a_bf16_n64],
    128 => [lk_hopper_selftest_staged_f16_n128, lk_hopper_selftest_staged_bf16_n128,
            lk_hopper_selftest_register_a_f16_n128, lk_hopper_selftest_register_a_bf16_n128],
    256 => [lk_hopper_selftest_staged_f16_n256, lk_hopper_selftest_staged_bf16_n256,
            lk_hopper_selftest_register_a_f16_n256, lk_hopper_selftest_register_a_bf16_n256],
}

/// Rows of A and of the result.
pub const ROWS: usize = 64;
/// The k the kernels run over (operands are zero past their own `k`).
pub const K: usize = 128;
/// The N of the TMA kernels.
pub const TMA_N: usize = 64;

/// A self-test's shape: `out[64][n] = A[64][k] B[b_rows][k]^T`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// The wgmma's N: 8, 16, 32, 64, 128 or 256 (64 for TMA staging).
    pub n: usize,
    /// 1..=128 (a multiple of 8 for TMA staging: its rows are 16-byte aligned).
    pub k: usize,
    /// B's rows, 1..=n: the result is 0 past them.
    pub b_rows: usize,
}

impl Shape {
    /// The TMA kernels' full shape.
    pub const FULL: Shape = Shape {
        n: TMA_N,
        k: K,
        b_rows: TMA_N,
    };
}

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
    /// MN-major B: the descriptor's leading and stride byte offsets swapped.
    pub const SWAPPED_STRIDES: i32 = 9;
    /// MN-major B read as K-major (no `imm-trans-b`).
    pub const WRONG_MAJOR: i32 = 10;
}

/// How the operands reach the wgmma.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Staging {
    /// Both by TMA, in stages of `swizzle / 2` k (16 without swizzle),
    /// double-buffered on two mbarriers; `swizzle`: 0, 32, 64 or 128 bytes.
    Tma { swizzle: u32 },
    /// As `Tma`, B loaded from a `[k][b_rows]` copy (N contiguous: `b_rows`
    /// a multiple of 8) in boxes of `swizzle / 2` n (8 without swizzle) and
    /// read MN-major (`imm-trans-b`).
    TmaBMnMajor { swizzle: u32 },
    /// Both stored by the threads (no swizzle), then `fence.proxy.async`.
    Stores,
    /// A from registers (mma's A fragment); B stored by the threads.
    RegisterA,
}

/// `out[64][n] = a[64][k] b[b_rows][k]^T` (f32), the operands staged as `staging` says.
pub fn wgmma<T: KernelElement>(
    dev: &Device,
    staging: Staging,
    shape: Shape,
    a: &[T],
    b: &[T],
    variant: i32,
) -> Result<Vec<f32>> {
    let Shape { n, k, b_rows } = shape;
    let (swizzle, tma, b_mn_major) = match staging {
        Staging::Tma { swizzle } => (swizzle, true, false),
        Staging::TmaBMnMajor { swizzle } => (swizzle, true, true),
        Staging::Stores | Staging::RegisterA => (0, false, false),
    };
    if ![0, 32, 64, 128].contains(&swizzle) {
        return Err(invalid(
            "swizzle",
            swizzle,
            "must be 0, 32, 64 or 128 bytes",
        ));
    }
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
    let kernel: &Kernel<HopperSelftestParams> = match staging {
        Staging::Tma { .. } | Staging::TmaBMnMajor { .. } if n != TMA_N => {
            return Err(invalid("n", n, "must be 64 for TMA staging"));
        }
        Staging::Tma { .. } | Staging::TmaBMnMajor { .. } if bf16 => &TMA_WGMMA_BF16,
        Staging::Tma { .. } | Staging::TmaBMnMajor { .. } => &TMA_WGMMA_F16,
        Staging::Stores | Staging::RegisterA => {
            let forms = STAGED
                .iter()
                .find(|(form_n, _)| *form_n == n)
                .ok_or_else(|| {
                    invalid(
                        "n",
                        n,
                        "must be 8, 16, 32, 64, 128 or 256 (the wgmma forms)",
                    )
                })?;
            forms.1[2 * usize::from(staging == Staging::RegisterA) + usize::from(bf16)]
        }
    };
    if !(1..=K).contains(&k) || (tma && !k.is_multiple_of(8)) {
        return Err(invalid(
            "k",
            k,
            "must be in 1..=128 (a multiple of 8 for TMA)",
        ));
    }
    if !(1..=n).contains(&b_rows) || (b_mn_major && !b_rows.is_multiple_of(8)) {
        return Err(invalid(
            "b_rows",
            b_rows,
            format!(
                "must be in 1..={n} (a multiple of 8 for MN-major B: its rows of n are 16-byte aligned)"
            ),
        ));
    }
    check_matrix("a", ROWS, k, a.len())?;
    check_matrix("b", b_rows, k, b.len())?;
    // Shared memory past the 1024 bytes the kernels spend on alignment: two
    // stages of A and B tiles (TMA), or all of A and B over k = 128 (stores).
    let stage_k = if swizzle == 0 {
        16
    } else {
        swizzle as usize / 2
    };
    let operands = if tma {
        2 * 2 * ROWS * stage_k * 2
    } else {
        (ROWS + n) * K * 2
    };
    let a_buf = dev.upload(a)?;
    // MN-major B: the kernel loads it from its transpose, [k][b_rows].
    let b_buf = if b_mn_major {
        let bt: Vec<T> = (0..k * b_rows)
            .map(|e| b[(e % b_rows) * k + e / b_rows])
            .collect();
        dev.upload(&bt)?
    } else {
        dev.upload(b)?
    };
    // Poisoned so that an output the kernel fails to write shows as NaN.
    let mut out = dev.upload(&vec![f32::NAN; ROWS * n])?;
    let launched = {
        let (ra, rb) = (BufRef::from(&a_buf), BufRef::from(&b_buf));
        let mut ro = BufMut::from(&mut out);
        let (pa, _ga) = crate::ops::in_ptr(dev, &ra);
        let (pb, _gb) = crate::ops::in_ptr(dev, &rb);
        let (po, _go) = crate::ops::out_ptr(dev, &mut ro);
        // The box covers the kernel's 64 rows whatever the matrix has: TMA
        // fills the rows and columns past the matrix with zeros.
        // Boxes of S / 2 elements (8 without swizzle) by `box_rows`.
        let map = |ptr: u64, rows: usize, cols: usize, box_rows: usize| -> Result<LkTensorMap> {
            if !tma {
                return Ok(LkTensorMap::default());
            }
            let tile = TileMap2d {
                ptr,
                dtype: T::DTYPE,
                rows,
                cols,
                box_rows: box_rows as u32,
                box_cols: if swizzle == 0 { 8 } else { swizzle / 2 },
                swizzle,
            };
            tensor_map_2d(dev, &tile)
        };
        // MN-major B: a stage's k rows (the kernels' stage_k) a box.
        let b_map = if b_mn_major {
            map(pb, k, b_rows, stage_k)?
        } else {
            map(pb, b_rows, k, ROWS)?
        };
        let params = HopperSelftestParams {
            a_map: map(pa, ROWS, k, ROWS)?,
            b_map,
            a: pa,
            b: pb,
            out: po,
            n: n as i32,
            k: k as i32,
            b_rows: b_rows as i32,
            swizzle: swizzle as i32,
            variant,
            b_mn_major: b_mn_major.into(),
        };
        let dims = LaunchDims {
            grid: [1, 1, 1],
            block: [128, 1, 1],
            dynamic_smem_bytes: (1024 + operands) as u32,
        };
        // SAFETY: a and b were just uploaded with the 64 x k and b_rows x k
        // elements the kernels read (checked above: they read no further),
        // out holds the 64 x n they write, n is the kernel's N; the tensor
        // maps describe exactly those buffers; one block of one warpgroup
        // with the shared memory the kernel lays out (1024 alignment bytes +
        // its tiles) is the configuration they expect.
        unsafe { kernel.launch(dev, dims, &params) }
    };
    launched?;
    dev.download(&out)
}

#[cfg(all(test, feature = "host"))]
mod tests;
