// What smoe's fused MoE ops share (amx_moe.cpp, f32_moe.cpp; segment.cpp its count check): their argument checks, the
// token-slots sorted by expert, and scratch memory a thread keeps between calls.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <optional>
#include <type_traits>
#include <tuple>
#include <vector>

namespace smoe_moe {

// x (N, D), w1 and w3 (E, H, D), w2 (E, D, H), experts and weights (N, K): CPU tensors, x of `dtype`, the expert weights
// of `weights_dtype` (by default `dtype`)
inline void check_args(const char* op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                       const at::Tensor& w3, const at::Tensor& experts, const at::Tensor& weights,
                       at::ScalarType dtype, std::optional<at::ScalarType> weights_dtype = std::nullopt) {
    TORCH_CHECK(x.device().is_cpu() && w1.device().is_cpu() && w2.device().is_cpu() && w3.device().is_cpu(), op,
                ": CPU tensors only");
    const auto wt = weights_dtype.value_or(dtype);
    const auto name = [](at::ScalarType t) { return t == at::kFloat ? "float32" : "bfloat16"; };
    TORCH_CHECK(x.scalar_type() == dtype && w1.scalar_type() == wt && w2.scalar_type() == wt &&
                    w3.scalar_type() == wt,
                op, ": x must be ", name(dtype), " and the expert weights ", name(wt), ", got ", x.scalar_type(),
                ", ", w1.scalar_type(), ", ", w2.scalar_type(), ", ", w3.scalar_type());
    TORCH_CHECK(x.dim() == 2 && w1.dim() == 3 && w1.sizes() == w3.sizes() && w2.dim() == 3 &&
                    w2.size(0) == w1.size(0) && w2.size(1) == w1.size(2) && w2.size(2) == w1.size(1) &&
                    x.size(1) == w1.size(2),
                op, ": x (N, D), w1 and w3 (E, H, D), w2 (E, D, H), got ", x.sizes(), ", ", w1.sizes(), ", ",
                w2.sizes(), ", ", w3.sizes());
    TORCH_CHECK(experts.dim() == 2 && experts.sizes() == weights.sizes() && experts.size(0) == x.size(0), op,
                ": experts and weights (N, K), got ", experts.sizes(), " and ", weights.sizes());
}

// counts (E,): rows per expert, none negative, summing to S (`rows_of`: "a has", say, for the message)
inline void check_counts(const char* op, at::IntArrayRef counts, int64_t S, const char* rows_of) {
    int64_t total = 0;
    for (const int64_t c : counts) {
        TORCH_CHECK_VALUE(c >= 0, op, ": negative count ", c);
        total += c;
    }
    TORCH_CHECK_VALUE(total == S, op, ": counts sum to ", total, ", ", rows_of, " ", S, " rows");
}

// a (S, M) and b (S, N), CPU tensors of `dtype`, and counts of their rows per expert: the weight-gradient ops'
// arguments
inline void check_segment_args(const char* op, const at::Tensor& a, const at::Tensor& b, at::IntArrayRef counts,
                               at::ScalarType dtype) {
    TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && a.scalar_type() == dtype && b.scalar_type() == dtype &&
                    a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0),
                op, ": a (S, M) and b (S, N), ", dtype == at::kFloat ? "float32" : "bfloat16", " CPU tensors, got ",
                a.sizes(), " ", a.scalar_type(), " and ", b.sizes(), " ", b.scalar_type());
    check_counts(op, counts, a.size(0), "a and b have");
}

// The N K token-slots of each expert together (a counting sort, stable), with their token and router weight:
// expert e's slots are start[e] .. start[e + 1]
struct Slots {
    std::vector<int64_t> start, token;
    std::vector<float> weight;

    Slots(const char* op, const int64_t* experts, const float* weights, int64_t N, int64_t K, int64_t E)
        : start(E + 1, 0), token(N * K), weight(N * K) {
        for (int64_t s = 0; s < N * K; s++) {
            TORCH_CHECK_VALUE(experts[s] >= 0 && experts[s] < E, op, ": expert index ", experts[s],
                              " out of range [0, ", E, ")");
            start[experts[s] + 1]++;
        }
        for (int64_t i = 0; i < E; i++) start[i + 1] += start[i];
        std::vector<int64_t> fill(start.begin(), start.end() - 1);
        for (int64_t s = 0; s < N * K; s++) {
            const int64_t at = fill[experts[s]]++;
            token[at] = s / K;
            weight[at] = weights[s];
        }
    }
};

// An expert's n slots from lo split between the intra-op threads where there are several and at least
// min_per_thread slots each: f(lo_q, hi_q) on each thread for its contiguous share, every share but the last ending a
// multiple of align slots from lo. Returns whether it split (else the caller runs the slots itself). An expert's slots
// are distinct tokens, so shares never write the same output row.
template <typename F>
bool split_slots(int64_t lo, int64_t n, int64_t min_per_thread, int64_t align, const F& f) {
    const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
    if (threads < 2 || n < threads * min_per_thread) return false;
    const auto bound = [&](int64_t q) { return q == threads ? lo + n : lo + n * q / threads / align * align; };
    at::parallel_for(0, threads, 1, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; q++) f(bound(q), bound(q + 1));
    });
    return true;
}

// (out, a1, a3) from a fused MoE that also keeps the pre-activations: moe(x, ..., weights, a1, a3) with a1 and a3 fresh
// (N K x H each, of x's dtype T)
template <typename T, typename Moe>
std::tuple<at::Tensor, at::Tensor, at::Tensor> keeping(const char* op, const Moe& moe, const at::Tensor& x,
                                                        const at::Tensor& w1, const at::Tensor& w2,
                                                        const at::Tensor& w3, const at::Tensor& experts,
                                                        const at::Tensor& weights) {
    TORCH_CHECK(w1.dim() == 3, op, ": w1 (E, H, D), got ", w1.sizes());
    auto a1 = at::empty({experts.numel(), w1.size(1)}, x.options()), a3 = at::empty_like(a1);
    auto out = moe(x, w1, w2, w3, experts, weights, a1.mutable_data_ptr<T>(), a3.mutable_data_ptr<T>());
    return {out, a1, a3};
}

// Uninitialized scratch memory of at least n elements that this thread keeps between calls (kSlot: one buffer per
// use), so that no call pays fresh memory's page faults (about 0.35 ms per MB on a Xeon with AMX: 2.8 ms of a
// 4096-token call of 45 for dim 512) or zero-fills it; past kKeptBytes a buffer is the call's own. Buffers start on a
// cache line: malloc's 16-byte alignment split every vector load of x^T and h^T over two lines, which held f32_moe at
// 512 tokens at 1.00-1.18x the dense-equivalent, by process, against 0.95-1.03 aligned (in-process A/B).
constexpr int64_t kKeptBytes = int64_t(64) << 20;

struct FreeAligned {
    void operator()(void* p) const { std::free(p); }
};

template <typename T>
std::unique_ptr<T[], FreeAligned> aligned_array(int64_t n) {
    const size_t bytes = (size_t(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
    T* p = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (p == nullptr) throw std::bad_alloc();
    return std::unique_ptr<T[], FreeAligned>(p);
}

template <int kSlot, typename T>
struct Scratch {
    static_assert(std::is_trivial_v<T>, "scratch memory is left uninitialized");
    T* data;
    std::unique_ptr<T[], FreeAligned> fresh;

    explicit Scratch(int64_t n) {
        static thread_local std::unique_ptr<T[], FreeAligned> kept;
        static thread_local int64_t kept_n = 0;
        if (n * int64_t(sizeof(T)) > kKeptBytes) {
            fresh = aligned_array<T>(n);
            data = fresh.get();
        } else {
            if (n > kept_n) {
                kept = aligned_array<T>(n);
                kept_n = n;
            }
            data = kept.get();
        }
    }
};

}  // namespace smoe_moe
