//! Where a default launch takes a Hopper kernel (wgmma + TMA, sm_90a) over
//! its mma.sync one. A launch form that names the kernel (`wgmma:
//! Some(_)`) overrides the choice.
//!
//! The rules come from the first GPU measurements,
//! `reports/gpu/2026-12-01-nvidia-h200` (an H200, bf16, ranks 16 and 64;
//! `reports/gpu/NOTES.md` reads them):
//! - The fused prefill at m = 4096, n = 4096 and 14336 (1024 and 3584 tiles
//!   of 128 x 128): the wgmma kernel with 4 column tiles a work unit took
//!   0.34x-0.40x the time of the mma.sync default (289 against 781 us at
//!   4096², r 16), and 0.80x-0.98x the time of its own 1-tile units.
//! - The multi-adapter prefill at 256 tokens: at n = 4096 (64 tiles, half a
//!   wave on 132 SMs) the wgmma kernel took 0.73x-1.03x the mma.sync
//!   kernel's time, at n = 14336 (224 tiles) 0.98x-1.13x. Where the tiles are
//!   a wave or two, whole waves decide (the mma.sync kernel fits two blocks
//!   an SM, the wgmma kernel one), and the mma.sync kernel has split-K
//!   since. So the prefill takes wgmma only where its tiles fill every SM
//!   [`MIN_WAVES`] times: the tail wave is then at most a fifth of the work.
//! - The backward at k = 4096 (n = 4096 and 14336): with the wgmma dx it
//!   took 0.47x-0.65x the time it took with the mma.sync dx at m = 512 and
//!   0.62x-0.82x at m = 4096, but 1.41x-1.58x at m = 16 (a 128-row tile for
//!   16 rows). The wgmma dx is taken from [`DX_MIN_M`] rows; between 16 and
//!   512 nothing was measured.
//!
//! The tuning sweep (`tour --tune`) times both kernels on every shape of
//! the tour's tables; its report is what moves these limits.
use super::check_wgmma;
use crate::device::Device;
use crate::element::DType;
use crate::launch::{Kernel, image};

/// Waves of 128 x 128 output tiles (one per SM each) from which a default
/// prefill takes the wgmma kernel.
pub(crate) const MIN_WAVES: usize = 4;

/// Column tiles a work unit of the fused wgmma prefill takes by default:
/// `t` is computed once per unit, and with [`MIN_WAVES`] waves of tiles
/// every SM still gets a unit.
pub(crate) const FUSED_COL_TILES: usize = 4;

/// Tokens from which the backward's dx takes the wgmma kernel by default.
pub(crate) const DX_MIN_M: usize = 512;

/// Whether `kernel` (a wgmma kernel) can run on `dev` for `dtype`: f16 or
/// bf16, on the host runtime or a GPU of compute capability 9.0 for which
/// the crate holds the kernel's sm_90a cubin (a build for other
/// architectures has none, and then its launch would fail).
pub(crate) fn runs<P>(dev: &Device, dtype: DType, kernel: &Kernel<P>) -> bool {
    if check_wgmma(dev, dtype, kernel.name).is_err() {
        return false;
    }
    match dev {
        Device::Cuda(_) => image(kernel.file).is_some_and(|i| i.cubins.iter().any(|c| c.0 == 90)),
        Device::Host(_) => kernel.host.is_some(),
    }
}

/// Whether a default prefill of `m x n` outputs takes the wgmma kernel on
/// `sm_count` SMs: its 128 x 128 tiles fill them [`MIN_WAVES`] times.
pub(crate) fn prefill_fills(m: usize, n: usize, sm_count: usize) -> bool {
    let tiles = m.div_ceil(128).saturating_mul(n.div_ceil(128));
    tiles >= MIN_WAVES * sm_count
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shapes the report measured land where it says: m = 4096 at
    /// n = 4096 and 14336 on wgmma, 256 tokens at either n on mma.sync;
    /// the limit is at 4 waves exactly, and follows the SM count.
    #[test]
    fn prefill_takes_wgmma_from_four_waves_of_tiles() {
        assert!(prefill_fills(4096, 4096, 132));
        assert!(prefill_fills(4096, 14336, 132));
        assert!(!prefill_fills(256, 4096, 132));
        assert!(!prefill_fills(256, 14336, 132));
        // 4 x 132 = 528 tiles: 33 row tiles by 16 column tiles.
        assert!(prefill_fills(33 * 128, 16 * 128, 132));
        assert!(!prefill_fills(33 * 128 - 128, 16 * 128, 132));
        assert!(prefill_fills(33 * 128 - 127, 16 * 128, 132));
        assert!(!prefill_fills(33 * 128, 16 * 128, 133));
        assert!(prefill_fills(1, 8 * 128, 2));
        assert!(!prefill_fills(usize::MAX, 0, 1));
        assert!(prefill_fills(usize::MAX, usize::MAX, 132));
    }

    /// The host runtime runs the wgmma kernels in f16 and bf16 only.
    #[cfg(feature = "host")]
    #[test]
    fn the_host_runtime_runs_wgmma_for_f16_and_bf16() {
        let kernel = super::super::fused_forward_wgmma::kernel(DType::BF16);
        let host = Device::host().unwrap();
        assert!(runs(&host, DType::BF16, kernel));
        assert!(runs(&host, DType::F16, kernel));
        assert!(!runs(&host, DType::F32, kernel));
    }
}
