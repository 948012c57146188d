//! The backward's launches (src/ops/lora_backward.rs) on tensor cores: `u`,
//! `dx`, `db` and `da` with their reductions, by the plan the op launches.
use super::{Traffic, distinct};
use crate::element::DType;
use crate::ops::lora_backward::{BackwardOptions, Plan, TokenSplit, dx_mma, plan};
use crate::ops::tiles::{GATHER_GEMM, TOKEN_GEMM};
use crate::shape::Dims;

/// The bytes of a backward's launches, per gradient, and in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackwardTraffic {
    /// `u = s g b`: the column ranges' partials and their sum into `u`.
    pub u: u64,
    /// `dx = g w + u a`.
    pub dx: u64,
    /// `db = s g^T t`: the blocks' reads and writes, the reduction of token
    /// ranges (partials or atomics) and the zeroing before it.
    pub db: u64,
    /// `da = u^T x`, as `db`.
    pub da: u64,
    /// The four together, and the floor: `g`, `x`, `w`, the used entries of
    /// `t` and the trained slots' `a` and `b` read once; `dx` and the
    /// gradients written once (every slot's, as the op's output holds them;
    /// with `accumulate`, the trained slots' ranks read and written).
    pub total: Traffic,
}

/// [`crate::ops::lora_backward::multi_adapter_backward`] computing `dx`,
/// `da` and `db` for token `i` on slot `ids[i]` (-1: none) of a pool whose
/// slot `s` has rank `slot_ranks[s]` (0: empty) and rank capacity
/// `max_rank` (`ids` holds `dims.m` ids); with `ids` None,
/// [`crate::ops::lora_backward::lora_backward`] of one adapter
/// (`slot_ranks = [r]`, `max_rank = r`). None for f32, whose
/// SIMT kernels this does not model. The ids, ranks and scales the kernels
/// look up are not counted.
///
/// - `u`: per 32 tokens of a slot's token range, each 64-rank chunk reads
///   the tokens' `g` rows and `n` rows of `b` (the chunk's ranks rounded up
///   to 16); each range of `n` writes its partial, which the sum reads.
/// - `dx`: the tiles of a GEMM (`g` once per column tile, `w` once per row
///   tile), then per tile each token's `u` row and, per distinct adapter
///   among its rows, the adapter's `a` columns.
/// - `db`, `da`: per 128 columns, each 32-rank chunk reads its tokens' rows
///   of `g` (`x`) and `t` (`u`); every block writes its slot's `max_rank`
///   rows of its columns.
pub fn lora_backward(
    dtype: DType,
    dims: Dims,
    slot_ranks: &[usize],
    max_rank: usize,
    ids: Option<&[i32]>,
    opts: BackwardOptions,
) -> Option<BackwardTraffic> {
    let slots = slot_ranks.len();
    let plan = plan(dtype, dims, slots, ids.is_some());
    // The pipeline's depth moves no byte: any device's tiles have the shape.
    let (_, dx_tiles) = dx_mma(dtype, dims.m, false, usize::MAX)?;
    let (u_split, u_cols) = plan.u?;
    let e = dtype.size() as u64;
    let (m, n, k) = (dims.m as u64, dims.n as u64, dims.k as u64);
    let acc = opts.accumulate as u64;
    let batch = Batch::new(slot_ranks, ids, dims.m);
    let rank = |s: usize| slot_ranks[s] as u64;
    // Σ over tokens of their adapter's rank: the entries of t and u in use.
    let used = batch.token_ranks();

    // u: a block per (range of n, token range, layer).
    let mut u = 4 * (u_cols as u64 + 1) * used;
    for (s, cnt) in batch.layers(&plan, u_split) {
        let r = rank(s);
        let tiles = cnt.div_ceil(GATHER_GEMM.bm as u64);
        for r0 in (0..r).step_by(GATHER_GEMM.ranks) {
            let rc = (r - r0).min(GATHER_GEMM.ranks as u64);
            let b_cols = rc
                .next_multiple_of(16)
                .min((max_rank as u64).saturating_sub(r0));
            u += e * (cnt * n + tiles * n * b_cols) + 4 * u_cols as u64 * cnt * rc;
        }
    }

    // dx: a GEMM over n, then the expand per row tile's distinct adapters.
    let (bm, bn) = (dx_tiles.bm, dx_tiles.bn as u64);
    let tiles_k = k.div_ceil(bn);
    let a_rows: u64 = (0..dims.m)
        .step_by(bm)
        .map(|row0| {
            batch
                .distinct_slots(row0..dims.m.min(row0 + bm))
                .map(rank)
                .sum::<u64>()
        })
        .sum();
    let dx = e * (tiles_k * m * n + m.div_ceil(bm as u64) * n * k + a_rows * k)
        + 4 * tiles_k * used
        + e * m * k * (1 + acc);

    // db and da: reductions over tokens of `width` columns each.
    let reduction = |split: TokenSplit, width: u64| {
        let tiles = width.div_ceil(TOKEN_GEMM.bn as u64);
        let (mut bytes, mut layers) = (0, 0);
        for (s, cnt) in batch.layers(&plan, split) {
            let r = rank(s);
            let chunks = r.div_ceil(TOKEN_GEMM.ranks as u64);
            bytes += e * chunks * cnt * width + 4 * tiles * cnt * r;
            layers += 1;
        }
        let (out, len) = (
            4 * layers * max_rank as u64 * width,
            4 * slots as u64 * max_rank as u64 * width,
        );
        let splits = split.splits as u64;
        bytes += match (splits > 1, opts.deterministic) {
            (false, _) => out * (1 + acc),
            // Partials per range, summed in order into the gradient.
            (true, true) => out + splits * len + len * (1 + acc),
            // Atomics: a read and a write per value.
            (true, false) => 2 * out,
        };
        if (plan.by_token || (splits > 1 && !opts.deterministic)) && !opts.accumulate {
            bytes += len; // zeroed first
        }
        bytes
    };
    let db = reduction(plan.db, n);
    let da = reduction(plan.da, k);

    let trained: u64 = batch.distinct_slots(0..dims.m).map(rank).sum();
    let gradients = if opts.accumulate {
        2 * 4 * trained * (n + k)
    } else {
        4 * slots as u64 * max_rank as u64 * (n + k)
    };
    let floor = e * (m * n + m * k + n * k + trained * (n + k))
        + 4 * used
        + e * m * k * (1 + acc)
        + gradients;
    Some(BackwardTraffic {
        u,
        dx,
        db,
        da,
        total: Traffic {
            requested: u + dx + db + da,
            floor,
        },
    })
}

/// Which slot each token trains.
struct Batch<'a> {
    /// The slot token i trains: None for no adapter, an empty slot or a bad
    /// id (the kernels' `token_slot`).
    slot: Vec<Option<usize>>,
    slot_ranks: &'a [usize],
}

impl<'a> Batch<'a> {
    fn new(slot_ranks: &'a [usize], ids: Option<&[i32]>, m: usize) -> Self {
        let slot = (0..m)
            .map(|i| match ids {
                None => Some(0).filter(|_| slot_ranks.first().is_some_and(|&r| r > 0)),
                Some(ids) => usize::try_from(ids.get(i).copied().unwrap_or(-1))
                    .ok()
                    .filter(|&s| slot_ranks.get(s).is_some_and(|&r| r > 0)),
            })
            .collect();
        Batch { slot, slot_ranks }
    }

    fn token_ranks(&self) -> u64 {
        self.slot
            .iter()
            .flatten()
            .map(|&s| self.slot_ranks[s] as u64)
            .sum()
    }

    /// The distinct slots trained by the tokens in `rows`, in increasing order.
    fn distinct_slots(&self, rows: std::ops::Range<usize>) -> impl Iterator<Item = usize> {
        distinct(self.slot[rows].iter().flatten().copied()).into_iter()
    }

    /// (slot, its tokens in the range) for every block layer and token
    /// range of a reduction over tokens: a layer per slot, or with a layer
    /// per token one per slot the batch trains (the whole batch one range).
    fn layers(&self, plan: &Plan, split: TokenSplit) -> Vec<(usize, u64)> {
        let m = self.slot.len();
        let layer_slots: Vec<usize> = if plan.by_token {
            self.distinct_slots(0..m).collect()
        } else {
            (0..self.slot_ranks.len()).collect()
        };
        let mut out = Vec::new();
        for s in layer_slots {
            for y in 0..split.splits {
                let i0 = (y * split.tokens_per_split).min(m);
                let i1 = (i0 + split.tokens_per_split).min(m);
                let cnt = self.slot[i0..i1].iter().filter(|&&t| t == Some(s)).count();
                out.push((s, cnt as u64));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DET: BackwardOptions = BackwardOptions {
        accumulate: false,
        deterministic: true,
        wgmma: Some(false),
    };

    fn single(dims: Dims, r: usize, opts: BackwardOptions) -> BackwardTraffic {
        lora_backward(DType::BF16, dims, &[r], r, None, opts).expect("bf16 is modeled")
    }

    #[test]
    fn decode_dx_reads_w_once_and_g_per_column_tile() {
        // 16 tokens, n = k = 4096, r = 16: one row of 16 x 32 tiles, 128 columns of them.
        let t = single(Dims::new(16, 4096, 4096), 16, BackwardOptions::default());
        let (g, w, a, u, dx) = (16 * 4096, 4096 * 4096, 16 * 4096, 16 * 16, 16 * 4096);
        assert_eq!(t.dx, 2 * (128 * g + w + a) + 4 * 128 * u + 2 * dx);
        // u: one tile of 16 tokens, n in 16 ranges of 256, each writing its
        // partial, which the sum reads before writing u.
        let b = 4096 * 16;
        assert_eq!(t.u, 2 * (g + b) + 4 * 16 * u + 4 * 17 * u);
        assert!(t.total.ratio() > 1.0);
        assert_eq!(t.total.requested, t.u + t.dx + t.db + t.da);
    }

    #[test]
    fn token_ranges_cost_the_same_as_partials_or_as_atomics() {
        // m = 4096: db's 32 column tiles take 9 token ranges (TARGET_BLOCKS).
        let (m, n, k, r) = (4096u64, 4096u64, 4096u64, 16u64);
        let dims = Dims::new(m as usize, n as usize, k as usize);
        let det = single(dims, r as usize, DET);
        let atomic = single(dims, r as usize, BackwardOptions::default());
        let loads = 2 * m * n + 4 * (n / 128) * m * r;
        let gradient = 4 * r * n;
        // Partials: 9 written, 9 read and one sum written. Atomics: 9 reads
        // and writes, after zeroing.
        assert_eq!(det.db - loads, (9 + 9 + 1) * gradient);
        assert_eq!(atomic.db - loads, (2 * 9 + 1) * gradient);
        // One range (few tokens) writes the gradient once.
        let few = single(Dims::new(16, 4096, 4096), 16, DET);
        assert_eq!(few.db - (2 * 16 * n + 4 * 32 * 16 * r), gradient);
    }

    #[test]
    fn a_pool_larger_than_the_batch_zeroes_every_slot_and_writes_its_own() {
        // 64 tokens of 64 distinct slots of a 1000-slot pool: a layer per token.
        let (slots, r, n, k) = (1000u64, 16u64, 4096u64, 4096u64);
        let ids: Vec<i32> = (0..64).collect();
        let ranks = vec![r as usize; slots as usize];
        let dims = Dims::new(64, n as usize, k as usize);
        let t = lora_backward(DType::BF16, dims, &ranks, r as usize, Some(&ids), DET).unwrap();
        let per_layer = 2 * n + 4 * (n / 128) * r + 4 * r * n;
        assert_eq!(t.db, 64 * per_layer + 4 * slots * r * n);
        // The floor writes every slot's gradients too: the zeros dominate both.
        assert!(t.total.floor > 4 * slots * r * (n + k));
        assert!(t.total.ratio() < 2.0);
        // Accumulating skips the zeros: the floor then counts the trained slots only.
        let acc = BackwardOptions {
            accumulate: true,
            ..DET
        };
        let t_acc = lora_backward(DType::BF16, dims, &ranks, r as usize, Some(&ids), acc).unwrap();
        assert_eq!(t_acc.db, 64 * (per_layer + 4 * r * n));
        assert!(t_acc.total.floor < t.total.floor / 4);
    }

    #[test]
    fn tokens_without_an_adapter_move_no_adapter_bytes() {
        let dims = Dims::new(40, 96, 64);
        let ranks = [8, 0, 24];
        // Tokens on the empty slot 1, on bad ids and on -1 train nothing.
        let trained: Vec<i32> = (0..40).map(|i| [0, 2][i % 2]).collect();
        let mixed: Vec<i32> = (0..40).map(|i| [0, 2, -1, 1, 7][i % 5]).collect();
        let t = |ids: &[i32]| lora_backward(DType::F16, dims, &ranks, 24, Some(ids), DET).unwrap();
        let (all, some) = (t(&trained), t(&mixed));
        assert!(some.u < all.u && some.dx < all.dx && some.db < all.db);
        // No token trains: no u, and dx is the base GEMM alone (one row of
        // 64-row tiles: w once).
        let none = t(&[-1; 40]);
        assert_eq!(none.u, 0);
        let (m, n, k) = (40, 96, 64);
        assert_eq!(
            none.dx,
            2 * ((64u64).div_ceil(32) * m * n + m.div_ceil(64) * n * k + m * k)
        );
    }

    #[test]
    fn f32_runs_on_simt_kernels_that_are_not_modeled() {
        let dims = Dims::new(4, 8, 8);
        assert!(lora_backward(DType::F32, dims, &[4], 4, None, DET).is_none());
    }
}
