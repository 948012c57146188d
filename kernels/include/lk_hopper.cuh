// Hopper's asynchronous instructions (sm_90a), reached through lk_mma.cuh:
// wgmma.mma_async (m64nNk16, f32 accumulators, f16/bf16 operands, K-major),
// TMA 2-D tile loads (cp.async.bulk.tensor) completing on an mbarrier, the
// mbarrier itself, and the proxy fences. Device builds emit inline PTX and
// exist only when compiling for sm_90a; host builds emulate every
// instruction (kernels/host/lk_host_hopper.h says how), so a kernel that
// misreads a layout, skips a fence or waits on the wrong phase fails on the
// host runtime as it would on a GPU. Both define LK_HOPPER.
//
// Shared-memory operands are K-major, in the PTX ISA's canonical layouts
// ("Shared Memory Matrix Layout"), for rows (M of A, N of B) by 16 k:
// - no swizzle: 8x8 core matrices, each 8 rows of 16 contiguous bytes;
//   element (row, k) at start + (row / 8) sbo + (k / 8) lbo + (row % 8) 16 + (k % 8) 2;
// - swizzle S (32, 64 or 128 bytes): rows of S bytes, 8 rows an atom;
//   (row, k) at start + (row / 8) sbo + (row % 8) S + 2 k, then the 16-byte
//   chunk index (address bits 4..) XOR the address bits from 7 up (1, 2 or 3
//   bits for 32, 64, 128). TMA with the same swizzle writes exactly this, so
//   a box of S / 2 elements by the rows loads an operand; its k steps start
//   32 bytes apart. Atoms must start on a multiple of 8 S bytes.
// B may also be MN-major (wgmma_ss_b_mn: a [k][N] matrix, N contiguous), in
// the canonical MN-major layouts, for N by 16 k:
// - no swizzle: 8x8 core matrices, each 8 k rows of 16 contiguous bytes (8 N);
//   element (n, k) at start + (n / 8) sbo + (k / 8) lbo + (k % 8) 16 + (n % 8) 2;
// - swizzle S: rows of S bytes (S / 2 N) along k, 8 rows an atom; (n, k) at
//   start + (n / (S / 2)) lbo + (k / 8) sbo + (k % 8) S + 2 (n % (S / 2)),
//   swizzled as above: TMA writes exactly this for a box of S / 2 N by the k
//   rows of a row-major [k][N] matrix. Every atom on a multiple of 8 S bytes
//   (k steps 16 S bytes apart). Note lbo and sbo trade roles against K-major.
// Accumulators, thread t of the warpgroup (warp w = t / 32, group = lane / 4,
// quad = lane % 4): d[i] is row 16 w + group + 8 ((i / 2) % 2), column
// 8 (i / 4) + 2 quad + i % 2. A from registers: each warp holds its 16 rows as
// mma.m16n8k16's A fragment (lk_mma.cuh).
#pragma once
#include "lk_runtime.cuh"

#if defined(LK_HOST)
#include <type_traits>

#include "../host/lk_host_hopper.h"
#define LK_HOPPER 1
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
#include "lk_wgmma_forms.cuh"
#define LK_HOPPER 1
#endif

#ifdef LK_HOPPER
namespace lk {

// The .shared window address of p (on the host runtime: p must be in dynamic
// shared memory).
__device__ __forceinline__ unsigned smem_address(const void* p) {
#ifdef LK_HOST
    return ::lk_host::shared_address(p);
#else
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
#endif
}

// A shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"):
// start address, leading (k) and stride (row) byte offsets, swizzle bytes
// (0, 32, 64 or 128). Base offset 0: atoms aligned as above.
__device__ __forceinline__ uint64_t wgmma_desc(unsigned start, unsigned lbo, unsigned sbo, int swizzle_bytes) {
    const uint64_t mode = swizzle_bytes == 128 ? 1 : swizzle_bytes == 64 ? 2 : swizzle_bytes == 32 ? 3 : 0;
    return (uint64_t)((start & 0x3FFFFu) >> 4) | (uint64_t)((lbo >> 4) & 0x3FFFu) << 16 |
           (uint64_t)((sbo >> 4) & 0x3FFFu) << 32 | mode << 62;
}

// d (N/2 floats a thread) = A B^T, or += when `accumulate`; A and B through descriptors.
template <int N, class T>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
#ifdef LK_HOST
    ::lk_host::hopper::wgmma_mma(N, std::is_same<T, __nv_bfloat16>::value, desc_a, nullptr, desc_b, false, accumulate,
                                 d);
#else
    wgmma_forms::Form<N, T>::ss(d, desc_a, desc_b, accumulate ? 1 : 0);
#endif
}

// The same with B MN-major (imm-trans-b: B's N contiguous, as a row-major
// [k][N] matrix loads; the layouts above).
template <int N, class T>
__device__ __forceinline__ void wgmma_ss_b_mn(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
#ifdef LK_HOST
    ::lk_host::hopper::wgmma_mma(N, std::is_same<T, __nv_bfloat16>::value, desc_a, nullptr, desc_b, true, accumulate,
                                 d);
#else
    wgmma_forms::Form<N, T>::ss_b_mn(d, desc_a, desc_b, accumulate ? 1 : 0);
#endif
}

// The same with A from registers (this warp's 16 rows, mma.m16n8k16's A fragment).
template <int N, class T>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
#ifdef LK_HOST
    ::lk_host::hopper::wgmma_mma(N, std::is_same<T, __nv_bfloat16>::value, 0, a, desc_b, false, accumulate, d);
#else
    wgmma_forms::Form<N, T>::rs(d, a, desc_b, accumulate ? 1 : 0);
#endif
}

// wgmma.fence: before the first wgmma that touches accumulators (or A
// registers) the threads accessed since the warpgroup last waited.
__device__ __forceinline__ void wgmma_fence() {
#ifdef LK_HOST
    ::lk_host::hopper::wgmma_fence();
#else
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef LK_HOST
    ::lk_host::hopper::wgmma_commit();
#else
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most N committed groups are pending: their accumulators are then written.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef LK_HOST
    ::lk_host::hopper::wgmma_wait(N);
#else
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Keeps the compiler from moving accesses of the accumulators across the
// asynchronous region (a no-op on the host).
template <int K>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[K]) {
#ifndef LK_HOST
#pragma unroll
    for (int i = 0; i < K; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
    (void)d;
#endif
}

// mbarrier, 8 bytes of shared memory. Initialized by one thread, then made
// visible with fence_mbarrier_init() and a __syncthreads.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, unsigned count) {
#ifdef LK_HOST
    ::lk_host::hopper::mbarrier_init(bar, count);
#else
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void fence_mbarrier_init() {
#ifndef LK_HOST
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#ifdef LK_HOST
    ::lk_host::hopper::mbarrier_arrive(bar, 0);
#else
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(bar)) : "memory");
#endif
}
// One arrival that also announces `bytes` to come through complete_tx (TMA).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
#ifdef LK_HOST
    ::lk_host::hopper::mbarrier_arrive(bar, bytes);
#else
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(bar)), "r"(bytes)
                 : "memory");
#endif
}
// True once the phase of parity `parity` has completed (a bounded wait on a GPU).
__device__ __forceinline__ bool mbarrier_try_wait(uint64_t* bar, unsigned parity) {
#ifdef LK_HOST
    return ::lk_host::hopper::mbarrier_try_wait(bar, parity);
#else
    unsigned done;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_address(bar)), "r"(parity)
        : "memory");
    return done != 0;
#endif
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, unsigned parity) {
    while (!mbarrier_try_wait(bar, parity)) {
    }
}

// TMA: the box at element coordinates (c0 innermost, c1) of the tensor map's
// tensor into shared memory at dst (128-byte aligned; for a swizzled map, on
// a multiple of 8 x the swizzle bytes), completing `bytes of the box` on bar.
// Out-of-bounds elements are zero-filled. `map` must be a __grid_constant__
// parameter's field (LK_KERNEL_TMA) or in global memory.
__device__ __forceinline__ void tma_load_2d(void* dst, const LkTensorMap* map, int c0, int c1, uint64_t* bar) {
#ifdef LK_HOST
    ::lk_host::hopper::tma_load_2d(dst, map, c0, c1, bar);
#else
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
            smem_address(dst)),
        "l"(map), "r"(c0), "r"(c1), "r"(smem_address(bar))
        : "memory");
#endif
}

// fence.proxy.async: generic stores to shared memory before it become visible
// to the async proxy (wgmma operands, TMA) after it.
__device__ __forceinline__ void fence_proxy_async() {
#ifdef LK_HOST
    ::lk_host::fence_proxy_async();
#else
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// setmaxnreg: a warpgroup gives up (dec) or claims (inc) registers, as
// warp-specialized kernels do for producers and consumers. Nothing on the host.
template <int Regs>
__device__ __forceinline__ void setmaxnreg_inc() {
#ifndef LK_HOST
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Regs));
#endif
}
template <int Regs>
__device__ __forceinline__ void setmaxnreg_dec() {
#ifndef LK_HOST
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Regs));
#endif
}

}  // namespace lk
#endif  // LK_HOPPER
