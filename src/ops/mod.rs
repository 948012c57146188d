//! The public operations on device (or host-runtime) buffers. Each op
//! validates every operand (shape, backend) before its one `unsafe` launch.
pub mod adamw;
pub mod fused_forward;
mod fused_forward_wgmma;
pub mod lora_backward;
mod lora_backward_wgmma;
pub mod merge;
pub mod multi_adapter_forward;
mod multi_adapter_forward_wgmma;
pub(crate) mod pool_load;
mod split_k;
mod tiles;
pub mod traffic;
mod wgmma_dispatch;

use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr, SyncOnDrop, ValidAsZeroBits};

use crate::buffer::{BufMut, BufRef, check_home};
use crate::device::{Device, SplitScratch};
use crate::element::{DType, Element};
use crate::error::Result;
use crate::shape::{check_finite, check_matrix, check_rank, invalid};

/// CUDA's limits on a launch grid: x up to 2^31 - 1 blocks, y and z up to 65535.
const MAX_GRID: [usize; 3] = [i32::MAX as usize, 65535, 65535];

/// A launch grid of `blocks` (x, y, z), or an error naming the size that
/// drives it (`name` = `value`, e.g. the token count) when it passes CUDA's
/// limits: checked before anything is launched, so a call that fails
/// changes nothing.
pub(crate) fn grid(name: &'static str, value: usize, blocks: [usize; 3]) -> Result<[u32; 3]> {
    if blocks.iter().zip(MAX_GRID).any(|(&b, max)| b > max) {
        let [x, y, z] = blocks;
        return Err(invalid(
            name,
            value,
            format!(
                "the launch needs a grid of {x} x {y} x {z} blocks, past CUDA's limits \
                 ({} x {} x {}): split the work into smaller calls",
                MAX_GRID[0], MAX_GRID[1], MAX_GRID[2]
            ),
        ));
    }
    Ok(blocks.map(|b| b as u32))
}

/// Storage types the kernels are compiled for: f32, f16, bf16.
pub trait KernelElement: Element + DeviceRepr + ValidAsZeroBits {}
impl KernelElement for f32 {}
impl KernelElement for half::f16 {}
impl KernelElement for half::bf16 {}

/// One adapter on the device: `a` `[rank, k]`, `b` `[n, rank]`, `scale`.
pub struct DeviceAdapter<'a, T> {
    /// The down projection, `[rank, k]`.
    pub a: BufRef<'a, T>,
    /// The up projection, `[n, rank]`.
    pub b: BufRef<'a, T>,
    /// The rank, 1..=[`crate::MAX_RANK`].
    pub rank: usize,
    /// The scale `s` (PEFT: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA).
    pub scale: f32,
}

impl<'a, T> DeviceAdapter<'a, T> {
    /// An adapter from its two matrices (buffers, cudarc slices or views).
    pub fn new(
        a: impl Into<BufRef<'a, T>>,
        b: impl Into<BufRef<'a, T>>,
        rank: usize,
        scale: f32,
    ) -> Self {
        DeviceAdapter {
            a: a.into(),
            b: b.into(),
            rank,
            scale,
        }
    }

    pub(crate) fn validate(&self, dev: &Device, n: usize, k: usize) -> Result<()> {
        check_rank("rank", self.rank)?;
        check_finite("scale", self.scale)?;
        check_operand(dev, "a", &self.a, self.rank, k)?;
        check_operand(dev, "b", &self.b, n, self.rank)
    }
}

/// Checks that `buf` lives where `dev` runs (its backend, and on CUDA its
/// context) and holds `rows x cols` elements.
pub(crate) fn check_operand<T>(
    dev: &Device,
    name: &'static str,
    buf: &BufRef<'_, T>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    check_home(name, dev.home(), buf.home())?;
    check_matrix(name, rows, cols, buf.len())
}

pub(crate) fn check_output<T>(
    dev: &Device,
    name: &'static str,
    buf: &BufMut<'_, T>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    check_home(name, dev.home(), buf.home())?;
    check_matrix(name, rows, cols, buf.len())
}

/// Whether a wgmma kernel (sm_90a: `kernel`, for the message) can run here:
/// f16 or bf16, on a GPU of compute capability 9.0 or on the host runtime
/// (which emulates Hopper's instructions); an error naming why not.
pub(crate) fn check_wgmma(dev: &Device, dtype: DType, kernel: &str) -> Result<()> {
    if !matches!(dtype, DType::F16 | DType::BF16) {
        return Err(invalid(
            "dtype",
            format!("{dtype:?}"),
            format!("{kernel} takes f16 or bf16"),
        ));
    }
    match dev.compute_capability() {
        Some(cc) if cc != (9, 0) => Err(invalid(
            "device",
            format!("compute capability {}.{}", cc.0, cc.1),
            format!("{kernel} runs on compute capability 9.0 (sm_90a) and on the host runtime"),
        )),
        _ => Ok(()),
    }
}

/// The address a kernel receives for an operand, plus the guard that records
/// cudarc's stream-ordering event when dropped (keep it until after the launch).
pub(crate) fn in_ptr<'s, T>(
    dev: &'s Device,
    buf: &'s BufRef<'_, T>,
) -> (u64, Option<SyncOnDrop<'s>>) {
    match (dev, buf) {
        (Device::Cuda(d), BufRef::Cuda(v)) => {
            let (p, guard) = v.device_ptr(d.stream());
            (p, Some(guard))
        }
        (_, BufRef::Host(s)) => (s.as_ptr() as u64, None),
        // Operands are checked with check_operand before any pointer is taken.
        (Device::Host(_), BufRef::Cuda(_)) => unreachable!("backend checked by validation"),
    }
}

pub(crate) fn out_ptr<'s, T>(
    dev: &'s Device,
    buf: &'s mut BufMut<'_, T>,
) -> (u64, Option<SyncOnDrop<'s>>) {
    match (dev, buf) {
        (Device::Cuda(d), BufMut::Cuda(v)) => {
            let (p, guard) = v.device_ptr_mut(d.stream());
            (p, Some(guard))
        }
        (_, BufMut::Host(s)) => (s.as_mut_ptr() as u64, None),
        (Device::Host(_), BufMut::Cuda(_)) => unreachable!("backend checked by validation"),
    }
}

/// The address of a split-K workspace ([`Device::split_k_scratch`]) for a
/// launch on `dev`, with the guard [`in_ptr`] gives.
pub(crate) fn scratch_ptr<'s>(
    dev: &'s Device,
    scratch: &'s mut SplitScratch,
) -> (u64, Option<SyncOnDrop<'s>>) {
    match (dev, scratch) {
        (Device::Cuda(d), SplitScratch::Cuda(s)) => {
            let (p, guard) = s.device_ptr(d.stream());
            (p, Some(guard))
        }
        (_, SplitScratch::Host(v)) => (v.as_mut_ptr() as u64, None),
        (Device::Host(_), SplitScratch::Cuda(_)) => {
            unreachable!("the host runtime's scratch is host memory")
        }
    }
}
