// Host runtime: Hopper's asynchronous instructions (wgmma, TMA tile loads,
// mbarrier), emulated with the PTX ISA's layouts. Included by lk_hopper.cuh
// in host builds; docs/DESIGN.md section 6 describes the model:
// - a wgmma takes effect when its group is waited on (wgmma.wait_group): it
//   reads its shared-memory operands then, through the async proxy's view,
//   and writes the accumulators of every thread of the warpgroup then;
// - a TMA load lands (in shared memory and the async proxy's view) when its
//   mbarrier's phase completes: every arrival in, and the bytes the loads
//   carry equal to the bytes announced by expect_tx;
// - a wait on an incomplete phase puts the thread to sleep until it completes.
#pragma once
#include <cstdint>

namespace lk_host {
namespace hopper {

// The host mirror of the CUtensorMap fields a 2-D tile load uses, in the 128
// bytes of an LkTensorMap, as 64-bit words (src/tensor_map.rs writes them):
//   [0] kTensorMapMagic     [1] global address of element (0, 0)
//   [2] dims[0] (elements, innermost)   [3] dims[1]
//   [4] bytes from one dims[1] index to the next
//   [5] box[0] | box[1] << 32 (elements)
//   [6] element bytes | swizzle bytes (0, 32, 64, 128) << 32
constexpr uint64_t kTensorMapMagic = 0x31304d54534f484cull;  // "LHOSTM01"

void mbarrier_init(void* bar, unsigned count);
// One arrival, announcing `expect_tx_bytes` more bytes for the phase.
void mbarrier_arrive(void* bar, unsigned expect_tx_bytes);
// Sleeps while the phase of parity `parity` is incomplete; then true.
bool mbarrier_try_wait(void* bar, unsigned parity);
void tma_load_2d(void* dst, const void* tensor_map, int c0, int c1, void* bar);

void wgmma_fence();
// One wgmma.mma_async m64nNk16: A through desc_a, or from registers `a` (4
// a thread) when not null; `d`: the calling thread's N/2 accumulators.
void wgmma_mma(int n, bool bf16, uint64_t desc_a, const uint32_t* a, uint64_t desc_b, bool b_mn_major, bool accumulate,
               float* d);
void wgmma_commit();
void wgmma_wait(int keep_groups);

}  // namespace hopper
}  // namespace lk_host
