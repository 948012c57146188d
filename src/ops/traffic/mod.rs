//! Static models of the global-memory traffic of the operations' launches:
//! the bytes their blocks read and write, computed from the tile plans the
//! ops launch (no GPU needed), beside the least any kernel must move. The
//! ratio says how much a kernel re-reads: `x` once per column tile, `w` once
//! per row tile, the rows of `a` in every block. Re-reads mostly come from L2,
//! not DRAM, so this is not a time; the tour prints it next to the measured
//! times on a GPU machine and alone without one.
//!
//! Every operation has its model: the forwards here, the backward in
//! `backward.rs`, the optimizer step and merge at the end. Where an op
//! decides its launch shape at run time (token ranges, column ranges), the
//! model calls the same function. The Hopper (wgmma) launches have no model
//! of their own: where the default takes them (large prefills, the
//! backward's dx from 512 tokens: `ops::wgmma_dispatch`), the model counts
//! the mma.sync launch, a tiling of the same 128 x 128 output tiles.
mod backward;

pub use backward::{BackwardTraffic, lora_backward};

use super::fused_forward::{Regime, regime_for};
use super::multi_adapter_forward::{one_adapter_fits, shrink_chunks, shrink_unit};
use super::split_k::decode_k_splits;
use super::tiles::{
    DECODE, FUSED_PREFILL, MmaTiles, PREFILL, PREFILL_COL_TILES, RANK_CHUNK, SIMT,
    fused_decode_tiles,
};
use crate::element::DType;
use crate::shape::Dims;

/// Bytes a launch moves by its tile plan, and the floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes its blocks read from global memory (L2 or DRAM) and write.
    pub requested: u64,
    /// Every operand read once and every result written once.
    pub floor: u64,
}

impl Traffic {
    /// `requested / floor`: 1 is a kernel that reads nothing twice.
    pub fn ratio(&self) -> f64 {
        self.requested as f64 / self.floor.max(1) as f64
    }
}

/// The block tile (rows, columns) of a forward regime for `m` tokens: at
/// decode 16 rows up to 16 tokens, 64 past (the fused and the multi-adapter
/// forward alike); at prefill the fused forward's (`fused`) or the
/// multi-adapter forward's.
fn tile(regime: Regime, m: usize, fused: bool) -> (u64, u64) {
    let (bm, bn) = match regime {
        Regime::Simt => (SIMT.bm, SIMT.bn),
        Regime::Decode => {
            // The pipeline's depth moves no byte: the shape is the same.
            let tiles = fused_decode_tiles(m, false);
            (tiles.bm, tiles.bn)
        }
        Regime::Prefill if fused => (FUSED_PREFILL.bm, FUSED_PREFILL.bn),
        Regime::Prefill => (PREFILL.bm, PREFILL.bn),
    };
    (bm as u64, bn as u64)
}

/// `y`'s bytes: written, and read first when `beta` is not 0.
fn y_bytes(m: u64, n: u64, beta: bool, e: u64) -> u64 {
    m * n * e * if beta { 2 } else { 1 }
}

/// [`super::fused_forward::fused_forward`] of `dims` at rank `r` in the
/// regime it picks for `dtype`. On tensor cores every tile reads its rows
/// of `x` once per 64 ranks, its columns of `w`, the rank rows of `a` (at
/// prefill with one chunk of ranks, once per block of
/// `PREFILL_COL_TILES` tiles) and its rows
/// of `b`; the SIMT kernel (f32) reads a row of `x` and of `a` from
/// global memory for every entry of its `t` tile. A decode launch split
/// across blocks (split-K, on a GPU of [`SPLIT_K_MODEL_SMS`] SMs) also writes
/// each block's f32 partial sums of its existing rows (`y`'s columns and `t`'s
/// first ranks, rounded up to 16) and reads them back in the tile's last block.
///
/// A decode launch of up to 16 tokens at ranks up to 64 runs on the
/// multi-adapter kernel with every token on the one adapter (the shared
/// shrink): its model is [`multi_adapter_forward`]'s, which reads `a` once
/// per token for the shrink instead of once per column tile.
pub fn fused_forward(dtype: DType, dims: Dims, r: usize, beta: bool) -> Traffic {
    if one_adapter_fits(regime_for(dtype, dims.m), dims.m, r, false) {
        return multi_adapter_forward(dtype, dims, &[r], &vec![0; dims.m], beta);
    }
    let e = dtype.size() as u64;
    let (m, n, k, r) = (dims.m as u64, dims.n as u64, dims.k as u64, r as u64);
    let regime = regime_for(dtype, dims.m);
    let (bm, bn) = tile(regime, dims.m, true);
    let (tiles_m, tiles_n) = (m.div_ceil(bm), n.div_ceil(bn));
    let ab = match regime {
        Regime::Simt => {
            // Base product: x and w tiles; shrink: x and a rows per t entry.
            let shrink = tiles_n * m * r * 2 * k;
            tiles_n * m * k + shrink + tiles_m * n * r
        }
        _ => {
            let passes = r.div_ceil(RANK_CHUNK as u64).max(1);
            // Prefill blocks of PREFILL_COL_TILES tiles read a's rows once
            // for them all (one chunk of ranks).
            let shrinks = if regime == Regime::Prefill && passes == 1 {
                tiles_n.div_ceil(PREFILL_COL_TILES as u64)
            } else {
                tiles_n
            };
            tiles_n * m * k * passes + tiles_m * shrinks * r * k + tiles_m * n * r
        }
    };
    let splittable = regime == Regime::Decode && r <= RANK_CHUNK as u64;
    let partials = split_partials(
        splittable,
        dims,
        (tiles_m * tiles_n, &DECODE),
        bn + r.div_ceil(16) * 16,
    );
    Traffic {
        requested: e * (tiles_m * n * k + ab) + y_bytes(m, n, beta, e) + partials,
        floor: e * (m * k + n * k + r * k + n * r) + y_bytes(m, n, beta, e),
    }
}

/// The SMs of the GPU the model sizes split-K for: an H100 / H200 SXM's,
/// as many as the host runtime counts.
pub const SPLIT_K_MODEL_SMS: usize = crate::device::HOST_SM_COUNT;

/// Bytes of split-K's partial sums in a launch of `tiles` tiles of a
/// shape (split where `splittable`): every block of a split tile writes
/// `per_row` f32 values for each of its rows that exist (all of them
/// together: `m` per column of tiles) and the tile's last block reads them
/// all back.
fn split_partials(
    splittable: bool,
    dims: Dims,
    (tiles, shape): (u64, &MmaTiles),
    per_row: u64,
) -> u64 {
    if !splittable {
        return 0;
    }
    let ktiles = dims.k.div_ceil(shape.bk);
    let splits = decode_k_splits(tiles as usize, ktiles, SPLIT_K_MODEL_SMS) as u64;
    let columns = dims.n.div_ceil(shape.bn) as u64;
    match splits {
        1 => 0,
        _ => 2 * 4 * columns * splits * dims.m as u64 * per_row,
    }
}

/// [`super::multi_adapter_forward::multi_adapter_forward`] of `dims` with
/// token `i` on slot `ids[i]` (-1: none) of a pool whose slot `s` has rank
/// `slot_ranks[s]` (0: empty) and rank capacity `max_rank`. The shrink
/// writes `t` (f32); at decode it reads each token's `x` row once per 4 ranks
/// and its adapter's rank rows, at prefill (tensor cores, 16 tokens a unit)
/// each token's `x` row once per 32 ranks and, per group of 16 tokens, each
/// distinct adapter's rank rows (a few tokens' units cut into chunks of `k`
/// also write and read back each chunk's sums). Every tile block reads its rows of `x`, its
/// columns of `w`, and per distinct adapter among its rows those rows' `t`
/// and its rows of `b` (at decode per 16 rows: a 64-row tile's warps each
/// expand their own). A launch split across blocks (split-K) also
/// writes and reads back each block's f32 sums of its existing rows. The
/// floor reads `x`, `w` and each distinct adapter once.
pub fn multi_adapter_forward(
    dtype: DType,
    dims: Dims,
    slot_ranks: &[usize],
    ids: &[i32],
    beta: bool,
) -> Traffic {
    let e = dtype.size() as u64;
    let (m, n, k) = (dims.m as u64, dims.n as u64, dims.k as u64);
    let regime = regime_for(dtype, dims.m);
    let (bm, bn) = tile(regime, dims.m, false);
    let (tiles_m, tiles_n) = (m.div_ceil(bm), n.div_ceil(bn));
    let rank_of = |id: i32| {
        usize::try_from(id)
            .ok()
            .and_then(|s| slot_ranks.get(s))
            .map_or(0, |&r| r as u64)
    };
    // x rows, a rows and t writes of the shrink: per unit of `tokens` tokens
    // and per distinct adapter among them, its tokens' x rows once per
    // `ranks` ranks and the adapter's rank rows once.
    let (tokens, ranks) = shrink_unit(regime);
    let shrink: u64 = ids
        .chunks(tokens)
        .flat_map(|unit| {
            distinct(unit.iter().copied()).into_iter().map(move |id| {
                let own = unit.iter().filter(|&&other| other == id).count() as u64;
                (own, rank_of(id))
            })
        })
        .map(|(own, r)| e * (own * r.div_ceil(ranks as u64) * k + r * k) + 4 * own * r)
        .sum();
    // SIMT units cut into chunks of k (few tokens): each chunk writes its
    // sums of the unit's rows and the unit's last chunk reads them all back.
    // (Prefill units cut into shares move nothing more: each pass is whole.)
    let max_rank = slot_ranks.iter().copied().max().unwrap_or(0);
    let units = dims.m.div_ceil(tokens) * max_rank.div_ceil(ranks);
    let chunks = match regime {
        Regime::Prefill => 1,
        _ => shrink_chunks(regime, units, dims.k, slot_ranks.len(), SPLIT_K_MODEL_SMS) as u64,
    };
    let chunk_sums = match chunks {
        1 => 0,
        _ => 2 * 4 * chunks * ids.iter().map(|&id| rank_of(id)).sum::<u64>(),
    };
    // Per team of rows that expand together (a tile's, or at decode a
    // warp's 16): its distinct adapters' b rows, and its rows' t per column
    // tile.
    let team = match regime {
        Regime::Decode => DECODE.bm,
        _ => bm as usize,
    };
    let mut expand = 0;
    for rows in ids.chunks(team) {
        let b_rows: u64 = distinct(rows.iter().copied())
            .iter()
            .map(|&id| rank_of(id))
            .sum();
        let t: u64 = rows.iter().map(|&id| rank_of(id)).sum();
        expand += e * n * b_rows + tiles_n * 4 * t;
    }
    let adapters: u64 = distinct(ids.iter().copied())
        .iter()
        .map(|&id| rank_of(id) * (k + n))
        .sum();
    // Split-K: decode and prefill tiles (the model has no wgmma form).
    let shape = if regime == Regime::Prefill {
        &PREFILL
    } else {
        &DECODE
    };
    let splits = split_partials(regime != Regime::Simt, dims, (tiles_m * tiles_n, shape), bn);
    Traffic {
        requested: e * (tiles_n * m * k + tiles_m * n * k)
            + shrink
            + chunk_sums
            + expand
            + splits
            + y_bytes(m, n, beta, e),
        floor: e * (m * k + n * k + adapters) + y_bytes(m, n, beta, e),
    }
}

/// The distinct values among `items`, in increasing order.
fn distinct<T: Ord + Copy>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut seen: Vec<T> = items.into_iter().collect();
    seen.sort_unstable();
    seen.dedup();
    seen
}

/// One AdamW step over `trained` parameters (the active slots' `rank (k +
/// n)` each) with storage type `dtype`, every slot's bounds clearing it
/// (ordinary training): the writing pass reads the f32 gradient, master,
/// both moments (and the anchor when pulling), and writes master, moments
/// and the storage copy. [`super::adamw::SlotOptimizer::step`] reads the
/// gradient once more before, for the norm; `step_pool_grads` takes the
/// norm from the backward pass's statistics (`from_stats`: 16 bytes per
/// slot and column tile of 128 or more columns by the rank, left out here)
/// and reads it once. A slot the bounds do not clear also runs the checking
/// pass, which reads them all once more. The floor reads each once and
/// writes each once.
pub fn adamw_step(dtype: DType, trained: usize, anchored: bool, from_stats: bool) -> Traffic {
    let p = trained as u64;
    let reads = 4 * if anchored { 5 } else { 4 }; // g, master, m1, m2 (, anchor): f32
    let writes = 3 * 4 + dtype.size() as u64; // master, m1, m2, storage copy
    let norm = if from_stats { 0 } else { 4 };
    Traffic {
        requested: p * (norm + reads + writes),
        floor: p * (reads + writes),
    }
}

/// [`super::merge::merge`] (or unmerge) of a rank-`r` adapter into `w`
/// (`[n, k]`): `w` read and written once; each block of 8 rows reads `a`'s
/// rank rows over its columns and its rows of `b` once per chunk of columns.
/// The floor reads `a` and `b` once.
pub fn merge(dtype: DType, n: usize, k: usize, r: usize) -> Traffic {
    let e = dtype.size() as u64;
    let (rows, cols) = super::merge::block_tile(k);
    let (n, k, r) = (n as u64, k as u64, r as u64);
    let a = n.div_ceil(rows as u64) * r * k;
    let b = k.div_ceil(cols as u64) * n * r;
    Traffic {
        requested: e * (2 * n * k + a + b),
        floor: e * (2 * n * k + r * k + n * r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_decode_token_reads_w_once_and_a_once_for_the_shrink() {
        // m = 1, n = k = 4096, r = 16, bf16, on the multi-adapter kernel: 128
        // column tiles of 32 read x and w; 4 shrink units (4 ranks each) read
        // x and a's rank rows once, cut into 4 chunks of k whose f32 sums are
        // written and read back; the tiles read t and their rows of b.
        let t = fused_forward(DType::BF16, Dims::new(1, 4096, 4096), 16, false);
        let (w, a, b, x, y) = (4096 * 4096, 16 * 4096, 4096 * 16, 4096, 4096);
        assert_eq!(t.floor, 2 * (w + a + b + x + y));
        let shrink = 2 * (4 * x + a) + 4 * 16;
        let chunk_sums = 2 * 4 * 4 * 16;
        let expand = 2 * b + 128 * 4 * 16;
        let want = 2 * (w + 128 * x + y) + shrink + chunk_sums + expand;
        assert_eq!(t.requested, want);
        // The same as the multi-adapter launch of one slot for every token.
        let multi =
            multi_adapter_forward(DType::BF16, Dims::new(1, 4096, 4096), &[16], &[0], false);
        assert_eq!(t, multi);
        // Ranks past 64 stay on the fused kernel: a is read in every column tile.
        let t65 = fused_forward(DType::BF16, Dims::new(1, 4096, 4096), 65, false);
        let (a, b) = (65 * 4096, 4096 * 65);
        assert_eq!(t65.requested, 2 * (w + 128 * a + b + 2 * 128 * x + y));
    }

    #[test]
    fn decode_up_to_64_rows_reads_w_once_per_column_tile() {
        // Up to 64 tokens at ranks up to 64: the multi-adapter kernel's
        // 64-row tiles with one slot for every token (t computed once).
        for m in [17, 64] {
            let dims = Dims::new(m, 4096, 4096);
            let t = fused_forward(DType::BF16, dims, 16, false);
            let multi = multi_adapter_forward(DType::BF16, dims, &[16], &vec![0; m], false);
            assert_eq!(t, multi);
        }
        // Rank 65 keeps the fused kernel: one row of 64-row tiles reads w
        // once and a's rows in every column tile, x twice (two chunks of
        // ranks); 17 rows take the same row of tiles.
        let (w, a, b) = (4096 * 4096, 65 * 4096, 4096 * 65);
        for m in [17, 64] {
            let t = fused_forward(DType::BF16, Dims::new(m, 4096, 4096), 65, false);
            let (x, y) = (m as u64 * 4096, m as u64 * 4096);
            assert_eq!(t.requested, 2 * (w + 128 * a + b + 2 * 128 * x + y));
        }
    }

    #[test]
    fn decode_split_k_adds_the_partial_sums_of_the_existing_rows() {
        // n = 1024: 32 column tiles, 4 blocks each on 132 SMs; every block
        // writes one row of 32 columns, the last reads all 4 (the shared
        // shrink's t is not split).
        let split = fused_forward(DType::BF16, Dims::new(1, 1024, 4096), 16, false);
        let e = 2u64;
        let shrink = e * (4 * 4096 + 16 * 4096) + 4 * 16 + 2 * 4 * 4 * 16;
        let expand = e * 1024 * 16 + 32 * 4 * 16;
        let base = e * (32 * 4096 + 1024 * 4096) + shrink + expand + e * 1024;
        assert_eq!(split.requested, base + 2 * 4 * 32 * 4 * 32);
        // Two chunks of ranks take the fused kernel, and no split.
        let two = fused_forward(DType::BF16, Dims::new(1, 1024, 4096), 65, false);
        let x = e * 32 * 4096 * 2;
        assert_eq!(
            two.requested,
            x + e * (1024 * 4096 + 32 * 65 * 4096 + 1024 * 65) + e * 1024
        );
    }

    #[test]
    fn prefill_reads_x_per_column_tile_and_w_per_row_tile() {
        // On the multi-adapter kernel: 32 x 32 tiles of 128 read x (once per
        // column tile) and w (once per row tile);
        // 256 shrink units of 16 tokens read their x rows once per 32 ranks
        // and a's rows once, and write t; each row tile reads b's rows and
        // its rows' t per column tile.
        let dims = Dims::new(4096, 4096, 4096);
        let t = fused_forward(DType::F16, dims, 64, true);
        let (tiles_m, tiles_n, mk, nk) = (32, 32, 4096 * 4096, 4096 * 4096);
        let shrink = 256 * (2 * (16 * 2 * 4096 + 64 * 4096) + 4 * 16 * 64);
        let expand = tiles_m * (2 * 4096 * 64 + tiles_n * 4 * 128 * 64);
        let want = 2 * (tiles_n * mk + tiles_m * nk) + shrink + expand + 2 * 2 * 4096 * 4096;
        assert_eq!(t.requested, want);
        assert_eq!(
            t,
            multi_adapter_forward(DType::F16, dims, &[64], &[0; 4096], true)
        );
        // A batch whose t would pass 2^24 values stays on the fused kernel
        // (tiles of 128 x 256): x and a once per column tile and 64 ranks,
        // w and b once per row tile. n = 600: 3 column tiles.
        let (m, n, k) = (1 << 21, 600, 32);
        let big = fused_forward(DType::F16, Dims::new(m, n, k), 64, false);
        let (tiles_m, tiles_n) = (m / 128, 3);
        let a = tiles_m * tiles_n * 64 * k;
        let want = 2 * (tiles_m * n * k + tiles_n * m * k + a + tiles_m * n * 64) + 2 * m * n;
        assert_eq!(big.requested, want as u64);
    }

    #[test]
    fn multi_adapter_floor_counts_each_distinct_adapter_once() {
        let dims = Dims::new(4, 64, 32);
        let ranks = [8, 16, 0];
        // Slot 2 is empty and -1 is no adapter: neither moves adapter bytes.
        let t = multi_adapter_forward(DType::BF16, dims, &ranks, &[0, 1, 0, -1], false);
        let (x, w, y) = (4 * 32, 64 * 32, 4 * 64);
        assert_eq!(t.floor, 2 * (x + w + (8 + 16) * (32 + 64) + y));
        let with_empty = multi_adapter_forward(DType::BF16, dims, &ranks, &[0, 1, 2, -1], false);
        assert!(with_empty.requested < t.requested);
        assert!(t.ratio() > 1.0);
    }

    #[test]
    fn multi_adapter_prefill_shrink_reads_x_once_per_32_ranks() {
        // 128 tokens (prefill), k = 64, n = 32: one row tile, one column tile.
        let dims = Dims::new(128, 32, 64);
        let (m, n, k) = (128, 32, 64);
        let base = 2 * (m * k + n * k + m * n);
        // All tokens on slot 0 (rank 40): each token's x row twice (ranks
        // 0..32 and 32..40), a's 40 rows once per group of 16 tokens.
        let one = multi_adapter_forward(DType::BF16, dims, &[40], &[0; 128], false);
        let shrink = 2 * (2 * m * k + 8 * 40 * k) + 4 * m * 40;
        let expand = 2 * n * 40 + 4 * m * 40;
        assert_eq!(one.requested, base + shrink + expand);
        // Tokens alternating between two rank-8 slots: each group of 16 reads
        // both adapters' a rows, and each token's x row once.
        let ids: Vec<i32> = (0..128).map(|i| i % 2).collect();
        let two = multi_adapter_forward(DType::BF16, dims, &[8, 8], &ids, false);
        let shrink = 2 * (m * k + 8 * 2 * 8 * k) + 4 * m * 8;
        let expand = 2 * n * 16 + 4 * m * 8;
        assert_eq!(two.requested, base + shrink + expand);
    }

    #[test]
    fn multi_adapter_decode_split_k_adds_the_partial_sums_of_the_existing_rows() {
        // n = 1024: 32 column tiles of 32, 4 blocks each on 132 SMs; every
        // block writes its row of 32 sums, the last reads all 4. n = 4096
        // (128 tiles) takes no split.
        let ids = [0];
        let split =
            multi_adapter_forward(DType::BF16, Dims::new(1, 1024, 4096), &[16], &ids, false);
        let (x, w, y) = (32 * 4096, 1024 * 4096, 1024);
        // One token at rank 16: 4 units, each cut into 4 chunks of k.
        let shrink = 2 * (4 * 4096 + 16 * 4096) + 4 * 16 + 2 * 4 * 4 * 16;
        let expand = 2 * 1024 * 16 + 32 * 4 * 16;
        assert_eq!(
            split.requested,
            2 * (x + w + y) + shrink + expand + 2 * 4 * 32 * 4 * 32
        );
        let wide = multi_adapter_forward(DType::BF16, Dims::new(1, 4096, 4096), &[16], &ids, false);
        let (x, w, y) = (128 * 4096, 4096 * 4096, 4096);
        let expand = 2 * 4096 * 16 + 128 * 4 * 16;
        assert_eq!(wide.requested, 2 * (x + w + y) + shrink + expand);
    }

    #[test]
    fn multi_adapter_decode_of_64_tokens_reads_w_once() {
        // 64 tokens of 8 rank-16 adapters (token i on i % 8), n = k = 4096:
        // one row of 128 tiles of 64 rows read x and w once each; 256 shrink
        // units (a token's 4 ranks) read their x row and rank rows, cut into
        // 2 chunks of k; each warp's 16 rows read their 8 adapters' b rows
        // and their t per column tile.
        let ids: Vec<i32> = (0..64).map(|i| i % 8).collect();
        let dims = Dims::new(64, 4096, 4096);
        let t = multi_adapter_forward(DType::BF16, dims, &[16; 8], &ids, false);
        let (x, w, y) = (128 * 64 * 4096, 4096 * 4096, 64 * 4096);
        let shrink = 64 * (2 * (4 * 4096 + 16 * 4096) + 4 * 16);
        let chunk_sums = 2 * 4 * 2 * 64 * 16;
        let expand = 4 * (2 * 4096 * 8 * 16 + 128 * 4 * 16 * 16);
        assert_eq!(t.requested, 2 * (x + w + y) + shrink + chunk_sums + expand);
        assert_eq!(t.floor, 2 * (64 * 4096 + w + 8 * 16 * 8192 + y));
    }

    #[test]
    fn adamw_reads_the_gradient_twice_or_from_stats_once() {
        let t = adamw_step(DType::BF16, 1000, false, false);
        assert_eq!(t.floor, 1000 * (16 + 14));
        assert_eq!(t.requested, 1000 * (4 + 16 + 14));
        let t = adamw_step(DType::BF16, 1000, false, true);
        assert_eq!(t.requested, t.floor);
    }

    #[test]
    fn merge_reads_a_once_per_8_rows() {
        // n = k = 4096, r = 16: 512 blocks of 8 rows, columns in chunks of 256.
        let t = merge(DType::BF16, 4096, 4096, 16);
        let (w, a, b) = (4096 * 4096, 16 * 4096, 4096 * 16);
        assert_eq!(t.floor, 2 * (2 * w + a + b));
        assert_eq!(t.requested, 2 * (2 * w + 512 * a + 16 * b));
    }
}
