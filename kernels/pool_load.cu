// Loading an adapter that already lies in device memory into an adapter
// pool slot (PoolLoadParams in lk_params.h), in two passes so the load is
// all or nothing: the check pass counts non-finite weights (the host reads
// the counts and writes nothing if any), then the write pass pads b's rows
// to the pool's max_rank (a is one contiguous copy, done by the driver).
// Grid-stride loops with 64-bit offsets: rank * k and n * max_rank may
// exceed 2^31.
#include "lk_runtime.cuh"

namespace {

// Counts the non-finite values of src[0..len) into stats[0] and keeps the
// NOT of the smallest such index in stats[1] (atomicMax of ~i).
template <class T>
__device__ void count_non_finite(const T* src, int64_t len, unsigned long long* stats) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        if (!isfinite(lk::to_f32(src[i]))) {
            atomicAdd(&stats[0], 1ull);
            atomicMax(&stats[1], ~(unsigned long long)i);
        }
    }
}

template <class T>
__device__ void pool_check(const PoolLoadParams& p) {
    auto* stats = reinterpret_cast<unsigned long long*>(p.stats);
    count_non_finite(reinterpret_cast<const T*>(p.a), p.a_len, stats);
    count_non_finite(reinterpret_cast<const T*>(p.b), (int64_t)p.n * p.rank, stats + 2);
}

template <class T>
__device__ void pool_write_b(const PoolLoadParams& p) {
    const T* b = reinterpret_cast<const T*>(p.b);
    T* rows = reinterpret_cast<T*>(p.pool_b);
    const int64_t len = (int64_t)p.n * p.max_rank;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        const int64_t row = i / p.max_rank;
        const int col = (int)(i - row * p.max_rank);
        rows[i] = col < p.rank ? b[row * p.rank + col] : lk::from_f32<T>(0.f);
    }
}

}  // namespace

LK_KERNEL(lk_pool_check_f32, PoolLoadParams, pool_check<float>)
LK_KERNEL(lk_pool_check_f16, PoolLoadParams, pool_check<__half>)
LK_KERNEL(lk_pool_check_bf16, PoolLoadParams, pool_check<__nv_bfloat16>)
LK_KERNEL(lk_pool_write_b_f32, PoolLoadParams, pool_write_b<float>)
LK_KERNEL(lk_pool_write_b_f16, PoolLoadParams, pool_write_b<__half>)
LK_KERNEL(lk_pool_write_b_bf16, PoolLoadParams, pool_write_b<__nv_bfloat16>)
