// SwiGLU's elementwise work for smoe's grouped MoE on the CPU, one pass each way (smoe.kernels.native builds it
// into its library for every instruction set).
//
// smoe_native::swiglu(a1 (S, H), a3 (S, H), out (S, H)) -> (): out = silu(a1) * a3 (out may be a1 itself)
// smoe_native::swiglu_backward(dh, a1, a3, w (S,), da3, hw) -> dw (S,) fp32: for h = silu(a1) * a3 and an output
//     that uses w[s] * h[s], given dh = dL/d(w h): dw = sum_j dh h, hw = w h, da3 = w dh silu(a1),
//     da1 = w dh a3 silu'(a1), the last written over dh.
// fp32 or bf16 tensors, all of one dtype; the math is fp32 and every output is rounded once. torch's code takes
// one pass (and, for bf16, a rounding) per operation, and a new tensor for most: 4-5 passes over S x H each way.
// The rows go by hand in 16 lanes in the AVX-512 builds (simd512.h) and in 8 in the AVX2 build (simd256.h, where gcc
// left plain loops scalar: fp32 at 1024 x 1536 on 1 thread of a Zen 3, 0.9-1.1 ms forward and 2.2-2.5 backward
// by hand against 7-10 and 11-15).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "elementwise.h"
#include "simd256.h"
#include "simd512.h"

namespace {

using namespace smoe_elementwise;

#if defined(__AVX512F__) && defined(__AVX512BF16__)
using namespace smoe_simd512;

// One row each, 16 lanes at a time, the tail masked. By hand, bf16 rows take about 0.7x the time of gcc's vectorized
// loops below and fp32 ones alike forward, 0.9x backward (2048 x 1536, 1 thread of a Xeon with AMX)
template <typename T>
void swiglu_row(const T* a1, const T* a3, T* out, int64_t H) {
    for (int64_t j = 0; j < H; j += 16) {
        const __mmask16 m = lanes(H - j);
        store16(out + j, swiglu16(load16(a1 + j, m), load16(a3 + j, m)), m);
    }
}

template <typename T>
float swiglu_backward_row(T* dh, const T* a1, const T* a3, float ws, T* da3, T* hw, int64_t H) {
    const __m512 w = _mm512_set1_ps(ws), one = _mm512_set1_ps(1.f);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < H; j += 16) {
        const __mmask16 m = lanes(H - j);
        const __m512 x = load16(a1 + j, m), g = load16(a3 + j, m), d = load16(dh + j, m);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)), sg = reciprocal16(_mm512_add_ps(one, e));
        const __m512 silu = _mm512_mul_ps(x, sg), h = _mm512_mul_ps(silu, g), dwh = _mm512_mul_ps(w, d);
        acc = _mm512_fmadd_ps(d, h, acc);
        store16(hw + j, _mm512_mul_ps(w, h), m);
        store16(da3 + j, _mm512_mul_ps(dwh, silu), m);
        // 1 - sg as e sg: no cancellation for large x
        const __m512 dsilu = _mm512_mul_ps(sg, _mm512_fmadd_ps(x, _mm512_mul_ps(e, sg), one));
        store16(dh + j, _mm512_mul_ps(_mm512_mul_ps(dwh, g), dsilu), m);
    }
    return _mm512_reduce_add_ps(acc);
}
#elif defined(__AVX2__) && defined(__FMA__)
using namespace smoe_simd256;

// One row each, 8 lanes at a time, the tail's lanes loaded as zeros and not stored
template <typename T>
void swiglu_row(const T* a1, const T* a3, T* out, int64_t H) {
    for (int64_t j = 0; j < H; j += 8) store8(out + j, swiglu8(load8(a1 + j, H - j), load8(a3 + j, H - j)), H - j);
}

template <typename T>
float swiglu_backward_row(T* dh, const T* a1, const T* a3, float ws, T* da3, T* hw, int64_t H) {
    const __m256 w = _mm256_set1_ps(ws), one = _mm256_set1_ps(1.f);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < H; j += 8) {
        const int64_t n = H - j;
        const __m256 x = load8(a1 + j, n), g = load8(a3 + j, n), d = load8(dh + j, n);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x)), sg = _mm256_div_ps(one, _mm256_add_ps(one, e));
        const __m256 silu = _mm256_mul_ps(x, sg), h = _mm256_mul_ps(silu, g), dwh = _mm256_mul_ps(w, d);
        acc = _mm256_fmadd_ps(d, h, acc);
        store8(hw + j, _mm256_mul_ps(w, h), n);
        store8(da3 + j, _mm256_mul_ps(dwh, silu), n);
        // 1 - sg as e sg: no cancellation for large x
        const __m256 dsilu = _mm256_mul_ps(sg, _mm256_fmadd_ps(x, _mm256_mul_ps(e, sg), one));
        store8(dh + j, _mm256_mul_ps(_mm256_mul_ps(dwh, g), dsilu), n);
    }
    return sum8(acc);
}
#else
#error "swiglu.cpp is built with AVX-512 and BF16, or AVX2 and FMA"
#endif

int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)); }

template <typename T>
void swiglu_rows(const T* a1, const T* a3, T* out, int64_t S, int64_t H) {
    at::parallel_for(0, S, row_grain(H), [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; s++) swiglu_row(a1 + s * H, a3 + s * H, out + s * H, H);
    });
}

template <typename T>
void swiglu_backward_rows(T* dh, const T* a1, const T* a3, const T* w, T* da3, T* hw, float* dw, int64_t S, int64_t H) {
    at::parallel_for(0, S, row_grain(H), [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; s++)
            dw[s] = swiglu_backward_row(dh + s * H, a1 + s * H, a3 + s * H, load(w, s), da3 + s * H, hw + s * H, H);
    });
}

void check(const at::Tensor& t, const at::Tensor& like, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == like.scalar_type() && t.is_contiguous() &&
                    t.sizes() == like.sizes(),
                "smoe_native swiglu: ", name, " must be a contiguous CPU tensor of a1's dtype and shape ", like.sizes(),
                ", got ", t.scalar_type(), " ", t.sizes());
}

void check_a1(const at::Tensor& a1) {
    TORCH_CHECK(a1.device().is_cpu() && a1.dim() == 2 && a1.is_contiguous() &&
                    (a1.scalar_type() == at::kFloat || a1.scalar_type() == at::kBFloat16),
                "smoe_native swiglu: a1 must be a contiguous 2-d float32 or bfloat16 CPU tensor, got ",
                a1.scalar_type(), " ", a1.sizes());
}

template <typename T>
T* ptr(const at::Tensor& t) {
    return reinterpret_cast<T*>(t.data_ptr());
}

void swiglu(const at::Tensor& a1, const at::Tensor& a3, const at::Tensor& out) {
    check_a1(a1);
    check(a3, a1, "a3");
    check(out, a1, "out");
    const int64_t S = a1.size(0), H = a1.size(1);
    if (a1.scalar_type() == at::kFloat)
        swiglu_rows(ptr<float>(a1), ptr<float>(a3), ptr<float>(out), S, H);
    else
        swiglu_rows(ptr<uint16_t>(a1), ptr<uint16_t>(a3), ptr<uint16_t>(out), S, H);
}

at::Tensor swiglu_backward(const at::Tensor& dh, const at::Tensor& a1, const at::Tensor& a3, const at::Tensor& w,
                           const at::Tensor& da3, const at::Tensor& hw) {
    check_a1(a1);
    const std::pair<const at::Tensor*, const char*> others[] = {{&dh, "dh"}, {&a3, "a3"}, {&da3, "da3"}, {&hw, "hw"}};
    for (const auto& [t, name] : others) check(*t, a1, name);
    const int64_t S = a1.size(0), H = a1.size(1);
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == a1.scalar_type() && w.is_contiguous() && w.dim() == 1 &&
                    w.size(0) == S,
                "smoe_native swiglu_backward: w must be a contiguous (", S, ",) CPU tensor of a1's dtype, got ",
                w.scalar_type(), " ", w.sizes());
    auto dw = at::empty({S}, a1.options().dtype(at::kFloat));
    if (a1.scalar_type() == at::kFloat)
        swiglu_backward_rows(ptr<float>(dh), ptr<float>(a1), ptr<float>(a3), ptr<float>(w), ptr<float>(da3),
                             ptr<float>(hw), ptr<float>(dw), S, H);
    else
        swiglu_backward_rows(ptr<uint16_t>(dh), ptr<uint16_t>(a1), ptr<uint16_t>(a3), ptr<uint16_t>(w),
                             ptr<uint16_t>(da3), ptr<uint16_t>(hw), ptr<float>(dw), S, H);
    return dw;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smoe_native, m) {
    m.def("swiglu(Tensor a1, Tensor a3, Tensor(a!) out) -> ()");
    m.def("swiglu_backward(Tensor(a!) dh, Tensor a1, Tensor a3, Tensor w, Tensor(b!) da3, Tensor(c!) hw) -> Tensor");
}

TORCH_LIBRARY_IMPL(smoe_native, CPU, m) {
    m.impl("swiglu", &swiglu);
    m.impl("swiglu_backward", &swiglu_backward);
}
