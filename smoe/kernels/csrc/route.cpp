// The MoE router for smoe's CPU inference in one op (smoe.kernels.native builds it for every instruction set).
//
// smoe_native::route(x (N, D), gate (E, D), k) -> (weights (N, k) fp32, experts (N, k) int64, logits (N, E) fp32):
//     logits = x gate^T in fp32, the k largest per token in descending order (the first of equal ones first; NaN
//     above all, as torch.topk), and the softmax over those k logits.
// x and gate each fp32 or bf16. torch's code takes 6-8 dispatches for this (casts, the product, topk, softmax),
// about 60 us of a 1-token MoE layer whose experts' products take 400; at 4096 bf16 tokens of dim 512 it took
// 1.73 ms against 0.83 (1 thread, a Xeon with AMX), most of it converting x to fp32.
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "elementwise.h"

namespace {

using namespace smoe_elementwise;

template <typename TX, typename TG>
__attribute__((noinline)) float dot(const TX* x, const TG* g, int64_t D) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < D; j++) acc += load(x, j) * load(g, j);
    return acc;
}

// One vector of fp32 lanes, for dot8: AVX-512 (16 lanes) or AVX2 (8); a bf16 element is its fp32's top 16 bits
#if defined(__AVX512F__)
struct Vec {
    using T = __m512;
    static constexpr int64_t L = 16;
    static T zero() { return _mm512_setzero_ps(); }
    static T load(const float* p) { return _mm512_loadu_ps(p); }
    static T load(const uint16_t* p) {
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
    }
    static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
    static float sum(T v) { return _mm512_reduce_add_ps(v); }
};
#elif defined(__AVX2__)
struct Vec {
    using T = __m256;
    static constexpr int64_t L = 8;
    static T zero() { return _mm256_setzero_ps(); }
    static T load(const float* p) { return _mm256_loadu_ps(p); }
    static T load(const uint16_t* p) {
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
    }
    static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
    static float sum(T v) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
};
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
// l[e] = x . gate[e] for 8 experts at once: x's vector loaded once for the 8 rows, 8 independent sums (a single
// chain, as dot's, waits on each add: 1.5x torch's time at 512 tokens)
template <typename TX, typename TG>
void dot8(const TX* x, const TG* gate, int64_t D, float* l) {
    typename Vec::T acc[8];
    for (int i = 0; i < 8; i++) acc[i] = Vec::zero();
    int64_t j = 0;
    for (; j + Vec::L <= D; j += Vec::L) {
        const auto xv = Vec::load(x + j);
        for (int i = 0; i < 8; i++) acc[i] = Vec::fma(xv, Vec::load(gate + i * D + j), acc[i]);
    }
    for (int i = 0; i < 8; i++) {
        float t = Vec::sum(acc[i]);
        for (int64_t r = j; r < D; r++) t += load(x, r) * load(gate + i * D, r);
        l[i] = t;
    }
}
#endif

bool above(float v, float best) { return v > best || (std::isnan(v) && !std::isnan(best)); }

template <typename TX, typename TG>
void route_rows(const TX* x, const TG* gate, float* logits, float* weights, int64_t* experts, int64_t N, int64_t E,
                int64_t D, int64_t k) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; n++) {
            float* l = logits + n * E;
            int64_t e = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
            for (; e + 8 <= E; e += 8) dot8(x + n * D, gate + e * D, D, l + e);
#endif
            for (; e < E; e++) l[e] = dot(x + n * D, gate + e * D, D);
            float* w = weights + n * k;
            int64_t* ex = experts + n * k;
            for (int64_t j = 0; j < k; j++) {  // k passes of max over the experts not yet chosen
                int64_t best = -1;
                for (int64_t e = 0; e < E; e++) {
                    bool taken = false;
                    for (int64_t i = 0; i < j; i++) taken |= ex[i] == e;
                    if (!taken && (best < 0 || above(l[e], l[best]))) best = e;
                }
                ex[j] = best;
                w[j] = l[best];
            }
            const float top = w[0];  // the largest: exp(l - top) <= 1
            float sum = 0.f;
            for (int64_t j = 0; j < k; j++) sum += (w[j] = std::exp(w[j] - top));
            for (int64_t j = 0; j < k; j++) w[j] /= sum;
        }
    });
}

template <typename TX>
void dispatch_gate(const at::Tensor& x, const at::Tensor& gate, float* l, float* w, int64_t* ex, int64_t k) {
    const auto* xp = reinterpret_cast<const TX*>(x.data_ptr());
    const int64_t N = x.size(0), E = gate.size(0), D = x.size(1);
    if (gate.scalar_type() == at::kFloat)
        route_rows(xp, gate.data_ptr<float>(), l, w, ex, N, E, D, k);
    else
        route_rows(xp, reinterpret_cast<const uint16_t*>(gate.data_ptr()), l, w, ex, N, E, D, k);
}

bool float_or_bf16(const at::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> route(const at::Tensor& x, const at::Tensor& gate, int64_t k) {
    TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous() && float_or_bf16(x),
                "smoe_native route: x must be a contiguous 2-d float32 or bfloat16 CPU tensor, got ", x.scalar_type(),
                " ", x.sizes());
    TORCH_CHECK(gate.device().is_cpu() && gate.dim() == 2 && gate.is_contiguous() && float_or_bf16(gate) &&
                    gate.size(1) == x.size(1),
                "smoe_native route: gate must be a contiguous (E, ", x.size(1),
                ") float32 or bfloat16 CPU tensor, got ", gate.scalar_type(), " ", gate.sizes());
    TORCH_CHECK(1 <= k && k <= gate.size(0), "smoe_native route: k must be in [1, ", gate.size(0), "], got ", k);
    const auto f32 = x.options().dtype(at::kFloat);
    auto logits = at::empty({x.size(0), gate.size(0)}, f32), weights = at::empty({x.size(0), k}, f32);
    auto experts = at::empty({x.size(0), k}, x.options().dtype(at::kLong));
    float *l = logits.data_ptr<float>(), *w = weights.data_ptr<float>();
    int64_t* ex = experts.data_ptr<int64_t>();
    if (x.scalar_type() == at::kFloat)
        dispatch_gate<float>(x, gate, l, w, ex, k);
    else
        dispatch_gate<uint16_t>(x, gate, l, w, ex, k);
    return {weights, experts, logits};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smoe_native, m) {
    m.def("route(Tensor x, Tensor gate, int k) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(smoe_native, CPU, m) { m.impl("route", &route); }
