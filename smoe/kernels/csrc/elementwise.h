// Elementwise fp32 math shared by smoe's CPU kernels (swiglu.cpp, gemv.cpp): bf16 <-> fp32 as torch rounds,
// exp and SiLU in plain C++ that the compiler vectorizes.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>

namespace smoe_elementwise {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return std::bit_cast<float>(uint32_t(p[i]) << 16); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) {  // round to nearest even, as torch; NaN stays NaN
    const uint32_t u = std::bit_cast<uint32_t>(v);
    p[i] = v != v ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// exp(x) in fp32 (Cephes' expf polynomial, about 1 ulp) in operations the compiler vectorizes
inline float exp_approx(float x) {
    x = std::min(std::max(x, -87.3f), 88.7f);
    const float n = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest (|x log2 e| < 2^22)
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    return p * std::bit_cast<float>(uint32_t(int32_t(n) + 127) << 23);
}

inline float sigmoid(float x) { return 1.f / (1.f + exp_approx(-x)); }

}  // namespace smoe_elementwise
