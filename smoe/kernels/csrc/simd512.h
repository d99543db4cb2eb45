// The fp32 math of SwiGLU in 16 AVX-512 lanes, shared by smoe's kernels built for AVX-512 with BF16 (the "avx512" and
// "amx" builds: swiglu.cpp, gemv.cpp, amx_moe.cpp); simd256.h has it in 8 lanes for the AVX2 build. By hand,
// because gcc vectorizes neither of two things these use: a bf16 rounded by vcvtneps2bf16 (one instruction, round to
// nearest even as torch; the portable form takes eight) and a reciprocal without vdivps (10-16 cycles a vector).
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

#include <cstdint>

namespace smoe_simd512 {

// exp(x) in fp32 (Cephes' expf polynomial, about 1 ulp)
inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

// 1 / d by rcp14 (relative error below 2^-14) and one Newton step (about 2^-28)
inline __m512 reciprocal16(__m512 d) {
    const __m512 r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
}

// silu(a1) * a3 = a1 a3 / (1 + exp(-a1))
inline __m512 swiglu16(__m512 a1, __m512 a3) {
    const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), a1)));
    return _mm512_mul_ps(_mm512_mul_ps(a1, a3), reciprocal16(d));
}

// the first n lanes (all 16 from n = 16)
inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

// the lanes of m from p as fp32 (a bf16 is stored as uint16_t: the top half of its fp32); the others 0
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// the lanes of m of v into p, a bf16 rounded to nearest even
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(uint16_t* p, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

// r[i][j] -> r[j][i] for a 16 x 16 fp32 block held in 16 vectors
inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    // r[4a + b] now holds, in each 128-bit lane L, element b of rows 4a..4a+3 of columns 4L..4L+3
    for (int b = 0; b < 4; b++) {
        t[b] = _mm512_shuffle_f32x4(r[b], r[4 + b], 0x88);        // lanes 0, 2 of rows 0-3 and 4-7
        t[4 + b] = _mm512_shuffle_f32x4(r[b], r[4 + b], 0xdd);    // lanes 1, 3
        t[8 + b] = _mm512_shuffle_f32x4(r[8 + b], r[12 + b], 0x88);
        t[12 + b] = _mm512_shuffle_f32x4(r[8 + b], r[12 + b], 0xdd);
    }
    for (int b = 0; b < 4; b++) {
        r[b] = _mm512_shuffle_f32x4(t[b], t[8 + b], 0x88);             // column lane 0
        r[8 + b] = _mm512_shuffle_f32x4(t[b], t[8 + b], 0xdd);         // column lane 2
        r[4 + b] = _mm512_shuffle_f32x4(t[4 + b], t[12 + b], 0x88);    // column lane 1
        r[12 + b] = _mm512_shuffle_f32x4(t[4 + b], t[12 + b], 0xdd);   // column lane 3
    }
}

}  // namespace smoe_simd512
#endif
