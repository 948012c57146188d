/* Kernel parameter structs, declared once for the kernels and for Rust.
 * src/params.rs mirrors them with #[repr(C)]; tests/params_layout.rs compares
 * every size and field offset against this header (compiled by the host C++
 * compiler), so the two cannot drift apart silently.
 * Pointers travel as uint64_t device (or, on the host runtime, host) addresses.
 * Plain C: no C++ in this file. */
#pragma once
#include <stdint.h>

/* y[m,n] = x[m,k] w[n,k]^T + scale * (x a[r,k]^T) b[n,r]^T  (+ beta * y) */
typedef struct FusedForwardParams {
    uint64_t x, w, a, b, y;
    int32_t m, n, k, r;
    float scale;
    float beta; /* 0: y is written without being read */
} FusedForwardParams;

/* Runtime self-test kernels (kernels/runtime_selftest.cu). */
typedef struct SelftestParams {
    uint64_t input, input2, out;
    int32_t n;
    int32_t variant; /* which planted bug to run; 0 = correct */
} SelftestParams;
