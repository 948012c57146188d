// Host runtime: emulation of Hopper's asynchronous instructions (the model is
// in lk_host_hopper.h). State lives per block: wgmma groups per warpgroup,
// mbarriers by address; both are reset at every block start.
#include "lk_host_hopper.h"

#include <cstdio>
#include <deque>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "../include/lk_runtime.cuh"

namespace lk_host {
namespace hopper {
namespace {

constexpr unsigned kMaxWarpgroups = 8;  // 1024 threads

struct WgmmaOp {
    int n;
    bool bf16, a_in_regs, b_mn_major, accumulate;
    uint64_t desc_a, desc_b;
    uint32_t a[128][4];  // A registers, by thread of the warpgroup (a_in_regs)
    float* d[128];       // each thread's accumulators
};

struct Warpgroup {
    bool fenced = false;  // a wgmma.fence since the last wait
    std::vector<WgmmaOp> open;  // issued, not committed
    std::deque<std::vector<WgmmaOp>> groups;  // committed, oldest first
};

struct Landing {
    unsigned dst;  // shared address
    std::vector<unsigned char> bytes;
};

struct Mbarrier {
    unsigned count = 0, pending = 0, phase = 0;
    long long tx = 0;  // bytes announced by expect_tx, less those landed
    std::vector<Landing> queued;  // TMA loads of the current phase, not landed yet
    std::string what;  // for a deadlock report
};

struct State {
    Warpgroup warpgroups[kMaxWarpgroups];
    std::map<const void*, Mbarrier> barriers;
    std::string unfinished;
} st;

Warpgroup& my_warpgroup() { return st.warpgroups[thread_rank() / 128]; }

// ---- Shared-memory operands ------------------------------------------------

float element(const unsigned char* p, bool bf16) {
    unsigned short bits = (unsigned short)(p[0] | p[1] << 8);
    return bf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
}

struct Descriptor {
    unsigned start, lbo, sbo, swizzle;  // swizzle bytes, 0 for none
};

Descriptor decode(uint64_t desc) {
    const unsigned base_offset = (unsigned)((desc >> 49) & 7);
    const unsigned mode = (unsigned)(desc >> 62);
    if (base_offset != 0) fail("wgmma descriptor: base offset %u is not emulated (align the atoms instead)", base_offset);
    return Descriptor{(unsigned)(desc & 0x3FFF) << 4, (unsigned)((desc >> 16) & 0x3FFF) << 4,
                      (unsigned)((desc >> 32) & 0x3FFF) << 4, mode == 0 ? 0u : mode == 1 ? 128u : mode == 2 ? 64u : 32u};
}

// The swizzled address: the 16-byte chunk index (bits 4..) XOR the bits from 7 up.
unsigned swizzled(unsigned addr, unsigned swizzle) { return addr ^ (((addr >> 7) & (swizzle / 16 - 1)) << 4); }

// The shared address of element (row, k) of a K-major operand, k < 16.
unsigned operand_address(uint64_t raw, int row, int k) {
    const Descriptor d = decode(raw);
    const unsigned start = d.start, lbo = d.lbo, sbo = d.sbo;
    if (d.swizzle == 0) return start + (row / 8) * sbo + (k / 8) * lbo + (row % 8) * 16 + (k % 8) * 2;
    const unsigned swizzle = d.swizzle;
    const unsigned atom = (start & ~(swizzle - 1)) + (row / 8) * sbo;
    if (atom % (8 * swizzle) != 0 || start % swizzle + 32 > swizzle)
        fail("wgmma descriptor (%u-byte swizzle): the 8-row group at 0x%x is not on a multiple of %u bytes, or its k "
             "step at +%u leaves the %u-byte row",
             swizzle, atom, 8 * swizzle, start % swizzle, swizzle);
    return swizzled(start + (row / 8) * sbo + (row % 8) * swizzle + k * 2, swizzle);
}

// The shared address of element (mn, k) of an MN-major operand (B read with
// imm-trans-b), k < 16: the PTX ISA's canonical MN-major layouts. Without
// swizzle, 8 x 8 core matrices of 8 k rows of 16 contiguous bytes (8 mn),
// (mn / 8) sbo + (k / 8) lbo apart; with swizzle S, rows of S bytes (S / 2
// mn) along k, 8 rows an atom, groups of S / 2 mn lbo apart and of 8 k sbo
// apart. The k steps of a kernel start whole atoms apart (16 rows of S bytes).
unsigned operand_address_mn(uint64_t raw, int mn, int k) {
    const Descriptor d = decode(raw);
    if (d.swizzle == 0) return d.start + (mn / 8) * d.sbo + (k / 8) * d.lbo + (k % 8) * 16 + (mn % 8) * 2;
    const unsigned swizzle = d.swizzle, span = swizzle / 2;  // mn per row
    const unsigned atom = d.start + (mn / span) * d.lbo + (k / 8) * d.sbo;
    if (atom % (8 * swizzle) != 0)
        fail("wgmma descriptor (MN-major, %u-byte swizzle): the atom at 0x%x is not on a multiple of %u bytes", swizzle,
             atom, 8 * swizzle);
    return swizzled(atom + (k % 8) * swizzle + (mn % span) * 2, swizzle);
}

void run(const WgmmaOp& op) {
    const int n = op.n;
    static float A[64][16], B[256][16];
    for (int row = 0; row < 64; ++row)
        for (int k = 0; k < 16; ++k) {
            if (op.a_in_regs) {
                // Thread t's register i holds (row 16 w + group + 8 (i % 2), k 8 (i / 2) + 2 quad + half).
                int w = row / 16, r = row % 16, group = r % 8, quad = (k % 8) / 2;
                int i = (r / 8) + 2 * (k / 8);
                uint32_t reg = op.a[32 * w + 4 * group + quad][i];
                unsigned short bits = (unsigned short)((k % 2) ? reg >> 16 : reg & 0xFFFFu);
                unsigned char b2[2] = {(unsigned char)(bits & 0xFF), (unsigned char)(bits >> 8)};
                A[row][k] = element(b2, op.bf16);
            } else {
                A[row][k] = element(shared_view(operand_address(op.desc_a, row, k), 2), op.bf16);
            }
        }
    for (int col = 0; col < n; ++col)
        for (int k = 0; k < 16; ++k) {
            const unsigned at = op.b_mn_major ? operand_address_mn(op.desc_b, col, k) : operand_address(op.desc_b, col, k);
            B[col][k] = element(shared_view(at, 2), op.bf16);
        }
    for (int t = 0; t < 128; ++t) {
        int w = t / 32, lane = t % 32, group = lane / 4, quad = lane % 4;
        for (int i = 0; i < n / 2; ++i) {
            int row = 16 * w + group + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * quad + i % 2;
            float acc = op.accumulate ? op.d[t][i] : 0.f;
            for (int k = 0; k < 16; ++k) acc += A[row][k] * B[col][k];
            op.d[t][i] = acc;
        }
    }
}

// ---- wgmma as warpgroup collectives ----------------------------------------

struct MmaIn {
    int n;
    bool bf16, a_in_regs, b_mn_major, accumulate;
    uint64_t desc_a, desc_b;
    uint32_t a[4];
    float* d;
};

void mma_op(const void* const ins[128], void* const[128]) {
    const MmaIn& first = *static_cast<const MmaIn*>(ins[0]);
    Warpgroup& wg = my_warpgroup();
    if (!wg.fenced)
        fail("wgmma.mma_async without a wgmma.fence since the warpgroup last waited (the fence orders the "
             "accumulators the threads touched before it)");
    WgmmaOp op;
    op.n = first.n;
    op.bf16 = first.bf16;
    op.a_in_regs = first.a_in_regs;
    op.b_mn_major = first.b_mn_major;
    op.accumulate = first.accumulate;
    op.desc_a = first.desc_a;
    op.desc_b = first.desc_b;
    for (int t = 0; t < 128; ++t) {
        const MmaIn& in = *static_cast<const MmaIn*>(ins[t]);
        if (in.n != first.n || in.bf16 != first.bf16 || in.a_in_regs != first.a_in_regs || in.b_mn_major != first.b_mn_major ||
            in.accumulate != first.accumulate || in.desc_b != first.desc_b ||
            (!in.a_in_regs && in.desc_a != first.desc_a))
            fail("wgmma.mma_async: thread %d of the warpgroup has other operands than thread 0", t);
        for (int i = 0; i < 4; ++i) op.a[t][i] = in.a[i];
        op.d[t] = in.d;
    }
    wg.open.push_back(op);
}

void fence_op(const void* const[128], void* const[128]) { my_warpgroup().fenced = true; }

void commit_op(const void* const[128], void* const[128]) {
    Warpgroup& wg = my_warpgroup();
    wg.groups.push_back(std::move(wg.open));
    wg.open.clear();
}

void wait_op(const void* const ins[128], void* const[128]) {
    Warpgroup& wg = my_warpgroup();
    const size_t keep = (size_t) * static_cast<const int*>(ins[0]);
    while (wg.groups.size() > keep) {
        for (const WgmmaOp& op : wg.groups.front()) run(op);
        wg.groups.pop_front();
    }
    wg.fenced = false;
}

// ---- mbarrier and TMA ------------------------------------------------------

Mbarrier& barrier(const void* bar) {
    auto it = st.barriers.find(bar);
    if (it == st.barriers.end()) fail("mbarrier at %p used before mbarrier.init", bar);
    return it->second;
}

void describe(const void* bar, Mbarrier& b) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "mbarrier %p phase %u (%u of %u arrivals missing, %lld announced bytes not landed)",
                  bar, b.phase, b.pending, b.count, b.tx);
    b.what = buf;
}

// With every arrival in, the queued loads land; the phase completes when the
// bytes they carried equal the bytes announced.
void try_complete(const void* bar, Mbarrier& b) {
    if (b.pending != 0) return;
    for (Landing& l : b.queued) {
        const unsigned bytes = (unsigned)l.bytes.size();
        std::memcpy(shared_live(l.dst, bytes), l.bytes.data(), bytes);
        std::memcpy(const_cast<unsigned char*>(shared_view(l.dst, bytes)), l.bytes.data(), bytes);
        b.tx -= bytes;
    }
    b.queued.clear();
    if (b.tx < 0)
        fail("mbarrier %p: TMA loads brought %lld bytes more than expect_tx announced for phase %u", bar, -b.tx,
             b.phase);
    if (b.tx == 0) {
        ++b.phase;
        b.pending = b.count;
        notify(bar);
    }
    describe(bar, b);
}

}  // namespace

void mbarrier_init(void* bar, unsigned count) {
    if (reinterpret_cast<uintptr_t>(bar) % 8 != 0) fail("mbarrier.init: %p is not 8-byte aligned", bar);
    if (count == 0 || count >= (1u << 20)) fail("mbarrier.init: count %u outside 1..2^20-1", count);
    Mbarrier& b = st.barriers[bar];
    b = Mbarrier{};
    b.count = b.pending = count;
    describe(bar, b);
}

void mbarrier_arrive(void* bar, unsigned expect_tx_bytes) {
    Mbarrier& b = barrier(bar);
    if (b.pending == 0) fail("mbarrier %p: an arrival past the %u of phase %u", bar, b.count, b.phase);
    b.tx += expect_tx_bytes;
    --b.pending;
    try_complete(bar, b);
}

bool mbarrier_try_wait(void* bar, unsigned parity) {
    for (;;) {
        Mbarrier& b = barrier(bar);
        // The phase of that parity is complete when the current one has the other parity.
        if ((b.phase & 1u) != (parity & 1u)) return true;
        wait_for(bar, b.what.c_str());
    }
}

void tma_load_2d(void* dst, const void* tensor_map, int c0, int c1, void* bar) {
    uint64_t w[8];
    std::memcpy(w, tensor_map, sizeof w);
    if (w[0] != kTensorMapMagic) fail("cp.async.bulk.tensor: %p does not hold a host tensor map", tensor_map);
    const unsigned char* base = reinterpret_cast<const unsigned char*>(w[1]);
    const uint64_t dims[2] = {w[2], w[3]}, row_stride = w[4];
    const unsigned box0 = (unsigned)w[5], box1 = (unsigned)(w[5] >> 32);
    const unsigned elem = (unsigned)w[6], swizzle = (unsigned)(w[6] >> 32);
    const unsigned row_bytes = box0 * elem, total = row_bytes * box1;
    const unsigned addr = shared_address(dst);
    if (addr % 128 != 0) fail("cp.async.bulk.tensor: shared destination 0x%x is not 128-byte aligned", addr);
    if (swizzle != 0 && (row_bytes != swizzle || addr % (8 * swizzle) != 0))
        fail("cp.async.bulk.tensor: a %u-byte swizzle is emulated for boxes %u bytes wide on a multiple of %u "
             "bytes (box %u bytes wide at 0x%x)",
             swizzle, swizzle, 8 * swizzle, row_bytes, addr);
    if (swizzle == 0 && row_bytes % 16 != 0)
        fail("cp.async.bulk.tensor: box rows of %u bytes are not a multiple of 16", row_bytes);
    Landing l;
    l.dst = addr;
    l.bytes.assign(total, 0);
    for (unsigned r = 0; r < box1; ++r)
        for (unsigned e = 0; e < box0; ++e) {
            const long long x = (long long)c0 + e, y = (long long)c1 + r;
            unsigned offset = r * row_bytes + e * elem;
            if (swizzle != 0) {
                const unsigned a = addr + offset;
                offset = (a ^ (((a >> 7) & (swizzle / 16 - 1)) << 4)) - addr;
            }
            if (x >= 0 && y >= 0 && (uint64_t)x < dims[0] && (uint64_t)y < dims[1])
                std::memcpy(&l.bytes[offset], base + (uint64_t)y * row_stride + (uint64_t)x * elem, elem);
        }
    Mbarrier& b = barrier(bar);
    b.queued.push_back(std::move(l));
    try_complete(bar, b);
}

void wgmma_fence() {
    int dummy = 0;
    warpgroup_collective("wgmma.fence", &dummy, nullptr, &fence_op);
}

void wgmma_mma(int n, bool bf16, uint64_t desc_a, const uint32_t* a, uint64_t desc_b, bool b_mn_major, bool accumulate,
               float* d) {
    if (n < 8 || n > 256 || n % 8 != 0) fail("wgmma.mma_async: N = %d is not a multiple of 8 in 8..256", n);
    MmaIn in{n, bf16, a != nullptr, b_mn_major, accumulate, desc_a, desc_b, {0, 0, 0, 0}, d};
    if (a)
        for (int i = 0; i < 4; ++i) in.a[i] = a[i];
    warpgroup_collective("wgmma.mma_async", &in, nullptr, &mma_op);
}

void wgmma_commit() {
    int dummy = 0;
    warpgroup_collective("wgmma.commit_group", &dummy, nullptr, &commit_op);
}

void wgmma_wait(int keep_groups) {
    warpgroup_collective("wgmma.wait_group", &keep_groups, nullptr, &wait_op);
}

}  // namespace hopper

void hopper_block_start() {
    for (auto& wg : hopper::st.warpgroups) wg = hopper::Warpgroup{};
    hopper::st.barriers.clear();
}

const char* hopper_block_end() {
    for (unsigned g = 0; g < hopper::kMaxWarpgroups; ++g) {
        const hopper::Warpgroup& wg = hopper::st.warpgroups[g];
        if (!wg.open.empty() || !wg.groups.empty()) {
            char buf[160];
            std::snprintf(buf, sizeof buf,
                          "warpgroup %u ended with wgmma work never waited on (%zu committed groups, %zu uncommitted "
                          "operations)",
                          g, wg.groups.size(), wg.open.size());
            hopper::st.unfinished = buf;
            return hopper::st.unfinished.c_str();
        }
    }
    for (const auto& [bar, b] : hopper::st.barriers)
        if (!b.queued.empty()) {
            char buf[160];
            std::snprintf(buf, sizeof buf, "the block ended with %zu TMA loads on mbarrier %p that never landed",
                          b.queued.size(), bar);
            hopper::st.unfinished = buf;
            return hopper::st.unfinished.c_str();
        }
    return nullptr;
}

}  // namespace lk_host
