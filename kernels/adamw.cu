// AdamW over every slot of an adapter pool in one launch, a block per slot
// (AdamWParams, SlotOptim in lk_params.h; docs/DESIGN.md section 1):
//   1. the slot's squared gradient norm, accumulated in f64 (no f32 overflow
//      for any finite gradient) and reduced in a fixed order (deterministic);
//      a slot whose gradient holds NaN or Inf skips its step (SKIPPED_NON_FINITE);
//   2. clip to max_grad_norm, add the anchor pull lambda (p - anchor), then
//      m1 = b1 m1 + (1-b1) g, m2 = b2 m2 + (1-b2) g^2,
//      p -= lr (m1/(1-b1^t) / (sqrt(m2/(1-b2^t)) + eps) + wd p),
//      computed without writing: if any new p, m1, m2 or storage-type copy of
//      the slot is NaN or Inf, the slot skips its step (SKIPPED_OVERFLOW), so
//      a step is all or nothing and no non-finite weight enters the pool;
//   3. the same arithmetic again, now written: p, m1, m2 and the pool's copy.
// The scalars shared by a slot (clip factor, bias corrections) are computed
// once per block in f64. Reads each gradient three times and p, m1, m2 twice:
// the price of all-or-nothing without a scratch copy of the slot.
// Offsets are 64-bit throughout: a pool's element count may pass 2^31.
#include "lk_runtime.cuh"

namespace {

constexpr int THREADS = 512;

// Status codes, mirrored by SlotStatus in src/ops/adamw.rs.
constexpr int UPDATED = 0;
constexpr int SKIPPED_NON_FINITE = 1;
constexpr int IDLE = 2;
constexpr int SKIPPED_OVERFLOW = 3;

// Element e of slot s's parameters: the first rank*k are a, then n*rank of b.
struct SlotParams {
    size_t a0, b0;  // the slot's offsets in the pool layout
    size_t rank, k, max_rank;
    size_t count;
    __device__ size_t index(size_t e, bool& is_a) const {
        size_t na = rank * k;
        is_a = e < na;
        if (is_a) return a0 + e;
        size_t f = e - na;
        return b0 + (f / rank) * max_rank + f % rank;
    }
};

// What one slot's step shares: the clip factor (f64: for a huge norm it is
// far below f32's normal range) and the reciprocals of the bias corrections,
// from f64 so that 1 - beta^t is exact to f32's precision at any t.
struct StepScalars {
    double clip;
    float inv_bias1, inv_sqrt_bias2;
};

// The sum over the block (every thread gets it), in a fixed order: shuffles,
// then the warps in order.
__device__ double block_sum(double v, double* scratch) {
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < THREADS / 32; ++w) total += scratch[w];
    __syncthreads();
    return total;
}

template <class T>
struct NewValues {
    float w, m1, m2;
    T work;
    __device__ bool finite() const {
        return isfinite(w) && isfinite(m1) && isfinite(m2) && isfinite(lk::to_f32(work));
    }
};

// One parameter's step (pool-layout index i): pure, so that the checking pass
// and the writing pass compute the same values.
template <class T>
__device__ NewValues<T> step_element(const AdamWParams& p, const SlotOptim& h, const StepScalars& c,
                                     bool is_a, size_t i, float g) {
    const float w = reinterpret_cast<const float*>(is_a ? p.master_a : p.master_b)[i];
    const float m1 = reinterpret_cast<const float*>(is_a ? p.m1_a : p.m1_b)[i];
    const float m2 = reinterpret_cast<const float*>(is_a ? p.m2_a : p.m2_b)[i];
    float gc = (float)((double)g * c.clip);
    if (h.anchor_pull != 0.f && p.anchor_a)
        gc += h.anchor_pull * (w - reinterpret_cast<const float*>(is_a ? p.anchor_a : p.anchor_b)[i]);
    const float a1 = p.beta1 * m1 + (1.f - p.beta1) * gc;
    const float a2 = p.beta2 * m2 + (1.f - p.beta2) * gc * gc;  // ((1-b2) g) g: g^2 alone may overflow
    const float root = sqrtf(a2) * c.inv_sqrt_bias2;             // sqrt(a2 / bias2) without overflow
    const float nw = w - h.lr * ((a1 * c.inv_bias1) / (root + p.eps) + h.weight_decay * w);
    return {nw, a1, a2, lk::from_f32<T>(nw)};
}

template <class T>
__device__ void adamw(const AdamWParams& p) {
    LK_SHARED(double, scratch, [THREADS / 32]);
    const int s = blockIdx.x;
    const SlotOptim h = reinterpret_cast<const SlotOptim*>(p.hyper)[s];
    const int rank = reinterpret_cast<const int*>(p.slot_rank)[s];
    int* status = reinterpret_cast<int*>(p.status);
    float* grad_norm = reinterpret_cast<float*>(p.grad_norm);
    if (!h.active || rank <= 0) {
        if (threadIdx.x == 0) status[s] = IDLE;
        return;
    }
    const size_t max_rank = p.max_rank, n = p.n, k = p.k;
    const SlotParams sp{(size_t)s * max_rank * k, (size_t)s * n * max_rank, (size_t)rank, k, max_rank,
                        (size_t)rank * (k + n)};
    auto grad = [&](size_t e, bool& is_a, size_t& i) {
        i = sp.index(e, is_a);
        return (is_a ? reinterpret_cast<const float*>(p.grad_a) : reinterpret_cast<const float*>(p.grad_b))[i];
    };

    // 1. The norm (f64: a sum of squares of f32 values cannot overflow it).
    double sq = 0.0, bad = 0.0;
    for (size_t e = threadIdx.x; e < sp.count; e += THREADS) {
        bool is_a;
        size_t i;
        const float g = grad(e, is_a, i);
        if (!isfinite(g)) bad = 1.0;
        else sq += (double)g * g;
    }
    sq = block_sum(sq, scratch);
    bad = block_sum(bad, scratch);
    const double norm = sqrt(sq);
    if (bad > 0.0) {
        if (threadIdx.x == 0) {
            status[s] = SKIPPED_NON_FINITE;
            grad_norm[s] = __uint_as_float(0x7FC00000u);  // NaN
        }
        return;
    }
    const int t = reinterpret_cast<const int*>(p.step)[s] + 1;
    const double bias1 = 1.0 - pow((double)p.beta1, (double)t), bias2 = 1.0 - pow((double)p.beta2, (double)t);
    const StepScalars c{(h.max_grad_norm > 0.f && norm > h.max_grad_norm) ? h.max_grad_norm / norm : 1.0,
                        (float)(1.0 / bias1), (float)(1.0 / sqrt(bias2))};

    // 2. Would the step leave anything non-finite? Then it writes nothing.
    double overflow = 0.0;
    for (size_t e = threadIdx.x; e < sp.count; e += THREADS) {
        bool is_a;
        size_t i;
        const float g = grad(e, is_a, i);
        if (!step_element<T>(p, h, c, is_a, i, g).finite()) overflow = 1.0;
    }
    overflow = block_sum(overflow, scratch);  // its barriers also order pass 2's reads before pass 3's writes
    if (overflow > 0.0) {
        if (threadIdx.x == 0) {
            status[s] = SKIPPED_OVERFLOW;
            grad_norm[s] = (float)norm;
        }
        return;
    }

    // 3. The step. Each element is read and written by the same thread only.
    for (size_t e = threadIdx.x; e < sp.count; e += THREADS) {
        bool is_a;
        size_t i;
        const float g = grad(e, is_a, i);
        const NewValues<T> v = step_element<T>(p, h, c, is_a, i, g);
        reinterpret_cast<float*>(is_a ? p.master_a : p.master_b)[i] = v.w;
        reinterpret_cast<float*>(is_a ? p.m1_a : p.m1_b)[i] = v.m1;
        reinterpret_cast<float*>(is_a ? p.m2_a : p.m2_b)[i] = v.m2;
        reinterpret_cast<T*>(is_a ? p.work_a : p.work_b)[i] = v.work;
    }
    __syncthreads();  // every thread has read the old step count before it changes
    if (threadIdx.x == 0) {
        reinterpret_cast<int*>(p.step)[s] = t;
        status[s] = UPDATED;
        grad_norm[s] = (float)norm;
    }
}

}  // namespace

LK_KERNEL(lk_adamw_f32, AdamWParams, adamw<float>)
LK_KERNEL(lk_adamw_f16, AdamWParams, adamw<__half>)
LK_KERNEL(lk_adamw_bf16, AdamWParams, adamw<__nv_bfloat16>)
