// AdamW over every slot of an adapter pool in one launch, a block per slot
// (AdamWParams, SlotOptim in lk_params.h; docs/DESIGN.md section 1):
//   1. the slot's gradient L2 norm, reduced in a fixed order (deterministic);
//      a slot whose gradient holds NaN or Inf skips its step (status 1) and
//      keeps its weights, moments and step count;
//   2. clip to max_grad_norm, add the anchor pull lambda (p - anchor), then
//      m1 = b1 m1 + (1-b1) g, m2 = b2 m2 + (1-b2) g^2,
//      p -= lr (m1/(1-b1^t) / (sqrt(m2/(1-b2^t)) + eps) + wd p),
//      and refresh the pool's storage-type copy from p.
// Reads each parameter's gradient twice (norm, then update): the rest of the
// traffic is the minimum (p, m1, m2 read and written, the copy written).
#include "lk_runtime.cuh"

namespace {

constexpr int THREADS = 512;

// Element e of slot s's parameters: the first rank*k are a, then n*rank of b.
struct SlotParams {
    size_t a0, b0;  // the slot's offsets in the pool layout
    int rank, k, max_rank;
    size_t count;
    __device__ size_t index(size_t e, bool& is_a) const {
        size_t na = (size_t)rank * k;
        is_a = e < na;
        if (is_a) return a0 + e;
        size_t f = e - na;
        return b0 + (f / rank) * max_rank + f % rank;
    }
};

__device__ float block_sum(float v, float* scratch) {
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < THREADS / 32; ++w) total += scratch[w];  // fixed order: every thread gets the same sum
    __syncthreads();
    return total;
}

template <class T>
__device__ void adamw(const AdamWParams& p) {
    LK_SHARED(float, scratch, [THREADS / 32]);
    const int s = blockIdx.x;
    const SlotOptim h = reinterpret_cast<const SlotOptim*>(p.hyper)[s];
    const int rank = reinterpret_cast<const int*>(p.slot_rank)[s];
    int* status = reinterpret_cast<int*>(p.status);
    if (!h.active || rank <= 0) {
        if (threadIdx.x == 0) status[s] = 2;  // not stepped
        return;
    }
    SlotParams sp{(size_t)s * p.max_rank * p.k, (size_t)s * p.n * p.max_rank, rank, p.k, p.max_rank,
                  (size_t)rank * (p.k + p.n)};
    auto grad = [&](size_t e) {
        bool is_a;
        size_t i = sp.index(e, is_a);
        return (is_a ? reinterpret_cast<const float*>(p.grad_a) : reinterpret_cast<const float*>(p.grad_b))[i];
    };

    float sq = 0.f, bad = 0.f;
    for (size_t e = threadIdx.x; e < sp.count; e += THREADS) {
        float g = grad(e);
        if (!isfinite(g)) bad = 1.f;
        else sq += g * g;
    }
    sq = block_sum(sq, scratch);
    bad = block_sum(bad, scratch);
    float norm = sqrtf(sq);
    if (bad > 0.f) {
        if (threadIdx.x == 0) {
            status[s] = 1;
            reinterpret_cast<float*>(p.grad_norm)[s] = __uint_as_float(0x7FC00000u);  // NaN
        }
        return;
    }
    const float clip = (h.max_grad_norm > 0.f && norm > h.max_grad_norm) ? h.max_grad_norm / norm : 1.f;
    const int t = reinterpret_cast<const int*>(p.step)[s] + 1;
    const float bias1 = 1.f - powf(p.beta1, (float)t), bias2 = 1.f - powf(p.beta2, (float)t);
    for (size_t e = threadIdx.x; e < sp.count; e += THREADS) {
        bool is_a;
        size_t i = sp.index(e, is_a);
        float* master = reinterpret_cast<float*>(is_a ? p.master_a : p.master_b);
        float* m1 = reinterpret_cast<float*>(is_a ? p.m1_a : p.m1_b);
        float* m2 = reinterpret_cast<float*>(is_a ? p.m2_a : p.m2_b);
        T* work = reinterpret_cast<T*>(is_a ? p.work_a : p.work_b);
        float w = master[i];
        float g = grad(e) * clip;
        if (h.anchor_pull != 0.f && p.anchor_a)
            g += h.anchor_pull * (w - reinterpret_cast<const float*>(is_a ? p.anchor_a : p.anchor_b)[i]);
        float a1 = p.beta1 * m1[i] + (1.f - p.beta1) * g;
        float a2 = p.beta2 * m2[i] + (1.f - p.beta2) * g * g;
        w -= h.lr * ((a1 / bias1) / (sqrtf(a2 / bias2) + p.eps) + h.weight_decay * w);
        m1[i] = a1;
        m2[i] = a2;
        master[i] = w;
        work[i] = lk::from_f32<T>(w);
    }
    __syncthreads();  // every thread has read the old step count before it changes
    if (threadIdx.x == 0) {
        reinterpret_cast<int*>(p.step)[s] = t;
        status[s] = 0;
        reinterpret_cast<float*>(p.grad_norm)[s] = norm;
    }
}

}  // namespace

LK_KERNEL(lk_adamw_f32, AdamWParams, adamw<float>)
LK_KERNEL(lk_adamw_f16, AdamWParams, adamw<__half>)
LK_KERNEL(lk_adamw_bf16, AdamWParams, adamw<__nv_bfloat16>)
