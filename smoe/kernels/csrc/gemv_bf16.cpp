// bf16 matrix-vector products on x86 CPUs with AVX512-BF16 (smoe.kernels.native builds and loads this).
//
// A decode step multiplies a few rows by each weight, so its cost is reading the weight once. torch's
// bf16 path for a few rows, and inductor's fp32-converting reductions over short rows, read bf16 weights
// well below the memory's rate on one core; vdpbf16ps multiplies 32 bf16 pairs exactly and accumulates in
// fp32 in one instruction, so the loop below streams each weight row at memory speed.
//
// smoe_native::gemv(x (M, I), w (O, I)) -> (M, O) bf16: every row of x against every row of w, each
//     weight row read once for all M rows of x.
// smoe_native::expert_gemv(x (N, Kx, I), w (E, O, I), experts (N, K)) -> (N, K, O) float32:
//     y[n, k] = w[experts[n, k]] @ x[n, k if Kx == K else 0] (the chosen experts' products of a MoE),
//     the slots of one expert sharing each read of its weight.
// Products are exact and sums fp32, as in torch's bf16 matmul; only the summation order differs.
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

using bf16 = at::BFloat16;
constexpr int64_t kMaxRows = 8;  // rows of x sharing one read of a weight row (2 x 8 accumulators)

inline __m512bh load(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load_tail(const bf16* p, int64_t n) {
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p);
}

// ys[m][o] = w[o] . xs[m] for o in [o0, o1), m < M: M rows of x (anywhere) against rows o0..o1 of w
template <int M, typename Out>
void rows(const bf16* w, const bf16* const* xs, Out* const* ys, int64_t o0, int64_t o1, int64_t I) {
    for (int64_t o = o0; o < o1; o++) {
        const bf16* r = w + o * I;
        __m512 a[M], b[M];  // two chains per row: the 64-wide loop keeps two dot products in flight
        for (int m = 0; m < M; m++) a[m] = b[m] = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 64 <= I; i += 64) {
            __m512bh w0 = load(r + i), w1 = load(r + i + 32);
            for (int m = 0; m < M; m++) {
                a[m] = _mm512_dpbf16_ps(a[m], w0, load(xs[m] + i));
                b[m] = _mm512_dpbf16_ps(b[m], w1, load(xs[m] + i + 32));
            }
        }
        for (; i < I; i += 32) {
            int64_t n = std::min<int64_t>(32, I - i);
            __m512bh w0 = load_tail(r + i, n);
            for (int m = 0; m < M; m++) a[m] = _mm512_dpbf16_ps(a[m], w0, load_tail(xs[m] + i, n));
        }
        for (int m = 0; m < M; m++) ys[m][o] = Out(_mm512_reduce_add_ps(_mm512_add_ps(a[m], b[m])));
    }
}

template <typename Out>
void rows_any(int64_t M, const bf16* w, const bf16* const* xs, Out* const* ys, int64_t o0, int64_t o1, int64_t I) {
    switch (M) {
        case 1: return rows<1>(w, xs, ys, o0, o1, I);
        case 2: return rows<2>(w, xs, ys, o0, o1, I);
        case 3: return rows<3>(w, xs, ys, o0, o1, I);
        case 4: return rows<4>(w, xs, ys, o0, o1, I);
        case 5: return rows<5>(w, xs, ys, o0, o1, I);
        case 6: return rows<6>(w, xs, ys, o0, o1, I);
        case 7: return rows<7>(w, xs, ys, o0, o1, I);
        default: return rows<8>(w, xs, ys, o0, o1, I);
    }
}

// M rows of x against all O rows of w (O x I), kMaxRows rows per read of w, split over the intra-op
// threads by weight rows
template <typename Out>
void product(int64_t M, const bf16* w, const bf16* const* xs, Out* const* ys, int64_t O, int64_t I) {
    const int64_t grain = std::max<int64_t>(16, 32768 / std::max<int64_t>(I, 1));  // >= 64 KB of weight per task
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        int64_t rows_here = std::min(kMaxRows, M - m0);
        at::parallel_for(0, O, grain, [&](int64_t o0, int64_t o1) {
            rows_any(rows_here, w, xs + m0, ys + m0, o0, o1, I);
        });
    }
}

void check_bf16(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16, "smoe_native: ", name,
                " must be a bfloat16 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w) {
    check_bf16(x, "x");
    check_bf16(w, "w");
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "smoe_native::gemv: x (M, I) and w (O, I), got ",
                x.sizes(), " and ", w.sizes());
    auto xc = x.contiguous();
    auto wc = w.contiguous();
    const int64_t M = xc.size(0), O = wc.size(0), I = wc.size(1);
    auto y = at::empty({M, O}, xc.options());
    std::vector<const bf16*> xs(M);
    std::vector<bf16*> ys(M);
    for (int64_t m = 0; m < M; m++) {
        xs[m] = xc.const_data_ptr<bf16>() + m * I;
        ys[m] = y.mutable_data_ptr<bf16>() + m * O;
    }
    product(M, wc.const_data_ptr<bf16>(), xs.data(), ys.data(), O, I);
    return y;
}

at::Tensor expert_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& experts) {
    check_bf16(x, "x");
    check_bf16(w, "w");
    TORCH_CHECK(x.dim() == 3 && w.dim() == 3 && experts.dim() == 2 && x.size(2) == w.size(2) &&
                    x.size(0) == experts.size(0) && (x.size(1) == 1 || x.size(1) == experts.size(1)),
                "smoe_native::expert_gemv: x (N, K or 1, I), w (E, O, I), experts (N, K), got ", x.sizes(), ", ",
                w.sizes(), ", ", experts.sizes());
    auto xc = x.contiguous();
    auto wc = w.contiguous();
    auto ec = experts.to(at::kLong).contiguous();
    const int64_t N = ec.size(0), K = ec.size(1), Kx = xc.size(1), E = wc.size(0), O = wc.size(1), I = wc.size(2);
    auto y = at::empty({N, K, O}, xc.options().dtype(at::kFloat));
    const int64_t* e = ec.const_data_ptr<int64_t>();
    // the slots of each expert together, so each touched expert's weight is read once (per kMaxRows slots)
    std::vector<std::vector<int64_t>> slots(E);
    for (int64_t s = 0; s < N * K; s++) {
        TORCH_CHECK(e[s] >= 0 && e[s] < E, "smoe_native::expert_gemv: expert id ", e[s], " outside 0..", E - 1);
        slots[e[s]].push_back(s);
    }
    for (int64_t ex = 0; ex < E; ex++) {
        const int64_t M = slots[ex].size();
        if (M == 0) continue;
        std::vector<const bf16*> xs(M);
        std::vector<float*> ys(M);
        for (int64_t m = 0; m < M; m++) {
            const int64_t s = slots[ex][m];
            xs[m] = xc.const_data_ptr<bf16>() + (Kx == 1 ? s / K : s) * I;
            ys[m] = y.mutable_data_ptr<float>() + s * O;
        }
        product(M, wc.const_data_ptr<bf16>() + ex * O * I, xs.data(), ys.data(), O, I);
    }
    return y;
}

}  // namespace

TORCH_LIBRARY(smoe_native, m) {
    m.def("gemv(Tensor x, Tensor w) -> Tensor");
    m.def("expert_gemv(Tensor x, Tensor w, Tensor experts) -> Tensor");
}

TORCH_LIBRARY_IMPL(smoe_native, CPU, m) {
    m.impl("gemv", &gemv);
    m.impl("expert_gemv", &expert_gemv);
}
