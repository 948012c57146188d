// Merge / unmerge an adapter into the base weight: w <- w +/- scale * b a,
// the product accumulated in f32 and the sum rounded once to the storage
// type (MergeParams in lk_params.h). A thread per element; threads of a warp
// take consecutive columns q (coalesced w and a), a row c per block row.
#include "lk_runtime.cuh"

namespace {

template <class T>
__device__ void merge(const MergeParams& p) {
    T* w = reinterpret_cast<T*>(p.w);
    const T* a = reinterpret_cast<const T*>(p.a);
    const T* b = reinterpret_cast<const T*>(p.b);
    const int q = blockIdx.x * blockDim.x + threadIdx.x, c = blockIdx.y;
    if (q >= p.k) return;
    float acc = 0.f;
    for (int j = 0; j < p.r; ++j) acc += lk::to_f32(b[(size_t)c * p.r + j]) * lk::to_f32(a[(size_t)j * p.k + q]);
    size_t idx = (size_t)c * p.k + q;
    w[idx] = lk::from_f32<T>(lk::to_f32(w[idx]) + p.sign * p.scale * acc);
}

}  // namespace

LK_KERNEL(lk_merge_f32, MergeParams, merge<float>)
LK_KERNEL(lk_merge_f16, MergeParams, merge<__half>)
LK_KERNEL(lk_merge_bf16, MergeParams, merge<__nv_bfloat16>)
