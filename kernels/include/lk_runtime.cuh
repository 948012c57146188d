// The one include every kernel starts with. It hides the difference between a
// device build (nvcc) and a host build (g++ against kernels/host, docs/DESIGN.md
// section 6): kernels are written once, with these macros.
#pragma once

#ifdef LK_HOST
#include "../host/lk_host_runtime.h"
#define LK_CONCAT_(a, b) a##b
#define LK_CONCAT(a, b) LK_CONCAT_(a, b)
// Shared memory (16-byte aligned, for vector loads and cp.async): a static
// array registered with the runtime, which poisons it at every block start.
#define LK_SHARED(type, name, dims)                                                     \
    alignas(16) static type name dims;                                                              \
    static ::lk_host::SharedRegion LK_CONCAT(lk_shared_region_, name)(&name, sizeof(name))
#define LK_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::lk_host::dynamic_shared())
// A kernel entry point: on the host, `extern "C" int <name>(launch, params)`,
// the same symbol name as the device kernel, which src/launch.rs calls.
#define LK_KERNEL(name, Params, body)                                                          \
    extern "C" int name(const LkHostLaunch* launch, const Params* params) {                    \
        const Params p = *params;                                                              \
        return ::lk_host::launch(*launch, [&p] { body(p); });                                  \
    }
// The same, for a kernel whose registers must let `blocks` blocks of
// `threads` share an SM (__launch_bounds__ on the device).
#define LK_KERNEL_BOUNDED(name, Params, body, threads, blocks) LK_KERNEL(name, Params, body)
// A kernel whose parameters hold tensor maps (TMA takes their address).
#define LK_KERNEL_TMA(name, Params, body) LK_KERNEL(name, Params, body)
#define LK_KERNEL_TMA_BOUNDED(name, Params, body, threads, blocks) LK_KERNEL(name, Params, body)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#define LK_SHARED(type, name, dims) __shared__ __align__(16) type name dims
#define LK_DYNAMIC_SHARED(type, name)                       \
    extern __shared__ __align__(16) unsigned char name##_bytes[]; \
    type* name = reinterpret_cast<type*>(name##_bytes)
#define LK_KERNEL(name, Params, body) \
    extern "C" __global__ void name(const Params p) { body(p); }
#define LK_KERNEL_BOUNDED(name, Params, body, threads, blocks) \
    extern "C" __global__ void __launch_bounds__(threads, blocks) name(const Params p) { body(p); }
#define LK_KERNEL_TMA(name, Params, body) \
    extern "C" __global__ void name(const __grid_constant__ Params p) { body(p); }
#define LK_KERNEL_TMA_BOUNDED(name, Params, body, threads, blocks) \
    extern "C" __global__ void __launch_bounds__(threads, blocks) name(const __grid_constant__ Params p) { body(p); }
#endif

#include "lk_params.h"
#include "lk_types.cuh"

namespace lk {

// Waits until *counter >= target, where the counter is raised by blocks
// EARLIER in the grid that never wait themselves (they are dispatched first,
// so this cannot deadlock). Call from one thread, then __syncthreads(). On the
// host runtime blocks run in order, so the counter must already be there: a
// launch that would wait on a later block fails there instead of hanging.
__device__ __forceinline__ void wait_counter_at_least(const unsigned* counter, unsigned target) {
#ifdef LK_HOST
    if (*counter < target)
        ::lk_host::fail("wait on a grid counter at %u < %u: it depends on a later block", *counter, target);
#else
    while (*reinterpret_cast<const volatile unsigned*>(counter) < target) __nanosleep(64);
    __threadfence();
#endif
}

// A named barrier: the `count` threads (a multiple of 32) that call it with
// `id` (1..15; 0 is __syncthreads) wait for each other, the rest go on. For
// teams within a block, as a warp-specialized kernel's consumers.
__device__ __forceinline__ void named_barrier_sync(unsigned id, unsigned count) {
#ifdef LK_HOST
    ::lk_host::named_barrier(id, count);
#else
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
#endif
}

// A load that bypasses L1: for data another block wrote during this launch.
template <class T>
__device__ __forceinline__ T load_cg(const T* p) {
#ifdef LK_HOST
    return *p;
#else
    return __ldcg(p);
#endif
}

// Asks for the 128-byte line holding p to be brought into L2, without
// waiting for it: a hint, for data the block loads later (a no-op on the host).
__device__ __forceinline__ void prefetch_l2(const void* p) {
#ifdef LK_HOST
    (void)p;
#else
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

// Hides p's value from the compiler, so that what the code derives from it
// (row pointers, bounds) is computed where it is used instead of hoisted out
// of an enclosing loop and held in registers across it (a no-op on the host).
template <class T>
__device__ __forceinline__ void opaque(T*& p) {
#ifdef LK_HOST
    (void)p;
#else
    asm volatile("" : "+l"(p));
#endif
}

}  // namespace lk
