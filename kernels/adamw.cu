// AdamW over every slot of an adapter pool in one launch, a block per slot
// (AdamWParams, SlotOptim in lk_params.h; docs/DESIGN.md section 1):
//   1. the slot's squared gradient norm, accumulated in f64 (no f32 overflow
//      for any finite gradient) and reduced in a fixed order (deterministic),
//      and its largest |g| (or both from the backward pass's per-tile
//      statistics, grad_stats_a/b); a slot whose gradient holds NaN or Inf
//      skips its step (SKIPPED_NON_FINITE);
//   2. clip to max_grad_norm, add the anchor pull lambda (p - anchor), then
//      m1 = b1 m1 + (1-b1) g, m2 = b2 m2 + (1-b2) g^2,
//      p -= lr (m1/(1-b1^t) / (sqrt(m2/(1-b2^t)) + eps) + wd p);
//      a step is all or nothing: if any new p, m1, m2 or storage-type copy of
//      the slot would be NaN or Inf, the slot skips its step
//      (SKIPPED_OVERFLOW), so no non-finite weight enters the pool. Whether it
//      could be is first decided from bounds (bounds_clear): the slot's
//      largest |g| and stored upper bounds of |p|, m2, |anchor| and of
//      |m1| / (sqrt(m2) + e) (state_bound, anchor_bound: every writer of the
//      state keeps them) bound every value the step computes. Only a slot
//      whose bounds reach the largest finite value runs the checking pass:
//      the step computed without writing;
//   3. the same arithmetic, now written: p, m1, m2 and the pool's copy, and
//      the slot's next bounds (the largest |p| and m2 written, and the
//      largest |ratio| of the update, which bounds |m1| / (sqrt(m2) + e)).
// The scalars shared by a slot (clip factor, bias corrections) are computed
// once per block in f64. Reads each gradient, p, m1 and m2 once, the floor,
// when the backward pass left the gradient's statistics (grad_stats_a/b: the
// clip factor needs the whole norm before the first write); else the
// gradient twice. A checked slot reads them once more.
//
// A slot's parameters are runs of the pool layout: a's rank rows (one run of
// rank * k) and b's n rows (rank values each, max_rank apart). Threads walk
// them in units of 4 values with 16-byte loads when rank and max_rank are
// multiples of 4 and every array is aligned for it (the common ranks 8, 16,
// 32, 64), else one value at a time; positions in b advance by adding, not
// by dividing. Offsets are 64-bit throughout: a pool's element count may
// pass 2^31.
#include "lk_runtime.cuh"

namespace {

constexpr int THREADS = 512;

// Status codes, mirrored by SlotStatus in src/ops/adamw.rs.
constexpr int UPDATED = 0;
constexpr int SKIPPED_NON_FINITE = 1;
constexpr int IDLE = 2;
constexpr int SKIPPED_OVERFLOW = 3;
// Or'd into the status of a slot whose bounds did not clear it: it ran the
// checking pass.
constexpr int CHECKED = 16;
// Or'd into the status of a slot whose norm came from the gradient's
// statistics (grad_stats_a/b): its step read the gradient once.
constexpr int FROM_STATS = 32;

// Where slot s's parameters lie in the pool layout.
struct SlotParams {
    size_t a0, b0;  // the slot's offsets
    size_t rank, k, n, max_rank;
};

// Calls f(is_a, i) for every unit of U consecutive parameters of the slot, i
// the unit's first pool-layout index: a's run, then b's rows. U divides rank
// and max_rank.
template <int U, class F>
__device__ void for_each_unit(const SlotParams& sp, F&& f) {
    const size_t a_units = sp.rank * sp.k / U;
    for (size_t q = threadIdx.x; q < a_units; q += THREADS) f(true, sp.a0 + U * q);  // sass-loop: adamw_a
    // b: row-major over (row, unit in row); the thread's place advances by
    // THREADS units: drow rows and dcol units, carrying into the row.
    const size_t per_row = sp.rank / U, drow = THREADS / per_row, dcol = THREADS % per_row;
    size_t row = threadIdx.x / per_row, col = threadIdx.x % per_row;
    while (row < sp.n) {  // sass-loop: adamw_b
        f(false, sp.b0 + row * sp.max_rank + U * col);
        row += drow;
        col += dcol;
        if (col >= per_row) {
            col -= per_row;
            ++row;
        }
    }
}

template <int U>
struct Unit {
    static constexpr int value = U;
};

// U values at p: one 16-byte access for U = 4 (p 16-byte aligned).
template <int U>
struct alignas(4 * U) Floats {
    float v[U];
};
template <int U>
__device__ __forceinline__ Floats<U> load(uint64_t base, size_t i) {
    return *reinterpret_cast<const Floats<U>*>(reinterpret_cast<const float*>(base) + i);
}
template <int U>
__device__ __forceinline__ void store(uint64_t base, size_t i, const Floats<U>& v) {
    *reinterpret_cast<Floats<U>*>(reinterpret_cast<float*>(base) + i) = v;
}
template <class T, int U>
struct alignas(sizeof(T) * U) Values {
    T v[U];
};

// What one slot's step shares: the clip factor (f64: for a huge norm it is
// far below f32's normal range) and the reciprocals of the bias corrections,
// from f64 so that 1 - beta^t is exact to f32's precision at any t.
struct StepScalars {
    double clip;
    float inv_bias1, inv_sqrt_bias2;
};

// v combined over the block by op (every thread gets it), in a fixed order:
// shuffles, then the warps in order (a deterministic sum).
template <class Op>
__device__ double block_reduce(double v, double* scratch, Op op) {
    for (int off = 16; off > 0; off /= 2) v = op(v, __shfl_xor_sync(0xFFFFFFFFu, v, off));
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    double total = scratch[0];
    for (int w = 1; w < THREADS / 32; ++w) total = op(total, scratch[w]);
    __syncthreads();
    return total;
}
__device__ double block_sum(double v, double* scratch) {
    return block_reduce(v, scratch, [](double x, double y) { return x + y; });
}
__device__ double block_max(double v, double* scratch) {
    return block_reduce(v, scratch, [](double x, double y) { return fmax(x, y); });
}

// The largest finite value of the pool's storage type.
template <class T>
__device__ constexpr double largest_finite();
template <>
__device__ constexpr double largest_finite<float>() {
    return 3.4028234663852886e38;
}
template <>
__device__ constexpr double largest_finite<__half>() {
    return 65504.0;
}
template <>
__device__ constexpr double largest_finite<__nv_bfloat16>() {
    return 3.3895313892515355e38;
}

template <class T>
struct NewValues {
    float w, m1, m2;
    T work;
    float ratio;  // (m1 / bias1) / (sqrt(m2 / bias2) + eps), for the slot's next bounds
    __device__ bool finite() const {
        return isfinite(w) && isfinite(m1) && isfinite(m2) && isfinite(lk::to_f32(work));
    }
};

// One parameter's step from its gradient g, weight w, moments m1, m2 and
// anchor: pure, so that the checking pass and the writing pass compute the
// same values.
template <class T>
__device__ NewValues<T> step_element(const AdamWParams& p, const SlotOptim& h, const StepScalars& c, float g,
                                     float w, float m1, float m2, float anchor) {
    float gc = (float)((double)g * c.clip);
    if (h.anchor_pull != 0.f && p.anchor_a) gc += h.anchor_pull * (w - anchor);
    const float a1 = p.beta1 * m1 + (1.f - p.beta1) * gc;
    const float a2 = p.beta2 * m2 + (1.f - p.beta2) * gc * gc;  // ((1-b2) g) g: g^2 alone may overflow
    const float root = sqrtf(a2) * c.inv_sqrt_bias2;             // sqrt(a2 / bias2) without overflow
    const float ratio = (a1 * c.inv_bias1) / (root + p.eps);
    const float nw = w - h.lr * (ratio + h.weight_decay * w);
    return {nw, a1, a2, lk::from_f32<T>(nw), ratio};
}

// Whether the step provably leaves every value finite, from upper bounds of
// its inputs: g_max, the slot's largest |g|, the stored bounds (state, 3 a
// slot) of |p|, |m2| and q (below), and of |anchor|. Each named quantity
// below bounds the magnitude of one value of step_element and of every
// partial result on the way to it, as exact arithmetic on the bounds; the
// factor UP (1%) covers the f32 rounding of those few operations (2^-24
// each). With every bound below f32's (and the work copy's below T's) largest
// finite value no operation overflows, root + eps >= eps > 0 rules out 0/0,
// and m2 >= 0 (every writer keeps it so) a root of a negative: nothing
// becomes NaN or Inf. A bound that is Inf (unknown) or too large sends the
// slot to the checking pass.
//
// The ratio a1 ib1 / (sqrt(a2) isb2 + eps) is bounded two ways, the smaller
// taken: by |a1| ib1 / eps, and through q, a bound of |m1| / (sqrt(m2) + e)
// over the slot's elements for some e <= e' = eps / isb2 (this step's): the
// host stores q for e = 0, a step for its own e (the largest |ratio| times
// isb2 / ib1), and e grows with t. As sqrt(a2) + e' is at least
// sqrt(b2) (sqrt(m2) + e) and at least sqrt(1 - b2) |gc|,
//   |a1| / (sqrt(a2) + e') <= b1 q / sqrt(b2) + (1 - b1) / sqrt(1 - b2) =: k0
// and the ratio <= k0 ib1 / isb2. (For e' >= 2^-60 only: then the absolute
// error of an underflowing a2 or a1 is negligible beside the bound.) The
// second way keeps an f16 pool off the checking pass: |a1| / eps alone
// passes 65504 / lr for any gradient of ordinary size. q also bounds |m1|, by
// q (sqrt(m2) + e'): no register holds a maximum of |m1| through the writing
// pass (64 at most, for 2 blocks per SM).
template <class T>
__device__ bool bounds_clear(const AdamWParams& p, const SlotOptim& h, const StepScalars& c, double g_max,
                             const float* state, float anchor) {
    constexpr double UP = 1.01;
    // Each bound checked as it is made (fewer live registers than a maximum
    // at the end; NaN, from Inf times 0, fails the check).
    bool ok = true;
    auto fits = [&ok](double bound) {
        ok = ok && bound < largest_finite<float>();
        return bound;
    };
    const double b1 = p.beta1, b2 = p.beta2, ib1 = c.inv_bias1, isb2 = c.inv_sqrt_bias2;
    const double w = state[0] * UP, m2 = state[1] * UP, q = state[2] * UP;
    const bool pull = h.anchor_pull != 0.f && p.anchor_a;
    const double apart = fits(pull ? (w + anchor) * UP : 0.0);  // |p - anchor|
    const double gc = fits((g_max * c.clip + fabs((double)h.anchor_pull) * apart) * UP);
    const double a2 = fits((b2 * m2 + (1.0 - b2) * gc * gc) * UP);
    fits((sqrt(a2) * isb2 + p.eps) * UP);  // root (isb2 >= 1)
    const double m1 = q * (sqrt(m2) + p.eps / isb2) * UP;
    const double num = fits((b1 * m1 + (1.0 - b1) * gc) * ib1 * UP * UP);  // a1 ib1 (ib1 >= 1)
    const bool via_q = b2 > 0.0 && q < HUGE_VAL && p.eps / isb2 >= 0x1p-60;
    const double k0 = via_q ? b1 * q / sqrt(b2) + (1.0 - b1) / sqrt(1.0 - b2) : HUGE_VAL;
    const double ratio = fmin(num / p.eps, k0 * ib1 / isb2) * UP * UP;
    const double sum = fits((ratio + fabs((double)h.weight_decay) * w) * UP);  // also bounds wd |p|
    const double change = fits(fabs((double)h.lr) * sum * UP);
    return ok && (w + change) * UP < largest_finite<T>();
}

// The largest magnitudes a writing pass wrote, and of its ratio: the slot's
// next bounds.
struct Written {
    float w = 0.f, m2 = 0.f, ratio = 0.f;
};

// The step of the U parameters from pool-layout index i: computes them
// (WRITE = false: returns whether all are finite) or also writes them and
// raises `written` to their magnitudes.
template <class T, int U, bool WRITE>
__device__ bool step_unit(const AdamWParams& p, const SlotOptim& h, const StepScalars& c, bool is_a, size_t i,
                          Written& written) {
    const Floats<U> g = load<U>(is_a ? p.grad_a : p.grad_b, i);
    Floats<U> w = load<U>(is_a ? p.master_a : p.master_b, i);
    Floats<U> m1 = load<U>(is_a ? p.m1_a : p.m1_b, i);
    Floats<U> m2 = load<U>(is_a ? p.m2_a : p.m2_b, i);
    Floats<U> anchor{};
    if (h.anchor_pull != 0.f && p.anchor_a) anchor = load<U>(is_a ? p.anchor_a : p.anchor_b, i);
    Values<T, U> work;
    bool finite = true;
    for (int u = 0; u < U; ++u) {
        const NewValues<T> v = step_element<T>(p, h, c, g.v[u], w.v[u], m1.v[u], m2.v[u], anchor.v[u]);
        finite = finite && v.finite();
        w.v[u] = v.w;
        m1.v[u] = v.m1;
        m2.v[u] = v.m2;
        work.v[u] = v.work;
        if (WRITE) {
            written.w = fmaxf(written.w, fabsf(v.w));
            written.m2 = fmaxf(written.m2, fabsf(v.m2));
            written.ratio = fmaxf(written.ratio, fabsf(v.ratio));
        }
    }
    if (WRITE) {
        store<U>(is_a ? p.master_a : p.master_b, i, w);
        store<U>(is_a ? p.m1_a : p.m1_b, i, m1);
        store<U>(is_a ? p.m2_a : p.m2_b, i, m2);
        *reinterpret_cast<Values<T, U>*>(reinterpret_cast<T*>(is_a ? p.work_a : p.work_b) + i) = work;
    }
    return finite;
}

// Whether every array the step touches allows 16-byte (4-value) accesses.
template <class T>
__device__ bool quad_aligned(const AdamWParams& p, size_t max_rank) {
    if (max_rank % 4 != 0) return false;
    const uint64_t f32 = p.master_a | p.master_b | p.m1_a | p.m1_b | p.m2_a | p.m2_b | p.grad_a | p.grad_b |
                         p.anchor_a | p.anchor_b;
    return f32 % 16 == 0 && (p.work_a | p.work_b) % (4 * sizeof(T)) == 0;
}

// b^t for t >= 1 by squaring (f64: within a few ulp for any t): pow's
// general code would cost the kernel registers it has none of to spare.
__device__ double power(double b, int t) {
    double r = 1.0;
    for (; t > 0; t >>= 1, b *= b)
        if (t & 1) r *= b;
    return r;
}

// The block's slot's stored bounds (bounds_clear).
__device__ float* slot_bounds(const AdamWParams& p) {
    return reinterpret_cast<float*>(p.state_bound) + 3 * (size_t)blockIdx.x;
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
    const size_t max_rank = p.max_rank;
    const SlotParams sp{(size_t)s * max_rank * p.k, (size_t)s * p.n * max_rank, (size_t)rank, (size_t)p.k,
                        (size_t)p.n, max_rank};
    // The same for every thread of the block: which width the passes take.
    const bool quads = rank % 4 == 0 && quad_aligned<T>(p, max_rank);
    auto each = [&](auto&& f) {
        if (quads) for_each_unit<4>(sp, [&](bool is_a, size_t i) { f(Unit<4>(), is_a, i); });
        else for_each_unit<1>(sp, [&](bool is_a, size_t i) { f(Unit<1>(), is_a, i); });
    };

    // 1. The norm (f64: a sum of squares of f32 values cannot overflow it) and
    // the largest |g|, Inf where any g is NaN or Inf: from the statistics the
    // backward pass left per column tile when it wrote the gradient (so the
    // step reads the gradient once), else from the gradient itself.
    double sq = 0.0;
    float g_max = 0.f;
    const int from_stats = p.grad_stats_a && p.grad_stats_b ? FROM_STATS : 0;
    if (from_stats) {
        auto tiles = [&](uint64_t stats, int count) {
            const double* at = reinterpret_cast<const double*>(stats) + 2 * (size_t)s * count;
            for (int t = threadIdx.x; t < count; t += THREADS) {
                sq += at[2 * t];
                g_max = fmaxf(g_max, (float)at[2 * t + 1]);
            }
        };
        tiles(p.grad_stats_a, p.tiles_a);
        tiles(p.grad_stats_b, p.tiles_b);
    } else {
        each([&](auto unit, bool is_a, size_t i) {
            constexpr int U = decltype(unit)::value;
            const Floats<U> g = load<U>(is_a ? p.grad_a : p.grad_b, i);
            for (int u = 0; u < U; ++u) {
                if (!isfinite(g.v[u])) g_max = INFINITY;
                else {
                    sq += (double)g.v[u] * g.v[u];
                    g_max = fmaxf(g_max, fabsf(g.v[u]));
                }
            }
        });
    }
    sq = block_sum(sq, scratch);
    g_max = (float)block_max(g_max, scratch);
    const double norm = sqrt(sq);
    // Written now, whatever the outcome (NaN for a non-finite gradient): no
    // register holds the norm through the passes.
    if (threadIdx.x == 0) grad_norm[s] = isinf(g_max) ? __uint_as_float(0x7FC00000u) : (float)norm;
    if (isinf(g_max)) {
        if (threadIdx.x == 0) status[s] = SKIPPED_NON_FINITE | from_stats;
        return;
    }
    const int t = reinterpret_cast<const int*>(p.step)[s] + 1;
    const double bias1 = 1.0 - power(p.beta1, t), bias2 = 1.0 - power(p.beta2, t);
    const StepScalars c{(h.max_grad_norm > 0.f && norm > h.max_grad_norm) ? h.max_grad_norm / norm : 1.0,
                        (float)(1.0 / bias1), (float)(1.0 / sqrt(bias2))};
    const float anchor_bound = reinterpret_cast<const float*>(p.anchor_bound)[s];
    Written written;

    // 2. Would the step leave anything non-finite? Then it writes nothing.
    // Only where the bounds cannot rule it out (the same answer for every
    // thread: the bounds and g_max are the block's).
    const bool check = !bounds_clear<T>(p, h, c, g_max, slot_bounds(p), anchor_bound);
    if (check) {
        double overflow = 0.0;
        each([&](auto unit, bool is_a, size_t i) {
            if (!step_unit<T, decltype(unit)::value, false>(p, h, c, is_a, i, written)) overflow = 1.0;
        });
        overflow = block_sum(overflow, scratch);  // its barriers also order pass 2's reads before pass 3's writes
        if (overflow > 0.0) {
            if (threadIdx.x == 0) status[s] = SKIPPED_OVERFLOW | CHECKED | from_stats;
            return;
        }
    }

    // 3. The step. Each element is read and written by the same thread only.
    each([&](auto unit, bool is_a, size_t i) {
        step_unit<T, decltype(unit)::value, true>(p, h, c, is_a, i, written);
    });
    // The barriers also keep every thread's read of the old bounds and step
    // count before thread 0 changes them.
    const double w_max = block_max(written.w, scratch), m2_max = block_max(written.m2, scratch),
                 ratio_max = block_max(written.ratio, scratch);
    if (threadIdx.x == 0) {
        float* bound = slot_bounds(p);
        bound[0] = (float)w_max;  // f32 values: exact
        bound[1] = (float)m2_max;
        bound[2] = (float)(ratio_max * c.inv_sqrt_bias2 / c.inv_bias1);  // q (bounds_clear)
        reinterpret_cast<int*>(p.step)[s] = t;
        status[s] = UPDATED | (check ? CHECKED : 0) | from_stats;
    }
}

}  // namespace

// Two blocks per SM (at most 64 registers): a memory-bound kernel needs the
// warps to keep enough loads in flight.
LK_KERNEL_BOUNDED(lk_adamw_f32, AdamWParams, adamw<float>, THREADS, 2)
LK_KERNEL_BOUNDED(lk_adamw_f16, AdamWParams, adamw<__half>, THREADS, 2)
LK_KERNEL_BOUNDED(lk_adamw_bf16, AdamWParams, adamw<__nv_bfloat16>, THREADS, 2)
