// Storage types and their conversions to and from the f32 accumulator.
// Device builds use CUDA's __half / __nv_bfloat16; host builds get bit-exact
// stand-ins (round to nearest even, like __float2half_rn / __float2bfloat16_rn).
#pragma once

#ifdef LK_HOST
struct __half {
    unsigned short x;
};
struct __nv_bfloat16 {
    unsigned short x;
};

inline float __half2float(__half h) {
    unsigned sign = (unsigned)(h.x & 0x8000u) << 16;
    unsigned exp = (h.x >> 10) & 0x1Fu;
    unsigned mant = h.x & 0x3FFu;
    unsigned bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13);  // Inf / NaN
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {  // subnormal: normalize
        int e = -1;
        do {
            ++e;
            mant <<= 1;
        } while (!(mant & 0x400u));
        bits = sign | ((unsigned)(112 - e) << 23) | ((mant & 0x3FFu) << 13);
    }
    return __uint_as_float(bits);
}

inline __half __float2half_rn(float f) {
    unsigned bits = __float_as_uint(f);
    unsigned short sign = (unsigned short)((bits >> 16) & 0x8000u);
    unsigned abs = bits & 0x7FFFFFFFu;
    __half h;
    if (abs >= 0x7F800000u) {  // Inf or NaN (keep NaN quiet)
        h.x = sign | 0x7C00u | (abs > 0x7F800000u ? 0x200u | ((abs >> 13) & 0x3FFu) : 0u);
        return h;
    }
    if (abs >= 0x477FF000u) {  // rounds to >= 65520: overflow to Inf
        h.x = sign | 0x7C00u;
        return h;
    }
    if (abs < 0x38800000u) {  // below the smallest normal half: subnormal or zero
        if (abs < 0x33000000u) {  // < 2^-25 rounds to zero (2^-25 ties to even zero)
            h.x = sign;
            return h;
        }
        unsigned e = abs >> 23;
        unsigned mant = (abs & 0x7FFFFFu) | 0x800000u;
        unsigned shift = 126 - e;  // bits to drop so the result is in units of 2^-24
        unsigned q = mant >> shift;
        unsigned rem = mant & ((1u << shift) - 1);
        unsigned half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u))) ++q;
        h.x = sign | (unsigned short)q;
        return h;
    }
    unsigned q = (abs - 0x38000000u) >> 13;  // rebias exponent 127 -> 15
    unsigned rem = abs & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;
    h.x = sign | (unsigned short)q;
    return h;
}

inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((unsigned)b.x << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    unsigned bits = __float_as_uint(f);
    __nv_bfloat16 b;
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
        b.x = (unsigned short)((bits >> 16) | 0x40u);  // quiet NaN
        return b;
    }
    bits += 0x7FFFu + ((bits >> 16) & 1u);
    b.x = (unsigned short)(bits >> 16);
    return b;
}
#endif

namespace lk {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
    return v;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
    return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

}  // namespace lk
