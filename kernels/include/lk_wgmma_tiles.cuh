// What the wgmma kernels (kernels/fused_forward_wgmma.cu,
// kernels/multi_adapter_forward_wgmma.cu, kernels/lora_backward_wgmma.cu)
// share: the block shape (three warpgroups, warpgroup 0 the TMA producer,
// warpgroups 1 and 2 the consumers of a 128 x 128 tile, 64 rows each, in
// 64-wide k-tiles), the stage ring of mbarriers, the two roles, a consumer's
// k-tile, the expand's products on wgmma, and the tile's store through shared
// memory. The consumers' accumulators are those of 8 mma.sync warps of
// 16 x 128 (a wgmma warp's d[4 j + q] is acc[0][j][q]), so the mma.sync
// expand steps (lk_tile_gemm.cuh) continue them.
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

// The stage ring's mbarriers (static shared memory the kernel declares, one
// of each per stage): full[s] completes when the producer's loads of stage s
// have landed (one arrival announcing their bytes), empty[s] when both
// consumer warpgroups are done with it (one arrival each). Iteration `it`
// uses stage it % STAGES, in phase it / STAGES.
template <int STAGES>
struct StageRing {
    uint64_t* full;
    uint64_t* empty;
    // Thread 0 initializes the barriers; every thread of the block meets here.
    __device__ void init() const {
        if (threadIdx.x == 0) {
            for (int s = 0; s < STAGES; ++s) {
                lk::mbarrier_init(&full[s], 1);
                lk::mbarrier_init(&empty[s], 2);  // one arrival per consumer warpgroup
            }
            lk::fence_mbarrier_init();
        }
        __syncthreads();
    }
    // The producer: the stage of iteration `it`, once it is free again (its
    // first use waits on nothing), with `bytes` announced on its full barrier.
    __device__ int acquire(int it, unsigned bytes) const {
        const int s = it % STAGES;
        lk::mbarrier_wait(&empty[s], (unsigned)(it / STAGES % 2) ^ 1u);
        lk::mbarrier_arrive_expect_tx(&full[s], bytes);
        return s;
    }
    // Consumers: the stage of iteration `it`, once its loads have landed.
    __device__ int wait_loaded(int it) const {
        const int s = it % STAGES;
        lk::mbarrier_wait(&full[s], (unsigned)(it / STAGES % 2));
        return s;
    }
    // Consumers: this warpgroup is done with stage s.
    __device__ void release(int s) const {
        if (threadIdx.x % 128 == 0) lk::mbarrier_arrive(&empty[s]);
    }
};

// The block's two roles: warpgroup 0, the producer, gives its registers up
// and its thread 0 runs `stream()` (the loads, through StageRing::acquire);
// the call returns true there and the caller returns. The consumers claim
// registers and get false.
template <class Stream>
__device__ bool producer_role(Stream stream) {
    if (threadIdx.x >= 128) {
        lk::setmaxnreg_inc<232>();
        return false;
    }
    lk::setmaxnreg_dec<40>();
    if (threadIdx.x == 0) stream();
    return true;
}

// producer_role for `count` iterations: `load(it, s)` once stage s of
// iteration it is acquired with `bytes(it)` announced.
template <int STAGES, class Bytes, class Load>
__device__ bool produce(const StageRing<STAGES>& ring, int count, Bytes bytes, Load load) {
    return producer_role([&] {
        for (int it = 0; it < count; ++it) load(it, ring.acquire(it, bytes(it)));
    });
}

// One k-tile of a consumer warpgroup's single product: wait for stage `it`,
// fence, `issue(s)` (its wgmmas into acc), commit and wait for the group
// (keeping one in flight had ptxas serialize the wgmmas: its C7515 note),
// then release the stage.
template <int STAGES, int N, class Issue>
__device__ __forceinline__ void consume(const StageRing<STAGES>& ring, int it, float (&acc)[N], Issue issue) {
    const int s = ring.wait_loaded(it);
    lk::wgmma_fence();
    lk::wgmma_fence_operands(acc);
    issue(s);
    lk::wgmma_commit();
    lk::wgmma_wait<0>();
    lk::wgmma_fence_operands(acc);
    ring.release(s);
}

// A K-major operand of 128-byte rows (64 k) in the 128-byte swizzle, from
// its first row at `rows`: k-step kk (16 k) starts 32 bytes in; 8-row atoms
// are 1024 bytes apart.
__device__ __forceinline__ uint64_t k_major_desc(unsigned rows, int kk) {
    return lk::wgmma_desc(rows + 32 * kk, 16, 1024, 128);
}

// The forward's weight tile for a wgmma expand: rows col0 .. col0 + BN of b
// ([n][ldb]), ranks 0 .. rp, zeros past n and from rc on, in the canonical
// K-major layout without swizzle (8 x 8 core matrices of 8 rows of 16
// bytes): (row, j) at (j / 8) BN 16 + (row / 8) 128 + (row % 8) 16 + (j % 8) 2
// bytes, so expand_wgmma's descriptors read it with lbo = BN 16, sbo = 128.
// Non-finite weights are 0 (finite_weight raises the guard). Ends with
// fence.proxy.async: wgmma reads what these generic stores wrote.
template <class T, class C>
__device__ void load_b_canonical(T* ws, const lk::ExpandGuard<C>& guard, const T* b, int ldb, int n, int col0,
                                 int rc, int rp) {
    for (int i = C::Team::tid(); i < C::BN * rp; i += C::THREADS) {
        const int row = i / rp, j = i % rp, gn = col0 + row;
        const T v = (gn < n && j < rc) ? b[(size_t)gn * ldb + j] : lk::from_f32<T>(0.f);
        ws[(j / 8) * C::BN * 8 + (row / 8) * 64 + (row % 8) * 8 + j % 8] = lk::finite_weight(v, guard);
    }
    lk::fence_proxy_async();
}

// The expand's finite products on wgmma: acc += v_hi W + v_lo W over rank
// columns [0, rp), each warp's 16 rows of v_hi and v_lo from the split's
// tiles (ldmatrix: mma.m16n8k16's A fragment, which wgmma takes from
// registers), W from load_b_canonical's tile. Two wgmma (hi, lo) of N = BN
// per 16 ranks, fenced each time (their A registers were just loaded); the
// group is waited on before the accumulators are touched again.
template <class T, class C>
__device__ void expand_wgmma(const lk::ExpandTiles<T, C>& e, int rp, lk::Accumulators<C>& r) {
    static_assert(C::MT == 1 && C::WN == 1 && C::KSPLIT == 1, "warps of 16 whole rows");
    float(&acc)[C::BN / 2] = *reinterpret_cast<float(*)[C::BN / 2]>(&r.acc[0][0][0]);
    const int lane = C::Team::tid() % 32, warp = C::Team::tid() / 32;
    const unsigned ws = lk::smem_address(e.ws);
    for (int kk = 0; kk < rp; kk += 16) {  // sass-loop: expand_wgmma
        uint32_t hf[4], lf[4];
        const int off = (warp * 16 + lane % 16) * C::LDT + kk + (lane / 16) * 8;
        lk::ldmatrix_x4(hf, e.th + off, false);
        lk::ldmatrix_x4(lf, e.tl + off, false);
        const uint64_t desc = lk::wgmma_desc(ws + (kk / 8) * C::BN * 16, C::BN * 16, 128, 0);
        lk::wgmma_fence();
        lk::wgmma_fence_operands(acc);
        lk::wgmma_rs<C::BN, T>(acc, hf, desc, true);
        lk::wgmma_rs<C::BN, T>(acc, lf, desc, true);
        lk::wgmma_commit();
        lk::wgmma_wait<0>();
        lk::wgmma_fence_operands(acc);
    }
}

// Bytes of shared memory store_tile stages the tile's f32 sums in (rows of
// BN + 8 floats: the half-warps' 8-byte stores of one fragment hit distinct
// banks). The kernels pass their expand tiles, free by then and larger.
template <class C>
constexpr int staged_tile_bytes() {
    return C::BM * (C::BN + 8) * 4;
}

// y[row0.., col0..] = acc (+ beta y), as lk::store_y computes it (one
// rounding of acc + beta y; beta = 0 never reads y), but through shared
// memory: the consumers put their f32 sums in `stage` (staged_tile_bytes),
// then each thread takes 8 consecutive columns of a row and stores them with
// one 16-byte store (and, with beta, one 16-byte load of y) where n % 8 == 0
// and y is 16-byte aligned; element by element otherwise and at the edges.
// A warp's 16-row fragments stored directly are 2-byte stores, 8 rows apart.
// Call from every consumer thread; starts and ends with their barrier (the
// stage may be the expand's tiles of the next column tile).
template <class T, class C>
__device__ void store_tile(T* y, int m, int n, int row0, int col0, float beta, const lk::Accumulators<C>& r,
                           unsigned char* stage) {
    static_assert(C::MT == 1 && C::WN == 1 && C::KSPLIT == 1, "warps of 16 whole rows");
    constexpr int LD = C::BN + 8;
    float* sums = reinterpret_cast<float*>(stage);
    const int tid = C::Team::tid(), lane = tid % 32, warp = tid / 32;
    C::Team::sync();  // the stage's last readers are done
    for (int j = 0; j < C::NT; ++j)
        for (int h = 0; h < 2; ++h) {
            const int row = warp * 16 + lane / 4 + 8 * h, col = j * 8 + 2 * (lane % 4);
            *reinterpret_cast<float2*>(&sums[row * LD + col]) = make_float2(r.acc[0][j][2 * h], r.acc[0][j][2 * h + 1]);
        }
    C::Team::sync();
    const bool vector = n % 8 == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0;
    constexpr int CHUNKS = C::BN / 8;  // 8 columns a thread
    for (int e = tid; e < C::BM * CHUNKS; e += C::THREADS) {
        const int row = e / CHUNKS, col = e % CHUNKS * 8, gr = row0 + row, gc = col0 + col;
        if (gr >= m || gc >= n) continue;
        const float* s = &sums[row * LD + col];
        T* out = y + (size_t)gr * n + gc;
        if (vector && gc + 8 <= n) {
            // memcpy, not pointer casts between T and uint4 (C++'s aliasing rules on the host).
            T old[8], v[8];
            if (beta != 0.f) {
                const uint4 raw = *reinterpret_cast<const uint4*>(out);
                memcpy(old, &raw, sizeof(old));
            }
            for (int i = 0; i < 8; ++i) v[i] = lk::from_f32<T>(beta != 0.f ? s[i] + beta * lk::to_f32(old[i]) : s[i]);
            uint4 packed;
            memcpy(&packed, v, sizeof(packed));
            *reinterpret_cast<uint4*>(out) = packed;
        } else {
            for (int i = 0; i < 8 && gc + i < n; ++i)
                out[i] = lk::from_f32<T>(beta != 0.f ? s[i] + beta * lk::to_f32(out[i]) : s[i]);
        }
    }
    C::Team::sync();  // the stage is free again
}

}  // namespace wgmma_tiles
}  // namespace lk
