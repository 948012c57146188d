// Tensor-core instructions, the only way kernels reach them: mma.sync
// m16n8k16 (f16/bf16 in, f32 accumulate), ldmatrix, cp.async here; Hopper's
// wgmma, TMA and mbarrier in lk_hopper.cuh, included at the end. Device builds
// emit inline PTX; host builds emulate each instruction as a warp collective
// that follows the PTX ISA's fragment layouts (section "Matrix Fragments for
// mma.m16n8k16"), so a kernel that indexes a fragment wrongly computes a wrong
// answer on the host runtime exactly as it would on a GPU.
//
// Layouts, with group = lane / 4 and quad = lane % 4 (each .b32 register holds two
// 16-bit elements, lower half first):
//   A 16x16 row-major, a[0..3]: a[0] (group,    2quad..+1)   a[1] (group+8, 2quad..+1)
//                                a[2] (group,  8+2quad..+1)  a[3] (group+8, 8+2quad..+1)
//   B 16x8 (k x n),   b[0..1]: b[0] (k = 2quad..+1, n = group)  b[1] (k = 8+2quad..+1, n = group)
//   C/D 16x8 f32,     c[0..3]: c[0..1] (group, 2quad..+1)       c[2..3] (group+8, 2quad..+1)
#pragma once
#include "lk_runtime.cuh"

namespace lk {

#ifndef LK_HOST

__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4], __half) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
}
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4], __nv_bfloat16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
}

// ldmatrix: lane i supplies the shared-memory address of row (i % 8) of matrix
// (i / 8); lane i receives row i/4, columns 2(i%4)..+1 of each matrix (of its
// transpose for the .trans forms).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
    unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
    if (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row, bool trans) {
    unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
    if (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(addr));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

// cp.async of 16 bytes global -> shared; bytes past src_bytes are zero-filled
// (src_bytes = 0 reads nothing: the way tails are padded).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, unsigned src_bytes) {
    unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem), "r"(src_bytes));
}
// The same, issued only if `issue` (a predicated instruction, no branch:
// a copy under a branch costs the loop convergence barriers); otherwise
// smem keeps what it holds.
__device__ __forceinline__ void cp_async_16_if(bool issue, void* smem, const void* gmem, unsigned src_bytes) {
    unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %0, 0;\n @p cp.async.cg.shared.global [%1], [%2], 16, %3;\n}\n" ::"r"(
            (int)issue),
        "r"(addr), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

#else  // LK_HOST

namespace host_mma {

struct MmaIn {
    uint32_t a[4];
    uint32_t b[2];
    float c[4];
};

template <class T>
inline float elem(uint32_t reg, int half_index) {
    T v;
    v.x = (unsigned short)(half_index ? reg >> 16 : reg & 0xFFFFu);
    return to_f32(v);
}

// D = A B + C over the whole warp. Products are accumulated in f32 in k order
// (the hardware's order within an instruction is unspecified; results agree to
// f32 rounding, which the tolerances of docs/DESIGN.md section 3 allow for).
template <class T>
void mma_op(const void* const ins[32], void* const outs[32], unsigned mask) {
    if (mask != 0xFFFFFFFFu) ::lk_host::fail("mma.sync needs all 32 lanes (mask 0x%08x)", mask);
    float A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const MmaIn* in = static_cast<const MmaIn*>(ins[lane]);
        int group = lane / 4, quad = lane % 4;
        for (int i = 0; i < 4; ++i)
            for (int h = 0; h < 2; ++h)
                A[group + 8 * (i & 1)][8 * (i >> 1) + 2 * quad + h] = elem<T>(in->a[i], h);
        for (int i = 0; i < 2; ++i)
            for (int h = 0; h < 2; ++h) B[8 * i + 2 * quad + h][group] = elem<T>(in->b[i], h);
        for (int i = 0; i < 4; ++i) C[group + 8 * (i >> 1)][2 * quad + (i & 1)] = in->c[i];
    }
    for (int lane = 0; lane < 32; ++lane) {
        float* d = static_cast<float*>(outs[lane]);
        int group = lane / 4, quad = lane % 4;
        for (int i = 0; i < 4; ++i) {
            int row = group + 8 * (i >> 1), col = 2 * quad + (i & 1);
            float acc = C[row][col];
            for (int kk = 0; kk < 16; ++kk) acc += A[row][kk] * B[kk][col];
            d[i] = acc;
        }
    }
}

template <int NMAT, bool TRANS>
void ldmatrix_op(const void* const ins[32], void* const outs[32], unsigned mask) {
    if (mask != 0xFFFFFFFFu) ::lk_host::fail("ldmatrix needs all 32 lanes (mask 0x%08x)", mask);
    for (int lane = 0; lane < 32; ++lane) {
        uint32_t* r = static_cast<uint32_t*>(outs[lane]);
        int row = lane / 4, col = 2 * (lane % 4);
        for (int m = 0; m < NMAT; ++m) {
            unsigned short e[2];
            for (int h = 0; h < 2; ++h) {
                // Element (row, col + h) of matrix m, or of its transpose.
                int src_row = TRANS ? col + h : row;
                int src_col = TRANS ? row : col + h;
                const unsigned short* row_ptr =
                    *static_cast<const unsigned short* const*>(ins[8 * m + src_row]);
                e[h] = row_ptr[src_col];
            }
            r[m] = (uint32_t)e[0] | ((uint32_t)e[1] << 16);
        }
    }
}

}  // namespace host_mma

template <class T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4], T) {
    host_mma::MmaIn in;
    std::memcpy(in.a, a, sizeof in.a);
    std::memcpy(in.b, b, sizeof in.b);
    std::memcpy(in.c, c, sizeof in.c);
    float out[4];
    ::lk_host::warp_collective(0xFFFFFFFFu, "mma.m16n8k16", &in, out, &host_mma::mma_op<T>);
    std::memcpy(d, out, sizeof out);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
    uint32_t out[4];
    ::lk_host::warp_collective(0xFFFFFFFFu, trans ? "ldmatrix.x4.trans" : "ldmatrix.x4", &row, out,
                               trans ? &host_mma::ldmatrix_op<4, true> : &host_mma::ldmatrix_op<4, false>);
    std::memcpy(r, out, sizeof out);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row, bool trans) {
    uint32_t out[2];
    ::lk_host::warp_collective(0xFFFFFFFFu, trans ? "ldmatrix.x2.trans" : "ldmatrix.x2", &row, out,
                               trans ? &host_mma::ldmatrix_op<2, true> : &host_mma::ldmatrix_op<2, false>);
    std::memcpy(r, out, sizeof out);
}
inline void cp_async_16(void* smem, const void* gmem, unsigned src_bytes) {
    ::lk_host::async_copy(smem, gmem, 16, src_bytes);
}
inline void cp_async_16_if(bool issue, void* smem, const void* gmem, unsigned src_bytes) {
    if (issue) ::lk_host::async_copy(smem, gmem, 16, src_bytes);
}
inline void cp_async_commit() { ::lk_host::async_commit(); }
template <int N>
inline void cp_async_wait() {
    ::lk_host::async_wait(N);
}

#endif

}  // namespace lk

#include "lk_hopper.cuh"
