// Matrix-vector products for decode on x86-64 CPUs, bf16 and fp32 (smoe.kernels.native builds and loads this).
//
// A decode step multiplies a few rows by each weight, so its cost is reading the weight once. torch's paths
// for a few rows (bf16 especially), and inductor's reductions over short rows, read weights well below the
// memory's rate on one core; the loops below stream each weight row once for all rows of x.
//
// Built for one of two instruction sets, chosen by smoe.kernels.native from the CPU's flags:
//   avx512 (-mavx512f -mavx512bw -mavx512vl -mavx512bf16): bf16 by vdpbf16ps, which multiplies 32 bf16 pairs
//       exactly and sums them in fp32 in one instruction; fp32 by 16-wide FMAs; up to 8 rows of x per pass;
//   avx2 (-mavx2 -mfma): a bf16 is the top half of an fp32, so a weight's 16 bf16 become its 8 even and 8 odd
//       elements as fp32 by one shift and one mask, multiplied by x split likewise once per call; fp32 by
//       8-wide FMAs; up to 4 rows of x per pass (16 vector registers).
// More rows than one pass takes read each block of weight rows from memory once and again from cache.
//
// smoe_native::gemv(x (..., I), w (O, I)) -> (..., O), x and w both bf16 or both fp32, in their dtype: every
//     row of x against every row of w.
// smoe_native::expert_gemv(x (N, Kx, I), w (E, O, I), experts (N, K)) -> (N, K, O) float32:
//     y[n, k] = w[experts[n, k]] @ x[n, k if Kx == K else 0] (the chosen experts' products of a MoE),
//     the slots of one expert sharing each read of its weight.
// smoe_native::moe_gemv(x (N, D), w1 (E, H, D), w2 (E, D, H), w3 (E, H, D), experts (N, K), weights (N, K))
//     -> (N, D) in x's dtype: a MoE layer's chosen experts at decode sizes in one op (expert_gemv for w1 and w3,
//     silu(a1) a3 weight rounded to x's dtype, expert_gemv for w2, the K outputs summed in fp32).
// Products of bf16 are exact in fp32 and sums are fp32, as in torch's matmuls; only the summation order differs.
// smoe_native::stream_sum(x float32, streams) -> 0-d: x's sum, read as that many streams (bandwidth probes).
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "elementwise.h"
#include "simd256.h"
#include "simd512.h"

namespace {

using bf16 = at::BFloat16;

#if defined(__AVX512F__)
constexpr int kMaxRows = 8;  // rows of x per pass over a weight row (2 accumulators each, of 32 registers)
#else
constexpr int kMaxRows = 4;  // 2 accumulators each, of 16 registers
#endif

#if defined(__AVX512F__) && !defined(__AVX512BF16__)
#error "the avx512 build takes AVX512-BF16 too (-mavx512bf16)"
#endif

// ys[m][o] = w[o] . xs[m] for o in [o0, o1). Weight rows are read as S sequential streams at once, each over
// its own part of [o0, o1): one core reads memory faster from several streams than from one (16-19 vs 12-15
// GB/s for 1-16 KB rows on a Zen 3; 16.0 vs 13.9 GB/s on an Intel Xeon with AMX), where interleaving adjacent
// rows read slower still for short rows
template <typename P, int M, typename Out>
void rows_streams(const typename P::W* w, const typename P::X* const* xs, Out* const* ys, int64_t o0, int64_t o1,
                  int64_t I) {
    // P::kStreams streams for one row of x (0: one stream), two for two rows, else one: at most 8 accumulators
    constexpr int S = P::kStreams ? (M == 1 ? P::kStreams : M == 2 ? 2 : 1) : 1;
    const int64_t span = (o1 - o0) / S;
    int64_t o = o0;
    if constexpr (S > 1) {
        for (; o < o0 + span; o++) P::template tile<S, M>(w, xs, ys, o, span, I);
        o = o0 + S * span;
    }
    for (; o < o1; o++) P::template tile<1, M>(w, xs, ys, o, 0, I);
}

#if defined(__AVX512F__)
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// ys[m][o + s * stride] = w[o + s * stride] . xs[m] for s < S, m < M: Step's loads and dot products over the
// weight rows, kStep elements per vector, the last I % kStep by masked loads
template <typename Step, int S, int M, typename Out>
inline void tile512(const typename Step::W* w, const typename Step::W* const* xs, Out* const* ys, int64_t o,
                    int64_t stride, int64_t I) {
    constexpr int64_t kW = Step::kStep;
    __m512 acc[S][M][2];  // two chains per stream and row: two vectors in flight
    for (int s = 0; s < S; s++)
        for (int m = 0; m < M; m++) acc[s][m][0] = acc[s][m][1] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 2 * kW <= I; i += 2 * kW)
        for (int s = 0; s < S; s++) {
            const auto* r = w + (o + s * stride) * I + i;
            // each stream's next lines asked for 1 KB ahead: 17.4 vs 14.1-15.4 GB/s over two 7 MB experts, 16.5 vs
            // 14.5-14.9 over a 65 MB weight (256 B ahead: 15.9 and 15.3; 4 KB: 16.4 and 16.0), an Intel Xeon
            _mm_prefetch(reinterpret_cast<const char*>(r) + 1024, _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(r) + 1024 + 64, _MM_HINT_T0);
            const auto w0 = Step::load(r), w1 = Step::load(r + kW);
            for (int m = 0; m < M; m++) {
                acc[s][m][0] = Step::dot(acc[s][m][0], w0, Step::load(xs[m] + i));
                acc[s][m][1] = Step::dot(acc[s][m][1], w1, Step::load(xs[m] + i + kW));
            }
        }
    for (; i < I; i += kW) {
        const int64_t n = std::min<int64_t>(kW, I - i);
        for (int s = 0; s < S; s++) {
            const auto w0 = Step::load_tail(w + (o + s * stride) * I + i, n);
            for (int m = 0; m < M; m++) acc[s][m][0] = Step::dot(acc[s][m][0], w0, Step::load_tail(xs[m] + i, n));
        }
    }
    for (int s = 0; s < S; s++)
        for (int m = 0; m < M; m++) ys[m][o + s * stride] = Out(hsum(_mm512_add_ps(acc[s][m][0], acc[s][m][1])));
}

struct F32 {
    using W = float;
    using X = float;
    static constexpr bool kPrepared = false;  // rows of x are read in place
    static constexpr int64_t kStep = 16;
    static constexpr int kStreams = 0;  // one: fp32 decode of the large model read 0.73-0.82x as fast with four
    static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
    static __m512 load_tail(const float* p, int64_t n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
    static __m512 dot(__m512 acc, __m512 w, __m512 x) { return _mm512_fmadd_ps(w, x, acc); }

    template <int S, int M, typename Out>
    static void tile(const W* w, const X* const* xs, Out* const* ys, int64_t o, int64_t stride, int64_t I) {
        tile512<F32, S, M>(w, xs, ys, o, stride, I);
    }
    template <int M, typename Out>
    static void rows(const W* w, const X* const* xs, Out* const* ys, int64_t o0, int64_t o1, int64_t I) {
        rows_streams<F32, M>(w, xs, ys, o0, o1, I);
    }
};

struct BF16 {
    using W = bf16;
    using X = bf16;  // vdpbf16ps takes x as it is
    static constexpr bool kPrepared = false;
    static constexpr int64_t kStep = 32;
    static constexpr int kStreams = 4;
    static __m512bh load(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }
    static __m512bh load_tail(const bf16* p, int64_t n) {
        return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p);
    }
    static __m512 dot(__m512 acc, __m512bh w, __m512bh x) { return _mm512_dpbf16_ps(acc, w, x); }

    template <int S, int M, typename Out>
    static void tile(const W* w, const X* const* xs, Out* const* ys, int64_t o, int64_t stride, int64_t I) {
        tile512<BF16, S, M>(w, xs, ys, o, stride, I);
    }
    template <int M, typename Out>
    static void rows(const W* w, const X* const* xs, Out* const* ys, int64_t o0, int64_t o1, int64_t I) {
        rows_streams<BF16, M>(w, xs, ys, o0, o1, I);
    }
};

#else  // AVX2 + FMA
inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Both dtypes take a weight row 16 elements at a time as two 8-wide fp32 vectors: fp32 its elements 0-7 and
// 8-15, bf16 its even and its odd elements (x is laid out alike: BF16::prepare)
inline void widen(const float* p, __m256& lo, __m256& hi) {
    lo = _mm256_loadu_ps(p);
    hi = _mm256_loadu_ps(p + 8);
}
inline void widen(const bf16* p, __m256& lo, __m256& hi) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    hi = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(int(0xFFFF0000u))));
}

// ys[m][o + s * stride] = w[o + s * stride] . xs[m] for s < S, m < M; the last I % 16 elements by P::tail
template <typename P, int S, int M, typename Out>
inline void tile256(const typename P::W* w, const float* const* xs, Out* const* ys, int64_t o, int64_t stride,
                    int64_t I) {
    __m256 acc[S][M][2];
    for (int s = 0; s < S; s++)
        for (int m = 0; m < M; m++) acc[s][m][0] = acc[s][m][1] = _mm256_setzero_ps();
    const int64_t full = I / 16 * 16;
    for (int64_t i = 0; i < full; i += 16)
        for (int s = 0; s < S; s++) {
            __m256 lo, hi;
            widen(w + (o + s * stride) * I + i, lo, hi);
            for (int m = 0; m < M; m++) {
                acc[s][m][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xs[m] + i), acc[s][m][0]);
                acc[s][m][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xs[m] + i + 8), acc[s][m][1]);
            }
        }
    for (int s = 0; s < S; s++)
        for (int m = 0; m < M; m++)
            ys[m][o + s * stride] = Out(hsum(_mm256_add_ps(acc[s][m][0], acc[s][m][1])) +
                                        P::tail(w + (o + s * stride) * I, xs[m], full, I));
}

struct F32 {
    using W = float;
    using X = float;
    static constexpr bool kPrepared = false;  // rows of x are read in place
    static constexpr int kStreams = 4;
    static float tail(const float* r, const float* x, int64_t i0, int64_t I) {
        float s = 0.f;
        for (int64_t i = i0; i < I; i++) s += r[i] * x[i];
        return s;
    }
    template <int M, typename Out>
    static void rows(const W* w, const X* const* xs, Out* const* ys, int64_t o0, int64_t o1, int64_t I) {
        rows_streams<F32, M>(w, xs, ys, o0, o1, I);
    }
    template <int S, int M, typename Out>
    static void tile(const W* w, const X* const* xs, Out* const* ys, int64_t o, int64_t stride, int64_t I) {
        tile256<F32, S, M>(w, xs, ys, o, stride, I);
    }
};

struct BF16 {
    using W = bf16;
    using X = float;  // x as fp32, each 16-element chunk as its 8 even then its 8 odd elements, zero-padded
    static constexpr bool kPrepared = true;
    static constexpr int kStreams = 4;
    static int64_t prepared_len(int64_t I) { return (I + 15) / 16 * 16; }
    static void prepare(const bf16* x, int64_t I, X* out) {
        for (int64_t c = 0; c < prepared_len(I); c += 16)
            for (int j = 0; j < 8; j++) {
                out[c + j] = c + 2 * j < I ? float(x[c + 2 * j]) : 0.f;
                out[c + 8 + j] = c + 2 * j + 1 < I ? float(x[c + 2 * j + 1]) : 0.f;
            }
    }
    static float tail(const bf16* r, const float* xp, int64_t i0, int64_t I) {
        float s = 0.f;
        for (int64_t j = 0; j < I - i0; j++) s += float(r[i0 + j]) * xp[i0 + (j & 1) * 8 + j / 2];
        return s;
    }
    template <int M, typename Out>
    static void rows(const W* w, const X* const* xs, Out* const* ys, int64_t o0, int64_t o1, int64_t I) {
        rows_streams<BF16, M>(w, xs, ys, o0, o1, I);
    }
    template <int S, int M, typename Out>
    static void tile(const W* w, const X* const* xs, Out* const* ys, int64_t o, int64_t stride, int64_t I) {
        tile256<BF16, S, M>(w, xs, ys, o, stride, I);
    }
};
#endif

template <typename P, typename Out>
void rows_any(int64_t M, const typename P::W* w, const typename P::X* const* xs, Out* const* ys, int64_t o0,
              int64_t o1, int64_t I) {
    switch (M) {
        case 1: return P::template rows<1>(w, xs, ys, o0, o1, I);
        case 2: return P::template rows<2>(w, xs, ys, o0, o1, I);
        case 3: return P::template rows<3>(w, xs, ys, o0, o1, I);
#if defined(__AVX512F__)
        case 4: return P::template rows<4>(w, xs, ys, o0, o1, I);
        case 5: return P::template rows<5>(w, xs, ys, o0, o1, I);
        case 6: return P::template rows<6>(w, xs, ys, o0, o1, I);
        case 7: return P::template rows<7>(w, xs, ys, o0, o1, I);
#endif
        default: return P::template rows<kMaxRows>(w, xs, ys, o0, o1, I);
    }
}

// M rows of x against all O rows of w (O x I), split over the intra-op threads by weight rows. With more rows
// than one pass takes, weight rows go in blocks that stay in cache for the passes after the first.
template <typename P, typename Out>
void product(int64_t M, const typename P::W* w, const typename P::X* const* xs, Out* const* ys, int64_t O,
             int64_t I) {
    const int64_t row_bytes = std::max<int64_t>(I, 1) * sizeof(typename P::W);
    const int64_t grain = std::max<int64_t>(16, 65536 / row_bytes);  // >= 64 KB of weight per task
    const int64_t block = M <= kMaxRows ? O : std::max<int64_t>(1, 16384 / row_bytes);
    at::parallel_for(0, O, grain, [&](int64_t o0, int64_t o1) {
        for (int64_t b0 = o0; b0 < o1; b0 += block) {
            const int64_t b1 = std::min(o1, b0 + block);
            for (int64_t m0 = 0; m0 < M; m0 += kMaxRows)
                rows_any<P>(std::min<int64_t>(kMaxRows, M - m0), w, xs + m0, ys + m0, b0, b1, I);
        }
    });
}

// the rows of x (n of them, I long, at x) in the form P's loops read: as they are, or prepared into scratch
template <typename P>
std::vector<const typename P::X*> x_rows(const typename P::W* x, int64_t n, int64_t I, std::vector<float>& scratch) {
    std::vector<const typename P::X*> out(n);
    if constexpr (P::kPrepared) {
        const int64_t L = P::prepared_len(I);
        scratch.resize(n * L);
        for (int64_t r = 0; r < n; r++) {
            P::prepare(x + r * I, I, scratch.data() + r * L);
            out[r] = scratch.data() + r * L;
        }
    } else {
        for (int64_t r = 0; r < n; r++) out[r] = reinterpret_cast<const typename P::X*>(x + r * I);
    }
    return out;
}

void check_pair(const at::Tensor& x, const at::Tensor& w, const char* op) {
    TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "smoe_native::", op, ": CPU tensors only, got ",
                x.device(), " and ", w.device());
    TORCH_CHECK(x.scalar_type() == w.scalar_type() &&
                    (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
                "smoe_native::", op, ": x and w must both be bfloat16 or both float32, got ", x.scalar_type(),
                " and ", w.scalar_type());
}

template <typename P>
void gemv_impl(const at::Tensor& xc, const at::Tensor& wc, at::Tensor& y) {
    using W = typename P::W;
    const int64_t M = xc.size(0), O = wc.size(0), I = wc.size(1);
    std::vector<float> scratch;
    auto xs = x_rows<P>(xc.const_data_ptr<W>(), M, I, scratch);
    std::vector<W*> ys(M);
    for (int64_t m = 0; m < M; m++) ys[m] = y.mutable_data_ptr<W>() + m * O;
    product<P>(M, wc.const_data_ptr<W>(), xs.data(), ys.data(), O, I);
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w) {
    check_pair(x, w, "gemv");
    TORCH_CHECK(x.dim() >= 1 && w.dim() == 2 && x.size(-1) == w.size(1),
                "smoe_native::gemv: x (..., I) and w (O, I), got ", x.sizes(), " and ", w.sizes());
    auto xc = x.reshape({-1, x.size(-1)}).contiguous();
    auto wc = w.contiguous();
    auto y = at::empty({xc.size(0), wc.size(0)}, xc.options());
    if (x.scalar_type() == at::kFloat)
        gemv_impl<F32>(xc, wc, y);
    else
        gemv_impl<BF16>(xc, wc, y);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = wc.size(0);
    return y.view(shape);
}

template <typename P>
void expert_gemv_impl(const at::Tensor& xc, const at::Tensor& wc, const int64_t* e, int64_t K, at::Tensor& y) {
    using W = typename P::W;
    const int64_t N = y.size(0), Kx = xc.size(1), E = wc.size(0), O = wc.size(1), I = wc.size(2);
    std::vector<float> scratch;
    auto x_all = x_rows<P>(xc.const_data_ptr<W>(), N * Kx, I, scratch);
    // the slots of each expert together, so each touched expert's weight is read once (per kMaxRows slots)
    std::vector<std::vector<int64_t>> slots(E);
    for (int64_t s = 0; s < N * K; s++) slots[e[s]].push_back(s);
    for (int64_t ex = 0; ex < E; ex++) {
        const int64_t M = slots[ex].size();
        if (M == 0) continue;
        std::vector<const typename P::X*> xs(M);
        std::vector<float*> ys(M);
        for (int64_t m = 0; m < M; m++) {
            const int64_t s = slots[ex][m];
            xs[m] = x_all[Kx == 1 ? s / K : s];
            ys[m] = y.mutable_data_ptr<float>() + s * O;
        }
        product<P>(M, wc.const_data_ptr<W>() + ex * O * I, xs.data(), ys.data(), O, I);
    }
}

at::Tensor expert_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& experts) {
    check_pair(x, w, "expert_gemv");
    TORCH_CHECK(x.dim() == 3 && w.dim() == 3 && experts.dim() == 2 && x.size(2) == w.size(2) &&
                    x.size(0) == experts.size(0) && (x.size(1) == 1 || x.size(1) == experts.size(1)),
                "smoe_native::expert_gemv: x (N, K or 1, I), w (E, O, I), experts (N, K), got ", x.sizes(), ", ",
                w.sizes(), ", ", experts.sizes());
    auto xc = x.contiguous();
    auto wc = w.contiguous();
    auto ec = experts.to(at::kLong).contiguous();
    const int64_t N = ec.size(0), K = ec.size(1), E = wc.size(0);
    const int64_t* e = ec.const_data_ptr<int64_t>();
    for (int64_t s = 0; s < N * K; s++)
        TORCH_CHECK_VALUE(e[s] >= 0 && e[s] < E, "smoe_native::expert_gemv: expert index ", e[s], " out of range [0, ",
                          E, ")");
    auto y = at::empty({N, K, wc.size(1)}, xc.options().dtype(at::kFloat));
    if (x.scalar_type() == at::kFloat)
        expert_gemv_impl<F32>(xc, wc, e, K, y);
    else
        expert_gemv_impl<BF16>(xc, wc, e, K, y);
    return y;
}

// out[j] = silu(a1[j]) a3[j] w, in out's dtype (by hand in the build's lanes: simd512.h, simd256.h)
template <typename T>
void weighted_swiglu(const float* a1, const float* a3, float w, T* out, int64_t n) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    using namespace smoe_simd512;
    const __m512 wv = _mm512_set1_ps(w);
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = lanes(n - j);
        store16(out + j, _mm512_mul_ps(swiglu16(load16(a1 + j, m), load16(a3 + j, m)), wv), m);
    }
#else
    using namespace smoe_simd256;
    const __m256 wv = _mm256_set1_ps(w);
    for (int64_t j = 0; j < n; j += 8)
        store8(out + j, _mm256_mul_ps(swiglu8(load8(a1 + j, n - j), load8(a3 + j, n - j)), wv), n - j);
#endif
}

// out[n] = sum_k y[n, k] (D wide), summed in fp32 and rounded once to out's dtype
template <typename T>
void sum_slots(const float* y, T* out, int64_t N, int64_t K, int64_t D) {
    for (int64_t n = 0; n < N; n++)
        for (int64_t d = 0; d < D; d++) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; k++) acc += y[(n * K + k) * D + d];
            smoe_elementwise::store(out, n * D + d, acc);
        }
}

at::Tensor moe_gemv(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& w3,
                    const at::Tensor& experts, const at::Tensor& weights) {
    TORCH_CHECK(x.dim() == 2 && w1.dim() == 3 && w1.sizes() == w3.sizes() && w2.dim() == 3 &&
                    w2.size(0) == w1.size(0) && w2.size(1) == w1.size(2) && w2.size(2) == w1.size(1) &&
                    x.size(1) == w1.size(2) && experts.dim() == 2 && experts.sizes() == weights.sizes() &&
                    experts.size(0) == x.size(0),
                "smoe_native::moe_gemv: x (N, D), w1 and w3 (E, H, D), w2 (E, D, H), experts and weights (N, K), got ",
                x.sizes(), ", ", w1.sizes(), ", ", w2.sizes(), ", ", w3.sizes(), ", ", experts.sizes(), ", ",
                weights.sizes());
    const int64_t N = x.size(0), K = experts.size(1), H = w1.size(1), D = x.size(1);
    const auto a1 = expert_gemv(x.unsqueeze(1), w1, experts), a3 = expert_gemv(x.unsqueeze(1), w3, experts);
    const auto wf = weights.to(at::kFloat).contiguous();
    auto h = at::empty({N, K, H}, x.options());  // rounded to x's dtype, as the products' input
    for (int64_t s = 0; s < N * K; s++) {
        const float* p1 = a1.const_data_ptr<float>() + s * H;
        const float* p3 = a3.const_data_ptr<float>() + s * H;
        const float w = wf.const_data_ptr<float>()[s];
        if (x.scalar_type() == at::kFloat)
            weighted_swiglu(p1, p3, w, h.mutable_data_ptr<float>() + s * H, H);
        else
            weighted_swiglu(p1, p3, w, reinterpret_cast<uint16_t*>(h.mutable_data_ptr<bf16>()) + s * H, H);
    }
    const auto y = expert_gemv(h, w2, experts);  // (N, K, D) fp32
    auto out = at::empty({N, D}, x.options());
    if (x.scalar_type() == at::kFloat)
        sum_slots(y.const_data_ptr<float>(), out.mutable_data_ptr<float>(), N, K, D);
    else
        sum_slots(y.const_data_ptr<float>(), reinterpret_cast<uint16_t*>(out.mutable_data_ptr<bf16>()), N, K, D);
    return out;
}

// the sum of x's elements read as S sequential streams at once, each over its part of x (for the bandwidth
// probe of benchmarks: the streams these products read)
template <int S>
float stream_sum_of(const float* x, int64_t n) {
#if defined(__AVX512F__)
    using V = __m512;
    constexpr int64_t kW = 16;
    auto zero = [] { return _mm512_setzero_ps(); };
    auto add = [](V a, const float* p) { return _mm512_add_ps(a, _mm512_loadu_ps(p)); };
    auto sum = [](V a, V b) { return _mm512_add_ps(a, b); };
#else
    using V = __m256;
    constexpr int64_t kW = 8;
    auto zero = [] { return _mm256_setzero_ps(); };
    auto add = [](V a, const float* p) { return _mm256_add_ps(a, _mm256_loadu_ps(p)); };
    auto sum = [](V a, V b) { return _mm256_add_ps(a, b); };
#endif
    const int64_t span = n / S / (2 * kW) * (2 * kW);
    V acc[S][2];
    for (int s = 0; s < S; s++) acc[s][0] = acc[s][1] = zero();
    for (int64_t i = 0; i < span; i += 2 * kW)
        for (int s = 0; s < S; s++) {
            acc[s][0] = add(acc[s][0], x + s * span + i);
            acc[s][1] = add(acc[s][1], x + s * span + i + kW);
        }
    V total = zero();
    for (int s = 0; s < S; s++) total = sum(total, sum(acc[s][0], acc[s][1]));
    float out = hsum(total);
    for (int64_t i = S * span; i < n; i++) out += x[i];
    return out;
}

at::Tensor stream_sum(const at::Tensor& x, int64_t streams) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
                "smoe_native::stream_sum: a contiguous float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
    const float* p = x.const_data_ptr<float>();
    const int64_t n = x.numel();
    float out;
    switch (streams) {
        case 1: out = stream_sum_of<1>(p, n); break;
        case 2: out = stream_sum_of<2>(p, n); break;
        case 4: out = stream_sum_of<4>(p, n); break;
        case 8: out = stream_sum_of<8>(p, n); break;
        default: TORCH_CHECK(false, "smoe_native::stream_sum: streams must be 1, 2, 4 or 8, got ", streams);
    }
    return at::scalar_tensor(out, x.options());
}

}  // namespace

TORCH_LIBRARY(smoe_native, m) {
    m.def("gemv(Tensor x, Tensor w) -> Tensor");
    m.def("expert_gemv(Tensor x, Tensor w, Tensor experts) -> Tensor");
    m.def("moe_gemv(Tensor x, Tensor w1, Tensor w2, Tensor w3, Tensor experts, Tensor weights) -> Tensor");
    m.def("stream_sum(Tensor x, int streams) -> Tensor");
}

TORCH_LIBRARY_IMPL(smoe_native, CPU, m) {
    m.impl("gemv", &gemv);
    m.impl("expert_gemv", &expert_gemv);
    m.impl("moe_gemv", &moe_gemv);
    m.impl("stream_sum", &stream_sum);
}
