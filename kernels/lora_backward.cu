// Adapter backward for a pool of adapters (a single adapter is a pool of one
// slot), BackwardParams in lk_params.h. f32 accumulation; the base weight
// stays frozen. Launch order (src/ops/lora_backward.rs):
//   0. lk_backward_first_tokens, for a pool larger than the batch only: each
//      slot's first token, so u, db and da run a grid layer per token
//      (block_slot) instead of one per slot
//   1. lk_backward_u:  u = s g b (per token, at its adapter's own rank;
//      tensor cores for f16/bf16: lk_backward_u_mma_*, lk_gather_gemm.cuh,
//      with few tokens over several ranges of n and lk_backward_u_sum;
//      SIMT for f32)
//   2. lk_backward_dx: dx = g w + u a, base and low-rank in one accumulator
//      (tensor cores for f16/bf16: lk_backward_dx_mma_*; SIMT for f32)
//   3. lk_backward_db / lk_backward_da: the reductions over tokens, split
//      into `splits` token ranges (tensor cores for f16/bf16:
//      lk_backward_{db,da}_mma_*, lk_token_gemm.cuh; SIMT for f32); then
//      lk_backward_reduce (deterministic: fixed order, no float atomics)
//      when splits > 1.
#include "lk_backward.cuh"
#include "lk_gather_gemm.cuh"
#include "lk_token_gemm.cuh"

namespace {

constexpr int THREADS = 256;

using lk::backward::slot_rank;
using lk::backward::slot_scale;
using lk::backward::token_slot;

// The slot a block of u, da or db works for, or -1 (the block has nothing
// to do): its layer's (z), or, with a layer per token (p.first_token), token
// z's slot when z is that slot's first token, so every slot the batch uses
// gets one layer of blocks and no other slot any.
__device__ __forceinline__ int block_slot(const BackwardParams& p) {
    if (!p.first_token) return blockIdx.z;
    const int i = blockIdx.z, s = token_slot(p, i);
    return s >= 0 && reinterpret_cast<const int*>(p.first_token)[s] == p.m - i ? s : -1;
}

// first_token[s] = m - (the first token of slot s), 0 for a slot no token
// uses: the largest m - i over its tokens i (the caller zeroed it).
__device__ void backward_first_tokens(const BackwardParams& p) {
    const int64_t i = (int64_t)blockIdx.x * THREADS + threadIdx.x;
    if (i >= p.m) return;
    const int s = token_slot(p, (int)i);
    if (s >= 0) atomicMax(reinterpret_cast<int*>(p.first_token) + s, (int)(p.m - i));
}

// u[i, j] = s * sum_c g[i, c] b[s][c, j]: one block per token; lanes take
// consecutive ranks j (so a warp reads a contiguous piece of a row of b),
// warps take interleaved columns c, and the warps' partial sums are added in
// a fixed order through shared memory.
template <class T>
__device__ void backward_u(const BackwardParams& p) {
    const T* g = reinterpret_cast<const T*>(p.g);
    const T* b_pool = reinterpret_cast<const T*>(p.b_pool);
    float* u = reinterpret_cast<float*>(p.u);
    constexpr int WARPS = THREADS / 32;
    LK_SHARED(float, partial, [WARPS][32]);
    const int i = blockIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int s = token_slot(p, i);
    const int rank = s < 0 ? 0 : slot_rank(p, s);
    const float scale = s < 0 ? 0.f : slot_scale(p, s);
    const T* gi = g + (size_t)i * p.n;
    for (int j0 = 0; j0 < p.max_rank; j0 += 32) {
        const int j = j0 + lane;
        float acc = 0.f;
        if (j < rank) {
            const T* bj = b_pool + (size_t)s * p.n * p.max_rank + j;
            for (int c = warp; c < p.n; c += WARPS) acc += lk::to_f32(gi[c]) * lk::to_f32(bj[(size_t)c * p.max_rank]);  // sass-loop: u
        }
        partial[warp][lane] = acc;
        __syncthreads();
        if (threadIdx.x < 32 && j0 + lane < p.max_rank) {
            float v = 0.f;
            for (int w = 0; w < WARPS; ++w) v += partial[w][lane];
            u[(size_t)i * p.max_rank + j0 + lane] = scale * v;  // 0 past the rank
        }
        __syncthreads();
    }
}

// dx[i, q] = sum_c g[i, c] w[c, q] + sum_j u[i, j] a[s_i][j, q], a 32 x 64 tile per block.
template <class T>
__device__ void backward_dx(const BackwardParams& p) {
    constexpr int BM = 32, BN = 64, BC = 32, TM = 2, TN = 4;
    const T* g = reinterpret_cast<const T*>(p.g);
    const T* w = reinterpret_cast<const T*>(p.w);
    const T* a_pool = reinterpret_cast<const T*>(p.a_pool);
    const float* u = reinterpret_cast<const float*>(p.u);
    T* dx = reinterpret_cast<T*>(p.dx);
    LK_SHARED(float, gs, [BM][BC + 1]);
    LK_SHARED(float, ws, [BC][BN]);
    LK_SHARED(int, row_slot, [BM]);
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
    float acc[TM][TN];
    for (int i = 0; i < TM; ++i)
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
    if (tid < BM) row_slot[tid] = row0 + tid < p.m ? token_slot(p, row0 + tid) : -1;
    for (int c0 = 0; c0 < p.n; c0 += BC) {  // sass-loop: dx_simt
        for (int e = tid; e < BM * BC; e += THREADS) {
            int r = e / BC, c = e % BC;
            gs[r][c] = (row0 + r < p.m && c0 + c < p.n) ? lk::to_f32(g[(size_t)(row0 + r) * p.n + c0 + c]) : 0.f;
        }
        for (int e = tid; e < BC * BN; e += THREADS) {
            int c = e / BN, q = e % BN;  // consecutive threads read consecutive q: coalesced
            ws[c][q] = (c0 + c < p.n && col0 + q < p.k) ? lk::to_f32(w[(size_t)(c0 + c) * p.k + col0 + q]) : 0.f;
        }
        __syncthreads();
        for (int c = 0; c < BC; ++c)
            for (int i = 0; i < TM; ++i)
                for (int j = 0; j < TN; ++j) acc[i][j] += gs[ty * TM + i][c] * ws[c][tx + 16 * j];
        __syncthreads();
    }
    for (int i = 0; i < TM; ++i) {
        int r = ty * TM + i, s = row_slot[r];
        if (s < 0) continue;
        const float* ui = u + (size_t)(row0 + r) * p.max_rank;
        const T* as = a_pool + (size_t)s * p.max_rank * p.k;
        for (int j = 0; j < slot_rank(p, s); ++j)  // a token costs its own adapter's rank
            for (int jj = 0; jj < TN; ++jj) {
                int q = col0 + tx + 16 * jj;
                if (q < p.k) acc[i][jj] += ui[j] * lk::to_f32(as[(size_t)j * p.k + q]);
            }
    }
    for (int i = 0; i < TM; ++i) {
        int r = row0 + ty * TM + i;
        if (r >= p.m) continue;
        for (int j = 0; j < TN; ++j) {
            int q = col0 + tx + 16 * j;
            if (q >= p.k) continue;
            size_t idx = (size_t)r * p.k + q;
            float v = acc[i][j];
            if (p.accumulate) v += lk::to_f32(dx[idx]);
            dx[idx] = lk::from_f32<T>(v);
        }
    }
}

// dx = g w + u a on tensor cores: a BM x BN tile of dx per block, the base
// product over n as a k-major GEMM (lk_tile_gemm.cuh), then u a as extra
// k-steps over each distinct adapter's ranks among the block's rows (their a
// tiles prefetched into L2 during the k-loop; u as a
// hi + lo pair, like t in the forward, with lk::expand's range scaling and
// exact non-finite products), all in one accumulator. In the 64-row decode
// tiles each warp expands its own 16 rows (dx_expand_rows).
template <class T, class C, bool ALIGNED>
__device__ void backward_dx_mma(const BackwardParams& p) {
    // Who expands: the block, or each warp its own rows (teams of E).
    using E = lk::ExpandTeam<C>;
    constexpr int TEAMS = C::THREADS / E::THREADS;
    static_assert(TEAMS * lk::expand_elems<E, true>() <= lk::smem_elems_bt<C>(), "the teams' expand tiles fit");
    LK_DYNAMIC_SHARED(T, smem);
    LK_SHARED(int, row_slot, [C::BM]);
    LK_SHARED(int, distinct, [TEAMS * (E::BM + 1)]);  // per team: distinct[0] = count
    LK_SHARED(int, guard_state, [TEAMS * (E::BM + 2)]);
    const int team = lk::expand_team<C>();
    const T* a_pool = reinterpret_cast<const T*>(p.a_pool);
    int tm, tn;
    lk::grouped_tile(tm, tn);
    const int row0 = tm * C::BM, col0 = tn * C::BN;

    lk::ExpandGuard<E> guard(guard_state + team * (E::BM + 2));
    lk::Accumulators<C> r;
    lk::zero<C>(r.acc);
    // Once the first k-tiles are on their way: the rows' adapters, and their
    // a tiles (rank rows x this block's columns) into L2 for the expand, a run
    // of rows with the same adapter asking once.
    auto prefetch_a = [&] {
        for (int i = threadIdx.x; i < C::BM; i += C::THREADS)
            row_slot[i] = row0 + i < p.m ? token_slot(p, row0 + i) : -1;
        __syncthreads();
        const int span = lk::min_int(C::BN, p.k - col0);
        for (int e = threadIdx.x; e < C::BM * p.max_rank; e += C::THREADS) {
            const int i = e / p.max_rank, j = e % p.max_rank, s = row_slot[i];
            if (s < 0 || (i > 0 && row_slot[i - 1] == s) || j >= slot_rank(p, s)) continue;
            lk::prefetch_span(a_pool + ((size_t)s * p.max_rank + j) * p.k + col0, span);
        }
    };
    // dx[m, k] = g[m, n] w[n, k]: the reduction runs over n.
    lk::mainloop_bt<T, C, ALIGNED>(smem, reinterpret_cast<const T*>(p.g), reinterpret_cast<const T*>(p.w), p.m, p.k,
                                   p.n, row0, col0, r, prefetch_a);
    // The block's pipeline is drained and row_slot written (mainloop_bt
    // ends with a barrier).
    if constexpr (TEAMS == 1) {
        lk::backward::dx_expand_rows<T, E>(p, smem, row_slot, distinct, guard, row0, col0, r);
    } else {
        const int rows = team * E::BM;  // the warp's first row in the tile
        lk::with_warp_accumulators(r, [&](lk::Accumulators<E>& acc) {
            lk::backward::dx_expand_rows<T, E>(p, smem + team * lk::expand_elems<E, true>(), row_slot + rows,
                                 distinct + team * (E::BM + 1), guard, row0 + rows, col0, acc);
        });
    }
    lk::store_y<T, C>(reinterpret_cast<T*>(p.dx), p.m, p.k, row0, col0, p.accumulate ? 1.f : 0.f, r);
}

// The end of the token range starting at i0 (64-bit: i0 + tokens_per_split
// may pass 2^31 - 1 when m is close to it).
__device__ __forceinline__ int range_end(const BackwardParams& p, int i0) {
    const int64_t end = (int64_t)i0 + p.tokens_per_split;
    return end < p.m ? (int)end : p.m;
}

// Where a block's token-range results go: straight into the gradient (one
// range: written, or added in accumulate mode; several ranges: atomics into
// a gradient the caller zeroed unless accumulating), or into this range's
// partials for lk_backward_reduce. Decided once per block.
struct Emitter {
    float* dst;
    bool partial, atomic, add;
    __device__ Emitter(const BackwardParams& p, float* grad, size_t len)
        : dst(p.splits > 1 && p.deterministic ? reinterpret_cast<float*>(p.partials) + (size_t)blockIdx.y * len : grad),
          partial(p.splits > 1 && p.deterministic),
          atomic(p.splits > 1 && !p.deterministic),
          add(p.splits == 1 && p.accumulate) {}
    __device__ __forceinline__ void put(size_t idx, float v) const {
        if (atomic)
            atomicAdd(dst + idx, v);
        else
            dst[idx] = add ? dst[idx] + v : v;
    }
};

// What is learned of a gradient's values as they are finished
// (BackwardParams::grad_stats): the sum of squares (f64: no overflow for any
// f32) and the largest magnitude, Inf once a value is NaN or Inf.
struct TileStats {
    double sq = 0.0;
    float max = 0.f;
    __device__ __forceinline__ void add(float v) {
        if (isfinite(v)) {
            sq += (double)v * v;
            max = fmaxf(max, fabsf(v));
        } else {
            max = INFINITY;
        }
    }
};

// The block's statistics combined in a fixed order (shuffles, then the warps
// in order: the same bits run to run) into record `at` of p.grad_stats.
// Every thread of the block calls it.
__device__ void write_tile_stats(const BackwardParams& p, size_t at, TileStats st) {
    LK_SHARED(double, warp_sq, [32]);
    LK_SHARED(float, warp_max, [32]);
    for (int off = 16; off > 0; off /= 2) {
        st.sq += __shfl_xor_sync(0xFFFFFFFFu, st.sq, off);
        st.max = fmaxf(st.max, __shfl_xor_sync(0xFFFFFFFFu, st.max, off));
    }
    if (threadIdx.x % 32 == 0) {
        warp_sq[threadIdx.x / 32] = st.sq;
        warp_max[threadIdx.x / 32] = st.max;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double sq = 0.0;
        float max = 0.f;
        for (int w = 0; w < (int)blockDim.x / 32; ++w) {
            sq += warp_sq[w];
            max = fmaxf(max, warp_max[w]);
        }
        double* out = reinterpret_cast<double*>(p.grad_stats) + 2 * at;
        out[0] = sq;
        out[1] = max;
    }
}

// Calls f(idx, j) for the entries of ranks j < rows of column tile x of slot
// s's da or db (DB), idx the pool-layout index, the block's threads taking
// them in a fixed order.
template <class F>
__device__ void each_tile_entry(const BackwardParams& p, bool db, int s, int x, int rows, F&& f) {
    const int ncols = db ? p.n : p.k, c0 = x * p.tile_cols;
    const int per = ncols - c0 < p.tile_cols ? ncols - c0 : p.tile_cols;
    const int64_t total = (int64_t)rows * per;
    for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
        if (db) {  // rows of n, the ranks contiguous in each
            const int c = c0 + (int)(e / rows), j = (int)(e % rows);
            f(((size_t)s * p.n + c) * p.max_rank + j, j);
        } else {  // rank rows, the tile's columns contiguous in each
            const int j = (int)(e / per), q = c0 + (int)(e % per);
            f(((size_t)s * p.max_rank + j) * p.k + q, j);
        }
    }
}

// After a block's puts into its tile (its slot, column tile blockIdx.x) of da
// or db (DB): the tile's statistics, if wanted, read back from L2 where the
// block just wrote them: by the block itself with one token range, by the
// last range's block to finish with atomics; partials leave them to
// lk_backward_reduce. (Summed in the epilogue instead, their registers spill
// the f16 kernels, which sit at the 168-register cap.) Every thread of the
// block calls it.
__device__ void finish_tile(const BackwardParams& p, bool db, const Emitter& out) {
    if (!p.grad_stats || out.partial) return;
    // Found again, not passed in: held through a kernel's passes it took a register.
    const int s = block_slot(p);
    const size_t at = (size_t)s * gridDim.x + blockIdx.x;
    LK_SHARED(int, is_last, [1]);
    if (out.atomic) __threadfence();  // this block's atomics land before the count that announces them
    __syncthreads();                  // one range: the block's writes are visible to all its threads
    if (out.atomic) {
        // The host zeroed the counters before the launch.
        if (threadIdx.x == 0)
            is_last[0] = atomicAdd(reinterpret_cast<unsigned*>(p.tile_counters) + at, 1u) == (unsigned)p.splits - 1;
        __syncthreads();
        if (!is_last[0]) return;
        __threadfence();  // every other range's atomics are in before these reads
    }
    TileStats stats;
    each_tile_entry(p, db, s, blockIdx.x, slot_rank(p, s), [&](size_t idx, int) { stats.add(lk::load_cg(out.dst + idx)); });
    write_tile_stats(p, at, stats);
}

// The tokens i in [w0, w1) with token_slots[i] == s, in token order, into
// list; returns how many (the same in every thread). Every thread calls it;
// it ends with a barrier.
__device__ int collect_tokens(const BackwardParams& p, int s, int64_t w0, int64_t w1, int* list, int* warp_counts) {
    const int* ids = reinterpret_cast<const int*>(p.token_slots);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int total = 0;
    for (int64_t base = w0; base < w1; base += lk::tok::THREADS) {
        const int64_t i = base + threadIdx.x;
        const bool match = i < w1 && ids[i] == s;
        const unsigned ballot = __ballot_sync(0xFFFFFFFFu, match);
        if (lane == 0) warp_counts[warp] = __popc(ballot);
        __syncthreads();
        int offset = total;
        for (int w = 0; w < lk::tok::WARPS; ++w) {
            if (w < warp) offset += warp_counts[w];
            total += warp_counts[w];
        }
        if (match) list[offset + __popc(ballot & ((1u << lane) - 1u))] = (int)i;
        __syncthreads();  // before warp_counts is written again
    }
    return total;
}

// Calls f(count, token_at) for the tokens of [i0, i1) that use slot s, in
// token order, token_at(pos) the token at list position pos: all of them at
// once for a single adapter, WINDOW of the range at a time for a pool (list
// and warp_counts: the block's shared arrays for collect_tokens).
template <class F>
__device__ void each_token_window(const BackwardParams& p, int s, int i0, int i1, int* list, int* warp_counts, F&& f) {
    if (!p.token_slots) {
        f(i1 - i0, [&](int pos) { return i0 + pos; });
        return;
    }
    for (int64_t w0 = i0; w0 < i1; w0 += lk::tok::WINDOW) {
        const int64_t w1 = i1 - w0 < lk::tok::WINDOW ? i1 : w0 + lk::tok::WINDOW;
        const int count = collect_tokens(p, s, w0, w1, list, warp_counts);
        f(count, [&](int pos) { return list[pos]; });
    }
}

// sum_c g[i, c] b[s][c, j] on tensor cores (lk_gather_gemm.cuh), into the
// partial of the block's range of columns c (grid x), which
// lk_backward_u_sum scales and adds up in range order into u: a block takes
// the tokens of its token range (y) that use its slot (z), 32 at a time,
// each tile one pass over its columns per 64-rank chunk. Only the columns
// below each token's rank are written, and only for tokens that train a
// slot: dx and da never read the rest. Several ranges of n are for few
// tokens (decode), which would leave one block streaming all of b with a
// single pipeline in flight; there is one range otherwise.
template <class T, bool ALIGNED>
__device__ void backward_u_mma(const BackwardParams& p) {
    namespace ga = lk::gather;
    static_assert(ga::THREADS == lk::tok::THREADS, "collect_tokens counts the block's warps");
    LK_DYNAMIC_SHARED(T, smem);
    LK_SHARED(int, list, [lk::tok::WINDOW]);
    LK_SHARED(int, warp_counts, [lk::tok::WARPS]);
    const int s = block_slot(p);
    if (s < 0) return;
    const int rank = slot_rank(p, s);
    if (rank <= 0) return;  // an empty slot: no token trains it
    const T* g = reinterpret_cast<const T*>(p.g);
    const T* b = reinterpret_cast<const T*>(p.b_pool) + (size_t)s * p.n * p.max_rank;
    const int i0 = blockIdx.y * p.tokens_per_split, i1 = range_end(p, i0);
    // This block's columns [c0, c1) of n: whole 64-column stages, the last range shorter.
    const int per = ((p.n + (int)gridDim.x - 1) / (int)gridDim.x + ga::BK - 1) / ga::BK * ga::BK;
    const int c0 = (int)blockIdx.x * per < p.n ? (int)blockIdx.x * per : p.n;
    const int c1 = p.n - c0 < per ? p.n : c0 + per;
    float* out = reinterpret_cast<float*>(p.partials) + (size_t)blockIdx.x * p.m * p.max_rank;
    each_token_window(p, s, i0, i1, list, warp_counts, [&](int count, auto token_at) {
        for (int first = 0; first < count; first += ga::BM) {
            const int rows = count - first < ga::BM ? count - first : ga::BM;
            auto at = [&](int pos) { return token_at(first + pos); };
            for (int r0 = 0; r0 < rank; r0 += ga::RANKS) {
                const int rc = rank - r0 < ga::RANKS ? rank - r0 : ga::RANKS;
                const int rp = (rc + 15) / 16 * 16;
                ga::Tile acc;
                // An empty range (c0 == c1) writes zeros: the sum reads every range.
                ga::tile<T, ALIGNED>(smem, g, p.n, c0, c1, b, p.max_rank, r0, rp, rows, at, acc);
                ga::reduce(smem, acc, rows, rp, [&](int pos, int j, float sum) {
                    if (j < rc) out[(size_t)at(pos) * p.max_rank + r0 + j] = sum;
                });
            }
        }
    });
}

// db (DB) or da on tensor cores, with lk_token_gemm.cuh:
//   db[s][c, j] = s * sum_i t[i, j] g[i, c]      da[s][j, q] = sum_i u[i, j] x[i, q]
// over the tokens i of the block's range (y) that train its slot (z), 128
// columns c or q per block (x), each 32-rank chunk of the slot's rank one
// pass over those tokens. A pool block finds its tokens a window at a time.
template <class T, bool DB, bool ALIGNED>
__device__ void backward_reduce_mma(const BackwardParams& p) {
    namespace tok = lk::tok;
    LK_DYNAMIC_SHARED(unsigned char, smem);
    LK_SHARED(int, list, [tok::WINDOW]);
    LK_SHARED(int, warp_counts, [tok::WARPS]);
    LK_SHARED(int, flagged, [1]);  // the last rank chunk (r0 + 1) that met a non-finite value
    const int s = block_slot(p), col0 = blockIdx.x * tok::BN;
    if (s < 0) return;
    const int ncols = DB ? p.n : p.k;
    const float* L = reinterpret_cast<const float*>(DB ? p.t : p.u);
    const T* big = reinterpret_cast<const T*>(DB ? p.g : p.x);
    const int rank = slot_rank(p, s);
    const float scale = DB ? slot_scale(p, s) : 1.f;
    const int i0 = blockIdx.y * p.tokens_per_split, i1 = range_end(p, i0);
    if (threadIdx.x == 0) flagged[0] = 0;  // published by the first pass's barriers
    // Made where it is used, from the constant parameters: its pointer held
    // through the passes would take registers the f16 kernels lack.
    auto emitter = [&] { return Emitter(p, reinterpret_cast<float*>(DB ? p.db : p.da), (size_t)p.slots * p.max_rank * ncols); };

    auto each_window = [&](auto&& f) { each_token_window(p, s, i0, i1, list, warp_counts, f); };
    for (int r0 = 0; r0 < p.max_rank; r0 += tok::RANKS) {
        const int rc = rank - r0 >= tok::RANKS ? tok::RANKS : (rank > r0 ? rank - r0 : 0);
        const int rp = (rc + 15) / 16 * 16;
        tok::Acc acc;
        acc.clear();
        if (rp > 0) {
            bool bad = false;
            each_window([&](int count, auto token_at) {
                bad |= tok::pass<T, ALIGNED>(smem, L, p.max_rank, r0, rc, rp, big, ncols, col0, count, token_at, acc);
            });
            if (bad || tok::any_nonfinite(acc)) flagged[0] = r0 + 1;
            __syncthreads();
            if (flagged[0] == r0 + 1) {  // the whole block takes the slow path
                acc.clear();
                each_window([&](int count, auto token_at) {
                    tok::recompute(L, p.max_rank, r0, rc, big, ncols, col0, count, token_at, acc);
                });
            }
        }
        const int rows = p.max_rank - r0 < tok::RANKS ? p.max_rank - r0 : tok::RANKS;
        const Emitter out = emitter();
#pragma unroll
        for (int i = 0; i < tok::RT; ++i)
#pragma unroll
            for (int j = 0; j < tok::NT; ++j)
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const int row = tok::acc_row(i, q), col = col0 + tok::acc_col(j, q);
                    if (row >= rows || col >= ncols) continue;
                    const int jr = r0 + row;
                    const float v = jr < rank ? scale * acc.total(i, j, q) : 0.f;  // 0 past the slot's rank
                    const size_t idx = DB ? ((size_t)s * p.n + col) * p.max_rank + jr
                                          : ((size_t)s * p.max_rank + jr) * p.k + col;
                    out.put(idx, v);
                }
    }
    finish_tile(p, DB, emitter());
}

// db[s][c, j] = s * sum_{i in range, slot i = s} g[i, c] t[i, j]: 64 columns
// c per block, the ranks in chunks of 64 (4 thread groups x 16).
template <class T>
__device__ void backward_db(const BackwardParams& p) {
    const T* g = reinterpret_cast<const T*>(p.g);
    const float* t = reinterpret_cast<const float*>(p.t);
    const int s = block_slot(p), c = blockIdx.x * 64 + threadIdx.x % 64, jg = threadIdx.x / 64;
    if (s < 0) return;
    const int rank = slot_rank(p, s);
    const float scale = slot_scale(p, s);
    const int i0 = blockIdx.y * p.tokens_per_split, i1 = range_end(p, i0);
    const Emitter out(p, reinterpret_cast<float*>(p.db), (size_t)p.slots * p.n * p.max_rank);
    // Threads past n stay for finish_tile's barriers.
    for (int j0 = 0; j0 < p.max_rank && c < p.n; j0 += 64) {
        float acc[16];
        for (int jj = 0; jj < 16; ++jj) acc[jj] = 0.f;
        for (int i = i0; i < i1; ++i) {  // sass-loop: db
            if (token_slot(p, i) != s) continue;
            float gv = lk::to_f32(g[(size_t)i * p.n + c]);
            for (int jj = 0; jj < 16; ++jj) {
                int j = j0 + jg + 4 * jj;
                if (j < rank) acc[jj] += gv * t[(size_t)i * p.max_rank + j];
            }
        }
        for (int jj = 0; jj < 16; ++jj) {
            int j = j0 + jg + 4 * jj;
            if (j < p.max_rank) out.put(((size_t)s * p.n + c) * p.max_rank + j, j < rank ? scale * acc[jj] : 0.f);
        }
    }
    finish_tile(p, true, out);
}

// da[s][j, q] = sum_{i in range, slot i = s} u[i, j] x[i, q]: a column q per
// thread, the ranks in chunks of 32.
template <class T>
__device__ void backward_da(const BackwardParams& p) {
    const T* x = reinterpret_cast<const T*>(p.x);
    const float* u = reinterpret_cast<const float*>(p.u);
    const int s = block_slot(p), q = blockIdx.x * THREADS + threadIdx.x;
    if (s < 0) return;
    const int rank = slot_rank(p, s);
    const int i0 = blockIdx.y * p.tokens_per_split, i1 = range_end(p, i0);
    const Emitter out(p, reinterpret_cast<float*>(p.da), (size_t)p.slots * p.max_rank * p.k);
    // Threads past k stay for finish_tile's barriers.
    for (int j0 = 0; j0 < p.max_rank && q < p.k; j0 += 32) {
        float acc[32];
        for (int jj = 0; jj < 32; ++jj) acc[jj] = 0.f;
        for (int i = i0; i < i1; ++i) {  // sass-loop: da
            if (token_slot(p, i) != s) continue;
            float xv = lk::to_f32(x[(size_t)i * p.k + q]);
            for (int jj = 0; jj < 32; ++jj)
                if (j0 + jj < rank) acc[jj] += u[(size_t)i * p.max_rank + j0 + jj] * xv;
        }
        for (int jj = 0; jj < 32 && j0 + jj < p.max_rank; ++jj)
            out.put(((size_t)s * p.max_rank + j0 + jj) * p.k + q, acc[jj]);
    }
    finish_tile(p, false, out);
}

// out (+)= the sum over splits of the partials, splits in order, a block per
// (slot, column tile) of da or db (p.reduce_db), and the tile's statistics
// when wanted.
__device__ void backward_reduce(const BackwardParams& p) {
    float* out = reinterpret_cast<float*>(p.reduce_out);
    const float* partials = reinterpret_cast<const float*>(p.partials);
    const int tiles = ((p.reduce_db ? p.n : p.k) + p.tile_cols - 1) / p.tile_cols;
    const int s = blockIdx.x / tiles, x = blockIdx.x % tiles, rank = slot_rank(p, s);
    TileStats stats;
    each_tile_entry(p, p.reduce_db, s, x, p.max_rank, [&](size_t e, int j) {
        float v = p.accumulate ? out[e] : 0.f;
        for (int z = 0; z < p.splits; ++z) v += partials[(size_t)z * p.reduce_len + e];
        out[e] = v;
        if (j < rank) stats.add(v);
    });
    if (p.grad_stats) write_tile_stats(p, blockIdx.x, stats);
}

// u[i, j] = s * (the sum over the `splits` column ranges, in order, of
// their partials) for each token i that trains a slot and j below its rank:
// the entries dx and da read (lk_backward_u_mma wrote those partials; with
// one range this only scales them).
__device__ void backward_u_sum(const BackwardParams& p) {
    const size_t len = (size_t)p.m * p.max_rank;
    const size_t e = (size_t)blockIdx.x * THREADS + threadIdx.x;
    if (e >= len) return;
    const int i = (int)(e / p.max_rank), j = (int)(e % p.max_rank);
    const int s = token_slot(p, i);
    if (s < 0 || j >= slot_rank(p, s)) return;
    const float* partials = reinterpret_cast<const float*>(p.partials);
    float sum = 0.f;
    for (int r = 0; r < p.splits; ++r) sum += partials[(size_t)r * len + e];
    reinterpret_cast<float*>(p.u)[e] = slot_scale(p, s) * sum;
}

}  // namespace

LK_KERNEL(lk_backward_u_sum, BackwardParams, backward_u_sum)
// f32 on SIMT (tensor cores take no f32); f16/bf16 run u and dx on tensor cores below.
LK_KERNEL(lk_backward_u_f32, BackwardParams, backward_u<float>)
LK_KERNEL(lk_backward_dx_f32, BackwardParams, backward_dx<float>)
LK_KERNEL(lk_backward_db_f32, BackwardParams, backward_db<float>)
LK_KERNEL(lk_backward_da_f32, BackwardParams, backward_da<float>)

// __launch_bounds__: three 128-thread blocks per SM, so registers stay at or
// below 168 (at 128, for four, they spill).
#define LK_REDUCE_MMA_KERNEL(name, T, DB, ALIGNED) \
    LK_KERNEL_BOUNDED(name, BackwardParams, (backward_reduce_mma<T, DB, ALIGNED>), 128, 3)
#define LK_BACKWARD_REDUCE_MMA(tname, T)                                           \
    LK_REDUCE_MMA_KERNEL(lk_backward_db_mma_##tname##_aligned, T, true, true)      \
    LK_REDUCE_MMA_KERNEL(lk_backward_db_mma_##tname##_any, T, true, false)         \
    LK_REDUCE_MMA_KERNEL(lk_backward_da_mma_##tname##_aligned, T, false, true)     \
    LK_REDUCE_MMA_KERNEL(lk_backward_da_mma_##tname##_any, T, false, false)
LK_BACKWARD_REDUCE_MMA(f16, __half)
LK_BACKWARD_REDUCE_MMA(bf16, __nv_bfloat16)

// Four 128-thread blocks per SM (54 KiB of shared memory each): registers at
// or below 128.
#define LK_U_MMA_KERNEL(name, T, ALIGNED) \
    LK_KERNEL_BOUNDED(name, BackwardParams, (backward_u_mma<T, ALIGNED>), 128, 4)
LK_U_MMA_KERNEL(lk_backward_u_mma_f16_aligned, __half, true)
LK_U_MMA_KERNEL(lk_backward_u_mma_f16_any, __half, false)
LK_U_MMA_KERNEL(lk_backward_u_mma_bf16_aligned, __nv_bfloat16, true)
LK_U_MMA_KERNEL(lk_backward_u_mma_bf16_any, __nv_bfloat16, false)

#define LK_BACKWARD_DX_MMA(regime, Cfg, tname, T)                                              \
    LK_KERNEL(lk_backward_dx_##regime##_##tname##_aligned, BackwardParams,                  \
              (backward_dx_mma<T, Cfg, true>))                                                \
    LK_KERNEL(lk_backward_dx_##regime##_##tname##_any, BackwardParams, (backward_dx_mma<T, Cfg, false>))
// Up to 16 tokens: one row of blocks, about one per SM; the deep pipeline
// keeps twice the bytes of w in flight (89 KiB: every GPU from sm_80).
LK_BACKWARD_DX_MMA(decode_deep, lk::DecodeDeepTiles, f16, __half)
LK_BACKWARD_DX_MMA(decode_deep, lk::DecodeDeepTiles, bf16, __nv_bfloat16)
// 17 to 64 tokens: one block covers every row, so each column tile of w is
// read once, not once per 16 rows; each warp expands its own 16 rows.
LK_BACKWARD_DX_MMA(decode_wide, lk::DecodeWideTiles, f16, __half)
LK_BACKWARD_DX_MMA(decode_wide, lk::DecodeWideTiles, bf16, __nv_bfloat16)
LK_BACKWARD_DX_MMA(decode_wide_deep, lk::DecodeWideDeepTiles, f16, __half)
LK_BACKWARD_DX_MMA(decode_wide_deep, lk::DecodeWideDeepTiles, bf16, __nv_bfloat16)
LK_BACKWARD_DX_MMA(prefill, lk::PrefillTiles, f16, __half)
LK_BACKWARD_DX_MMA(prefill, lk::PrefillTiles, bf16, __nv_bfloat16)
LK_KERNEL(lk_backward_reduce, BackwardParams, backward_reduce)
LK_KERNEL(lk_backward_first_tokens, BackwardParams, backward_first_tokens)
