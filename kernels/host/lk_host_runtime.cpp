// Host runtime implementation: a deterministic fiber scheduler for the threads
// of one block, warp-collective rendezvous, shared-memory poisoning and the
// cp.async queue. See lk_host_runtime.h for the model.
#include "lk_host_runtime.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <cstdarg>
#include <cstdio>
#include <string>
#include <vector>

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

// Fiber context switch. On x86-64 a few instructions that save the
// callee-saved registers and swap stacks (swapcontext would also make a
// signal-mask system call on every switch, which dominates host-runtime
// tests); elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void lk_host_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl lk_host_switch
    .type lk_host_switch, @function
lk_host_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size lk_host_switch, .-lk_host_switch
)");
#endif

namespace lk_host {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxDynamicSmem = 228 * 1024;
// Bytes past the end of dynamic shared memory that must still hold their
// pattern after every block: a kernel that writes beyond its allocation fails.
constexpr size_t kSmemGuard = 4096;
constexpr unsigned char kGuardByte = 0xA5;

enum class State { Runnable, AtBarrier, AtNamedBarrier, AtWarp, AtWarpgroup, AtEvent, Done };

struct PendingCopy {
    void* dst;
    const void* src;
    unsigned bytes, src_bytes;
};

// Where a suspended fiber (or the scheduler) resumes.
struct Context {
#if defined(__x86_64__)
    void* sp = nullptr;
#else
    ucontext_t uc;
#endif
};

void switch_context(Context& save, Context& load) {
#if defined(__x86_64__)
    lk_host_switch(&save.sp, load.sp);
#else
    swapcontext(&save.uc, &load.uc);
#endif
}

struct Fiber {
    Context ctx;
    char* stack = nullptr;  // mmap'd, guard page at the low end
    State state = State::Done;
    // Warp-collective arrival: what this lane brought and where it wants results.
    const char* warp_tag = nullptr;
    unsigned warp_mask = 0;
    const void* warp_in = nullptr;
    void* warp_out = nullptr;
    // The named barrier a thread waits at, and the count it gave.
    unsigned barrier_id = 0, barrier_count = 0;
    // What a thread asleep in wait_for waits on.
    const void* wait_key = nullptr;
    const char* wait_what = nullptr;
    std::vector<PendingCopy> copies;  // issued, not yet committed
    std::vector<std::vector<PendingCopy>> groups;  // committed, oldest first
};

struct Runtime {
    std::vector<Fiber> fibers;
    std::vector<std::pair<void*, size_t>> shared_regions;
    // Dynamic shared memory: `dynamic_bytes` at `dynamic_smem` (1024-byte
    // aligned inside `dynamic_storage`), then kSmemGuard guard bytes; and the
    // async proxy's view of it (fence_proxy_async).
    std::vector<unsigned char> dynamic_storage;
    unsigned char* dynamic_smem = nullptr;
    size_t dynamic_bytes = 0;
    std::vector<unsigned char> async_view;
    Context scheduler;
    unsigned current = 0;
    unsigned nthreads = 0;
    unsigned hint = 0;  // schedule position from which to look for a runnable thread
    int schedule = 0;
    bool failed = false;
    std::string error;
    const std::function<void()>* kernel = nullptr;
};

Runtime rt;
std::string last_error;

void poison(void* p, size_t n) { std::memset(p, 0xFF, n); }

Fiber& self() { return rt.fibers[rt.current]; }

// The thread at position i of the schedule, and the position of thread t.
unsigned order(unsigned i) { return rt.schedule == 1 ? rt.nthreads - 1 - i : i; }

// Marks thread t runnable and keeps the scheduler's hint below it.
void wake(unsigned t) {
    rt.fibers[t].state = State::Runnable;
    unsigned pos = order(t);  // order is its own inverse
    if (pos < rt.hint) rt.hint = pos;
}

void yield_to_scheduler() { switch_context(self().ctx, rt.scheduler); }

void flush_copies(Fiber& f, size_t keep_groups) {
    while (f.groups.size() > keep_groups) {
        for (const PendingCopy& c : f.groups.front()) {
            std::memcpy(c.dst, c.src, c.src_bytes);
            std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
        }
        f.groups.erase(f.groups.begin());
    }
}

void fiber_main() {
    (*rt.kernel)();
    Fiber& f = self();
    // A thread's outstanding cp.async copies still land after it exits.
    async_commit();
    flush_copies(f, 0);
    f.state = State::Done;
    yield_to_scheduler();
}

// Prepares f to start in fiber_main on its own stack at the next switch.
void start_context(Fiber& f) {
#if defined(__x86_64__)
    // The stack lk_host_switch pops on its way in: MXCSR and x87 control word
    // (8 bytes), six callee-saved registers, then fiber_main as the return
    // address, so fiber_main starts with rsp % 16 == 8 as after a call.
    uintptr_t top = reinterpret_cast<uintptr_t>(f.stack + kGuardBytes + kStackBytes) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                                  // fiber_main's own (never used) return address
    *--sp = reinterpret_cast<void*>(&fiber_main);     // where lk_host_switch returns to
    for (int i = 0; i < 6; ++i) *--sp = nullptr;      // rbp, rbx, r12-r15
    --sp;
    unsigned mxcsr;
    unsigned short fpcw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpcw));
    std::memcpy(sp, &mxcsr, 4);
    std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpcw, 2);
    f.ctx.sp = sp;
#else
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = f.stack + kGuardBytes;
    f.ctx.uc.uc_stack.ss_size = kStackBytes;
    f.ctx.uc.uc_link = nullptr;
    makecontext(&f.ctx.uc, fiber_main, 0);
#endif
}

bool ensure_fibers(unsigned n) {
    while (rt.fibers.size() < n) {
        rt.fibers.emplace_back();
        void* mem = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (mem == MAP_FAILED) return false;
        mprotect(mem, kGuardBytes, PROT_NONE);
        rt.fibers.back().stack = static_cast<char*>(mem);
    }
    return true;
}

void set_thread_coords(unsigned t) {
    threadIdx.x = t % blockDim.x;
    threadIdx.y = (t / blockDim.x) % blockDim.y;
    threadIdx.z = t / (blockDim.x * blockDim.y);
}

// Runs one block to completion. Returns false (rt.error set) on failure.
bool run_block() {
    for (auto& region : rt.shared_regions) poison(region.first, region.second);
    poison(rt.dynamic_smem, rt.dynamic_bytes);
    poison(rt.async_view.data(), rt.async_view.size());
    hopper_block_start();
    for (unsigned t = 0; t < rt.nthreads; ++t) {
        Fiber& f = rt.fibers[t];
        f.state = State::Runnable;
        f.copies.clear();
        f.groups.clear();
        start_context(f);
    }
    rt.current = rt.nthreads - 1;  // taking turns starts at thread 0
    for (;;) {
        // Always resume the first runnable thread in schedule order: a warp
        // whose collective completes carries on at once, so the first warp runs
        // all the way to the next __syncthreads before the second one starts.
        // That is the most adversarial order for a missing barrier (the reverse
        // schedule covers the other direction).
        // rt.hint: no thread before it (in schedule order) is runnable.
        rt.hint = 0;
        for (;;) {
            unsigned t = rt.nthreads;
            if (rt.schedule == 2) {
                // Taking turns: the next runnable thread after the last one run.
                for (unsigned d = 1; d <= rt.nthreads; ++d) {
                    unsigned c = (rt.current + d) % rt.nthreads;
                    if (rt.fibers[c].state == State::Runnable) {
                        t = c;
                        break;
                    }
                }
            } else {
                for (unsigned i = rt.hint; i < rt.nthreads; ++i) {
                    unsigned c = order(i);
                    if (rt.fibers[c].state == State::Runnable) {
                        t = c;
                        rt.hint = i;
                        break;
                    }
                }
            }
            if (t == rt.nthreads || rt.failed) break;
            rt.current = t;
            set_thread_coords(t);
            switch_context(rt.scheduler, rt.fibers[t].ctx);
        }
        if (rt.failed) return false;
        unsigned at_barrier = 0, done = 0;
        for (unsigned t = 0; t < rt.nthreads; ++t) {
            State s = rt.fibers[t].state;
            at_barrier += s == State::AtBarrier;
            done += s == State::Done;
        }
        if (done == rt.nthreads) {
            const unsigned char* guard = rt.dynamic_smem + rt.dynamic_bytes;
            for (size_t i = 0; i < kSmemGuard; ++i)
                if (guard[i] != kGuardByte) {
                    char msg[160];
                    std::snprintf(msg, sizeof msg,
                                  "dynamic shared memory overflow: byte %zu past the %zu bytes of the launch was written",
                                  i, rt.dynamic_bytes);
                    rt.error = msg;
                    return false;
                }
            const char* unfinished = hopper_block_end();
            if (unfinished) {
                rt.error = unfinished;
                return false;
            }
            return true;
        }
        // Nobody can run: unless everyone left waits at __syncthreads, the block is stuck.
        for (unsigned t = 0; t < rt.nthreads; ++t) {
            const Fiber& f = rt.fibers[t];
            if (f.state == State::AtBarrier || f.state == State::Done) continue;
            char buf[320];
            if (f.state == State::AtNamedBarrier)
                std::snprintf(buf, sizeof buf,
                              "deadlock: thread %u waits at named barrier %u for %u threads, which never arrive (%u "
                              "threads at __syncthreads, %u exited)",
                              t, f.barrier_id, f.barrier_count, at_barrier, done);
            else if (f.state == State::AtEvent)
                std::snprintf(buf, sizeof buf,
                              "deadlock: thread %u waits on %s, which nothing left to run completes (%u threads at "
                              "__syncthreads, %u exited)",
                              t, f.wait_what, at_barrier, done);
            else
                std::snprintf(buf, sizeof buf,
                              "deadlock: thread %u waits in %s collective '%s' that not all of its threads reach "
                              "(%u threads at __syncthreads, %u exited)",
                              t, f.state == State::AtWarp ? "warp" : "warpgroup", f.warp_tag, at_barrier, done);
            rt.error = buf;
            return false;
        }
        // Every live thread waits at __syncthreads: release the barrier.
        for (unsigned t = 0; t < rt.nthreads; ++t)
            if (rt.fibers[t].state == State::AtBarrier) wake(t);
    }
}

}  // namespace

void fail(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    char where[96];
    std::snprintf(where, sizeof where, " (block %u,%u,%u thread %u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z,
                  threadIdx.x, threadIdx.y, threadIdx.z);
    rt.error = std::string(buf) + where;
    rt.failed = true;
    // Abandon this fiber: the scheduler stops the block and never resumes it.
    Fiber& f = self();
    f.state = State::Done;
    yield_to_scheduler();
    __builtin_unreachable();
}

unsigned lane_id() { return rt.current % 32; }
unsigned thread_rank() { return rt.current; }

SharedRegion::SharedRegion(void* ptr, size_t bytes) {
    rt.shared_regions.emplace_back(ptr, bytes);
    poison(ptr, bytes);
}

void* dynamic_shared() { return rt.dynamic_smem; }

unsigned shared_address(const void* p) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (c < rt.dynamic_smem || c >= rt.dynamic_smem + rt.dynamic_bytes)
        fail("shared_address: %p is not in this launch's %zu bytes of dynamic shared memory (the host runtime "
             "gives only dynamic shared memory to TMA and wgmma)",
             p, rt.dynamic_bytes);
    return kDynamicSharedBase + (unsigned)(c - rt.dynamic_smem);
}

// The offset of [addr, addr + bytes) in dynamic shared memory; fails outside it.
static size_t dynamic_offset(unsigned addr, unsigned bytes) {
    if (addr < kDynamicSharedBase || (size_t)(addr - kDynamicSharedBase) + bytes > rt.dynamic_bytes)
        fail("shared address 0x%x (+%u bytes) is outside the launch's dynamic shared memory [0x%x, 0x%zx)", addr,
             bytes, kDynamicSharedBase, kDynamicSharedBase + rt.dynamic_bytes);
    return addr - kDynamicSharedBase;
}
unsigned char* shared_live(unsigned addr, unsigned bytes) { return rt.dynamic_smem + dynamic_offset(addr, bytes); }
const unsigned char* shared_view(unsigned addr, unsigned bytes) {
    return rt.async_view.data() + dynamic_offset(addr, bytes);
}
void fence_proxy_async() { std::memcpy(rt.async_view.data(), rt.dynamic_smem, rt.dynamic_bytes); }

void wait_for(const void* key, const char* what) {
    Fiber& f = self();
    f.wait_key = key;
    f.wait_what = what;
    f.state = State::AtEvent;
    yield_to_scheduler();
}

void named_barrier(unsigned id, unsigned count) {
    if (id == 0 || id > 15 || count == 0 || count % 32 != 0 || count > rt.nthreads)
        fail("bar.sync %u, %u: the id must be 1..15 and the count a multiple of 32 up to the block's %u threads", id,
             count, rt.nthreads);
    Fiber& f = self();
    f.barrier_id = id;
    f.barrier_count = count;
    f.state = State::AtNamedBarrier;
    unsigned arrived = 0;
    for (unsigned t = 0; t < rt.nthreads; ++t) {
        const Fiber& other = rt.fibers[t];
        if (other.state != State::AtNamedBarrier || other.barrier_id != id) continue;
        if (other.barrier_count != count)
            fail("bar.sync %u: thread %u arrived with count %u, thread %u with %u", id, rt.current, count, t,
                 other.barrier_count);
        ++arrived;
    }
    if (arrived < count) {
        yield_to_scheduler();  // the last thread to arrive releases us
        return;
    }
    for (unsigned t = 0; t < rt.nthreads; ++t)
        if (rt.fibers[t].state == State::AtNamedBarrier && rt.fibers[t].barrier_id == id) wake(t);
}

void notify(const void* key) {
    for (unsigned t = 0; t < rt.nthreads; ++t)
        if (rt.fibers[t].state == State::AtEvent && rt.fibers[t].wait_key == key) wake(t);
}

void warpgroup_collective(const char* tag, const void* in, void* out, WarpgroupOp op) {
    unsigned base = rt.current / 128 * 128;
    if (base + 128 > rt.nthreads)
        fail("warpgroup collective '%s': the block's %u threads end inside warpgroup %u", tag, rt.nthreads,
             base / 128);
    Fiber& f = self();
    f.warp_tag = tag;
    f.warp_in = in;
    f.warp_out = out;
    f.state = State::AtWarpgroup;
    for (unsigned i = 0; i < 128; ++i) {
        Fiber& other = rt.fibers[base + i];
        if (other.state == State::Done) fail("warpgroup collective '%s': thread %u has exited", tag, base + i);
        if (other.state != State::AtWarpgroup) {
            yield_to_scheduler();  // the last thread to arrive performs the op and wakes us
            return;
        }
    }
    const void* ins[128];
    void* outs[128];
    for (unsigned i = 0; i < 128; ++i) {
        Fiber& other = rt.fibers[base + i];
        if (std::strcmp(other.warp_tag, tag) != 0)
            fail("divergent warpgroup collectives: thread %u is in '%s', thread %u in '%s'", rt.current, tag,
                 base + i, other.warp_tag);
        ins[i] = other.warp_in;
        outs[i] = other.warp_out;
    }
    op(ins, outs);
    for (unsigned i = 0; i < 128; ++i) wake(base + i);
}

void warp_collective(unsigned mask, const char* tag, const void* in, void* out, WarpOp op) {
    unsigned lane = lane_id();
    unsigned warp_base = rt.current - lane;
    if (!(mask >> lane & 1u)) fail("warp collective '%s': calling lane %u is not in mask 0x%08x", tag, lane, mask);
    for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l & 1u) && warp_base + l >= rt.nthreads)
            fail("warp collective '%s': mask 0x%08x names lane %u, which does not exist in this block", tag, mask, l);
    Fiber& f = self();
    f.warp_tag = tag;
    f.warp_mask = mask;
    f.warp_in = in;
    f.warp_out = out;
    f.state = State::AtWarp;
    // Have all lanes of the mask arrived?
    for (unsigned l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        Fiber& other = rt.fibers[warp_base + l];
        if (other.state == State::Done)
            fail("warp collective '%s': lane %u of mask 0x%08x has exited", tag, l, mask);
        if (other.state != State::AtWarp) {
            yield_to_scheduler();  // the last lane to arrive performs the op and wakes us
            return;
        }
    }
    const void* ins[32] = {};
    void* outs[32] = {};
    for (unsigned l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        Fiber& other = rt.fibers[warp_base + l];
        if (other.warp_mask != mask || std::strcmp(other.warp_tag, tag) != 0)
            fail("divergent warp collectives: lane %u is in '%s' (mask 0x%08x), lane %u in '%s' (mask 0x%08x)", lane,
                 tag, mask, l, other.warp_tag, other.warp_mask);
        ins[l] = other.warp_in;
        outs[l] = other.warp_out;
    }
    op(ins, outs, mask);
    for (unsigned l = 0; l < 32; ++l)
        if (mask >> l & 1u) wake(warp_base + l);
}

void vote_op(const void* const ins[32], void* const outs[32], unsigned) {
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l)
        if (ins[l] && *static_cast<const int*>(ins[l])) ballot |= 1u << l;
    for (int l = 0; l < 32; ++l)
        if (outs[l]) *static_cast<unsigned*>(outs[l]) = ballot;
}

void async_copy(void* dst, const void* src, unsigned bytes, unsigned src_bytes) {
    if (src_bytes > bytes) fail("cp.async: src_bytes %u > copy size %u", src_bytes, bytes);
    self().copies.push_back({dst, src, bytes, src_bytes});
}

void async_commit() {
    Fiber& f = self();
    f.groups.push_back(std::move(f.copies));
    f.copies.clear();
}

void async_wait(int keep_groups) { flush_copies(self(), keep_groups < 0 ? 0 : (size_t)keep_groups); }

int launch(const LkHostLaunch& cfg, const std::function<void()>& kernel) {
    rt.failed = false;
    rt.error.clear();
    unsigned nthreads = cfg.block[0] * cfg.block[1] * cfg.block[2];
    char buf[256];
    // CUDA's limits, so a launch shape the GPU would refuse fails here too:
    // grid.x up to 2^31 - 1, grid.y and grid.z up to 65535, block.z up to 64.
    bool grid_ok = cfg.grid[0] >= 1 && cfg.grid[0] <= 0x7FFFFFFFu && cfg.grid[1] >= 1 && cfg.grid[1] <= 65535u &&
                   cfg.grid[2] >= 1 && cfg.grid[2] <= 65535u;
    bool block_ok = nthreads >= 1 && nthreads <= kMaxThreads && cfg.block[0] <= 1024u && cfg.block[1] <= 1024u &&
                    cfg.block[2] <= 64u;
    if (!grid_ok || !block_ok || cfg.dynamic_smem_bytes > kMaxDynamicSmem) {
        std::snprintf(buf, sizeof buf, "invalid launch: grid (%u,%u,%u), block (%u,%u,%u), %u bytes dynamic smem",
                      cfg.grid[0], cfg.grid[1], cfg.grid[2], cfg.block[0], cfg.block[1], cfg.block[2],
                      cfg.dynamic_smem_bytes);
        last_error = buf;
        return 1;
    }
    if (!ensure_fibers(nthreads)) {
        last_error = "host runtime: cannot allocate fiber stacks";
        return 1;
    }
    rt.nthreads = nthreads;
    rt.kernel = &kernel;
    // 1024-byte aligned, as the largest swizzle pattern needs; the window
    // (kDynamicSharedBase) then decides what the kernel sees.
    rt.dynamic_bytes = cfg.dynamic_smem_bytes;
    rt.dynamic_storage.assign(cfg.dynamic_smem_bytes + kSmemGuard + 1024, kGuardByte);
    rt.dynamic_smem = rt.dynamic_storage.data() + (1024 - reinterpret_cast<uintptr_t>(rt.dynamic_storage.data()) % 1024) % 1024;
    rt.async_view.assign(cfg.dynamic_smem_bytes, 0);
    blockDim = {cfg.block[0], cfg.block[1], cfg.block[2]};
    gridDim = {cfg.grid[0], cfg.grid[1], cfg.grid[2]};
    for (unsigned z = 0; z < cfg.grid[2]; ++z)
        for (unsigned y = 0; y < cfg.grid[1]; ++y)
            for (unsigned x = 0; x < cfg.grid[0]; ++x) {
                blockIdx = {x, y, z};
                if (!run_block()) {
                    last_error = rt.error;
                    return 2;
                }
            }
    return 0;
}

}  // namespace lk_host

extern "C" void lk_host_set_schedule(int order) { lk_host::rt.schedule = order; }
extern "C" const char* lk_host_last_error(void) { return lk_host::last_error.c_str(); }

void __syncthreads() {
    lk_host::Fiber& f = lk_host::self();
    f.state = lk_host::State::AtBarrier;
    lk_host::yield_to_scheduler();
}

void __syncwarp(unsigned mask) {
    int dummy = 0;
    unsigned out;
    lk_host::warp_collective(mask, "syncwarp", &dummy, &out, &lk_host::vote_op);
}

void __trap() { lk_host::fail("__trap() called"); }

unsigned __ballot_sync(unsigned mask, int predicate) {
    int in = predicate != 0;
    unsigned out;
    lk_host::warp_collective(mask, "vote", &in, &out, &lk_host::vote_op);
    return out;
}
