//! Split-K at decode, and at the multi-adapter kernel's mma.sync prefill. A
//! decode launch has about one tile block per 32 columns of `y`, a prefill
//! one per 128 x 128 tile: where a small `n` (a GQA model's k and v
//! projections) or a batch of a few hundred tokens leaves SMs idle, each
//! tile's k-loop is split across several blocks, each
//! over its own range of k-tiles, and the tile's last block to finish adds
//! their partial sums up in split order (`lk::gather_k_splits` in
//! kernels/include/lk_tile_gemm.cuh): the same bits whichever block is last.
//! The fused forward and the multi-adapter forward split this way. Partial
//! sums and counters live in a workspace per stream
//! (`Device::split_k_scratch`, docs/DESIGN.md section 13), which also holds
//! the shrink's state of the fused forward's one-adapter decode
//! (`multi_adapter_forward::one_adapter_forward`).
use cudarc::driver::SyncOnDrop;

use super::multi_adapter_forward::{chunked_shrink_partials, chunked_shrink_units};
use super::scratch_ptr;
use super::tiles::{DECODE, DECODE_WIDE, MmaTiles, PREFILL, RANK_CHUNK};
use crate::device::{Device, SplitScratch};
use crate::error::Result;
use crate::shape::invalid;

/// The f32 values one block of a
/// tile leaves for the tile's last block, its base sums and its `t` sums:
/// `bm x (bn + 64)`.
pub(crate) fn split_k_values(tiles: &MmaTiles) -> usize {
    tiles.bm * (tiles.bn + RANK_CHUNK)
}

/// Most blocks a decode tile's k-loop is split across.
pub(crate) const MAX_K_SPLITS: usize = 8;
/// Fewest k-tiles a split takes: its pipeline fills before it drains.
pub(crate) const MIN_KTILES_PER_SPLIT: usize = 4;

/// Blocks per tile for a decode launch of `tiles` tiles over `ktiles`
/// k-tiles on `sm_count` SMs: enough to give every SM a block when the tiles
/// are fewer than the SMs (a small `n`), within [`MAX_K_SPLITS`] and
/// [`MIN_KTILES_PER_SPLIT`]; 1 (no split) when the tiles already fill the GPU.
/// The blocks (`tiles x splits`) then never pass `sm_count`.
pub(crate) fn decode_k_splits(tiles: usize, ktiles: usize, sm_count: usize) -> usize {
    (sm_count / tiles.max(1))
        .min(MAX_K_SPLITS)
        .min(ktiles / MIN_KTILES_PER_SPLIT)
        .max(1)
}

/// The decode workspace of a device with `sm_count` SMs, in 4-byte values:
/// the partial sums of up to `sm_count` blocks of the largest decode tile,
/// then a counter per tile (fewer than `sm_count`) at [`split_k_counters_at`],
/// then the one-adapter forward's shrink state ([`SharedShrink`]) with room
/// for a decode's `t`.
pub(crate) fn split_k_scratch_len(sm_count: usize) -> usize {
    SharedShrink::scratch_len(sm_count, 0)
}

/// Where the fused forward's one-adapter launches (on the multi-adapter
/// kernel) keep their shrink's state in the decode workspace: the kernel's 5
/// counters, the sums and counters of shrink units cut into chunks of `k`
/// (as many as a pool keeps for them), then `t`: for up to 64 tokens of 64
/// ranks, or more for a prefill (the workspace grows). The counters are 0
/// between launches, like the split-K ones.
pub(crate) struct SharedShrink {
    /// Addresses of the counters, the chunk sums, the unit counters and `t`.
    pub counters: u64,
    pub unit_partials: u64,
    pub unit_counters: u64,
    pub t: u64,
}

impl SharedShrink {
    /// Room for the kernel's 5 counters (a 32-byte run of values).
    const COUNTERS: usize = 8;
    /// `t`'s values at least: the tokens of one decode row tile, one chunk of ranks.
    pub(crate) const T_VALUES: usize = DECODE_WIDE.bm * RANK_CHUNK;

    /// Where it starts in the workspace (4-byte values): after the split-K counters.
    fn at(sm_count: usize) -> usize {
        split_k_counters_at(sm_count) + sm_count
    }

    /// Values before `t`.
    fn fixed_len(sm_count: usize) -> usize {
        Self::COUNTERS + chunked_shrink_partials(sm_count) + chunked_shrink_units(sm_count)
    }

    /// The workspace's values for a launch whose `t` takes `t_values` (at
    /// least [`Self::T_VALUES`] are kept).
    pub(crate) fn scratch_len(sm_count: usize, t_values: usize) -> usize {
        Self::at(sm_count) + Self::fixed_len(sm_count) + t_values.max(Self::T_VALUES)
    }

    /// The addresses in a workspace at `base` on a device of `sm_count` SMs.
    pub(crate) fn in_workspace(base: u64, sm_count: usize) -> Self {
        let value = |i: usize| base + 4 * i as u64;
        let counters = Self::at(sm_count);
        let unit_partials = counters + Self::COUNTERS;
        let unit_counters = unit_partials + chunked_shrink_partials(sm_count);
        let t = unit_counters + chunked_shrink_units(sm_count);
        SharedShrink {
            counters: value(counters),
            unit_partials: value(unit_partials),
            unit_counters: value(unit_counters),
            t: value(t),
        }
    }
}

/// Where the counters start in the split-K workspace (f32 values): after
/// the partial sums of one block per SM of the largest tile that splits
/// (the multi-adapter kernel's mma.sync prefill tile, 128 x 128: 13 MB on
/// 132 SMs; the 16- and 64-row decode tiles take less, and two direct-load
/// blocks per SM a quarter of it).
pub(crate) fn split_k_counters_at(sm_count: usize) -> usize {
    let largest = [&DECODE, &DECODE_WIDE, &PREFILL].map(split_k_values);
    sm_count * largest.into_iter().max().unwrap_or(0)
}

/// Blocks per tile for a launch of `tiles` tiles over `ktiles` k-tiles on
/// `sm_count` SMs: `forced` (checked: 1, the unsplit launch, always; more
/// at most one split per k-tile and one block per SM), else [`decode_k_splits`] where the launch is
/// `splittable`, else 1. `rule` says which launches split, for the error
/// (formatted only then: launches pay no allocation for it).
pub(crate) fn k_splits(
    splittable: bool,
    rule: std::fmt::Arguments<'_>,
    forced: Option<usize>,
    tiles: usize,
    ktiles: usize,
    sm_count: usize,
) -> Result<usize> {
    let Some(splits) = forced else {
        return Ok(if splittable {
            decode_k_splits(tiles, ktiles, sm_count)
        } else {
            1
        });
    };
    // A launch of more tiles than SMs (or of one k-tile) can't split, but
    // runs unsplit when asked to.
    let most = if splittable {
        ktiles.min(sm_count / tiles.max(1)).max(1)
    } else {
        1
    };
    if splits == 0 || splits > most {
        return Err(invalid(
            "k_splits",
            splits,
            format!(
                "1 ..= {most}: split-K takes {rule}, at most one split per k-tile ({ktiles}) \
                 and {sm_count} blocks ({tiles} tiles)"
            ),
        ));
    }
    Ok(splits)
}

/// The workspace for a launch that wants `splits` blocks per tile, and the
/// splits it can take: none needed for 1; without one (a stream being
/// captured before its first split-K launch: an allocation can't be
/// captured) the launch runs unsplit.
pub(crate) fn workspace(dev: &Device, splits: usize) -> Result<(usize, Option<SplitScratch>)> {
    if splits == 1 {
        return Ok((1, None));
    }
    let scratch = dev.split_k_scratch(split_k_scratch_len(dev.sm_count()))?;
    Ok((if scratch.is_some() { splits } else { 1 }, scratch))
}

/// The addresses of a workspace's partial sums and of its counters (0 and 0
/// without one), and the guard that keeps them valid until the launch is queued.
pub(crate) fn workspace_ptrs<'s>(
    dev: &'s Device,
    scratch: &'s mut Option<SplitScratch>,
) -> (u64, u64, Option<SyncOnDrop<'s>>) {
    match scratch {
        None => (0, 0, None),
        Some(s) => {
            let (p, guard) = scratch_ptr(dev, s);
            (p, p + 4 * split_k_counters_at(dev.sm_count()) as u64, guard)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Enough splits to give each SM a block, at most 8 and at least 4
    /// k-tiles each; forced counts up to one split per k-tile and one block
    /// per SM.
    #[test]
    fn splits_give_idle_sms_a_block() {
        assert_eq!(decode_k_splits(32, 64, 132), 4);
        assert_eq!(decode_k_splits(16, 64, 132), 8); // 8 at most
        assert_eq!(decode_k_splits(16, 16, 132), 4); // 4 k-tiles each
        assert_eq!(decode_k_splits(128, 64, 132), 1);
        assert_eq!(decode_k_splits(0, 64, 132), 8); // no tiles: never divides by 0
        let forced =
            |splits, tiles| k_splits(true, format_args!("decode"), Some(splits), tiles, 64, 132);
        assert_eq!(forced(64, 2).unwrap(), 64);
        assert!(forced(65, 2).is_err()); // past one split per k-tile
        assert!(forced(5, 32).is_err()); // 160 blocks
        assert!(forced(0, 32).is_err());
        // More tiles than SMs: unsplit only, and never an error for it.
        assert_eq!(forced(1, 528).unwrap(), 1);
        assert!(forced(2, 528).is_err());
        let one_ktile = k_splits(true, format_args!("decode"), Some(1), 8, 1, 132);
        assert_eq!(one_ktile.unwrap(), 1);
        let err =
            k_splits(false, format_args!("decode launches"), Some(2), 32, 64, 132).unwrap_err();
        assert!(
            err.to_string()
                .contains("1 ..= 1: split-K takes decode launches"),
            "{err}"
        );
        assert_eq!(
            k_splits(false, format_args!(""), None, 1, 64, 132).unwrap(),
            1
        );
    }

    /// Two direct-load decode blocks per SM leave partial sums within what
    /// the workspace holds for one 64-row block per SM.
    #[test]
    fn direct_load_blocks_fit_the_workspace() {
        use super::super::tiles::{DECODE_DIRECT, DIRECT_BLOCKS_PER_SM};
        let sm_count = 132;
        let most_blocks = DIRECT_BLOCKS_PER_SM * sm_count;
        assert!(most_blocks * split_k_values(&DECODE_DIRECT) <= split_k_counters_at(sm_count));
        // Split tiles (2 blocks or more each) number at most sm_count: a counter each.
        assert!(most_blocks / 2 <= sm_count);
    }

    /// The workspace holds the partial sums of up to one block per SM of the
    /// largest tile that splits (the prefill's 128 x 128), then a counter
    /// per tile, then the one-adapter forward's shrink state, each part
    /// after the last.
    #[test]
    fn workspace_fits_a_block_per_sm() {
        assert_eq!(split_k_counters_at(132), 132 * 128 * (128 + 64));
        let shrink_at = 132 * 128 * 192 + 132;
        let chunk_sums = 4 * 4 * 132;
        let t_at = shrink_at + 8 + chunk_sums + 4 * 132;
        // Room for t of 64 tokens at 64 ranks (one row of decode tiles).
        assert_eq!(split_k_scratch_len(132), t_at + 64 * 64);
        // A prefill's t makes it longer; a small one keeps the decode's room.
        assert_eq!(SharedShrink::scratch_len(132, 4096 * 16), t_at + 4096 * 16);
        assert_eq!(SharedShrink::scratch_len(132, 5), t_at + 64 * 64);
        let s = SharedShrink::in_workspace(1 << 20, 132);
        let at = |values: usize| (1 << 20) + 4 * values as u64;
        assert_eq!(s.counters, at(shrink_at));
        assert_eq!(s.unit_partials, at(shrink_at + 8));
        assert_eq!(s.unit_counters, at(shrink_at + 8 + chunk_sums));
        assert_eq!(s.t, at(t_at));
    }
}
