// Multi-adapter forward: one launch for a batch in which every token has its
// own adapter (slot of a device pool, mixed ranks) or none, fused with the
// base product (MultiAdapterParams in lk_params.h):
//
//   y[i,:] = x[i,:] w^T + scale[s_i] (x[i,:] a[s_i]^T) b[s_i]^T  (+ beta * y)
//
// The grid has two kinds of block, and the launch shape depends only on m, n,
// k and the pool's shape, never on the ids (CUDA-graph capture stays valid):
// - the first `shrink_blocks` blocks compute t[i, :rank] = x[i,:] a[s_i]^T (f32;
//   units of 8 tokens x one rank row, each adapter's row loaded once per unit
//   and shared by its tokens, a token costing its own rank), then raise
//   counters[0];
// - the other blocks each own a BM x BN tile of y: they run the base product
//   (f16/bf16 on tensor cores, lk_tile_gemm.cuh; f32 on SIMT tiles,
//   lk_simt_tile.cuh, as tensor cores take no f32), then wait for counters[0]
//   (by then long reached: the shrink is a small fraction of the work) and
//   expand, once per distinct adapter among their rows, so tokens of the same
//   adapter share each load of its b tile. The last of them resets the
//   counters to 0.
// An id outside -1..slots-1 never reads outside the pool: it is treated as -1
// and counted (by the shrink blocks, once per token, in counters[3]; the last
// tile block adds the launch's count to *bad_ids).
// The segment table lives on the device and is checked there, without a host
// round trip (CUDA-graph capture stays valid): the shrink blocks check it
// cooperatively (offsets[0] == 0, offsets[segments] == m, non-decreasing) and
// raise counters[2] before their counters[0] increment; tile blocks read the
// flag after their wait and then serve every token as -1 (base model only),
// and the launch counts all m tokens as bad. The t rows the shrink wrote with
// such a table are unspecified (routing by a binary search of a malformed
// table stays inside the table and the pool, but names arbitrary segments).
// The counters make the pool's launches one at a time: use a pool from one stream.
// Counts that can pass 2^31 (shrink units, table entries) are 64-bit.
#include "lk_simt_tile.cuh"
#include "lk_tile_gemm.cuh"

namespace {

// The counters (MultiAdapterParams): 0 between launches.
enum Counter { SHRINK_DONE = 0, TILES_DONE = 1, BAD_TABLE = 2, BAD_IDS = 3 };

// The raw slot id of token i (per-token ids, or a binary search of the
// segments: always a segment in 0..segments-1, even in a malformed table).
__device__ __forceinline__ int raw_slot(const MultiAdapterParams& p, int i) {
    if (p.segments == 0) return reinterpret_cast<const int*>(p.token_slots)[i];
    const int* off = reinterpret_cast<const int*>(p.seg_offsets);
    int lo = 0, hi = p.segments - 1;
    while (lo < hi) {
        int mid = lo + (hi - lo + 1) / 2;  // not (lo + hi + 1) / 2: that passes 2^31 - 1
        if (off[mid] <= i) lo = mid; else hi = mid - 1;
    }
    return reinterpret_cast<const int*>(p.seg_slots)[lo];
}

// The shrink blocks' share of checking the segment table (if any): entry e
// of 0..segments checks offsets[0] == 0 (e = 0), offsets[e - 1] <= offsets[e]
// and offsets[segments] == m (e = segments); a failure raises BAD_TABLE.
// Together these put every offset in 0..m, in order.
__device__ void check_segment_table(const MultiAdapterParams& p, int threads) {
    if (p.segments == 0) return;
    const int* off = reinterpret_cast<const int*>(p.seg_offsets);
    const int64_t stride = (int64_t)p.shrink_blocks * threads;
    for (int64_t e = (int64_t)blockIdx.x * threads + threadIdx.x; e <= p.segments; e += stride) {
        bool ok = e == 0 ? off[0] == 0 : off[e - 1] <= off[e];
        if (e == p.segments) ok = ok && off[e] == p.m;
        if (!ok) atomicExch(reinterpret_cast<unsigned*>(p.counters) + BAD_TABLE, 1u);
    }
}

__device__ __forceinline__ bool out_of_range(const MultiAdapterParams& p, int id) { return id < -1 || id >= p.slots; }

// The slot token i uses, or -1 (no adapter, an empty slot, or a bad id).
__device__ __forceinline__ int token_slot(const MultiAdapterParams& p, int i) {
    int id = raw_slot(p, i);
    if (id < 0 || id >= p.slots) return -1;
    return reinterpret_cast<const int*>(p.slot_rank)[id] > 0 ? id : -1;
}

// Shrink work is split into units (a group of GROUP consecutive tokens, one
// rank row j): a unit loads row j of each distinct adapter among its tokens
// once, in chunks through shared memory, and every token of that adapter
// dots its x row with it, so tokens of one adapter share each load of `a`,
// and a token costs its own rank (rows j >= its rank are skipped).
constexpr int GROUP = 8;
constexpr int KCHUNK = 512;

template <class T, class C, bool ALIGNED>
__device__ void shrink_block(const MultiAdapterParams& p) {
    const T* x = reinterpret_cast<const T*>(p.x);
    const T* a_pool = reinterpret_cast<const T*>(p.a_pool);
    float* t = reinterpret_cast<float*>(p.t);
    LK_SHARED(float, a_row, [KCHUNK]);
    LK_SHARED(int, slot_of, [GROUP]);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    constexpr int WARPS = C::THREADS / 32;
    constexpr int PER_WARP = (GROUP + WARPS - 1) / WARPS;  // tokens each warp dots
    unsigned* counters = reinterpret_cast<unsigned*>(p.counters);
    check_segment_table(p, C::THREADS);
    const int64_t groups = (p.m + GROUP - 1) / GROUP;
    const int64_t units = groups * p.max_rank;  // up to 2^28 * 256
    for (int64_t unit = blockIdx.x; unit < units; unit += p.shrink_blocks) {
        const int i0 = (int)(unit / p.max_rank) * GROUP, j = (int)(unit % p.max_rank);
        __syncthreads();  // slot_of and a_row of the previous unit are no longer read
        if (threadIdx.x < GROUP) {
            int i = i0 + threadIdx.x, s = -1;
            if (i < p.m) {
                if (j == 0 && out_of_range(p, raw_slot(p, i))) atomicAdd(counters + BAD_IDS, 1u);
                s = token_slot(p, i);
                if (s >= 0 && j >= reinterpret_cast<const int*>(p.slot_rank)[s]) s = -1;  // past its rank
            }
            slot_of[threadIdx.x] = s;
        }
        __syncthreads();
        // Each distinct adapter of the group, in token order (the first token
        // of each adapter stands for it).
        for (int lead = 0; lead < GROUP; ++lead) {
            const int s = slot_of[lead];
            bool first = s >= 0;
            for (int e = 0; e < lead && first; ++e) first = slot_of[e] != s;
            if (!first) continue;
            const T* aj = a_pool + ((size_t)s * p.max_rank + j) * p.k;
            float acc[PER_WARP];
            for (int q = 0; q < PER_WARP; ++q) acc[q] = 0.f;
            for (int k0 = 0; k0 < p.k; k0 += KCHUNK) {
                const int len = p.k - k0 < KCHUNK ? p.k - k0 : KCHUNK;
                for (int c = threadIdx.x; c < len; c += C::THREADS) a_row[c] = lk::to_f32(aj[k0 + c]);
                __syncthreads();
                for (int q = 0; q < PER_WARP; ++q) {
                    int g = warp + q * WARPS;  // token i0 + g
                    if (g >= GROUP || slot_of[g] != s) continue;
                    const T* xi = x + (size_t)(i0 + g) * p.k + k0;
                    for (int c = lane; c < len; c += 32) acc[q] += lk::to_f32(xi[c]) * a_row[c];  // sass-loop: shrink
                }
                __syncthreads();
            }
            for (int q = 0; q < PER_WARP; ++q) {
                int g = warp + q * WARPS;
                if (g >= GROUP || slot_of[g] != s) continue;
                float v = acc[q];
                for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
                if (lane == 0) t[(size_t)(i0 + g) * p.max_rank + j] = v;
            }
        }
    }
    __syncthreads();  // every t, table check and bad-id count of this block is done
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(counters + SHRINK_DONE, 1u);
    }
}

// Called by every thread of a tile block after its base product: thread 0
// waits until every shrink block has written its t and checked its part of
// the segment table (SHRINK_DONE), reads whether the table is malformed, and
// the last tile block to get here adds the launch's bad ids to *bad_ids (m
// for a malformed table) and resets the counters for the next launch; then
// row_slot gets the slot of each of the tile's BM rows (-1: none, or every
// row with a malformed table) and distinct the distinct adapters among them
// (distinct[0] = count). Every t read after this (collect_distinct ends with
// a barrier) sees the shrink's writes (load_cg).
template <int BM, int THREADS>
__device__ void wait_and_collect_adapters(const MultiAdapterParams& p, int row0, int* row_slot, int* distinct) {
    unsigned* counters = reinterpret_cast<unsigned*>(p.counters);
    LK_SHARED(int, bad_table, [1]);
    if (threadIdx.x == 0) {
        lk::wait_counter_at_least(counters + SHRINK_DONE, (unsigned)p.shrink_blocks);
        bad_table[0] = *reinterpret_cast<volatile unsigned*>(counters + BAD_TABLE) != 0;
        __threadfence();  // the flag is read before this block counts as done (and it is reset)
        const unsigned tiles = gridDim.x - p.shrink_blocks;
        if (atomicAdd(counters + TILES_DONE, 1u) == tiles - 1) {
            const unsigned bad = bad_table[0] ? (unsigned)p.m : atomicExch(counters + BAD_IDS, 0u);
            atomicAdd(reinterpret_cast<unsigned*>(p.bad_ids), bad);
            for (int c = SHRINK_DONE; c <= BAD_IDS; ++c) atomicExch(counters + c, 0u);
        }
    }
    __syncthreads();  // bad_table is set
    const bool base_only = bad_table[0];
    for (int i = threadIdx.x; i < BM; i += THREADS)
        row_slot[i] = row0 + i < p.m && !base_only ? token_slot(p, row0 + i) : -1;
    lk::collect_distinct<BM>(row_slot, distinct);
}

template <class T, class C, bool ALIGNED>
__device__ void base_block(const MultiAdapterParams& p) {
    const T* b_pool = reinterpret_cast<const T*>(p.b_pool);
    const float* t = reinterpret_cast<const float*>(p.t);
    LK_DYNAMIC_SHARED(T, smem);
    LK_SHARED(int, row_slot, [C::BM]);
    LK_SHARED(int, distinct, [C::BM + 1]);  // distinct[0] = count
    LK_SHARED(int, guard_state, [C::BM + 2]);

    const int tiles_n = (p.n + C::BN - 1) / C::BN;
    const int tile = blockIdx.x - p.shrink_blocks;
    const int row0 = (tile / tiles_n) * C::BM, col0 = (tile % tiles_n) * C::BN;

    lk::ExpandGuard<C> guard(guard_state);
    lk::Accumulators<C> r;
    lk::zero<C>(r.acc);
    lk::mainloop<T, C, ALIGNED>(smem, reinterpret_cast<const T*>(p.x), reinterpret_cast<const T*>(p.w), nullptr,
                                p.m, p.n, p.k, 0, 0, row0, col0, r);

    wait_and_collect_adapters<C::BM, C::THREADS>(p, row0, row_slot, distinct);

    lk::ExpandTiles<T, C> e(smem);
    for (int d = 1; d <= distinct[0]; ++d) {
        const int s = distinct[d];
        const int rank = reinterpret_cast<const int*>(p.slot_rank)[s];
        const float scale = reinterpret_cast<const float*>(p.slot_scale)[s];
        const T* b = b_pool + (size_t)s * p.n * p.max_rank;
        for (int r0 = 0; r0 < rank; r0 += lk::RC) {
            const int rc = rank - r0 < lk::RC ? rank - r0 : lk::RC;
            const int rp = (rc + 15) / 16 * 16;
            // Rows of other adapters and padding ranks are exact zeros.
            auto values = [&](auto&& f) {
                for (int i = threadIdx.x; i < C::BM * rp; i += C::THREADS) {
                    int row = i / rp, col = i % rp;
                    float v = 0.f;
                    if (row_slot[row] == s && col < rc)
                        v = scale * lk::load_cg(t + (size_t)(row0 + row) * p.max_rank + r0 + col);
                    f(row, col, v);
                }
            };
            auto weight = [&](int row, int col, int j) {
                return row_slot[row] == s && col0 + col < p.n
                    ? lk::to_f32(b[(size_t)(col0 + col) * p.max_rank + r0 + j]) : 0.f;
            };
            guard.next();
            values([&](int row, int col, float v) { lk::store_split(e, guard, row, col, v); });
            for (int i = threadIdx.x; i < C::BN * rp; i += C::THREADS) {
                int row = i / rp, col = i % rp, gn = col0 + row;
                T v = (gn < p.n && col < rc) ? b[(size_t)gn * p.max_rank + r0 + col] : lk::from_f32<T>(0.f);
                e.ws[row * C::LDT + col] = lk::finite_weight(v, guard);
            }
            lk::expand(e, guard, rc, rp, values, weight, r);
        }
    }
    lk::store_y<T, C>(reinterpret_cast<T*>(p.y), p.m, p.n, row0, col0, p.beta, r);
}

// The f32 tile block: as base_block, on SIMT tiles. The x and w tiles of
// the base product are reused for scale * t and b in the expand; ranks are
// taken in chunks of the tile width, only as far as each adapter's rank.
template <class T>
__device__ void simt_tile_block(const MultiAdapterParams& p) {
    using C = lk::simt::Tiles;
    const T* b_pool = reinterpret_cast<const T*>(p.b_pool);
    const float* t = reinterpret_cast<const float*>(p.t);
    LK_SHARED(float, lhs, [C::BM * C::LD]);
    LK_SHARED(float, rhs, [C::BN * C::LD]);
    LK_SHARED(int, row_slot, [C::BM]);
    LK_SHARED(int, distinct, [C::BM + 1]);  // distinct[0] = count
    const lk::simt::Smem<C> sm{lhs, rhs};

    const int tiles_n = (p.n + C::BN - 1) / C::BN;
    const int tile = blockIdx.x - p.shrink_blocks;
    const int row0 = (tile / tiles_n) * C::BM, col0 = (tile % tiles_n) * C::BN;

    lk::simt::Acc<C> acc;
    lk::simt::zero(acc);
    lk::simt::base_product<T, C>(sm, reinterpret_cast<const T*>(p.x), reinterpret_cast<const T*>(p.w), p.m, p.n,
                                 p.k, row0, col0, acc);

    wait_and_collect_adapters<C::BM, C::THREADS>(p, row0, row_slot, distinct);

    for (int d = 1; d <= distinct[0]; ++d) {
        const int s = distinct[d];
        const int rank = reinterpret_cast<const int*>(p.slot_rank)[s];
        const float scale = reinterpret_cast<const float*>(p.slot_scale)[s];
        for (int r0 = 0; r0 < rank; r0 += C::BK) {
            const int rc = rank - r0 < C::BK ? rank - r0 : C::BK;
            for (int i = threadIdx.x; i < C::BM * rc; i += C::THREADS) {
                int row = i / rc, col = i % rc;
                // Rows of other adapters are exact zeros: they add nothing.
                lhs[row * C::LD + col] =
                    row_slot[row] == s ? scale * lk::load_cg(t + (size_t)(row0 + row) * p.max_rank + r0 + col) : 0.f;
            }
            for (int i = threadIdx.x; i < C::BN * rc; i += C::THREADS) {
                int row = i / rc, col = i % rc, gn = col0 + row;
                rhs[row * C::LD + col] =
                    gn < p.n ? lk::to_f32(b_pool[((size_t)s * p.n + gn) * p.max_rank + r0 + col]) : 0.f;
            }
            __syncthreads();
            lk::simt::fma_tiles<C>(sm, rc, acc);
            __syncthreads();  // before the next chunk or adapter overwrites the tiles
        }
    }
    lk::simt::store_y<T, C>(reinterpret_cast<T*>(p.y), p.m, p.n, row0, col0, p.beta, acc);
}

template <class T, class C, bool ALIGNED>
__device__ void multi_adapter_forward(const MultiAdapterParams& p) {
    if ((int)blockIdx.x < p.shrink_blocks) shrink_block<T, C, ALIGNED>(p);
    else base_block<T, C, ALIGNED>(p);
}

// f32: shrink blocks of the SIMT tile's block size, then SIMT tile blocks
// (element loads only: the shrink's loads are scalar for every type).
template <class T>
__device__ void multi_adapter_forward_simt(const MultiAdapterParams& p) {
    if ((int)blockIdx.x < p.shrink_blocks) shrink_block<T, lk::simt::Tiles, false>(p);
    else simt_tile_block<T>(p);
}

}  // namespace

// Entry points as in fused_forward_mma.cu: <regime>_<type>_<aligned|any>.
#define LK_MULTI(regime, Cfg, tname, T)                                                                         \
    LK_KERNEL(lk_multi_adapter_##regime##_##tname##_aligned, MultiAdapterParams,                               \
              (multi_adapter_forward<T, Cfg, true>))                                                            \
    LK_KERNEL(lk_multi_adapter_##regime##_##tname##_any, MultiAdapterParams, (multi_adapter_forward<T, Cfg, false>))
LK_MULTI(decode, lk::DecodeTiles, f16, __half)
LK_MULTI(decode, lk::DecodeTiles, bf16, __nv_bfloat16)
LK_MULTI(prefill, lk::PrefillTiles, f16, __half)
LK_MULTI(prefill, lk::PrefillTiles, bf16, __nv_bfloat16)
LK_KERNEL(lk_multi_adapter_simt_f32, MultiAdapterParams, multi_adapter_forward_simt<float>)
