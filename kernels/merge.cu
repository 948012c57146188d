// Merge / unmerge an adapter into the base weight: w <- w +/- scale * b a,
// the product accumulated in f32 and the sum rounded once to the storage
// type (MergeParams in lk_params.h). A thread per element: grid.x runs over
// the rows c (up to 2^31 - 1, so any n, an lm_head's included), grid.y over
// chunks of blockDim.x columns, striding when k needs more than grid.y's
// 65535 chunks; threads of a warp take consecutive columns q (coalesced w
// and a). Offsets are 64-bit: n * k may exceed 2^31.
#include "lk_runtime.cuh"

namespace {

template <class T>
__device__ void merge(const MergeParams& p) {
    T* w = reinterpret_cast<T*>(p.w);
    const T* a = reinterpret_cast<const T*>(p.a);
    const T* b = reinterpret_cast<const T*>(p.b);
    const int64_t c = blockIdx.x;
    const T* bc = b + c * p.r;
    const int64_t stride = (int64_t)gridDim.y * blockDim.x;
    for (int64_t q = (int64_t)blockIdx.y * blockDim.x + threadIdx.x; q < p.k; q += stride) {
        float acc = 0.f;
        for (int j = 0; j < p.r; ++j) acc += lk::to_f32(bc[j]) * lk::to_f32(a[(int64_t)j * p.k + q]);
        const int64_t idx = c * p.k + q;
        w[idx] = lk::from_f32<T>(lk::to_f32(w[idx]) + p.sign * p.scale * acc);
    }
}

}  // namespace

LK_KERNEL(lk_merge_f32, MergeParams, merge<float>)
LK_KERNEL(lk_merge_f16, MergeParams, merge<__half>)
LK_KERNEL(lk_merge_bf16, MergeParams, merge<__nv_bfloat16>)
