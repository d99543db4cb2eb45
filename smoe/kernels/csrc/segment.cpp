// The grouped MoE's per-expert products with the experts spread over the threads (smoe.kernels.native builds it into
// its library for every instruction set; the products themselves are ATen's).
//
// smoe_native::segment_mm(a [a_i (S, K_i)], w [w_i (E, K_i, N)], counts (E,)) -> (S, N): over each expert's run of
//     counts[e] rows (in order), out[run] = sum_i a_i[run] @ w_i[e]; the forward's products (w transposed views), the
//     backward's dL/dh (one pair) and dL/dx (two: w1, w3). One dtype, or float32 a with bfloat16 w: each work item
//     then converts its expert's weight into a float32 buffer of its thread and multiplies in float32 (CPUs without
//     bf16 products, where smoe.kernels.linear computes bf16 products as fp32 ones).
// One library product per expert and pair, as smoe.kernels.grouped.segment_mm_t does in Python, but each on one thread
// and the threads taking different experts: a product of one expert's rows (128 of them at 512 tokens of 8 experts)
// spread over the threads gains little (oneDNN's bf16 dL/dx shape, 128 or 1024 rows x 1536 -> 512, 1.0-1.1x faster on
// 2 threads than on 1), two experts side by side take half the time. An expert with more than an even share of the
// rows goes in pieces, so skewed routings still keep every thread busy. Each out row is written by one product (no sums
// across threads).
//
// smoe_native::segment_wgrad(a (S, O), b (S, I), counts (E,), dtype) -> (E, O, I): out[e] = a[run].T @ b[run] over
//     expert e's run of rows, zero for an empty expert: a stacked weight's gradient (w1, w3: a = dL/da, b = x; w2:
//     a = dL/dy, b = w h). The same way: one library product per expert on one thread, or per band of an expert's O
//     rows where it has more than an even share of the work (each band's rows are written by one product). float32 a
//     and b; out float32, or bfloat16 (each band summed in a float32 buffer of its thread and rounded once).
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "moe_common.h"
#include "spread.h"

namespace {

struct Piece {
    int64_t expert, lo, rows;
};

// run(k, t) for every work item k on thread t, the items spread over T threads by their costs (smoe_spread::spread)
template <typename Run>
void run_spread(const std::vector<int64_t>& cost, int64_t T, const Run& run) {
    const auto plan = smoe_spread::spread(cost, T);
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
        // a thread of the pool keeps its own dispatch state: these plain tensors need no autograd
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        for (int64_t t = t0; t < t1; t++)
            for (const int64_t k : plan.items[t]) run(k, t);
    });
}

// A float32 buffer per thread, taken as tensors of any shape and strides that fit it: a bfloat16 weight converted for
// a float32 product, or a product's sums before they are rounded to bfloat16. One allocation per thread and call (a
// fresh tensor per item costs its page faults).
class Scratch {
public:
    Scratch(int64_t threads, int64_t numel) : bufs_(threads), numel_(numel) {}

    // a float32 tensor of t's sizes and strides (t dense, as a stacked weight's slice or its transposed view)
    at::Tensor like(int64_t thread, const at::Tensor& t) {
        TORCH_INTERNAL_ASSERT(t.is_non_overlapping_and_dense());
        return take(thread, t.numel()).as_strided(t.sizes(), t.strides());
    }

    // a contiguous float32 (rows, cols)
    at::Tensor matrix(int64_t thread, int64_t rows, int64_t cols) { return take(thread, rows * cols).view({rows, cols}); }

private:
    at::Tensor take(int64_t thread, int64_t numel) {
        TORCH_INTERNAL_ASSERT(numel <= numel_);
        if (!bufs_[thread].defined()) bufs_[thread] = at::empty({numel_}, at::kFloat);
        return bufs_[thread].narrow(0, 0, numel);
    }

    std::vector<at::Tensor> bufs_;
    int64_t numel_;
};

at::Tensor segment_mm(at::TensorList a, at::TensorList w, at::IntArrayRef counts) {
    TORCH_CHECK(!a.empty() && a.size() == w.size(), "smoe_native::segment_mm: as many a as w (at least one), got ",
                a.size(), " and ", w.size());
    const int64_t E = int64_t(counts.size());
    const int64_t S = a[0].dim() == 2 ? a[0].size(0) : -1, N = w[0].dim() == 3 ? w[0].size(2) : -1;
    const auto dt = a[0].scalar_type();
    int64_t convert_numel = 0;  // the largest bfloat16 weight slice a float32 product converts
    for (size_t i = 0; i < a.size(); i++) {
        const bool w_ok = w[i].scalar_type() == dt || (dt == at::kFloat && w[i].scalar_type() == at::kBFloat16);
        TORCH_CHECK(a[i].device().is_cpu() && w[i].device().is_cpu() && a[i].scalar_type() == dt && w_ok &&
                        a[i].dim() == 2 && w[i].dim() == 3 && a[i].size(0) == S && w[i].size(0) == E &&
                        w[i].size(1) == a[i].size(1) && w[i].size(2) == N,
                    "smoe_native::segment_mm: a_i (S, K_i) and w_i (E = len(counts) = ", E,
                    ", K_i, N), CPU tensors of one dtype (or float32 a and bfloat16 w); got a ", a[i].sizes(), " ",
                    a[i].scalar_type(), " and w ", w[i].sizes(), " ", w[i].scalar_type());
        if (w[i].scalar_type() != dt) {
            TORCH_CHECK(E == 0 || w[i][0].is_non_overlapping_and_dense(), "smoe_native::segment_mm: a bfloat16 w_i ",
                        "takes dense slices w_i[e] (a stacked weight or its transposed view), got strides ",
                        w[i].strides());
            convert_numel = std::max(convert_numel, w[i].size(1) * N);
        }
    }
    smoe_moe::check_counts("smoe_native::segment_mm", counts, S, "a has");
    auto out = at::empty({S, N}, a[0].options());
    if (S == 0) return out;

    // pieces of at most an even share of the rows (rounded up to 32), spread over the threads by rows
    const int64_t T = std::min<int64_t>(at::get_num_threads(), (S + 31) / 32);
    const int64_t share = (S + T - 1) / T, most = (share + 31) / 32 * 32;
    std::vector<Piece> pieces;
    std::vector<int64_t> rows;
    for (int64_t e = 0, lo = 0; e < E; lo += counts[e], e++) {
        const int64_t n = (counts[e] + most - 1) / most;
        for (int64_t p = 0; p < n; p++) {
            const int64_t r0 = counts[e] * p / n, r1 = counts[e] * (p + 1) / n;
            pieces.push_back({e, lo + r0, r1 - r0});
            rows.push_back(r1 - r0);
        }
    }
    Scratch scratch(T, convert_numel);
    run_spread(rows, T, [&](int64_t k, int64_t t) {
        const Piece& p = pieces[k];
        auto o = out.narrow(0, p.lo, p.rows);
        for (size_t i = 0; i < a.size(); i++) {
            at::Tensor we = w[i][p.expert];
            if (we.scalar_type() != dt) we = scratch.like(t, we).copy_(we);
            if (i == 0)
                at::mm_out(o, a[i].narrow(0, p.lo, p.rows), we);
            else
                o.addmm_(a[i].narrow(0, p.lo, p.rows), we);
        }
    });
    return out;
}

struct Band {
    int64_t expert, lo, rows, o0, o1;
};

at::Tensor segment_wgrad(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef counts, at::ScalarType dtype) {
    smoe_moe::check_segment_args("smoe_native::segment_wgrad", a, b, counts, at::kFloat);
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
                "smoe_native::segment_wgrad: out dtype float32 or bfloat16, got ", dtype);
    const int64_t E = int64_t(counts.size()), S = a.size(0), O = a.size(1), I = b.size(1);
    auto out = at::empty({E, O, I}, a.options().dtype(dtype));
    if (S == 0) return out.zero_();
    // bands of at most an even share of the work (rows x O), at least 16 of O's rows, spread over the threads by work
    const int64_t T = std::min<int64_t>(at::get_num_threads(), (S + 31) / 32);
    const int64_t share = std::max<int64_t>(1, (S * O + T - 1) / T);
    std::vector<Band> bands;
    std::vector<int64_t> work;
    for (int64_t e = 0, lo = 0; e < E; lo += counts[e], e++) {
        if (counts[e] == 0) {
            out[e].zero_();
            continue;
        }
        const int64_t n = std::clamp<int64_t>((counts[e] * O + share - 1) / share, 1, std::max<int64_t>(1, O / 16));
        for (int64_t p = 0; p < n; p++) {
            const int64_t o0 = p == 0 ? 0 : O * p / n / 16 * 16, o1 = p == n - 1 ? O : O * (p + 1) / n / 16 * 16;
            bands.push_back({e, lo, counts[e], o0, o1});
            work.push_back(counts[e] * (o1 - o0));
        }
    }
    Scratch scratch(T, dtype == at::kFloat ? 0 : O * I);
    run_spread(work, T, [&](int64_t k, int64_t t) {
        const Band& p = bands[k];
        auto o = out[p.expert].narrow(0, p.o0, p.o1 - p.o0);
        auto sums = dtype == at::kFloat ? o : scratch.matrix(t, p.o1 - p.o0, I);
        at::mm_out(sums, a.narrow(0, p.lo, p.rows).narrow(1, p.o0, p.o1 - p.o0).t(), b.narrow(0, p.lo, p.rows));
        if (dtype != at::kFloat) o.copy_(sums);
    });
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smoe_native, m) {
    m.def("segment_mm(Tensor[] a, Tensor[] w, int[] counts) -> Tensor");
    m.def("segment_wgrad(Tensor a, Tensor b, int[] counts, ScalarType dtype=float) -> Tensor");
}

TORCH_LIBRARY_IMPL(smoe_native, CPU, m) {
    m.impl("segment_mm", &segment_mm);
    m.impl("segment_wgrad", &segment_wgrad);
}
