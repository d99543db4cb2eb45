// The fp32 math of SwiGLU in 8 AVX2 lanes, shared by smoe's kernels built for AVX2 with FMA (the "avx2" build:
// swiglu.cpp, gemv.cpp, f32_moe_avx2.cpp): simd512.h's at half the width. By hand, because gcc 12 vectorizes no
// plain loop of it: it threads the jumps of exp's clamp (x past +-87 gives constants) into branches before the
// vectorizer runs, and the loops were left scalar (4.6 ns an element on a Zen 3, 5x torch's silu).
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace smoe_simd256 {

// exp(x) in fp32 (Cephes' expf polynomial, about 1 ulp), as smoe_simd512::exp16 but for the top of its clamp: 2^n is
// built in the exponent's bits, where n = 128 (x past 88.38) would be inf and SiLU's gradient inf * 0 = NaN
inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// silu(a1) * a3 = a1 a3 / (1 + exp(-a1))
inline __m256 swiglu8(__m256 a1, __m256 a3) {
    const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), a1)));
    return _mm256_div_ps(_mm256_mul_ps(a1, a3), d);
}

// the first n lanes of 8 (all from n = 8), as a maskload's mask
inline __m256i lanes(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(n, 8))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// the first n lanes (all 8 from n = 8) from p as fp32 (a bf16 is stored as uint16_t: the top half of its fp32); the
// others 0
inline __m256 load8(const float* p, int64_t n) { return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes(n)); }
inline __m256 load8(const uint16_t* p, int64_t n) {
    __m128i h;
    if (n >= 8) {
        h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
        alignas(16) uint16_t b[8] = {};
        std::copy_n(p, std::max<int64_t>(n, 0), b);
        h = _mm_load_si128(reinterpret_cast<const __m128i*>(b));
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// the first n lanes of v into p, a bf16 rounded to nearest even as torch (a NaN stays a NaN)
inline void store8(float* p, __m256 v, int64_t n) {
    if (n >= 8)
        _mm256_storeu_ps(p, v);
    else
        _mm256_maskstore_ps(p, lanes(n), v);
}
inline void store8(uint16_t* p, __m256 v, int64_t n) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));  // each <= 0xffff
    if (n >= 8) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    } else {
        alignas(16) uint16_t b[8];
        _mm_store_si128(reinterpret_cast<__m128i*>(b), h);
        std::copy_n(b, std::max<int64_t>(n, 0), p);
    }
}

// the sum of v's 8 lanes
inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

}  // namespace smoe_simd256
#endif
