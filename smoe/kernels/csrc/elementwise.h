// Scalar loads and stores shared by smoe's CPU kernels (swiglu.cpp, gemv.cpp, route.cpp): bf16 <-> fp32 as torch
// rounds. SiLU's math in vector lanes is in simd512.h and simd256.h.
#pragma once

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

}  // namespace smoe_elementwise
