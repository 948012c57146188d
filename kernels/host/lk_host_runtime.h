// Host runtime: lets kernels/*.cu compile with the host C++ compiler and run a
// launch on the CPU (docs/DESIGN.md section 6). Included only through lk_runtime.cuh
// when LK_HOST is defined; never seen by nvcc.
//
// Execution model: blocks run one after another; the threads of a block are
// fibers run by a deterministic scheduler, each thread running until it blocks
// (__syncthreads, a warp collective) or exits, and the first runnable thread
// (in schedule order) always runs next. So the first warp runs all the way to
// its next __syncthreads before the next warp starts, and a missing barrier
// shows up on every run, not by luck. Shared memory is poisoned (0xFF bytes:
// NaN for f32/f16/bf16) at every block start, so a read before a write shows.
#pragma once

#include <math.h>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

// The current thread's coordinates; the scheduler sets them before it resumes
// a fiber. Plain globals are safe: host launches are serialized (one at a time).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
// Host builds reject plain __shared__: shared memory must be declared with
// LK_SHARED so the runtime can poison it at every block start.
#define __shared__ static_assert(false, "declare shared memory with LK_SHARED(type, name, dims)");

extern "C" {
// Configuration of one host launch, filled by Rust (src/launch.rs).
typedef struct LkHostLaunch {
    unsigned grid[3];
    unsigned block[3];
    unsigned dynamic_smem_bytes;
} LkHostLaunch;

// Thread schedule: 0 runs thread 0 first between barriers, 1 runs the last
// thread first. Running both exposes missing barriers in either direction.
// 2 lets the threads take turns (the next runnable thread after the one that
// blocked), so warps interleave at every warp collective: data that warps
// share without a block barrier shows.
void lk_host_set_schedule(int order);
// Message of the last failed host launch on this process (NUL-terminated).
const char* lk_host_last_error(void);
}

namespace lk_host {

// Runs a launch; returns 0 on success, nonzero (see lk_host_last_error) on a
// launch-configuration error, a deadlock, divergent collectives or __trap().
int launch(const LkHostLaunch& cfg, const std::function<void()>& kernel);

// Marks [ptr, ptr + bytes) as shared memory of the running kernel: poisoned now
// and at every later block start of every launch.
struct SharedRegion {
    SharedRegion(void* ptr, size_t bytes);
};
void* dynamic_shared();

// A warp-collective operation: every lane in `mask` calls it with the same
// `tag`; when the last one arrives `op` sees all lanes' inputs and writes all
// lanes' outputs. ins/outs are indexed by lane; entries of lanes outside
// `mask` are null.
using WarpOp = void (*)(const void* const ins[32], void* const outs[32], unsigned mask);
void warp_collective(unsigned mask, const char* tag, const void* in, void* out, WarpOp op);

// A warpgroup-collective operation (wgmma): the 128 threads of the calling
// thread's warpgroup (warps 4g..4g+3) call it with the same `tag`; when the
// last one arrives `op` sees all their inputs and writes all their outputs,
// indexed by thread within the warpgroup.
using WarpgroupOp = void (*)(const void* const ins[128], void* const outs[128]);
void warpgroup_collective(const char* tag, const void* in, void* out, WarpgroupOp op);

// A named barrier (bar.sync id, count; id 1..15, count a multiple of 32):
// the first `count` threads to arrive at `id` go on together. Barrier 0 is
// __syncthreads.
void named_barrier(unsigned id, unsigned count);

// Blocking on an event that another thread of the block brings about (an
// mbarrier phase): the thread sleeps until notify(key), then returns and
// checks its condition again. If every live thread sleeps, the launch fails
// with a deadlock that names `what`.
void wait_for(const void* key, const char* what);
void notify(const void* key);

// Dynamic shared memory as the async proxy (TMA, wgmma) addresses it. The
// window puts it at shared address kDynamicSharedBase (16-byte aligned and
// no more, as when static shared memory precedes it on a GPU), so a kernel
// must align its swizzled buffers itself. Only dynamic shared memory has
// addresses here: operands of TMA and wgmma must live in it.
constexpr unsigned kDynamicSharedBase = 0x410;
unsigned shared_address(const void* p);  // fails unless p is in dynamic shared memory
// The dynamic shared memory at [addr, addr + bytes), as generic stores see
// it (live) or as the async proxy sees it (view); fails past its end.
unsigned char* shared_live(unsigned addr, unsigned bytes);
const unsigned char* shared_view(unsigned addr, unsigned bytes);
// fence.proxy.async: the async proxy's view catches up with what generic
// stores wrote. The view is one copy per block, so a fence by any thread
// publishes every thread's stores: a fence missing in some threads only is
// not caught, one missing in all of them is.
void fence_proxy_async();

// Per-thread queue of cp.async copies, so a missing wait shows on the host too.
void async_copy(void* dst, const void* src, unsigned bytes, unsigned src_bytes);
void async_commit();
void async_wait(int keep_groups);

// The Hopper instructions' per-block state (kernels/host/lk_host_hopper.cpp):
// reset at every block start; at a block's end, a message if the block left
// work unfinished (a wgmma group never waited on), else null.
void hopper_block_start();
const char* hopper_block_end();

[[noreturn]] void fail(const char* fmt, ...);
unsigned lane_id();
// The running thread's linear index in its block.
unsigned thread_rank();

template <class T>
struct ShflIn {
    T value;
    int src;  // source lane, or -1 for "keep my own value"
};
template <class T>
void shfl_op(const void* const ins[32], void* const outs[32], unsigned mask) {
    for (int lane = 0; lane < 32; ++lane) {
        if (!ins[lane]) continue;
        const ShflIn<T>* in = static_cast<const ShflIn<T>*>(ins[lane]);
        int src = in->src < 0 ? lane : in->src;
        if (!(mask >> src & 1u)) fail("shuffle: lane %d reads lane %d, which is not in mask 0x%08x", lane, src, mask);
        *static_cast<T*>(outs[lane]) = static_cast<const ShflIn<T>*>(ins[src])->value;
    }
}
template <class T>
T shfl(unsigned mask, T v, int src) {
    ShflIn<T> in{v, src};
    T out;
    warp_collective(mask, "shfl", &in, &out, &shfl_op<T>);
    return out;
}
void vote_op(const void* const ins[32], void* const outs[32], unsigned mask);

}  // namespace lk_host

void __syncthreads();
void __syncwarp(unsigned mask = 0xffffffffu);
[[noreturn]] void __trap();

// Shuffles follow CUDA: `width` splits the warp into segments; a source lane
// outside the caller's segment returns the caller's own value.
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    int lane = (int)lk_host::lane_id();
    int base = lane & ~(width - 1);
    return lk_host::shfl(mask, v, base + (src & (width - 1)));
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    int lane = (int)lk_host::lane_id();
    int src = lane ^ lane_mask;
    if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = -1;
    return lk_host::shfl(mask, v, src);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = (int)lk_host::lane_id();
    int src = lane + (int)delta;
    if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = -1;
    return lk_host::shfl(mask, v, src);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = (int)lk_host::lane_id();
    int src = lane - (int)delta;
    if (src < (lane & ~(width - 1))) src = -1;
    return lk_host::shfl(mask, v, src);
}
unsigned __ballot_sync(unsigned mask, int predicate);
inline int __any_sync(unsigned mask, int p) { return __ballot_sync(mask, p) != 0; }
inline int __all_sync(unsigned mask, int p) { return __ballot_sync(mask, p) == mask; }

// Atomics: host launches run on one OS thread, so a plain read-modify-write is
// atomic with respect to every other simulated thread.
template <class T>
T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
template <class T>
T atomicMax(T* p, T v) {
    T old = *p;
    *p = old > v ? old : v;
    return old;
}
template <class T>
T atomicExch(T* p, T v) {
    T old = *p;
    *p = v;
    return old;
}
template <class T>
T atomicCAS(T* p, T cmp, T v) {
    T old = *p;
    if (old == cmp) *p = v;
    return old;
}
// Host launches run on one OS thread: memory is always coherent.
inline void __threadfence() {}
template <class T>
T __ldg(const T* p) {
    return *p;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
