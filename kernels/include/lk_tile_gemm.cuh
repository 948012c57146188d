// Building blocks of the tensor-core kernels (fused_forward_mma.cu,
// multi_adapter_forward.cu): a block owns a BM x BN tile of y = x w^T, its
// warps a WTM x WTN piece each, accumulated with mma.sync m16n8k16 from
// shared-memory tiles fed by a STAGES-deep cp.async pipeline.
#pragma once
#include "lk_mma.cuh"

#include <type_traits>

namespace lk {

constexpr int RC = 64;  // rank handled per pass (shrink rows per stage, expand k-steps)

// The threads that run a tile's code together: the whole block, or one warp
// that expands its own rows of a tile on its own (WarpTiles).
// tid() is unsigned, as threadIdx.x is: the compiler then knows it is not
// negative (int divisions and remainders by 32 cost instructions and
// registers in every kernel).
struct BlockTeam {
    static __device__ __forceinline__ unsigned tid() { return threadIdx.x; }
    static __device__ __forceinline__ void sync() { __syncthreads(); }
};
struct WarpTeam {
    static __device__ __forceinline__ unsigned tid() { return threadIdx.x % 32; }
    static __device__ __forceinline__ void sync() { __syncwarp(); }
};

// A block of WM x WN warps per k slice and KSPLIT k slices: the warps of
// slice ks take the 16-wide steps ks, ks + KSPLIT, ... of every k-tile, and
// after the k-loop their sums go to the slice-0 warp of the same piece of
// the tile (sum_k_slices), which alone runs the expand and stores. More
// slices keep more warps issuing copies and MMAs on a tile too small to
// give each its own piece.
template <int BM_, int BN_, int BK_, int WM_, int WN_, int STAGES_, int KSPLIT_ = 1>
struct TileConfig {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, WM = WM_, WN = WN_, STAGES = STAGES_;
    static constexpr int KSPLIT = KSPLIT_;
    static constexpr int PIECES = WM * WN;  // warps per k slice
    static constexpr int THREADS = 32 * PIECES * KSPLIT;
    static constexpr int WTM = BM / WM, WTN = BN / WN;  // warp tile
    static constexpr int MT = WTM / 16, NT = WTN / 8;   // mma tiles per warp
    static constexpr int TNT = (RC / 8 + WN - 1) / WN;  // t n8-tiles per warp (max)
    static constexpr int LDS = BK + 8;                   // smem row stride: 16B rows, no ldmatrix conflicts
    static constexpr int LDT = RC + 8;                   // row stride of the t and b tiles
    static_assert(WTM % 16 == 0 && WTN % 8 == 0 && BK % (16 * KSPLIT) == 0, "tile shape");
    using Team = BlockTeam;
};

// One warp's piece of a C tile as a tile of its own, run by that warp alone
// (Team = WarpTeam): the expand of a tile whose warps each own whole rows
// (WN == 1, one k slice), each warp packing only its own rows' adapters. Its
// accumulators have the shape of the warp's in C.
template <class C>
struct WarpTiles : TileConfig<C::WTM, C::WTN, C::BK, 1, 1, 1> {
    static_assert(C::WN == 1 && C::KSPLIT == 1, "a warp owns whole rows of the tile");
    using Team = WarpTeam;
};

// Decode: 2 warps per k slice and 2 slices, so the block's 4 warps cover the
// SM's 4 schedulers (n = 4096 gives 128 blocks: about one per SM).
using DecodeTiles = TileConfig<16, 32, 64, 1, 2, 6, 2>;
// Decode for 16 < m <= 64: one block covers all the rows, so each column
// tile of w (and, in the fused kernel, all of a) is loaded once, not once
// per 16 rows; 4 warps of 16 rows each (the multi-adapter kernel's warps
// expand their own rows: WarpTiles).
using DecodeWideTiles = TileConfig<64, 32, 64, 4, 1, 5>;
// The same tiles with deeper pipelines, for GPUs whose blocks may take the
// shared memory (the launch picks them where they fit, src/ops/tiles.rs):
// at decode the n / 32 blocks are about one per SM, so the stages a block
// keeps in flight are all that the SM streams of w. 11 stages of 32 rows x
// 64 columns are 44 KB of w in flight (the base tiles: 20 KB), past the
// ~29 KB per SM that covering DRAM latency at 4.8 TB/s over 132 SMs takes
// (docs/DESIGN.md section 8). Only the copies run further ahead: the
// k-steps, and so every sum, are the base tiles'.
using DecodeDeepTiles = TileConfig<16, 32, 64, 1, 2, 12, 2>;
using DecodeWideDeepTiles = TileConfig<64, 32, 64, 4, 1, 9>;
// Prefill: warps of 64 x 64. A warp's k16 step loads 4 A and 8 B fragments
// (4 KB through ldmatrix) for 32 MMAs: 128 bytes of shared memory per MMA,
// where 64 x 32 warp tiles took 192 (and the expand's hi/lo steps 96 where
// they took 160). Shared memory feeds 128 bytes per clock per SM, so by the
// datasheet at 192 the ldmatrix traffic, not the tensor cores, would set
// the pace (an estimate until a GPU times both). The 128 accumulators take
// a thread to 216-255 registers, and every loop over them is unrolled
// (zero, store_y): a loop left rolled indexes them in local memory.
//
// The multi-adapter forward and the backward's dx: 4 warps (2 x 2) on a
// 128 x 128 tile, two blocks per SM (registers: 2 x 128 x 255 fit), the
// 8 warps per SM that 64 x 32 warp tiles had in one block, with a block
// count (and so a last wave, and the SMs a batch of a few hundred tokens
// fills) as before. 3 stages: 2 blocks x two k-tiles of x and w in flight,
// 64 KB per SM, past the ~29 KB that cover DRAM latency (docs/DESIGN.md
// section 8), in 72 KB of shared memory a block (two fit on A100 and
// Hopper).
using PrefillTiles = TileConfig<128, 128, 32, 2, 2, 3>;
// The fused forward's prefill: its shrink's t n8-tiles are dealt to the
// warps of a block row, 4 of them at rank 64 to each of 2 warps (64 more
// registers: it spills), so it keeps 4 warps per block row: 8 warps on
// 128 x 256, one block per SM (252-255 registers), 107 KB of shared memory
// at ranks up to 64 (a fourth stage spills).
using FusedPrefillTiles = TileConfig<128, 256, 32, 2, 4, 3>;

// Where the calling warp works: its piece (wm, wn) of the block tile and its
// k slice ks (TileConfig).
template <class C>
struct WarpPlace {
    int wm, wn, ks;
    __device__ WarpPlace() {
        const int warp = C::Team::tid() / 32;
        // One slice: constants the compiler folds (it does not know warp < PIECES).
        const int piece = C::KSPLIT == 1 ? warp : warp % C::PIECES;
        wm = piece / C::WN;
        wn = piece % C::WN;
        ks = C::KSPLIT == 1 ? 0 : warp / C::PIECES;
    }
    // Whether this warp holds the tile's sums after sum_k_slices.
    __device__ bool owner() const { return C::KSPLIT == 1 || ks == 0; }
};

// Elements of an expand step's weight tile: [BN][LDT] rows of b for the
// forward, or [RC][BN + 8] rows of a k-major B (the backward's dx = g w + u a,
// loaded with ldmatrix.trans).
template <class C, bool KMAJOR>
__host__ __device__ constexpr int weight_tile_elems() {
    return KMAJOR ? RC * (C::BN + 8) : C::BN * C::LDT;
}

// Elements of an expand step's tiles (ExpandTiles): hi, lo and class of v
// ([BM][LDT] each) and the weight tile.
template <class C, bool KMAJOR>
__host__ __device__ constexpr int expand_elems() {
    return 3 * C::BM * C::LDT + weight_tile_elems<C, KMAJOR>();
}

// The same as smem_elems for a kernel whose B operand is stored k-major
// ([reduction][N]): the backward's dx. src/ops mirrors it.
template <class C>
__host__ __device__ constexpr int smem_elems_bt() {
    int pipeline = C::STAGES * (C::BM * C::LDS + C::BK * (C::BN + 8));
    int expand = expand_elems<C, true>();
    return pipeline > expand ? pipeline : expand;
}

// Elements of dynamic shared memory a launch needs: the pipeline (x, w and
// `shrink_rows` rows of a per stage) or the expand's tiles, which reuse the
// pipeline's space after the k-loop. src/ops mirrors this.
template <class C>
__host__ __device__ constexpr int smem_elems(int shrink_rows) {
    int pipeline = C::STAGES * (C::BM + C::BN + shrink_rows) * C::LDS;
    int expand = expand_elems<C, false>();
    return pipeline > expand ? pipeline : expand;
}

// Copies rows [row0, row0 + rows) x columns [col0, col0 + WIDTH) of a
// row-major [nrows, ncols] matrix into smem (row stride LD) element by
// element; out-of-range elements are zero. The path for k that is not a
// multiple of 8 or a base that is not 16-byte aligned (16-byte copies:
// TileCopy).
template <class T, int THREADS, int WIDTH, int LD>
__device__ __forceinline__ void load_rows_any(T* smem, const T* g, int nrows, int ncols, int row0, int rows,
                                              int col0) {
    constexpr int CHUNKS = WIDTH / 8;  // 8-element chunks per row
    for (int e = threadIdx.x; e < rows * CHUNKS; e += THREADS) {
        int r = e / CHUNKS, c = (e % CHUNKS) * 8;
        int gr = row0 + r, gc = col0 + c;
        T* dst = smem + r * LD + c;
        for (int i = 0; i < 8; ++i)
            dst[i] = (gr < nrows && gc + i < ncols) ? g[(size_t)gr * ncols + gc + i] : from_f32<T>(0.f);
    }
}

// One thread's 16-byte cp.async copies of a tile (up to MAXROWS rows x WIDTH
// columns, row stride LD in smem) of a row-major [nrows, ncols] matrix whose
// ncols % 8 == 0 and base is 16-byte aligned, as the tile moves along the
// matrix from one k-tile to the next. The chunks are dealt to the threads
// row-major, so a thread keeps one column and rows row, row + RSTEP, ...:
// its address, smem offset and stride are computed once, and a k-tile costs
// per chunk an address add, a predicate and the copy (the index arithmetic
// redone for every chunk of every k-tile cost ~37 instructions per copy).
// Chunks past the matrix's columns copy 0 bytes (zero fill) from its base;
// rows past its end are either zero-filled the same way or, when they are
// the same in every k-tile, zeroed once by the caller (zero_rows) and never
// touched again: a decode tile of 1 token in 16 rows issues 1 copy in 16.
template <class T, int THREADS, int WIDTH, int LD, int MAXROWS>
struct TileCopy {
    static constexpr int CHUNKS = WIDTH / 8;        // 16-byte chunks per row
    static constexpr int RSTEP = THREADS / CHUNKS;  // rows between a thread's chunks
    static constexpr int N = (MAXROWS + RSTEP - 1) / RSTEP;
    static_assert(sizeof(T) == 2 && THREADS % CHUNKS == 0, "16-bit elements, whole rows per thread group");
    // Addresses as integers: g may be null (an operand the launch skips),
    // and pointer arithmetic on null is undefined in C++ (the host runtime).
    const T* g;
    uintptr_t src;  // the thread's first chunk with the tile at (row0, col0)
    size_t stride;  // bytes between a thread's chunks: RSTEP rows
    int row, col;   // the first chunk's place in the tile
    int dst;        // and in smem

    __device__ TileCopy(const T* g_, int ncols, int row0, int col0)
        : g(g_), stride((size_t)RSTEP * ncols * sizeof(T)), row(threadIdx.x / CHUNKS),
          col(threadIdx.x % CHUNKS * 8), dst(row * LD + col) {
        src = reinterpret_cast<uintptr_t>(g) + ((size_t)(row0 + row) * ncols + col0 + col) * sizeof(T);
    }

    // The tile moved by `shift` elements from (row0, col0): rows below
    // `live` are copied, their columns from col_limit on zero-filled (both
    // counted from the tile's corner). The other rows are zero-filled too
    // (ZERO_TAIL: they change from one k-tile to the next) or left alone.
    template <bool ZERO_TAIL>
    __device__ __forceinline__ void copy(T* smem, size_t shift, int live, int col_limit) const {
        const uintptr_t p = src + shift * sizeof(T);
        const bool col_ok = col < col_limit;
        for (int i = 0; i < N; ++i) {
            const int r = row + i * RSTEP;
            if (MAXROWS % RSTEP != 0 && r >= MAXROWS) break;  // folds away when RSTEP divides the tile
            const bool ok = col_ok && r < live;
            const T* chunk = ok ? reinterpret_cast<const T*>(p + i * stride) : g;
            cp_async_16_if(ZERO_TAIL || r < live, smem + dst + i * RSTEP * LD, chunk, ok ? 16u : 0u);
        }
    }
};

// Zeroes rows [from, to) (WIDTH elements each, row stride LD) of the same
// tile in each of `stages` pipeline stages, stage_elems apart: the rows a
// k-loop's TileCopy leaves alone. Plain stores, made visible to the MMAs by
// the k-loop's first barrier.
template <class T, int THREADS, int WIDTH, int LD>
__device__ void zero_rows(T* tile, int stages, int stage_elems, int from, int to) {
    const int per_stage = (to - from) * WIDTH;
    for (int e = threadIdx.x; e < stages * per_stage; e += THREADS) {
        const int s = e / per_stage, r = from + e % per_stage / WIDTH, c = e % WIDTH;
        tile[s * stage_elems + r * LD + c] = from_f32<T>(0.f);
    }
}

// Prefetches (lk::prefetch_l2) the lines of first[0 .. span): part of a
// weight tile the block loads only after its k-loop, which then finds it in
// L2 instead of waiting on DRAM.
template <class T>
__device__ void prefetch_span(const T* first, int span) {
    if (span <= 0) return;
    const char* bytes = reinterpret_cast<const char*>(first);
    const size_t size = (size_t)span * sizeof(T);
    for (size_t o = 0; o < size; o += 128) prefetch_l2(bytes + o);
    prefetch_l2(bytes + size - 1);  // the last line, when the span starts mid-line
}

// 16 bytes to a 16-byte aligned address (shared or global), from registers.
__device__ __forceinline__ void store16(void* dst, const uint32_t (&v)[4]) {
#ifdef LK_HOST
    std::memcpy(dst, v, 16);
#else
    *reinterpret_cast<uint4*>(dst) = make_uint4(v[0], v[1], v[2], v[3]);
#endif
}

// A k-loop's hook that does nothing (see mainloop's `early`).
struct NoHook {
    __device__ void operator()() const {}
};

// The smaller of a and b.
__device__ __forceinline__ int min_int(int a, int b) { return a < b ? a : b; }

// The tile (row tile tm, column tile tn) that block number `id` of a
// tiles_m x tiles_n grid owns, in grouped order: consecutive blocks walk
// down TILE_GROUP row tiles of one column of tiles before the next column.
// The blocks in flight then share a few column tiles of w and row tiles of x
// in L2; a column-fastest order streams all of w from DRAM once per row of
// tiles when w is larger than L2 (an MLP's 4096 x 14336 weight).
constexpr int TILE_GROUP = 8;
__device__ __forceinline__ void grouped_tile(int64_t id, int tiles_m, int tiles_n, int& tm, int& tn) {
    const int64_t per_group = (int64_t)TILE_GROUP * tiles_n;
    const int64_t first_m = id / per_group * TILE_GROUP;
    const int64_t rows = tiles_m - first_m < TILE_GROUP ? tiles_m - first_m : TILE_GROUP;
    const int64_t in_group = id % per_group;
    tm = (int)(first_m + in_group % rows);
    tn = (int)(in_group / rows);
}

// The same for a block of a 2-D grid (x: column tiles, y: row tiles).
__device__ __forceinline__ void grouped_tile(int& tm, int& tn) {
    grouped_tile((int64_t)blockIdx.y * gridDim.x + blockIdx.x, (int)gridDim.y, (int)gridDim.x, tm, tn);
}

// Which adapters a block's rows use: row_slot[BM] (filled by the caller, -1 =
// none) becomes distinct[1..distinct[0]], each slot once, in row order.
// Call from every thread of the team; it synchronizes before and after.
template <int BM, class Team = BlockTeam>
__device__ void collect_distinct(const int* row_slot, int* distinct) {
    Team::sync();
    if (Team::tid() == 0) {
        int count = 0;
        for (int i = 0; i < BM; ++i) {
            int s = row_slot[i];
            bool seen = s < 0;
            for (int d = 1; d <= count && !seen; ++d) seen = distinct[d] == s;
            if (!seen) distinct[++count] = s;
        }
        distinct[0] = count;
    }
    Team::sync();
}

// Expand steps that take several adapters at once. A block whose rows use
// several adapters (collect_distinct) would run one expand step (staging,
// barriers, MMAs) per adapter and per RC of its ranks. Packed, a step takes
// RC rank columns as GROUPS groups of 16, each group 16 ranks of one adapter:
// an adapter's ranks go in chunks of RC (r0 .. r0 + RC - 1, as its own steps
// would take them), each chunk whole in one step and starting at a group.
// A row's products, their order, their k16 grouping into MMAs and its f16
// range scaling (its own values only) are then those of its own adapter's
// steps; the other groups add exact zeros to its accumulators. So a token's
// bits never depend on which adapters its neighbours use. 64 tokens of 64
// adapters at rank 16 take 4 steps per 16-row tile, not 16.
constexpr int GROUPS = RC / 16;

// The packing state in static shared memory (`state`: an int [3 * GROUPS +
// 3] the kernel declares): per group the adapter's slot, the rank of its
// first column and the adapter's rank; then the next adapter (an index into
// distinct), its next chunk, and the current step's groups. Only the team's
// thread 0 writes it: next() publishes each step with a barrier.
template <class Team = BlockTeam>
struct PackedSteps {
    int* s;
    static constexpr int NEXT = 3 * GROUPS, CHUNK = NEXT + 1, USED = NEXT + 2;
    __device__ explicit PackedSteps(int* state) : s(state) {
        if (Team::tid() == 0) {
            s[NEXT] = 1;
            s[CHUNK] = 0;
        }
    }
    // Whether rank column `col` of the current step holds a rank of an
    // adapter (`slot`, rank `j` of it), not padding.
    __device__ __forceinline__ bool at(int col, int& slot, int& j) const {
        const int g = col / 16;
        slot = s[g];
        j = s[GROUPS + g] + col % 16;
        return j < s[2 * GROUPS + g];
    }
    // The rank of the adapter whose ranks rank column `col` holds.
    __device__ __forceinline__ int rank_at(int col) const { return s[2 * GROUPS + col / 16]; }
    // Fills the next step with the chunks of distinct[1..distinct[0]] that
    // fit, in order; returns its groups (0: every chunk is done). Call from
    // every thread once the previous step's readers are done (lk::expand
    // ends with a barrier) and distinct is published (collect_distinct).
    template <class RankOf>
    __device__ int next(const int* distinct, RankOf rank_of) const {
        if (Team::tid() == 0) {
            int d = s[NEXT], chunk = s[CHUNK], used = 0;
            while (d <= distinct[0]) {
                const int slot = distinct[d], rank = rank_of(slot), r0 = chunk * RC;
                const int groups = (min_int(rank - r0, RC) + 15) / 16;
                if (used + groups > GROUPS) break;
                for (int g = 0; g < groups; ++g) {
                    s[used + g] = slot;
                    s[GROUPS + used + g] = r0 + 16 * g;
                    s[2 * GROUPS + used + g] = rank;
                }
                used += groups;
                if (r0 + RC < rank) {
                    ++chunk;
                } else {
                    ++d;
                    chunk = 0;
                }
            }
            s[NEXT] = d;
            s[CHUNK] = chunk;
            s[USED] = used;
        }
        Team::sync();
        return s[USED];
    }
};

// Per-warp accumulators: acc for the y tile, tacc for up to RC columns of t.
template <class C>
struct Accumulators {
    float acc[C::MT][C::NT][4];
    float tacc[C::MT][C::TNT][4];
};

// Who expands a C tile: the block, or, where each warp owns whole rows (the
// 64-row decode tiles: 4 warps of 16 rows), each warp its own rows
// (WarpTiles<C>). A block-wide expand there would run the adapters of all
// 64 rows as one sequence of steps; a warp takes only its rows' adapters
// (as many steps as a 16-row tile), without block barriers, and the warps'
// sequences overlap.
template <class C>
using ExpandTeam = std::conditional_t<C::WN == 1 && C::KSPLIT == 1 && (C::WM > 1), WarpTiles<C>, C>;

// The calling thread's team of ExpandTeam<C> (0 where the block is the
// team: a constant, as the compiler does not know threadIdx.x < THREADS).
template <class C>
__device__ __forceinline__ int expand_team() {
    using E = ExpandTeam<C>;
    return E::THREADS == C::THREADS ? 0 : (int)(threadIdx.x / E::THREADS);
}

// f(acc) on the calling warp's piece of r as a tile of its own
// (WarpTiles<C>: the same registers, copied in and out, moves the compiler
// drops). Where the block is the team, call with r itself: a lambda there
// changes how ptxas allocates the block-wide kernels' registers.
template <class C, class F>
__device__ __forceinline__ void with_warp_accumulators(Accumulators<C>& r, F&& f) {
    using E = WarpTiles<C>;
    static_assert(E::MT == C::MT && E::NT == C::NT, "a warp's accumulators are its piece of the tile's");
    Accumulators<E> own;
    for (int i = 0; i < C::MT; ++i)
        for (int j = 0; j < C::NT; ++j)
            for (int q = 0; q < 4; ++q) own.acc[i][j][q] = r.acc[i][j][q];
    f(own);
    for (int i = 0; i < C::MT; ++i)
        for (int j = 0; j < C::NT; ++j)
            for (int q = 0; q < 4; ++q) r.acc[i][j][q] = own.acc[i][j][q];
}

template <class C, int N>
__device__ __forceinline__ void zero(float (&v)[C::MT][N][4]) {
#pragma unroll
    for (int i = 0; i < C::MT; ++i)
#pragma unroll
        for (int j = 0; j < N; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) v[i][j][q] = 0.f;
}

// After a k-loop of a TileConfig with several k slices: each owner warp
// (slice 0) adds the partial sums of the warps of the other slices that
// share its piece of the tile, in slice order (the same bits every run),
// through `scratch` (shared memory of the drained pipeline: call after the
// k-loop's last barrier). acc if `base`, tacc if `shrink`. The other warps
// keep their partial sums and store nothing afterwards. Ends with a barrier.
template <class C>
__device__ void sum_k_slices(float* scratch, bool base, bool shrink, Accumulators<C>& r) {
    if constexpr (C::KSPLIT > 1) {
        constexpr int NA = C::MT * C::NT * 4, PER = NA + C::MT * C::TNT * 4;  // values per thread
        static_assert((C::KSPLIT - 1) * C::PIECES * PER * 32 * 4 <= C::STAGES * (C::BM + C::BN) * C::LDS * 2,
                      "the partial sums fit in the pipeline's shared memory");
        const WarpPlace<C> at;
        const int lane = threadIdx.x % 32, piece = at.wm * C::WN + at.wn;
        // Value v of slice ks's partial for this piece and lane: lanes adjacent (no bank conflicts).
        auto at_slice = [&](int ks, int v) { return (((ks - 1) * C::PIECES + piece) * PER + v) * 32 + lane; };
        // f(value index, accumulator) over the parts being summed.
        auto each = [&](auto&& f) {
            for (int i = 0; i < C::MT; ++i) {
                if (base)
                    for (int j = 0; j < C::NT; ++j)
                        for (int q = 0; q < 4; ++q) f((i * C::NT + j) * 4 + q, r.acc[i][j][q]);
                if (shrink)
                    for (int j = 0; j < C::TNT; ++j)
                        for (int q = 0; q < 4; ++q) f(NA + (i * C::TNT + j) * 4 + q, r.tacc[i][j][q]);
            }
        };
        if (!at.owner()) each([&](int v, float& x) { scratch[at_slice(at.ks, v)] = x; });
        __syncthreads();
        if (at.owner())
            for (int ks = 1; ks < C::KSPLIT; ++ks) each([&](int v, float& x) { x += scratch[at_slice(ks, v)]; });
        __syncthreads();  // before the caller reuses shared memory
    }
}

// Split-K across blocks: the `splits` blocks of one output tile each ran the
// k-loop over their own range of k-tiles (split `split` of them). Each
// block's owner warps (sum_k_slices) store their partial sums (acc, and tacc
// if `shrink`) to its slot of `partials` (`tile * splits + split`, lanes
// adjacent), then the block counts itself in at `*counter` (0 between
// launches). The last block of the tile to arrive adds every slot's sums
// (its own included) in split order, the same bits whichever block is last,
// into its accumulators, resets the counter for the next launch and returns
// true; the others return false and are done. Only the tile's `rows` rows
// that exist and t's first `rp` rank columns travel: the others are sums of
// the zero-filled rows of x and a, never stored. Call from every thread.
template <class C>
__device__ bool gather_k_splits(float* partials, unsigned* counter, int64_t tile, int split, int splits, int rows,
                                bool shrink, int rp, Accumulators<C>& r) {
    constexpr int NA = C::MT * C::NT * 4, PER = NA + C::MT * C::TNT * 4;  // values per thread
    constexpr int OWNERS = C::PIECES * 32;                                  // owner threads
    static_assert(PER * OWNERS == C::BM * (C::BN + RC), "a slot's size, as split_k_values in src/ops/tiles.rs");
    LK_SHARED(int, is_last, [1]);
    const WarpPlace<C> at;
    const int lane = threadIdx.x % 32;
    const int owner = (at.wm * C::WN + at.wn) * 32 + lane;
    auto at_slot = [&](int z, int v) { return ((tile * splits + z) * PER + v) * OWNERS + owner; };
    // f(value index, accumulator) over the values that travel.
    auto each = [&](auto&& f) {
        for (int i = 0; i < C::MT; ++i)
            for (int q = 0; q < 4; ++q) {
                if (at.wm * C::WTM + i * 16 + lane / 4 + 8 * (q >> 1) >= rows) continue;
                for (int j = 0; j < C::NT; ++j) f((i * C::NT + j) * 4 + q, r.acc[i][j][q]);
                if (shrink)
                    for (int j = 0; j < C::TNT; ++j)
                        if ((j * C::WN + at.wn) * 8 < rp) f(NA + (i * C::TNT + j) * 4 + q, r.tacc[i][j][q]);
            }
    };
    if (at.owner()) each([&](int v, float& x) { partials[at_slot(split, v)] = x; });
    __threadfence();  // the partials are visible before the count that announces them
    __syncthreads();
    if (threadIdx.x == 0) is_last[0] = atomicAdd(counter, 1u) == (unsigned)splits - 1;
    __syncthreads();
    if (!is_last[0]) return false;
    __threadfence();  // every other block's partials are in before these reads
    if (at.owner()) {
        each([&](int v, float& x) { x = load_cg(partials + at_slot(0, v)); });
        for (int z = 1; z < splits; ++z) each([&](int v, float& x) { x += load_cg(partials + at_slot(z, v)); });
    }
    if (threadIdx.x == 0) atomicExch(counter, 0u);
    return true;
}

// One pass over k for the block's rows [row0, row0 + BM):
//   w != nullptr: acc  += x w[col0 .. col0 + BN)^T
//   rp > 0:       tacc += x a^T for the first rp rows of `a` (rc of them real)
// over the k-tiles [kt_begin, kt_end) (all of k by default; split-K blocks
// take a range each). The t n8-tiles are dealt round-robin to the warps of a
// block row. early() runs in every thread once the first stages' copies are
// issued (it may synchronize): work that waits on global memory, such as
// prefetching the weights of the expand, overlaps the pipeline's first
// loads. Ends with the pipeline drained and a barrier, so the caller may
// reuse shared memory.
template <class T, class C, bool ALIGNED, class Early = NoHook>
__device__ void mainloop(T* smem, const T* x, const T* w, const T* a, int m, int n, int k, int rc, int rp,
                         int row0, int col0, Accumulators<C>& r, Early early = {}, int kt_begin = 0,
                         int kt_end = 1 << 30) {
    const int lane = threadIdx.x % 32;
    const WarpPlace<C> at;
    const int wm = at.wm, wn = at.wn;
    const int stage_elems = (C::BM + C::BN + rp) * C::LDS;
    const int ktiles = min_int((k + C::BK - 1) / C::BK, kt_end) - kt_begin;
    // The copies start at the range's first column k0: a k-tile's shift
    // from there is the same for every block (the compiler folds it).
    const int k0 = kt_begin * C::BK, krange = k - k0;

    const TileCopy<T, C::THREADS, C::BK, C::LDS, C::BM> xcopy(x, k, row0, k0);
    const TileCopy<T, C::THREADS, C::BK, C::LDS, C::BN> wcopy(w, k, col0, k0);
    const TileCopy<T, C::THREADS, C::BK, C::LDS, RC> acopy(a, k, 0, k0);
    // The rows of x that exist (a decode tile of one token has 1 of 16):
    // those that don't, and a's padding rows rc..rp, are zeros in every
    // stage and never copied. w's missing rows (the last column tile only)
    // are zero-filled with each copy: a branch per copy would cost more.
    const int xrows = min_int(C::BM, m - row0);
    if constexpr (ALIGNED) {
        zero_rows<T, C::THREADS, C::BK, C::LDS>(smem, C::STAGES, stage_elems, xrows, C::BM);
        zero_rows<T, C::THREADS, C::BK, C::LDS>(smem + (C::BM + C::BN) * C::LDS, C::STAGES, stage_elems, rc, rp);
    }
    auto load_stage = [&](int stage, int kt) {
        T* xs = smem + stage * stage_elems;
        T* ws = xs + C::BM * C::LDS;
        T* as = ws + C::BN * C::LDS;
        const int kc = kt * C::BK;  // from k0
        if constexpr (ALIGNED) {
            xcopy.template copy<false>(xs, kc, xrows, krange - kc);
            if (w) wcopy.template copy<true>(ws, kc, n - col0, krange - kc);
            if (rp) acopy.template copy<false>(as, kc, rc, krange - kc);
        } else {
            load_rows_any<T, C::THREADS, C::BK, C::LDS>(xs, x, m, k, row0, C::BM, k0 + kc);
            if (w) load_rows_any<T, C::THREADS, C::BK, C::LDS>(ws, w, n, k, col0, C::BN, k0 + kc);
            if (rp) load_rows_any<T, C::THREADS, C::BK, C::LDS>(as, a, rc, k, 0, rp, k0 + kc);
        }
    };

    for (int s = 0; s < C::STAGES - 1; ++s) {
        if (s < ktiles) load_stage(s, s);
        cp_async_commit();
    }
    early();
    for (int kt = 0; kt < ktiles; ++kt) {  // sass-loop: mainloop
        cp_async_wait<C::STAGES - 2>();
        __syncthreads();  // tile kt landed for all threads; stage (kt-1) is free
        int next = kt + C::STAGES - 1;
        if (next < ktiles) load_stage(next % C::STAGES, next);
        cp_async_commit();

        const T* xs = smem + (kt % C::STAGES) * stage_elems;
        const T* ws = xs + C::BM * C::LDS;
        const T* as = ws + C::BN * C::LDS;
        for (int step = 0; step < C::BK / (16 * C::KSPLIT); ++step) {
            const int kk = (step * C::KSPLIT + at.ks) * 16;
            uint32_t af[C::MT][4];
            for (int i = 0; i < C::MT; ++i)
                ldmatrix_x4(af[i], xs + (wm * C::WTM + i * 16 + lane % 16) * C::LDS + kk + (lane / 16) * 8, false);
            if (w) {
                for (int j = 0; j < C::NT; ++j) {
                    uint32_t bf[2];
                    ldmatrix_x2(bf, ws + (wn * C::WTN + j * 8 + lane % 8) * C::LDS + kk + ((lane / 8) & 1) * 8, false);
                    for (int i = 0; i < C::MT; ++i) mma_m16n8k16(r.acc[i][j], af[i], bf, r.acc[i][j], T());
                }
            }
            for (int j = 0; j < C::TNT; ++j) {
                int tile = j * C::WN + wn;
                if (tile * 8 >= rp) break;
                uint32_t bf[2];
                ldmatrix_x2(bf, as + (tile * 8 + lane % 8) * C::LDS + kk + ((lane / 8) & 1) * 8, false);
                for (int i = 0; i < C::MT; ++i) mma_m16n8k16(r.tacc[i][j], af[i], bf, r.tacc[i][j], T());
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();
    sum_k_slices<C>(reinterpret_cast<float*>(smem), w != nullptr, rp > 0, r);
}

// acc += A B over a k-major B: A = a [m, kdim] row-major (tokens x reduction),
// B = b [kdim, n] row-major (reduction x columns), the block's tile at rows
// row0.., columns col0.. (the backward's dx = g w). Same pipeline and early()
// as mainloop; B fragments come from ldmatrix.trans of [BK][BN + 8] tiles.
// Ends drained and after a barrier.
template <class T, class C, bool ALIGNED, class Early = NoHook>
__device__ void mainloop_bt(T* smem, const T* a, const T* b, int m, int n, int kdim, int row0, int col0,
                            Accumulators<C>& r, Early early = {}) {
    constexpr int LDB = C::BN + 8;
    const int lane = threadIdx.x % 32;
    const WarpPlace<C> at;
    const int wm = at.wm, wn = at.wn;
    const int stage_elems = C::BM * C::LDS + C::BK * LDB;
    const int ktiles = (kdim + C::BK - 1) / C::BK;
    const TileCopy<T, C::THREADS, C::BK, C::LDS, C::BM> acopy(a, kdim, row0, 0);
    const TileCopy<T, C::THREADS, C::BN, LDB, C::BK> bcopy(b, n, 0, col0);  // moves down b's rows
    // a's rows past m are zeros in every stage; b's rows past kdim (the
    // last k-tile's) are zero-filled by their copies.
    const int arows = min_int(C::BM, m - row0);
    if constexpr (ALIGNED) zero_rows<T, C::THREADS, C::BK, C::LDS>(smem, C::STAGES, stage_elems, arows, C::BM);
    auto load_stage = [&](int stage, int kt) {
        T* as = smem + stage * stage_elems;
        T* bs = as + C::BM * C::LDS;
        const int kc = kt * C::BK;
        if constexpr (ALIGNED) {
            acopy.template copy<false>(as, kc, arows, kdim - kc);
            bcopy.template copy<true>(bs, (size_t)kc * n, kdim - kc, n - col0);
        } else {
            load_rows_any<T, C::THREADS, C::BK, C::LDS>(as, a, m, kdim, row0, C::BM, kc);
            load_rows_any<T, C::THREADS, C::BN, LDB>(bs, b, kdim, n, kc, C::BK, col0);
        }
    };
    for (int s = 0; s < C::STAGES - 1; ++s) {
        if (s < ktiles) load_stage(s, s);
        cp_async_commit();
    }
    early();
    for (int kt = 0; kt < ktiles; ++kt) {  // sass-loop: mainloop_bt
        cp_async_wait<C::STAGES - 2>();
        __syncthreads();
        int next = kt + C::STAGES - 1;
        if (next < ktiles) load_stage(next % C::STAGES, next);
        cp_async_commit();
        const T* as = smem + (kt % C::STAGES) * stage_elems;
        const T* bs = as + C::BM * C::LDS;
        for (int step = 0; step < C::BK / (16 * C::KSPLIT); ++step) {
            const int kk = (step * C::KSPLIT + at.ks) * 16;
            uint32_t af[C::MT][4];
            for (int i = 0; i < C::MT; ++i)
                ldmatrix_x4(af[i], as + (wm * C::WTM + i * 16 + lane % 16) * C::LDS + kk + (lane / 16) * 8, false);
            for (int j = 0; j < C::NT; ++j) {
                // Lanes 0-7 give rows kk..kk+7 of the n8 column block, lanes 8-15 rows kk+8..kk+15.
                uint32_t bf[2];
                ldmatrix_x2(bf, bs + (kk + lane % 16) * LDB + wn * C::WTN + j * 8, true);
                for (int i = 0; i < C::MT; ++i) mma_m16n8k16(r.acc[i][j], af[i], bf, r.acc[i][j], T());
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();
    sum_k_slices<C>(reinterpret_cast<float*>(smem), true, false, r);
}

// ---- The expand: acc += v W over a rank chunk, v = scale * t (forward) or u (dx) ----
//
// v is f32; tensor cores take it as a hi + lo pair of the storage type,
// hi = round(v), lo = round(v - hi): v to about 16 significant bits, so the
// expand loses nothing to rounding t (the known precision bug of f16
// intermediates). Two cases leave that common path, each behind a block-wide
// flag, so a split without them pays one compare per element:
//
// - f16's range. hi overflows for |v| >= 65520, although v, the weights and
//   the result are finite. When some finite |v| of a split reaches
//   SPLIT_LIMIT = 2^15, every row whose largest finite |v| does is split again
//   as v / sigma, sigma = 2^e the smallest power of two with max |v| / sigma <
//   2^15, and that row's accumulators are divided by sigma before the MMAs and
//   multiplied by it after. Powers of two scale exactly, so the result is the
//   unscaled computation's, bit for bit, unless something over- or
//   underflows (lo can lose bits to f16's subnormal range: sigma 2^-25 |w| at
//   most). A row's sigma depends on its own values only: one token's adapter
//   never changes another token's bits. bf16 has f32's range and never
//   scales.
// - Non-finite operands. An MMA's product with an Inf factor can be NaN where
//   the exact one is not: Inf * (hi + lo) with lo = 0 gives Inf * 0 = NaN.
//   So the MMAs see finite values only: a non-finite v or weight is stored as
//   0, and afterwards each product with a non-finite factor is added exactly
//   as the f64 reference forms it, class(v) * w with class(v) = sign(v) (0
//   for 0) for a finite v and v itself otherwise (0 * Inf = NaN, Inf + -Inf =
//   NaN). The weights are read again from global memory for that.

constexpr float SPLIT_LIMIT = 32768.f;  // 2^15: v / sigma below it keeps f16's hi finite

template <class T>
struct NeedsRangeScaling {
    static constexpr bool value = false;
};
template <>
struct NeedsRangeScaling<__half> {
    static constexpr bool value = true;
};

// 2^e as a float, for -126 <= e <= 127.
__device__ __forceinline__ float pow2(int e) { return __uint_as_float((unsigned)(127 + e) << 23); }

// Shared-memory tiles of one expand step, carved from the start of smem: v as
// hi, lo and class ([BM][LDT] each), and the weight tile (weight_tile_elems).
template <class T, class C, bool KMAJOR = false>
struct ExpandTiles {
    T* th;
    T* tl;
    T* tc;
    T* ws;
    __device__ explicit ExpandTiles(T* smem)
        : th(smem), tl(smem + C::BM * C::LDT), tc(smem + 2 * C::BM * C::LDT), ws(smem + 3 * C::BM * C::LDT) {}
};

// The expand's rare-case state in static shared memory: `state` is an int
// [BM + 2] the kernel declares. flags[0] / flags[1] hold the number (epoch)
// of the last split that raised them: some finite |v| >= SPLIT_LIMIT (f16),
// some non-finite operand; comparing with the current epoch needs no reset
// between splits. row_exp[BM] is each row's e (sigma = 2^e) while a split is
// scaled. Construct it in every thread before the k-loop, whose barriers
// publish the reset.
template <class C>
struct ExpandGuard {
    int* flags;
    int* row_exp;
    int epoch = 0;
    __device__ explicit ExpandGuard(int* state) : flags(state), row_exp(state + 2) {
        if (C::Team::tid() == 0) flags[0] = flags[1] = 0;
    }
    // Starts the next split (every thread, after the previous expand's barrier).
    __device__ void next() { ++epoch; }
    __device__ bool range_raised() const { return flags[0] == epoch; }
    __device__ bool nonfinite_raised() const { return flags[1] == epoch; }
};

// Stores v at [row][col] of the expand tiles: hi, lo and class, or 0, 0, v
// for a non-finite v. Raises the guard's flags (plain stores of one value:
// racing writers agree).
template <class T, class C, bool KMAJOR>
__device__ __forceinline__ void store_split(const ExpandTiles<T, C, KMAJOR>& e, const ExpandGuard<C>& g, int row,
                                            int col, float v) {
    const int at = row * C::LDT + col;
    if (!isfinite(v)) {
        e.th[at] = e.tl[at] = from_f32<T>(0.f);
        e.tc[at] = from_f32<T>(v);
        g.flags[1] = g.epoch;
        return;
    }
    if (NeedsRangeScaling<T>::value && fabsf(v) >= SPLIT_LIMIT) g.flags[0] = g.epoch;
    T hi = from_f32<T>(v);
    e.th[at] = hi;
    e.tl[at] = from_f32<T>(v - to_f32(hi));  // rows with |v| >= 2^15 are split again
    e.tc[at] = from_f32<T>(v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f));
}

// A weight as the expand's tile holds it: itself if finite, else 0 (and the
// guard's flag is raised: add_nonfinite_products adds its products).
template <class T, class C>
__device__ __forceinline__ T finite_weight(T w, const ExpandGuard<C>& g) {
    if (isfinite(to_f32(w))) return w;
    g.flags[1] = g.epoch;
    return from_f32<T>(0.f);
}

// The forward's weight tile of one rank chunk: rows col0 .. col0 + BN of b
// ([n][ldb]), ranks r0 .. r0 + rc of each, zeros past n and from rc to rp.
template <class T, class C>
__device__ void load_b_rows(const ExpandTiles<T, C>& e, const ExpandGuard<C>& guard, const T* b, int ldb, int n,
                            int col0, int r0, int rc, int rp) {
    for (int i = C::Team::tid(); i < C::BN * rp; i += C::THREADS) {
        const int row = i / rp, col = i % rp, gn = col0 + row;
        const T v = (gn < n && col < rc) ? b[(size_t)gn * ldb + r0 + col] : from_f32<T>(0.f);
        e.ws[row * C::LDT + col] = finite_weight(v, guard);
    }
}

// The f16 range case, after the split and a barrier: if the split raised the
// range flag, row_exp gets each row's e and the rows with e > 0 are split
// again as v / 2^e. `values(f)` calls f(row, col, v) for each element this
// thread split. Returns whether any row is scaled (the same in every thread);
// if so it ends with a barrier.
template <class T, class C, bool KMAJOR, class Values>
__device__ bool scale_split_rows(const ExpandTiles<T, C, KMAJOR>& e, const ExpandGuard<C>& g, Values values) {
    if (!NeedsRangeScaling<T>::value || !g.range_raised()) return false;
    unsigned* max_bits = reinterpret_cast<unsigned*>(g.row_exp);
    for (int i = C::Team::tid(); i < C::BM; i += C::THREADS) max_bits[i] = 0u;
    C::Team::sync();
    // Non-negative floats order as their bit patterns.
    values([&](int row, int, float v) {
        if (isfinite(v)) atomicMax(max_bits + row, __float_as_uint(fabsf(v)));
    });
    C::Team::sync();
    for (int i = C::Team::tid(); i < C::BM; i += C::THREADS) {
        unsigned bits = max_bits[i];
        // max in [2^E, 2^(E+1)): e = E - 14 is the smallest with max / 2^e < 2^15.
        g.row_exp[i] = bits >= __float_as_uint(SPLIT_LIMIT) ? (int)(bits >> 23) - 127 - 14 : 0;
    }
    C::Team::sync();
    values([&](int row, int col, float v) {
        int exp = g.row_exp[row];
        if (exp > 0) store_split(e, g, row, col, v * pow2(-exp));
    });
    C::Team::sync();
    return true;
}

// Multiplies the accumulators of each scaled row by 2^(sign * e).
template <class C>
__device__ void scale_rows(const ExpandGuard<C>& g, int sign, Accumulators<C>& r) {
    const WarpPlace<C> at;
    if (!at.owner()) return;
    const int lane = C::Team::tid() % 32;
    const int wm = at.wm, group = lane / 4;
#pragma unroll
    for (int i = 0; i < C::MT; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            int exp = g.row_exp[wm * C::WTM + i * 16 + group + 8 * h];
            float f = pow2(sign * exp);  // 1 for rows that are not scaled
#pragma unroll
            for (int j = 0; j < C::NT; ++j) {
                r.acc[i][j][2 * h] *= f;
                r.acc[i][j][2 * h + 1] *= f;
            }
        }
}

// acc += v_hi W + v_lo W over rank columns [0, rp) of the expand tiles.
template <class T, class C, bool KMAJOR>
__device__ void expand_mma(const ExpandTiles<T, C, KMAJOR>& e, int rp, Accumulators<C>& r) {
    constexpr int LDB = C::BN + 8;  // k-major weight rows
    const WarpPlace<C> at;
    if (!at.owner()) return;  // the other k slices' warps hold no sums
    const int lane = C::Team::tid() % 32;
    const int wm = at.wm, wn = at.wn;
    for (int kk = 0; kk < rp; kk += 16) {  // sass-loop: expand
        uint32_t hf[C::MT][4], lf[C::MT][4];
        for (int i = 0; i < C::MT; ++i) {
            int off = (wm * C::WTM + i * 16 + lane % 16) * C::LDT + kk + (lane / 16) * 8;
            ldmatrix_x4(hf[i], e.th + off, false);
            ldmatrix_x4(lf[i], e.tl + off, false);
        }
        for (int j = 0; j < C::NT; ++j) {
            uint32_t bf[2];
            if constexpr (KMAJOR)  // lanes 0-7 give rows kk..kk+7 of the n8 column block, lanes 8-15 rows kk+8..
                ldmatrix_x2(bf, e.ws + (kk + lane % 16) * LDB + wn * C::WTN + j * 8, true);
            else
                ldmatrix_x2(bf, e.ws + (wn * C::WTN + j * 8 + lane % 8) * C::LDT + kk + ((lane / 8) & 1) * 8, false);
            for (int i = 0; i < C::MT; ++i) {
                mma_m16n8k16(r.acc[i][j], hf[i], bf, r.acc[i][j], T());
                mma_m16n8k16(r.acc[i][j], lf[i], bf, r.acc[i][j], T());
            }
        }
    }
}

// acc += class(v_j) * w_j for every rank j < rc where v_j or w_j is not
// finite. `weight(row, col, j)` is the weight element (col: a column of the
// block's tile), 0 where the row takes no part in this expand.
template <class T, class C, bool KMAJOR, class Weight>
__device__ void add_nonfinite_products(const ExpandTiles<T, C, KMAJOR>& e, int rc, Weight weight,
                                       Accumulators<C>& r) {
    const WarpPlace<C> at;
    if (!at.owner()) return;  // the other k slices' warps hold no sums
    const int lane = C::Team::tid() % 32;
    const int wm = at.wm, wn = at.wn;
    const int group = lane / 4, quad = lane % 4;
    // Ranks outermost: the accumulator loops unroll and acc stays in registers.
    for (int k = 0; k < rc; ++k) {
#pragma unroll
        for (int i = 0; i < C::MT; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                int row = wm * C::WTM + i * 16 + group + 8 * h;
                float c = to_f32(e.tc[row * C::LDT + k]);
#pragma unroll
                for (int j = 0; j < C::NT; ++j)
#pragma unroll
                    for (int q = 2 * h; q < 2 * h + 2; ++q) {
                        float w = weight(row, wn * C::WTN + j * 8 + 2 * quad + (q & 1), k);
                        if (!isfinite(c) || !isfinite(w)) r.acc[i][j][q] += c * w;
                    }
            }
    }
}

// One expand step, after every thread stored its part of the split
// (store_split) and of the weight tile (finite_weight): acc += v W over rank
// columns [0, rp), rc of them real, with the rare cases above. `values` as
// for scale_split_rows, `weight` as for add_nonfinite_products; `mma(rp)`
// adds the finite hi/lo products (expand_mma, or the wgmma kernels' own over
// their weight tile's layout). Starts and ends with a barrier.
template <class T, class C, bool KMAJOR, class Values, class Weight, class Mma>
__device__ void expand_with(const ExpandTiles<T, C, KMAJOR>& e, const ExpandGuard<C>& g, int rc, int rp,
                            Values values, Weight weight, Accumulators<C>& r, Mma mma) {
    C::Team::sync();  // the split and the weight tile are complete
    const bool scaled = scale_split_rows(e, g, values);
    const bool nonfinite = g.nonfinite_raised();
    if (scaled) scale_rows(g, -1, r);
    mma(rp);
    if (scaled) scale_rows(g, 1, r);
    if (nonfinite) add_nonfinite_products(e, rc, weight, r);
    C::Team::sync();  // before the next split overwrites the tiles
}

// expand_with the mma.sync products (expand_mma).
template <class T, class C, bool KMAJOR, class Values, class Weight>
__device__ void expand(const ExpandTiles<T, C, KMAJOR>& e, const ExpandGuard<C>& g, int rc, int rp, Values values,
                       Weight weight, Accumulators<C>& r) {
    expand_with(e, g, rc, rp, values, weight, r, [&](int ranks) { expand_mma(e, ranks, r); });
}

// y[row0.., col0..] = acc (+ beta y); beta = 0 never reads y, so garbage
// (even NaN) in y does not leak in.
template <class T, class C>
__device__ void store_y(T* y, int m, int n, int row0, int col0, float beta, const Accumulators<C>& r) {
    const WarpPlace<C> at;
    if (!at.owner()) return;  // the other k slices' warps hold no sums
    const int lane = C::Team::tid() % 32;
    const int wm = at.wm, wn = at.wn;
    const int group = lane / 4, quad = lane % 4;
#pragma unroll
    for (int i = 0; i < C::MT; ++i)
#pragma unroll
        for (int j = 0; j < C::NT; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                int row = row0 + wm * C::WTM + i * 16 + group + 8 * (q >> 1);
                int col = col0 + wn * C::WTN + j * 8 + 2 * quad + (q & 1);
                if (row >= m || col >= n) continue;
                size_t idx = (size_t)row * n + col;
                float v = r.acc[i][j][q];
                if (beta != 0.f) v += beta * to_f32(y[idx]);
                y[idx] = from_f32<T>(v);
            }
}

}  // namespace lk
