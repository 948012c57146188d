//! A device pool of adapter slots for multi-adapter serving (docs/DESIGN.md
//! section 2): a fixed number of slots allocated once at a maximum rank, each
//! slot holding one adapter of its own rank (1..=max_rank) and scale, loaded,
//! replaced and evicted without reallocating. Every change is a copy queued on
//! the device's stream, so a batch launched before a change is served the old
//! adapter and one launched after it the new one, never a half-written mix.
//!
//! Layout: `a` is `[slots][max_rank][k]`, `b` is `[slots][n][max_rank]`; slot
//! `s` uses its first `rank[s]` ranks. `rank[s] == 0` marks an empty slot.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use cudarc::driver::{CudaSlice, DeviceRepr};

use crate::buffer::{BufRef, Buffer};
use crate::device::Device;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::ops::multi_adapter_forward::{chunked_shrink_partials, chunked_shrink_units};
use crate::ops::{DeviceAdapter, KernelElement, check_operand, pool_load};
use crate::shape::{Dims, check_finite, check_matrix, check_rank, invalid};

/// The shape of a pool: how many slots, their maximum rank, and the layer
/// (`w` is `[n, k]`) the adapters belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// How many adapters the pool holds at once.
    pub slots: usize,
    /// The largest rank a slot takes (1..=[`crate::MAX_RANK`]); every slot
    /// reserves this much.
    pub max_rank: usize,
    /// Output features of the layer (rows of `w`).
    pub n: usize,
    /// Input features of the layer (columns of `w`).
    pub k: usize,
}

impl PoolConfig {
    /// An error unless `slot` names one of the pool's slots.
    pub fn check_slot(&self, slot: usize) -> Result<()> {
        if slot >= self.slots {
            return Err(invalid(
                "slot",
                slot,
                format!("the pool has {} slots", self.slots),
            ));
        }
        Ok(())
    }
}

/// One slot's adapter copied back to the host ([`AdapterPool::adapter`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SlotAdapter<T> {
    /// `[rank, k]`.
    pub a: Vec<T>,
    /// `[n, rank]`.
    pub b: Vec<T>,
    /// The adapter's rank.
    pub rank: usize,
    /// The adapter's scale.
    pub scale: f32,
}

/// Scratch the multi-adapter kernel uses: the f32 intermediate `t`
/// (`[tokens][max_rank]`, grown on demand), five launch counters (0 between
/// launches: kernels/multi_adapter_forward.cu), the count of out-of-range
/// ids seen on the device, and the sums and counters of shrink units cut
/// into chunks of k (sized for the device:
/// `ops::multi_adapter_forward::shrink_chunks`).
pub(crate) struct Scratch {
    pub t: Buffer<f32>,
    pub counters: Buffer<u32>,
    pub bad_ids: Buffer<u32>,
    pub unit_partials: Buffer<f32>,
    pub unit_counters: Buffer<u32>,
}

/// Adapters of many users for one linear layer, on one device: what
/// [`crate::ops::multi_adapter_forward`] serves from and the multi-adapter
/// backward and optimizer train.
///
/// ```
/// use lora_kernels::{AdapterPool, Device, PoolConfig};
/// use half::bf16;
///
/// let dev = Device::cuda(0).or_else(|_| Device::host())?;
/// let cfg = PoolConfig { slots: 4, max_rank: 16, n: 12, k: 10 };
/// let mut pool = AdapterPool::<bf16>::new(&dev, cfg)?;
/// let (rank, scale) = (8, 2.0);
/// let a = vec![bf16::from_f32(0.01); rank * cfg.k];
/// let b = vec![bf16::from_f32(0.02); cfg.n * rank];
/// pool.load(1, &a, &b, rank, scale)?;
/// assert_eq!(pool.rank(1), Some(8));
/// let back = pool.adapter(1)?.expect("slot 1 holds an adapter");
/// assert_eq!((back.a, back.b, back.rank, back.scale), (a, b, rank, scale));
/// assert_eq!(pool.adapter(0)?, None);
/// assert_eq!(pool.slots_free(), 3);
/// pool.evict(1)?;
/// assert_eq!(pool.rank(1), None);
/// # Ok::<(), lora_kernels::Error>(())
/// ```
pub struct AdapterPool<T> {
    dev: Device,
    cfg: PoolConfig,
    id: u64,
    pub(crate) a: Buffer<T>,
    pub(crate) b: Buffer<T>,
    pub(crate) ranks: Buffer<i32>,
    pub(crate) scales: Buffer<f32>,
    host_ranks: Vec<usize>,
    /// Per slot, how many times `load` or `evict` changed it: the optimizer
    /// trains a slot only while this is what it saw at its own load.
    generations: Vec<u64>,
    scratch: Mutex<Scratch>,
}

/// Pool ids, unique in the process: what binds an optimizer to its pool.
static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(0);

impl<T: KernelElement> AdapterPool<T> {
    /// Allocates every slot (zeros) on `dev`; all slots start empty.
    pub fn new(dev: &Device, cfg: PoolConfig) -> Result<Self> {
        if cfg.slots == 0 || cfg.slots > i32::MAX as usize {
            return Err(invalid("slots", cfg.slots, "must be in 1..=i32::MAX"));
        }
        check_rank("max_rank", cfg.max_rank)?;
        Dims::new(0, cfg.n, cfg.k).validate()?;
        let elements = (cfg.n.checked_add(cfg.k))
            .and_then(|nk| nk.checked_mul(cfg.max_rank))
            .and_then(|per_slot| per_slot.checked_mul(cfg.slots));
        if elements.is_none() {
            return Err(invalid("slots", cfg.slots, "pool size overflows usize"));
        }
        Ok(AdapterPool {
            dev: dev.clone(),
            id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
            a: dev.zeros(cfg.slots * cfg.max_rank * cfg.k)?,
            b: dev.zeros(cfg.slots * cfg.n * cfg.max_rank)?,
            ranks: dev.zeros(cfg.slots)?,
            scales: dev.zeros(cfg.slots)?,
            host_ranks: vec![0; cfg.slots],
            generations: vec![0; cfg.slots],
            scratch: Mutex::new(Scratch {
                t: dev.zeros(0)?,
                counters: dev.zeros(5)?,
                bad_ids: dev.zeros(1)?,
                unit_partials: dev.zeros(chunked_shrink_partials(dev.sm_count()))?,
                unit_counters: dev.zeros(chunked_shrink_units(dev.sm_count()))?,
            }),
            cfg,
        })
    }

    /// The pool's shape.
    pub fn config(&self) -> PoolConfig {
        self.cfg
    }

    /// The device the pool lives on (its ops run there).
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Puts an adapter (`a` `[rank, k]`, `b` `[n, rank]`) into `slot`, replacing
    /// whatever was there, in stream order. Every weight must be finite
    /// ([`Error::NonFinite`]); on any error the pool is unchanged.
    pub fn load(&mut self, slot: usize, a: &[T], b: &[T], rank: usize, scale: f32) -> Result<()> {
        self.check_load(slot, a.len(), b.len(), rank, scale)?;
        check_all_finite("a", a)?;
        check_all_finite("b", b)?;
        let PoolConfig { max_rank, n, k, .. } = self.cfg;
        // b's rows are max_rank long in the pool: pad each row with zeros.
        let mut b_rows = vec![T::default(); n * max_rank];
        for (dst, src) in b_rows.chunks_mut(max_rank).zip(b.chunks(rank)) {
            dst[..rank].copy_from_slice(src);
        }
        let a_at = slot * max_rank * k;
        let b_at = slot * n * max_rank;
        write(&self.dev, &mut self.a, a_at, a)?;
        write(&self.dev, &mut self.b, b_at, &b_rows)?;
        write(&self.dev, &mut self.scales, slot, &[scale])?;
        write(&self.dev, &mut self.ranks, slot, &[rank as i32])?;
        self.host_ranks[slot] = rank;
        self.generations[slot] += 1;
        Ok(())
    }

    /// [`Self::load`] from device memory: `a` (`[rank, k]`) and `b`
    /// (`[n, rank]`) are buffers on the pool's device (a GPU's, or the host
    /// runtime's slices), copied on the device without a trip through the
    /// host. A check pass on the device looks for NaN and Inf first
    /// ([`Error::NonFinite`]; the call waits for it); on any error the pool
    /// is unchanged.
    pub fn load_device<'a>(
        &mut self,
        slot: usize,
        a: impl Into<BufRef<'a, T>>,
        b: impl Into<BufRef<'a, T>>,
        rank: usize,
        scale: f32,
    ) -> Result<()> {
        let ad = DeviceAdapter::new(a, b, rank, scale);
        self.check_device_load(slot, &ad)?;
        let mut stats = self.dev.zeros::<u64>(pool_load::STATS_PER_ADAPTER)?;
        pool_load::queue_check(&self.dev, &ad.a, &ad.b, self.cfg.n, rank, &mut stats, 0)?;
        if let Some((operand, index)) = pool_load::first_non_finite(&self.dev.download(&stats)?) {
            let src = if operand == "a" { &ad.a } else { &ad.b };
            return Err(pool_load::non_finite_error(&self.dev, operand, src, index)?);
        }
        let meta = StagedMeta {
            scales: &self.dev.upload(&[scale])?,
            ranks: &self.dev.upload(&[rank as i32])?,
            at: 0,
        };
        self.write_device(slot, &ad, &meta)
    }

    /// What [`Self::load_device`] checks before its device check: the slot,
    /// rank, scale, sizes, and that `a` and `b` live on the pool's device.
    pub(crate) fn check_device_load(&self, slot: usize, ad: &DeviceAdapter<'_, T>) -> Result<()> {
        self.check_load(slot, ad.a.len(), ad.b.len(), ad.rank, ad.scale)?;
        check_operand(&self.dev, "a", &ad.a, ad.rank, self.cfg.k)?;
        check_operand(&self.dev, "b", &ad.b, self.cfg.n, ad.rank)
    }

    /// Writes an adapter that lies on the pool's device into `slot`: `a`
    /// copied, `b`'s rows padded to `max_rank` (kernels/pool_load.cu), the
    /// scale and rank copied from `meta`. Device work only, so a batched load
    /// uploads once for many pools. The caller has run every check of
    /// [`Self::load_device`] (or of [`Self::load`] on the host values).
    pub(crate) fn write_device(
        &mut self,
        slot: usize,
        ad: &DeviceAdapter<'_, T>,
        meta: &StagedMeta<'_>,
    ) -> Result<()> {
        let PoolConfig { max_rank, n, k, .. } = self.cfg;
        let (a_at, b_at) = (slot * max_rank * k, slot * n * max_rank);
        let shape = (n, ad.rank, max_rank);
        let (a, b) = (&ad.a, &ad.b);
        pool_load::write(&self.dev, a, b, &mut self.a, a_at, &mut self.b, b_at, shape)?;
        copy(&self.dev, meta.scales, meta.at, &mut self.scales, slot, 1)?;
        copy(&self.dev, meta.ranks, meta.at, &mut self.ranks, slot, 1)?;
        self.host_ranks[slot] = ad.rank;
        self.generations[slot] += 1;
        Ok(())
    }

    /// Everything [`Self::load`] checks but the weights' values: the slot,
    /// the rank (1..=max_rank), the scale (finite) and the sizes of `a`, `b`.
    pub(crate) fn check_load(
        &self,
        slot: usize,
        a_len: usize,
        b_len: usize,
        rank: usize,
        scale: f32,
    ) -> Result<()> {
        self.check_slot(slot)?;
        check_rank("rank", rank)?;
        if rank > self.cfg.max_rank {
            return Err(invalid(
                "rank",
                rank,
                format!("the pool's max_rank is {}", self.cfg.max_rank),
            ));
        }
        check_finite("scale", scale)?;
        check_matrix("a", rank, self.cfg.k, a_len)?;
        check_matrix("b", self.cfg.n, rank, b_len)
    }

    /// Empties `slot` (in stream order); tokens that still name it get the
    /// base model only.
    pub fn evict(&mut self, slot: usize) -> Result<()> {
        self.check_slot(slot)?;
        write(&self.dev, &mut self.ranks, slot, &[0])?;
        self.host_ranks[slot] = 0;
        self.generations[slot] += 1;
        Ok(())
    }

    /// The pool's identity, unique in the process.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// How many times `slot` was loaded or evicted (callers pass a valid slot).
    pub(crate) fn generation(&self, slot: usize) -> u64 {
        self.generations[slot]
    }

    /// A copy of the adapter in `slot` on the host, after the work queued
    /// before it; None when the slot is empty.
    pub fn adapter(&self, slot: usize) -> Result<Option<SlotAdapter<T>>> {
        self.check_slot(slot)?;
        let Some(rank) = self.rank(slot) else {
            return Ok(None);
        };
        let PoolConfig { max_rank, n, k, .. } = self.cfg;
        let a = read(&self.dev, &self.a, slot * max_rank * k, rank * k)?;
        let b_rows = read(&self.dev, &self.b, slot * n * max_rank, n * max_rank)?;
        let b = unpad_rows(&b_rows, max_rank, rank);
        let scale = read(&self.dev, &self.scales, slot, 1)?[0];
        Ok(Some(SlotAdapter { a, b, rank, scale }))
    }

    /// The scale of `slot`'s adapter (callers pass a valid slot).
    #[cfg(feature = "peft")]
    pub(crate) fn slot_scale(&self, slot: usize) -> Result<f32> {
        Ok(read(&self.dev, &self.scales, slot, 1)?[0])
    }

    /// The rank of the adapter in `slot`, or None when it is empty.
    pub fn rank(&self, slot: usize) -> Option<usize> {
        self.host_ranks.get(slot).copied().filter(|&r| r > 0)
    }

    /// How many slots are empty.
    pub fn slots_free(&self) -> usize {
        self.host_ranks.iter().filter(|&&r| r == 0).count()
    }

    /// Device bytes the pool holds (all slots at max rank, plus metadata).
    pub fn bytes_allocated(&self) -> usize {
        let PoolConfig {
            slots,
            max_rank,
            n,
            k,
        } = self.cfg;
        slots * (max_rank * (n + k) * std::mem::size_of::<T>() + 8)
    }

    /// Bytes of adapter weights in use: each occupied slot's `rank * (n + k)` elements.
    pub fn bytes_used(&self) -> usize {
        self.host_ranks
            .iter()
            .map(|&r| r * (self.cfg.n + self.cfg.k) * std::mem::size_of::<T>())
            .sum()
    }

    /// Checks ids given from the host: each is -1 or an occupied slot.
    pub fn check_ids(&self, ids: &[i32]) -> Result<()> {
        for (token, &id) in ids.iter().enumerate() {
            if id == -1 {
                continue;
            }
            if id < -1 || id as usize >= self.cfg.slots {
                return Err(Error::SlotOutOfRange {
                    token,
                    id,
                    slots: self.cfg.slots,
                });
            }
            if self.host_ranks[id as usize] == 0 {
                return Err(Error::EmptySlot { token, slot: id });
            }
        }
        Ok(())
    }

    /// How many out-of-range slot ids launches have met on the device since
    /// the pool was made or the count was reset (each was served as -1).
    pub fn bad_id_count(&self) -> Result<u32> {
        let scratch = self.scratch();
        Ok(self.dev.download(&scratch.bad_ids)?[0])
    }

    /// Sets the out-of-range id counter back to 0.
    pub fn reset_bad_id_count(&self) -> Result<()> {
        let mut scratch = self.scratch();
        write(&self.dev, &mut scratch.bad_ids, 0, &[0])
    }

    /// Makes room for batches of up to `tokens` tokens now, so that later
    /// launches (and CUDA-graph capture) allocate nothing.
    pub fn reserve_tokens(&self, tokens: usize) -> Result<()> {
        let mut scratch = self.scratch();
        let need = crate::shape::elements("tokens", tokens, self.cfg.max_rank)?;
        if scratch.t.len() < need {
            scratch.t = self.dev.zeros(need)?;
        }
        Ok(())
    }

    pub(crate) fn scratch(&self) -> MutexGuard<'_, Scratch> {
        self.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_slot(&self, slot: usize) -> Result<()> {
        self.cfg.check_slot(slot)
    }
}

/// Scales and ranks of many adapters uploaded together (a batched load);
/// this adapter's are at `at`.
pub(crate) struct StagedMeta<'a> {
    pub scales: &'a Buffer<f32>,
    pub ranks: &'a Buffer<i32>,
    pub at: usize,
}

/// [`Error::NonFinite`] for the first NaN or +/-Inf in `values`.
pub(crate) fn check_all_finite<T: Element>(operand: &'static str, values: &[T]) -> Result<()> {
    match values.iter().position(|v| !v.to_f32().is_finite()) {
        Some(index) => Err(Error::NonFinite {
            operand,
            index,
            value: values[index].to_f32(),
        }),
        None => Ok(()),
    }
}

/// Checks that every f32 value is finite and stays finite rounded to `T`
/// ([`Error::NonFinite`], [`Error::OutOfRange`] for the first that is not).
pub(crate) fn check_storable<T: Element>(operand: &'static str, values: &[f32]) -> Result<()> {
    check_all_finite(operand, values)?;
    match values
        .iter()
        .position(|&v| !T::from_f32(v).to_f32().is_finite())
    {
        Some(index) => Err(Error::OutOfRange {
            operand,
            index,
            value: values[index],
            dtype: T::DTYPE,
        }),
        None => Ok(()),
    }
}

/// `b` `[n, rank]` from the pool's rows of `max_rank` (the first `rank` of each).
pub(crate) fn unpad_rows<T: Copy>(rows: &[T], max_rank: usize, rank: usize) -> Vec<T> {
    rows.chunks(max_rank)
        .flat_map(|row| &row[..rank])
        .copied()
        .collect()
}

/// `buf[at..at + len]` on the host, after the work queued before (callers
/// pass ranges inside the buffer).
pub(crate) fn read<T: DeviceRepr + Copy + Default>(
    dev: &Device,
    buf: &Buffer<T>,
    at: usize,
    len: usize,
) -> Result<Vec<T>> {
    Ok(match buf {
        Buffer::Host(v) => v[at..at + len].to_vec(),
        Buffer::Cuda(s) => {
            let stream = dev
                .cuda_stream()
                .expect("a CUDA buffer belongs to a CUDA device");
            stream.clone_dtoh(&s.slice(at..at + len))?
        }
    })
}

/// Copies `src` into `buf[at..at + src.len()]`, queued on the device's stream.
pub(crate) fn write<T: DeviceRepr + Copy>(
    dev: &Device,
    buf: &mut Buffer<T>,
    at: usize,
    src: &[T],
) -> Result<()> {
    match buf {
        Buffer::Host(v) => v[at..at + src.len()].copy_from_slice(src),
        Buffer::Cuda(s) => {
            let stream = dev
                .cuda_stream()
                .expect("a CUDA buffer belongs to a CUDA device");
            let s: &mut CudaSlice<T> = s;
            let mut view = s.slice_mut(at..at + src.len());
            stream.memcpy_htod(src, &mut view)?;
        }
    }
    Ok(())
}

/// Copies `src[src_at..src_at + len]` to `dst[dst_at..]` on the device,
/// queued on its stream (callers pass ranges inside both buffers, which
/// belong to `dev`).
pub(crate) fn copy<T: DeviceRepr + Copy>(
    dev: &Device,
    src: &Buffer<T>,
    src_at: usize,
    dst: &mut Buffer<T>,
    dst_at: usize,
    len: usize,
) -> Result<()> {
    match (src, dst) {
        (Buffer::Host(s), Buffer::Host(d)) => {
            d[dst_at..dst_at + len].copy_from_slice(&s[src_at..src_at + len])
        }
        (Buffer::Cuda(s), Buffer::Cuda(d)) => {
            let stream = dev
                .cuda_stream()
                .expect("a CUDA buffer belongs to a CUDA device");
            stream.memcpy_dtod(
                &s.slice(src_at..src_at + len),
                &mut d.slice_mut(dst_at..dst_at + len),
            )?;
        }
        _ => unreachable!("buffers of one device share its backend"),
    }
    Ok(())
}
