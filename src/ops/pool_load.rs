//! Loading adapters that already lie in device memory into pool slots
//! ([`AdapterPool::load_device`](crate::AdapterPool::load_device),
//! [`AdapterSet::load_device`](crate::peft::AdapterSet::load_device)): a
//! check pass on the device counts non-finite weights, the host reads the
//! counts once and refuses the load if there are any (nothing written), then
//! `a` is copied as it is and `b`'s rows are padded to the pool's `max_rank`.
//! The write pass is also how `AdapterSet::load` puts host adapters (checked
//! on the host, uploaded together unpadded) into each pool.
//! Kernel: kernels/pool_load.cu. Reference: `AdapterPool::load` from host
//! slices, which a device load must match bit for bit (tests/pool_load.rs).
use super::{KernelElement, in_ptr, out_ptr};
use crate::buffer::{BufMut, BufRef, Buffer};
use crate::device::Device;
use crate::element::DType;
use crate::error::{Error, Result};
use crate::launch::{LaunchDims, kernel};
use crate::params::PoolLoadParams;

kernel!(CHECK_F32 = lk_pool_check_f32 in "pool_load": PoolLoadParams;);
kernel!(CHECK_F16 = lk_pool_check_f16 in "pool_load": PoolLoadParams;);
kernel!(CHECK_BF16 = lk_pool_check_bf16 in "pool_load": PoolLoadParams;);
kernel!(WRITE_B_F32 = lk_pool_write_b_f32 in "pool_load": PoolLoadParams;);
kernel!(WRITE_B_F16 = lk_pool_write_b_f16 in "pool_load": PoolLoadParams;);
kernel!(WRITE_B_BF16 = lk_pool_write_b_bf16 in "pool_load": PoolLoadParams;);

const THREADS: usize = 256;
/// Enough blocks to fill a GPU; the loops stride past them.
const MAX_BLOCKS: usize = 4096;

/// u64s of check results per adapter: per operand the count of non-finite
/// values and the NOT of the first one's index.
pub(crate) const STATS_PER_ADAPTER: usize = 4;

fn dims(len: usize) -> LaunchDims {
    LaunchDims {
        grid: [len.div_ceil(THREADS).clamp(1, MAX_BLOCKS) as u32, 1, 1],
        block: [THREADS as u32, 1, 1],
        dynamic_smem_bytes: 0,
    }
}

/// Queues the check of `a` (`[rank, k]`) and `b` (`[n, rank]`) into
/// `stats[at..at + STATS_PER_ADAPTER]`, which must be zero. The caller has
/// checked that `a` and `b` have those sizes and live on `dev`, and that
/// `stats` is a buffer of `dev` long enough.
pub(crate) fn queue_check<T: KernelElement>(
    dev: &Device,
    a: &BufRef<'_, T>,
    b: &BufRef<'_, T>,
    n: usize,
    rank: usize,
    stats: &mut Buffer<u64>,
    at: usize,
) -> Result<()> {
    let (pa, _ga) = in_ptr(dev, a);
    let (pb, _gb) = in_ptr(dev, b);
    let mut stats = sub_buffer(stats, at, STATS_PER_ADAPTER);
    let (ps, _gs) = out_ptr(dev, &mut stats);
    let params = PoolLoadParams {
        a: pa,
        b: pb,
        pool_b: 0,
        stats: ps,
        a_len: a.len() as i64,
        n: n as i32,
        rank: rank as i32,
        max_rank: 0,
        pad: 0,
    };
    let kernel = match T::DTYPE {
        DType::F16 => &CHECK_F16,
        DType::BF16 => &CHECK_BF16,
        _ => &CHECK_F32,
    };
    // SAFETY: a holds a_len = rank * k and b n * rank elements of T on `dev`,
    // stats four u64 (the caller's checks); n and rank fit i32 (a pool's n
    // and a rank <= MAX_RANK). The grid-stride loops read a[0..a_len) and
    // b[0..n * rank) with 64-bit indices and only count into stats with
    // atomics; the pointer guards live past the launch.
    unsafe { kernel.launch(dev, dims(a.len().max(b.len())), &params) }
}

/// The first non-finite weight the checks found: (operand, index), from
/// one adapter's stats as [`queue_check`] leaves them.
pub(crate) fn first_non_finite(stats: &[u64]) -> Option<(&'static str, usize)> {
    [("a", 0), ("b", 2)]
        .into_iter()
        .find(|&(_, at)| stats[at] > 0)
        .map(|(operand, at)| (operand, !stats[at + 1] as usize))
}

/// [`Error::NonFinite`] for the value at `index` of `src`.
pub(crate) fn non_finite_error<T: KernelElement>(
    dev: &Device,
    operand: &'static str,
    src: &BufRef<'_, T>,
    index: usize,
) -> Result<Error> {
    let value = match src {
        BufRef::Host(s) => s[index],
        BufRef::Cuda(v) => {
            let stream = dev
                .cuda_stream()
                .expect("a CUDA view belongs to a CUDA device");
            stream.clone_dtoh(&v.slice(index..index + 1))?[0]
        }
    };
    Ok(Error::NonFinite {
        operand,
        index,
        value: value.to_f32(),
    })
}

/// Copies `a` to `pool_a[a_at..]` and `b` (`[n, rank]`) into the rows of
/// `max_rank` at `pool_b[b_at..]`, zero past `rank`. The caller has checked
/// the sizes, that everything lives on `dev`, and that the values are finite.
#[allow(clippy::too_many_arguments)] // two sources, two destinations, the shape
pub(crate) fn write<T: KernelElement>(
    dev: &Device,
    a: &BufRef<'_, T>,
    b: &BufRef<'_, T>,
    pool_a: &mut Buffer<T>,
    a_at: usize,
    pool_b: &mut Buffer<T>,
    b_at: usize,
    (n, rank, max_rank): (usize, usize, usize),
) -> Result<()> {
    match (a, sub_buffer(pool_a, a_at, a.len())) {
        (BufRef::Host(src), BufMut::Host(dst)) => dst.copy_from_slice(src),
        (BufRef::Cuda(src), BufMut::Cuda(mut dst)) => {
            let stream = dev
                .cuda_stream()
                .expect("CUDA views belong to a CUDA device");
            stream.memcpy_dtod(src, &mut dst)?;
        }
        _ => unreachable!("the caller checked both live on `dev`"),
    }
    let (pb, _gb) = in_ptr(dev, b);
    let mut rows = sub_buffer(pool_b, b_at, n * max_rank);
    let (pr, _gr) = out_ptr(dev, &mut rows);
    let params = PoolLoadParams {
        a: 0,
        b: pb,
        pool_b: pr,
        stats: 0,
        a_len: 0,
        n: n as i32,
        rank: rank as i32,
        max_rank: max_rank as i32,
        pad: 0,
    };
    let kernel = match T::DTYPE {
        DType::F16 => &WRITE_B_F16,
        DType::BF16 => &WRITE_B_BF16,
        _ => &WRITE_B_F32,
    };
    // SAFETY: b holds n * rank elements of T on `dev` and rows n * max_rank
    // (a slot's b region of the pool, also on `dev`), rank <= max_rank <=
    // MAX_RANK and n fits i32 (the caller's checks). The grid-stride loop
    // writes rows[0..n * max_rank) and reads b[row * rank + col] only for
    // col < rank, with 64-bit indices; the pointer guards live past the launch.
    unsafe { kernel.launch(dev, dims(n * max_rank), &params) }
}

/// `buf[at..at + len]` as an output view (callers pass a range inside it).
fn sub_buffer<T>(buf: &mut Buffer<T>, at: usize, len: usize) -> BufMut<'_, T> {
    match buf {
        Buffer::Host(v) => BufMut::Host(&mut v[at..at + len]),
        Buffer::Cuda(s) => BufMut::Cuda(s.slice_mut(at..at + len)),
    }
}
