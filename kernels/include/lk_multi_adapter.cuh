// The multi-adapter forward's pieces that its two kernel files share:
// kernels/multi_adapter_forward.cu (mma.sync and SIMT tiles, every target)
// and kernels/multi_adapter_forward_wgmma.cu (sm_90a): the counters, routing
// a token to its slot (ids or a segment table checked on the device), the
// shrink work units that write t, the tile blocks' wait for them, the packed
// expand of a tile's adapters, and the launch's last block's bookkeeping.
// kernels/multi_adapter_forward.cu says how the pieces work together.
#pragma once
#include "lk_mma.cuh"
#include "lk_tile_gemm.cuh"

namespace lk {
namespace multi_adapter {
// Internal linkage: the host runtime links every kernel file into one library.
namespace {

// The counters (MultiAdapterParams): 0 between launches.
enum Counter { CLAIMED = 0, ITEMS_DONE = 1, BAD_TABLE = 2, BAD_IDS = 3, BLOCKS_DONE = 4 };

// One adapter for every token (MultiAdapterParams): slot 0, its rank and
// scale taken from the parameters; no ids or pool tables are read.
__device__ __forceinline__ bool uniform(const MultiAdapterParams& p) { return p.slot_rank == 0; }
__device__ __forceinline__ int rank_of(const MultiAdapterParams& p, int s) {
    return uniform(p) ? p.uniform_rank : reinterpret_cast<const int*>(p.slot_rank)[s];
}
__device__ __forceinline__ float scale_of(const MultiAdapterParams& p, int s) {
    return uniform(p) ? p.uniform_scale : reinterpret_cast<const float*>(p.slot_scale)[s];
}

// The raw slot id of token i (per-token ids, or a binary search of the
// segments: always a segment in 0..segments-1, even in a malformed table).
__device__ __forceinline__ int raw_slot(const MultiAdapterParams& p, int i) {
    if (uniform(p)) return 0;
    if (p.segments == 0) return reinterpret_cast<const int*>(p.token_slots)[i];
    const int* off = reinterpret_cast<const int*>(p.seg_offsets);
    int lo = 0, hi = p.segments - 1;
    while (lo < hi) {
        int mid = lo + (hi - lo + 1) / 2;  // not (lo + hi + 1) / 2: that passes 2^31 - 1
        if (off[mid] <= i) lo = mid; else hi = mid - 1;
    }
    return reinterpret_cast<const int*>(p.seg_slots)[lo];
}

// Checks entry e of 0..segments of the segment table (if any): offsets[0] ==
// 0 (e = 0), offsets[e - 1] <= offsets[e] and offsets[segments] == m (e =
// segments); a failure raises BAD_TABLE. Together these put every offset in
// 0..m, in order.
__device__ void check_segment_entry(const MultiAdapterParams& p, int64_t e) {
    if (p.segments == 0 || e > p.segments) return;
    const int* off = reinterpret_cast<const int*>(p.seg_offsets);
    bool ok = e == 0 ? off[0] == 0 : off[e - 1] <= off[e];
    if (e == p.segments) ok = ok && off[e] == p.m;
    if (!ok) atomicExch(reinterpret_cast<unsigned*>(p.counters) + BAD_TABLE, 1u);
}

__device__ __forceinline__ bool out_of_range(const MultiAdapterParams& p, int id) { return id < -1 || id >= p.slots; }

// The slot token i uses, or -1 (no adapter, an empty slot, or a bad id).
__device__ __forceinline__ int token_slot(const MultiAdapterParams& p, int i) {
    int id = raw_slot(p, i);
    if (id < 0 || id >= p.slots) return -1;
    return rank_of(p, id) > 0 ? id : -1;
}

// Shrink work is cut into units of TOKENS tokens and RANKS rank rows, a
// warp each: SimtShrink at decode and in f32, MmaShrink at prefill.
struct SimtShrink {
    static constexpr int TOKENS = 1, RANKS = 4;
    static constexpr bool MMA = false;
};
struct MmaShrink {
    static constexpr int TOKENS = 16, RANKS = 32;
    static constexpr bool MMA = true;
};

// SIMT units: one token i and SimtShrink::RANKS rank rows j0.., a warp
// each. The warp streams x[i,:] and those rows of its adapter's `a` over
// its range of k, 8 values per lane per step (one 16-byte load each when
// ALIGNED), with an accumulator per row, then reduces them with shuffles:
// no shared memory and no barriers, and each step's loads depend on nothing
// before them. A token costs its own rank: units past it do nothing.
//
// A warp waits a memory round trip per step it cannot overlap, and a batch
// of a few tokens has few units (one token at rank 16: 4), so k is cut into
// p.shrink_chunks chunks of whole KCHUNK-value pieces (src/ops picks the
// count: 1 when the units alone fill the GPU), an item each. Each chunk
// stores its sums to p.unit_partials and counts itself in at the unit's
// counter; the unit's last chunk to arrive adds the chunks' sums in chunk
// order (the same bits whichever arrives last), writes t and resets the
// counter. No chunk waits for another.
constexpr int SHRINK_ROWS = SimtShrink::RANKS;
constexpr int KSTEP = 32 * 8;  // values of k a warp takes per step
constexpr int DEPTH = 4;       // steps of the 16-byte path per loop pass
constexpr int KCHUNK = DEPTH * KSTEP;

// Values c .. c + 7 of a row as they are stored (one 16-byte load: the row
// 16-byte aligned, c % 8 == 0, k % 8 == 0), zeros past k; widen8 makes them f32.
template <class T>
__device__ __forceinline__ uint4 load16(const T* row, int k, int c) {
    uint4 raw{0u, 0u, 0u, 0u};
    if (c < k) raw = *reinterpret_cast<const uint4*>(row + c);
    return raw;
}
template <class T>
__device__ __forceinline__ void widen8(float (&v)[8], uint4 raw) {
    T h[8];
    memcpy(h, &raw, sizeof(h));  // not a pointer cast: that breaks C++'s aliasing rules on the host
    for (int e = 0; e < 8; ++e) v[e] = lk::to_f32(h[e]);
}

// Values c, c + 32, .., c + 224 of a row (element loads, coalesced across
// the warp), c = k0 + lane; 0 from `end` on.
template <class T>
__device__ __forceinline__ void load8_any(float (&v)[8], const T* row, int end, int k0, int lane) {
    for (int e = 0; e < 8; ++e) {
        const int c = k0 + lane + 32 * e;
        v[e] = c < end ? lk::to_f32(row[c]) : 0.f;
    }
}

// Units per group of S::TOKENS tokens (groups of S::RANKS rank rows), and
// units in all (src/ops computes the same count).
template <class S>
__device__ __forceinline__ int shrink_row_groups(const MultiAdapterParams& p) {
    return (p.max_rank + S::RANKS - 1) / S::RANKS;
}
template <class S>
__device__ __forceinline__ int64_t shrink_units(const MultiAdapterParams& p) {
    return (int64_t)((p.m + S::TOKENS - 1) / S::TOKENS) * shrink_row_groups<S>(p);
}

// The end of SIMT chunk `chunk` of `unit`, whose sums of its `rows` rows
// lane 0 stored at part[chunk * SHRINK_ROWS ..] (several chunks) or in t
// (one): the unit's last chunk adds them up into t (ti). Call from every
// lane of the warp.
__device__ void finish_chunk(const MultiAdapterParams& p, int64_t unit, int chunk, int rows, const float* part,
                             float* ti, int lane) {
    const int chunks = p.shrink_chunks;
    if (chunks == 1) return;
    unsigned* counter = reinterpret_cast<unsigned*>(p.unit_counters) + unit;
    unsigned last = 0;
    if (lane == 0) {
        __threadfence();  // the sums are visible before the count that announces them
        last = atomicAdd(counter, 1u) == (unsigned)chunks - 1;
    }
    if (!__shfl_sync(0xFFFFFFFFu, last, 0)) return;
    __threadfence();  // every other chunk's sums are in before these reads
    if (lane < rows) {
        float v = lk::load_cg(part + lane);
        for (int c = 1; c < chunks; ++c) v += lk::load_cg(part + c * SHRINK_ROWS + lane);
        ti[lane] = v;
    }
    if (lane == 0) atomicExch(counter, 0u);
}

// Shrink item: chunk `chunk` of unit `unit` (token unit / row_groups, rank
// rows from (unit % row_groups) * SHRINK_ROWS), by a whole warp. LEAN: one
// row and one value per lane at a time (few registers: the tile blocks'
// rare share, taken while their accumulators are live, which must not raise
// their kernel's register count); else every row at once, 8 values per
// lane, and on the 16-byte path DEPTH steps per loop pass, their loads
// written before any use (ptxas issues about 6 of the 20 ahead of the first
// FMA and interleaves the rest, for registers: hence the chunks as well).
// Rows past `rows` load the last row again: it exists, and is never stored.
template <class T, bool ALIGNED, bool LEAN>
__device__ void shrink_unit(const MultiAdapterParams& p, int64_t unit, int chunk, int lane) {
    const T* x = reinterpret_cast<const T*>(p.x);
    const T* a_pool = reinterpret_cast<const T*>(p.a_pool);
    float* t = reinterpret_cast<float*>(p.t);
    const int row_groups = shrink_row_groups<SimtShrink>(p);
    const int i = (int)(unit / row_groups), j0 = (int)(unit % row_groups) * SHRINK_ROWS;
    if (chunk == 0 && j0 == 0 && lane == 0 && out_of_range(p, raw_slot(p, i)))
        atomicAdd(reinterpret_cast<unsigned*>(p.counters) + BAD_IDS, 1u);
    const int s = token_slot(p, i);
    if (s < 0) return;
    const int rank = rank_of(p, s);
    if (j0 >= rank) return;  // past its rank
    const int rows = rank - j0 < SHRINK_ROWS ? rank - j0 : SHRINK_ROWS;
    const T* xi = x + (size_t)i * p.k;
    const T* aj = a_pool + ((size_t)s * p.max_rank + j0) * p.k;
    float* ti = t + (size_t)i * p.max_rank + j0;
    // This chunk's values of k (its share of the KCHUNK pieces: none is
    // empty, as src/ops takes at most one chunk per piece), and where its
    // sums go.
    const int pieces = (p.k + KCHUNK - 1) / KCHUNK;
    const int kb = (int)((int64_t)chunk * pieces / p.shrink_chunks) * KCHUNK;
    const int ke = lk::min_int(p.k, (int)((int64_t)(chunk + 1) * pieces / p.shrink_chunks) * KCHUNK);
    float* part = reinterpret_cast<float*>(p.unit_partials) + unit * p.shrink_chunks * SHRINK_ROWS;
    float* sums = p.shrink_chunks == 1 ? ti : part + chunk * SHRINK_ROWS;
    if constexpr (LEAN) {
#pragma unroll 1
        for (int q = 0; q < rows; ++q) {
            float v = 0.f;
#pragma unroll 1
            for (int c = kb + lane; c < ke; c += 32) v += lk::to_f32(xi[c]) * lk::to_f32(aj[(size_t)q * p.k + c]);
            for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
            if (lane == 0) sums[q] = v;
        }
    } else {
        float acc[SHRINK_ROWS];
        for (int q = 0; q < SHRINK_ROWS; ++q) acc[q] = 0.f;
#pragma unroll 1
        for (int k0 = kb; k0 < ke; k0 += ALIGNED ? KCHUNK : KSTEP) {  // sass-loop: shrink
            if constexpr (ALIGNED) {
                uint4 xr[DEPTH], ar[DEPTH][SHRINK_ROWS];
                for (int d = 0; d < DEPTH; ++d) {
                    const int c = k0 + d * KSTEP + lane * 8;
                    xr[d] = load16(xi, ke, c);
                    for (int q = 0; q < SHRINK_ROWS; ++q)
                        ar[d][q] = load16(aj + (size_t)lk::min_int(q, rows - 1) * p.k, ke, c);
                }
                for (int d = 0; d < DEPTH; ++d) {
                    float xv[8];
                    widen8<T>(xv, xr[d]);
                    for (int q = 0; q < SHRINK_ROWS; ++q) {
                        float av[8];
                        widen8<T>(av, ar[d][q]);
                        for (int e = 0; e < 8; ++e) acc[q] += xv[e] * av[e];
                    }
                }
            } else {
                float xv[8];
                load8_any<T>(xv, xi, ke, k0, lane);
                for (int q = 0; q < SHRINK_ROWS; ++q) {
                    if (q >= rows) break;
                    float av[8];
                    load8_any<T>(av, aj + (size_t)q * p.k, ke, k0, lane);
                    for (int e = 0; e < 8; ++e) acc[q] += xv[e] * av[e];
                }
            }
        }
        for (int q = 0; q < SHRINK_ROWS; ++q) {
            float v = acc[q];
            for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
            if (lane == 0 && q < rows) sums[q] = v;
        }
    }
    finish_chunk(p, unit, chunk, rows, part, ti, lane);
}

// Values c .. c + 7 of a row, packed two per register in the order the
// 16-bit halves of an mma fragment hold them (lower half first); zeros when
// !live and past k. ALIGNED: one 16-byte load (c % 8 == 0, k % 8 == 0).
template <class T, bool ALIGNED>
__device__ __forceinline__ void load_k8(uint32_t (&w)[4], const T* row, int k, int c, bool live) {
    if constexpr (ALIGNED) {
        uint4 raw{0u, 0u, 0u, 0u};
        if (live && c < k) raw = *reinterpret_cast<const uint4*>(row + c);
        memcpy(w, &raw, sizeof(w));
    } else {
        T h[8];
        for (int e = 0; e < 8; ++e) h[e] = live && c + e < k ? row[c + e] : lk::from_f32<T>(0.f);
        memcpy(w, h, sizeof(w));
    }
}

// k-steps of 32 whose loads a tensor-core unit's warp issues together on the
// 16-byte path (18 per lane): the warp waits a memory round trip per group of
// steps, not per step (more would take the kernel's registers past 136).
constexpr int MMA_DEPTH = 3;

// `bits` without its `count` lowest set bits.
__device__ __forceinline__ unsigned without_lowest(unsigned bits, int count) {
    for (int d = 0; d < count && bits != 0; ++d) bits &= bits - 1;
    return bits;
}

// Tensor-core unit u: tokens i0 = (u / row_groups) * 16 .. i0 + 15 and
// rank rows j0 = (u % row_groups) * 32 .. j0 + 31, by a whole warp with
// mma.m16n8k16 (f32 accumulators: t rows x 4 n-tiles of 8 ranks). One pass
// over k per distinct adapter s among the 16 tokens: rows of other adapters
// (and past m) load zeros and are not stored, so one token's values never
// reach another's t, and a token's x row is loaded in its adapter's pass only.
// The unit's passes are shared out over p.shrink_chunks items (its shares):
// share c takes the distinct adapters c, c + shares, .. in the order of their
// first token. A batch of many adapters thus gets a warp per adapter and
// unit (256 tokens of 64 adapters: 16 units of up to 16 passes each), not a
// warp per unit; each pass is the same whichever share runs it, so t's bits
// do not depend on the share count.
// The fragments come straight from global memory, with no shared memory or
// barrier: for each 32 values of k, lane (group g, quad q) loads values
// 8q .. 8q + 7 of x rows g and g + 8 and of a's rank rows g, 8 + g, ..
// (16 bytes each) and uses its first 4 as the fragment's k columns 2q, 2q + 1,
// 8 + 2q, 9 + 2q of one k16 step and its last 4 for the next. That permutes
// the k order the same way in A (x) and B (a^T), which a dot product over k
// does not see. LEAN (the tile blocks' share): one n-tile of 8 ranks per
// sweep over k, re-reading x per sweep, with a quarter of the registers.
template <class T, bool ALIGNED, bool LEAN>
__device__ void shrink_unit_mma(const MultiAdapterParams& p, int64_t unit, int share, int lane) {
    constexpr int NT = MmaShrink::RANKS / 8;  // n-tiles of 8 ranks
    constexpr int NP = LEAN ? 1 : NT;         // n-tiles per sweep over k
    constexpr int MD = LEAN || !ALIGNED ? 1 : MMA_DEPTH;  // k-steps of 32 whose loads go together
    const T* x = reinterpret_cast<const T*>(p.x);
    const T* a_pool = reinterpret_cast<const T*>(p.a_pool);
    float* t = reinterpret_cast<float*>(p.t);
    const int row_groups = shrink_row_groups<MmaShrink>(p);
    const int i0 = (int)(unit / row_groups) * MmaShrink::TOKENS, j0 = (int)(unit % row_groups) * MmaShrink::RANKS;
    const int g = lane / 4, q = lane % 4;
    // Lane l < 16 holds token i0 + l's slot (-1: none, or past m).
    const bool token = lane < MmaShrink::TOKENS && i0 + lane < p.m;
    if (j0 == 0 && share == 0 && token && out_of_range(p, raw_slot(p, i0 + lane)))  // once per token
        atomicAdd(reinterpret_cast<unsigned*>(p.counters) + BAD_IDS, 1u);
    const int mine = token ? token_slot(p, i0 + lane) : -1;
    // The lanes whose token is the first of its adapter: one per pass.
    bool first = mine >= 0;
    for (int l = 0; l < MmaShrink::TOKENS; ++l) {
        const int theirs = __shfl_sync(0xFFFFFFFFu, mine, l);
        if (l < lane && theirs == mine) first = false;
    }
    // Lowest set bit: this share's next pass.
    for (unsigned passes = without_lowest(__ballot_sync(0xFFFFFFFFu, first), share); passes != 0;
         passes = without_lowest(passes, p.shrink_chunks)) {
        const int s = __shfl_sync(0xFFFFFFFFu, mine, __ffs((int)passes) - 1);
        const bool lo = __shfl_sync(0xFFFFFFFFu, mine, g) == s;      // row g is s's
        const bool hi = __shfl_sync(0xFFFFFFFFu, mine, g + 8) == s;  // row g + 8 is s's
        const int rank = rank_of(p, s);
        if (j0 >= rank) continue;  // past its rank: nothing to do for s
        const int live_ranks = rank - j0;
        const T* x_lo = x + (size_t)(i0 + g) * p.k;  // dereferenced only when lo (i0 + g < m)
        const T* x_hi = x + (size_t)(i0 + g + 8) * p.k;
        const T* a_rows = a_pool + ((size_t)s * p.max_rank + j0 + g) * p.k;  // n-tile n: + 8 n rows
#pragma unroll 1
        for (int n0 = 0; n0 < NT && 8 * n0 < live_ranks; n0 += NP) {
            float acc[NP][4];
            for (int n = 0; n < NP; ++n)
                for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
#pragma unroll 1
            for (int k0 = 0; k0 < p.k; k0 += 32 * MD) {  // sass-loop: shrink_mma
                uint32_t xl[MD][4], xh[MD][4], av[MD][NP][4];
                for (int d = 0; d < MD; ++d) {
                    const int c = k0 + 32 * d + 8 * q;
                    load_k8<T, ALIGNED>(xl[d], x_lo, p.k, c, lo);
                    load_k8<T, ALIGNED>(xh[d], x_hi, p.k, c, hi);
                    for (int n = 0; n < NP; ++n)
                        load_k8<T, ALIGNED>(av[d][n], a_rows + (size_t)8 * (n0 + n) * p.k, p.k, c,
                                            8 * (n0 + n) + g < live_ranks);
                }
                for (int d = 0; d < MD; ++d)
                    for (int half = 0; half < 2; ++half) {
                        const uint32_t frag_a[4] = {xl[d][2 * half], xh[d][2 * half], xl[d][2 * half + 1],
                                                    xh[d][2 * half + 1]};
                        for (int n = 0; n < NP; ++n) {
                            if (8 * (n0 + n) >= live_ranks) break;  // the same for the whole warp
                            const uint32_t frag_b[2] = {av[d][n][2 * half], av[d][n][2 * half + 1]};
                            lk::mma_m16n8k16(acc[n], frag_a, frag_b, acc[n], T());
                        }
                    }
            }
            // acc[n][e]: row g + 8 (e / 2), rank j0 + 8 (n0 + n) + 2 q + e % 2.
            for (int n = 0; n < NP; ++n)
                for (int e = 0; e < 4; ++e) {
                    const int row = g + 8 * (e / 2), j = 8 * (n0 + n) + 2 * q + e % 2;
                    if ((e < 2 ? lo : hi) && j < live_ranks)
                        t[(size_t)(i0 + row) * p.max_rank + j0 + j] = acc[n][e];
                }
        }
    }
}

// Pieces of shrink work: units times p.shrink_chunks (piece e: chunk or
// share e / units of unit e % units): SIMT units' chunks of k, tensor-core
// units' shares of their passes.
template <class S>
__device__ __forceinline__ int64_t shrink_pieces(const MultiAdapterParams& p) {
    return shrink_units<S>(p) * p.shrink_chunks;
}

// Items of shrink work: item e is piece e (if e < pieces) and the check of
// table entry e (if e <= segments). src/ops bounds it below 2^31.
template <class S>
__device__ __forceinline__ unsigned shrink_items(const MultiAdapterParams& p) {
    const int64_t pieces = shrink_pieces<S>(p);
    const int64_t entries = p.segments == 0 ? 0 : (int64_t)p.segments + 1;
    return (unsigned)(pieces > entries ? pieces : entries);
}

// Every warp of the block claims `claim` items at a time until none are left,
// does them, and counts them done (every lane fences its writes of t before
// lane 0 counts). Called by shrink blocks, and by tile blocks before they
// wait (LEAN: the units' lean forms, which keep the tile kernel's registers at
// what its base product needs: its accumulators are live). When it returns,
// every item is claimed: what a tile block then waits for is held by running
// warps. Whole SIMT units are claimed 4 at a time (light items: fewer
// atomics on one counter when there are many); chunks of k and tensor-core
// pieces (a pass over all of k each) one at a time: each should have a warp
// of its own.
template <class T, class S, bool ALIGNED, bool LEAN>
__device__ void shrink_work(const MultiAdapterParams& p) {
    const unsigned claim = !S::MMA && p.shrink_chunks == 1 ? 4u : 1u;
    unsigned* counters = reinterpret_cast<unsigned*>(p.counters);
    const int lane = threadIdx.x % 32;
    const unsigned items = shrink_items<S>(p);
    const int64_t units = shrink_units<S>(p), pieces = shrink_pieces<S>(p);
    for (;;) {
        unsigned first = 0;
        if (lane == 0) first = atomicAdd(counters + CLAIMED, claim);
        first = __shfl_sync(0xFFFFFFFFu, first, 0);
        if (first >= items) return;
        const unsigned last = items - first < claim ? items : first + claim;
        for (unsigned e = first; e < last; ++e) {
            if (lane == 0) check_segment_entry(p, e);
            if (e >= pieces) continue;
            if constexpr (S::MMA) shrink_unit_mma<T, ALIGNED, LEAN>(p, e % units, (int)(e / units), lane);
            else shrink_unit<T, ALIGNED && !LEAN, LEAN>(p, e % units, (int)(e / units), lane);
        }
        __threadfence();
        __syncwarp();
        if (lane == 0) atomicAdd(counters + ITEMS_DONE, last - first);
    }
}

// The end of a block's use of the counters: the last block of the launch
// adds its bad ids to *bad_ids (m for a malformed table) and resets them.
// Team: the block's threads that still run (all of them, or a wgmma kernel's
// consumers once its producer is done).
template <class Team = lk::BlockTeam>
__device__ void finish_block(const MultiAdapterParams& p) {
    Team::sync();  // every thread of the block is done with the counters
    if (Team::tid() != 0) return;
    unsigned* counters = reinterpret_cast<unsigned*>(p.counters);
    __threadfence();
    if (atomicAdd(counters + BLOCKS_DONE, 1u) != gridDim.x - 1) return;
    __threadfence();  // every block's counter updates are in before these reads
    const bool bad_table = atomicAdd(counters + BAD_TABLE, 0u) != 0;
    const unsigned bad = bad_table ? (unsigned)p.m : atomicAdd(counters + BAD_IDS, 0u);
    if (p.bad_ids != 0) atomicAdd(reinterpret_cast<unsigned*>(p.bad_ids), bad);
    for (int c = CLAIMED; c <= BLOCKS_DONE; ++c) atomicExch(counters + c, 0u);
}

// Called by every thread of a tile block after its base product: its warps
// take any shrink work still unclaimed (rarely any), in the lean forms, then
// thread 0 waits until every shrink item is done
// (ITEMS_DONE: all of t written, the whole segment table checked) and reads
// whether the table is malformed; then row_slot gets the slot of each of the
// tile's BM rows (-1: none, or every row with a malformed table). Every t
// read after this (it ends with a barrier) sees the shrink's writes
// (load_cg).
template <class T, class S, bool ALIGNED, int BM, int THREADS, class Team = lk::BlockTeam>
__device__ void wait_for_shrink(const MultiAdapterParams& p, int row0, int* row_slot) {
    unsigned* counters = reinterpret_cast<unsigned*>(p.counters);
    LK_SHARED(int, bad_table, [1]);
    shrink_work<T, S, ALIGNED, true>(p);
    // The team's warps are done with the items they claimed: what thread 0
    // waits for is held by other blocks' running warps (the host runtime,
    // which runs blocks one at a time, requires it; a GPU loses nothing).
    Team::sync();
    if (Team::tid() == 0) {
        lk::wait_counter_at_least(counters + ITEMS_DONE, shrink_items<S>(p));
        bad_table[0] = *reinterpret_cast<volatile unsigned*>(counters + BAD_TABLE) != 0;
    }
    Team::sync();  // bad_table is set
    const bool base_only = bad_table[0];
    for (int i = Team::tid(); i < BM; i += THREADS)
        row_slot[i] = row0 + i < p.m && !base_only ? token_slot(p, row0 + i) : -1;
    Team::sync();
}

// A step's expand tiles staged 16 bytes at a time (expand_rows). A load
// whose value is used in the same loop iteration costs the thread an L2 round
// trip per element (the element-by-element loops below: 16 round trips a
// thread per 64-rank step of a 32-column decode tile, 64 for a warp that
// expands its own 16 rows); here each thread issues STAGE_BATCH 16-byte
// loads before it uses any. Needs rows of b and t whose 16-rank groups start
// on 16-byte boundaries (vector_staging). The same values and flags as the
// element loops, so the same bits.
constexpr int STAGE_BATCH = 4;

__device__ __forceinline__ bool vector_staging(const MultiAdapterParams& p) {
    return p.max_rank % 8 == 0 && p.b_pool % 16 == 0 && p.t % 16 == 0;
}

// Item i of `items`, this thread's share (every THREADS-th from tid): all
// of a batch's load(i) are issued before any store(i, raw) uses one.
template <class Team, int THREADS, class Load, class Store>
__device__ __forceinline__ void staged(int items, Load load, Store store) {
    for (int first = Team::tid(); first < items; first += THREADS * STAGE_BATCH) {
        uint4 raw[STAGE_BATCH];
#pragma unroll
        for (int u = 0; u < STAGE_BATCH; ++u) {
            const int i = first + u * THREADS;
            raw[u] = i < items ? load(i) : uint4{0u, 0u, 0u, 0u};
        }
#pragma unroll
        for (int u = 0; u < STAGE_BATCH; ++u) {
            const int i = first + u * THREADS;
            if (i < items) store(i, raw[u]);
        }
    }
}

// v = scale * t of each row's adapter, 4 ranks a load, split into the
// expand tiles (store_split); rows of other adapters and ranks past an
// adapter's are 0 (t holds no values there).
template <class T, class E>
__device__ void stage_values_16B(const MultiAdapterParams& p, const lk::ExpandTiles<T, E>& e,
                                 const lk::ExpandGuard<E>& guard, const lk::PackedSteps<typename E::Team>& steps,
                                 const int* row_slot, int row0, int groups) {
    const int per_row = 4 * groups;  // an item: 4 ranks of one row
    // Whether item i's ranks are its row's adapter's (s, from rank j).
    auto mine = [&](int i, int& s, int& j) {
        return steps.at(i % per_row * 4, s, j) && row_slot[i / per_row] == s;
    };
    auto load = [&](int i) {
        int s, j;
        if (!mine(i, s, j)) return uint4{0u, 0u, 0u, 0u};
        return lk::load_cg(reinterpret_cast<const uint4*>(p.t) + ((size_t)(row0 + i / per_row) * p.max_rank + j) / 4);
    };
    auto store = [&](int i, const uint4& raw) {
        const int row = i / per_row, col = i % per_row * 4;
        int s, j;
        const bool own = mine(i, s, j);
        const float scale = own ? scale_of(p, s) : 0.f;
        const int live = own ? steps.rank_at(col) - j : 0;  // of the 4
        const uint32_t bits[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int c = 0; c < 4; ++c)
            lk::store_split(e, guard, row, col + c, c < live ? scale * __uint_as_float(bits[c]) : 0.f);
    };
    staged<typename E::Team, E::THREADS>(E::BM * per_row, load, store);
}

// b[s][col0 + row, j] of the adapter of each rank column, 8 ranks a load,
// into the weight tile (finite_weight); rows past n and ranks past an
// adapter's are 0.
template <class T, class E>
__device__ void stage_weights_16B(const MultiAdapterParams& p, const lk::ExpandTiles<T, E>& e,
                                  const lk::ExpandGuard<E>& guard, const lk::PackedSteps<typename E::Team>& steps,
                                  int col0, int groups) {
    const int per_row = 2 * groups;  // an item: 8 ranks of one column of y
    auto load = [&](int i) {
        const int row = i / per_row;
        int s, j;
        if (!steps.at(i % per_row * 8, s, j) || col0 + row >= p.n) return uint4{0u, 0u, 0u, 0u};
        return *(reinterpret_cast<const uint4*>(p.b_pool) + (((size_t)s * p.n + col0 + row) * p.max_rank + j) * sizeof(T) / 16);
    };
    auto store = [&](int i, const uint4& raw) {
        const int row = i / per_row, col = i % per_row * 8;
        int s, j;
        const int live = steps.at(col, s, j) ? steps.rank_at(col) - j : 0;  // of the 8
        T w[8];
        memcpy(w, &raw, sizeof(w));
#pragma unroll
        for (int c = 0; c < 8; ++c) w[c] = c < live ? lk::finite_weight(w[c], guard) : lk::from_f32<T>(0.f);
        uint32_t packed[4];
        memcpy(packed, w, sizeof(packed));
        lk::store16(e.ws + row * E::LDT + col, packed);
    };
    staged<typename E::Team, E::THREADS>(E::BN * per_row, load, store);
}

// The expand of E's team (the block, or one warp of a 64-row tile): rows
// row0 .. row0 + E::BM - 1 of y (row_slot[E::BM]: their slots, after
// wait_for_shrink) by column tile col0, its adapters packed into steps of
// RC ranks (lk::PackedSteps). Rows of other adapters and padding ranks are
// exact zeros. smem: the team's expand tiles; distinct (E::BM + 1 ints) and
// step_state its scratch; guard constructed before the k-loop.
template <class T, class E>
__device__ void expand_rows(const MultiAdapterParams& p, T* smem, const int* row_slot, int* distinct,
                            int* step_state, lk::ExpandGuard<E>& guard, int row0, int col0,
                            lk::Accumulators<E>& r) {
    using Team = typename E::Team;
    const T* b_pool = reinterpret_cast<const T*>(p.b_pool);
    const float* t = reinterpret_cast<const float*>(p.t);
    lk::collect_distinct<E::BM, Team>(row_slot, distinct);
    lk::ExpandTiles<T, E> e(smem);
    const lk::PackedSteps<Team> steps(step_state);
    for (int groups; (groups = steps.next(distinct, [&](int s) { return rank_of(p, s); })) > 0;) {
        const int rp = 16 * groups;
        auto values = [&](auto&& f) {
            for (int i = Team::tid(); i < E::BM * rp; i += E::THREADS) {
                const int row = i / rp, col = i % rp;
                int s, j;
                float v = 0.f;
                if (steps.at(col, s, j) && row_slot[row] == s)
                    v = scale_of(p, s) * lk::load_cg(t + (size_t)(row0 + row) * p.max_rank + j);
                f(row, col, v);
            }
        };
        // b[s][col0 + col, j] of the adapter of rank column c, for every row:
        // lk::expand adds a product with a non-finite factor only where v or
        // the weight is not finite, and the rows of other adapters hold v = 0
        // with finite weights (a pool holds none other: section 10 of
        // docs/DESIGN.md; the uniform mode's one adapter is every row's).
        auto weight = [&](int, int col, int c) {
            int s, j;
            return steps.at(c, s, j) && col0 + col < p.n
                ? lk::to_f32(b_pool[((size_t)s * p.n + col0 + col) * p.max_rank + j]) : 0.f;
        };
        guard.next();
        if (vector_staging(p)) {
            stage_values_16B<T, E>(p, e, guard, steps, row_slot, row0, groups);
            stage_weights_16B<T, E>(p, e, guard, steps, col0, groups);
        } else {
            values([&](int row, int col, float v) { lk::store_split(e, guard, row, col, v); });
            for (int i = Team::tid(); i < E::BN * rp; i += E::THREADS) {
                const int row = i / rp, col = i % rp, gn = col0 + row;
                int s, j;
                const bool live = steps.at(col, s, j) && gn < p.n;
                const T v = live ? b_pool[((size_t)s * p.n + gn) * p.max_rank + j] : lk::from_f32<T>(0.f);
                e.ws[row * E::LDT + col] = lk::finite_weight(v, guard);
            }
        }
        lk::expand(e, guard, rp, rp, values, weight, r);
    }
}

}  // namespace
}  // namespace multi_adapter
}  // namespace lk
