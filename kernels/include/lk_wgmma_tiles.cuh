// The block shape of the wgmma kernels (kernels/fused_forward_wgmma.cu and
// kernels/lora_backward_wgmma.cu): three warpgroups, warpgroup 0 the TMA
// producer, warpgroups 1 and 2 the consumers of a 128 x 128 tile, 64 rows
// each, in 64-wide k-tiles. The consumers' accumulators are those of 8
// mma.sync warps of 16 x 128 (a wgmma warp's d[4 j + q] is acc[0][j][q]), so
// the mma.sync expand and store_y (lk_tile_gemm.cuh) continue them.
#pragma once
#include "lk_tile_gemm.cuh"

namespace lk {
namespace wgmma_tiles {

// The consumers of the block (warpgroups 1 and 2) as a team: named barrier 1.
struct ConsumerTeam {
    static __device__ __forceinline__ unsigned tid() { return threadIdx.x - 128; }
    static __device__ __forceinline__ void sync() { lk::named_barrier_sync(1, 256); }
};

// 8 consumer warps of 16 rows x 128 columns on a 128 x 128 tile, 64-wide k-tiles.
template <int STAGES>
struct Tiles : lk::TileConfig<128, 128, 64, 8, 1, STAGES> {
    using Team = ConsumerTeam;
};

constexpr int kThreads = 384;
// The stages' ring from the first 1024-byte boundary of the dynamic shared
// memory (128-byte swizzle atoms; the launch adds 1024 bytes for this).
__device__ __forceinline__ unsigned char* ring_start(unsigned char* dynamic) {
    return dynamic + (1024 - lk::smem_address(dynamic) % 1024) % 1024;
}

// A K-major operand of 128-byte rows (64 k) in the 128-byte swizzle, from
// its first row at `rows`: k-step kk (16 k) starts 32 bytes in; 8-row atoms
// are 1024 bytes apart.
__device__ __forceinline__ uint64_t k_major_desc(unsigned rows, int kk) {
    return lk::wgmma_desc(rows + 32 * kk, 16, 1024, 128);
}

}  // namespace wgmma_tiles
}  // namespace lk
