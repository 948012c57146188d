// The decode's base product with w loaded straight from global memory into
// the MMAs' registers: no shared-memory pipeline, no barrier in the k-loop.
//
// Why: at decode the base product is a stream of w that the SMs
// must keep in flight. The shared-memory pipeline (lk::mainloop) spends
// about 116 instructions per warp and 64-wide k-tile on copies, waits and
// barriers; with one 4-warp block per SM, each warp issuing every 4.7 cycles
// (Nsight Compute on an H200, reports/gpu/NOTES.md), that issue rate, not
// DRAM, set the pace: 1.08 TB/s. Here a warp's 32 values of k for its 16
// columns cost 2 loads of w, 2 of x (L1 hits after the first warp) and 4
// MMAs, and each warp keeps UNROLL such steps of w in flight in its
// registers, without waiting on the other warps.
//
// The fragment layout is lk_multi_adapter.cuh's tensor-core shrink's: lane
// (group g, quad q) loads values 8q .. 8q + 7 of its rows of a 32-wide chunk
// of k (16 bytes) and uses the first 4 as the fragment's k columns 2q, 2q+1,
// 8+2q, 9+2q of one k16 step and the last 4 for the next. x (A, rows g and
// g + 8) and w (B, row g of each n8 tile) are permuted alike, which a dot
// product over k does not see. The accumulators come out in lk::mainloop's
// layout, so split-K, the expand and the store are the shared ones.
#pragma once
#include <type_traits>

#include "lk_tile_gemm.cuh"

namespace lk {

// The 16 bytes at address `at` into r: a read-only load that either keeps
// the line in L1 (x: the block's other warps read it too) or leaves L1 alone
// (STREAM: w passes through once). Addresses as integers, as in
// lk::TileCopy.
template <bool STREAM>
__device__ __forceinline__ void load16(uint32_t (&r)[4], uintptr_t at) {
#ifdef LK_HOST
    memcpy(r, reinterpret_cast<const void*>(at), 16);
#else
    if constexpr (STREAM)
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "l"(at));
    else
        asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "l"(at));
#endif
}

// Decode tiles of 16 rows x BN columns for direct_mainloop: WN warps across
// the columns times KSPLIT k slices, each warp keeping UNROLL chunks of 32
// values of k in flight. BK only counts k-tiles for split-K; the 3 STAGES
// only size the shared memory that the k slices' sums and the expand reuse
// (the loop itself takes none).
template <int BN_, int WN_, int KSPLIT_, int UNROLL_>
struct DirectTiles : TileConfig<16, BN_, 64, 1, WN_, 3, KSPLIT_> {
    static constexpr int UNROLL = UNROLL_;
};

template <class C>
struct loads_direct : std::false_type {};
template <int BN, int WN, int KSPLIT, int UNROLL>
struct loads_direct<DirectTiles<BN, WN, KSPLIT, UNROLL>> : std::true_type {};

// 2 warps across 32 columns and 4 k slices: 8 warps, each with 5 chunks
// (5 KB of w) in flight, 40 KB per block, past the ~29 KB per SM that cover
// DRAM latency (docs/DESIGN.md section 8). 256 threads at 128 registers (6
// chunks spilled); two blocks fit an SM (registers, 20 KB of shared
// memory), and split-K aims for two per SM: n = 4096 (128 tiles) takes 2
// splits, 80 KB in flight per SM.
using DecodeDirectTiles = DirectTiles<32, 2, 4, 5>;

// As lk::mainloop for x [m, k] and w [n, k] with k % 8 == 0 and 16-byte
// aligned rows (the aligned kernels only): acc += x w[col0 .. col0 + BN)^T
// for the block's rows [row0, row0 + 16), over the k-tiles [kt_begin,
// kt_end) of C::BK. Warp (wn, ks) takes columns wn * WTN .. + WTN and the
// chunks ks, ks + KSPLIT, ... of the range, so the slices' warps read
// adjacent 64-byte pieces of each row of w. early() runs in every thread
// once the first chunks are on their way (it may synchronize). Ends with the
// slices' sums in the slice-0 warps (sum_k_slices) and a barrier.
template <class T, class C, class Early = NoHook>
__device__ void direct_mainloop(T* smem, const T* x, const T* w, int m, int n, int k, int row0, int col0,
                                Accumulators<C>& r, Early early = {}, int kt_begin = 0, int kt_end = 1 << 30) {
    static_assert(loads_direct<C>::value && C::MT == 1 && C::WM == 1, "16 rows: x is one A fragment");
    constexpr int CK = 32, U = C::UNROLL, NT = C::NT, KS = C::KSPLIT;
    const WarpPlace<C> at;
    const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    // The range's chunks of 32 (k_tiles first: kt_end may be 2^30).
    const int c_begin = kt_begin * (C::BK / CK);
    const int c_end = min_int(min_int((k + C::BK - 1) / C::BK, kt_end) * (C::BK / CK), (k + CK - 1) / CK);

    // This lane's rows: x rows g and g + 8 of the tile, w row g of each n8
    // tile, as byte addresses of their first 8 values of k. A row past m (x)
    // or past n (w) reads the last row instead: a row of the MMA's product
    // depends on its own row of x only, a column on its own row of w, and
    // nothing stores or sums rows past m or columns past n (the expand and
    // store_y check them). So only the k tail needs zeros.
    uintptr_t x_row[2], w_row[NT];
    for (int h = 0; h < 2; ++h) {
        const int row = min_int(row0 + g + 8 * h, m - 1);
        x_row[h] = reinterpret_cast<uintptr_t>(x) + ((size_t)row * k + 8 * q) * sizeof(T);
    }
    for (int j = 0; j < NT; ++j) {
        const int col = min_int(col0 + at.wn * C::WTN + j * 8 + g, n - 1);
        w_row[j] = reinterpret_cast<uintptr_t>(w) + ((size_t)col * k + 8 * q) * sizeof(T);
    }

    uint32_t xr[U][2][4], wr[U][NT][4];
    // Chunk c into slot u. FULL: the chunk lies within k and the range.
    // Otherwise zeros past either (k % 8 == 0: a lane's 8 values are all in
    // or all out), so that a tail adds exact zeros whatever the rows hold.
    auto load = [&](int u, int c, auto full) {
        const size_t off = (size_t)c * CK * sizeof(T);
        const bool in = decltype(full)::value || (c < c_end && c * CK + 8 * q < k);
        for (int h = 0; h < 2; ++h) {
            if (in) load16<false>(xr[u][h], x_row[h] + off);
            else xr[u][h][0] = xr[u][h][1] = xr[u][h][2] = xr[u][h][3] = 0u;
        }
        for (int j = 0; j < NT; ++j) {
            if (in) load16<true>(wr[u][j], w_row[j] + off);
            else wr[u][j][0] = wr[u][j][1] = wr[u][j][2] = wr[u][j][3] = 0u;
        }
    };
    auto consume = [&](int u) {
        for (int half = 0; half < 2; ++half) {
            const uint32_t a[4] = {xr[u][0][2 * half], xr[u][1][2 * half], xr[u][0][2 * half + 1],
                                   xr[u][1][2 * half + 1]};
            for (int j = 0; j < NT; ++j) {
                const uint32_t b[2] = {wr[u][j][2 * half], wr[u][j][2 * half + 1]};
                mma_m16n8k16(r.acc[0][j], a, b, r.acc[0][j], T());
            }
        }
    };

    const std::true_type full;
    const std::false_type maybe_tail;
    // Chunks that lie wholly within k (and the range): loads without checks.
    const int full_end = min_int(c_end, k / CK);
    const int first = c_begin + at.ks;
    for (int u = 0; u < U; ++u) load(u, first + u * KS, maybe_tail);
    early();
    // Each slot is consumed and refilled with the chunk U steps ahead: U
    // chunks stay in flight until the range runs out. The first loop's
    // refills all lie within k; the second takes what is left.
    int c = first;
    for (; c + (2 * U - 1) * KS < full_end; c += U * KS) {  // sass-loop: direct
        for (int u = 0; u < U; ++u) {
            consume(u);
            load(u, c + (u + U) * KS, full);
        }
    }
    for (; c < c_end; c += U * KS) {
        for (int u = 0; u < U; ++u) {
            consume(u);
            load(u, c + (u + U) * KS, maybe_tail);
        }
    }
    sum_k_slices<C>(reinterpret_cast<float*>(smem), true, false, r);
}

}  // namespace lk
