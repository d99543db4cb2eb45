// The grouped MoE backward's data products with the experts spread over the threads (smoe.kernels.native builds it
// into its library for every instruction set; the products themselves are ATen's).
//
// smoe_native::segment_mm(a [a_i (S, K_i)], w [w_i (E, K_i, N)], counts (E,)) -> (S, N): over each expert's run of
//     counts[e] rows (in order), out[run] = sum_i a_i[run] @ w_i[e]; dL/dh (one pair) and dL/dx (two: w1, w3).
// One library product per expert and pair, as smoe.kernels.grouped.segment_mm_t does in Python, but each on one thread
// and the threads taking different experts: a product of one expert's rows (128 of them at 512 tokens of 8 experts)
// spread over the threads gains little (oneDNN's bf16 dL/dx shape, 128 or 1024 rows x 1536 -> 512, 1.0-1.1x faster on
// 2 threads than on 1), two experts side by side take half the time. An expert with more than an even share of the
// rows goes in pieces, so skewed routings still keep every thread busy. Each out row is written by one product (no sums
// across threads).
//
// smoe_native::segment_wgrad(a (S, O), b (S, I), counts (E,)) -> (E, O, I): out[e] = a[run].T @ b[run] over expert e's
//     run of rows, zero for an empty expert: a stacked weight's gradient (w1, w3: a = dL/da, b = x; w2: a = dL/dy,
//     b = w h). The same way: one library product per expert on one thread, or per band of an expert's O rows where it
//     has more than an even share of the work (each band's rows are written by one product). float32.
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

// run(k) for every work item k, the items spread over T threads by their costs (smoe_spread::spread)
template <typename Run>
void run_spread(const std::vector<int64_t>& cost, int64_t T, const Run& run) {
    const auto plan = smoe_spread::spread(cost, T);
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
        // a thread of the pool keeps its own dispatch state: these plain tensors need no autograd
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        for (int64_t t = t0; t < t1; t++)
            for (const int64_t k : plan.items[t]) run(k);
    });
}

at::Tensor segment_mm(at::TensorList a, at::TensorList w, at::IntArrayRef counts) {
    TORCH_CHECK(!a.empty() && a.size() == w.size(), "smoe_native::segment_mm: as many a as w (at least one), got ",
                a.size(), " and ", w.size());
    const int64_t E = int64_t(counts.size());
    const int64_t S = a[0].dim() == 2 ? a[0].size(0) : -1, N = w[0].dim() == 3 ? w[0].size(2) : -1;
    for (size_t i = 0; i < a.size(); i++)
        TORCH_CHECK(a[i].device().is_cpu() && w[i].device().is_cpu() && a[i].scalar_type() == a[0].scalar_type() &&
                        w[i].scalar_type() == a[0].scalar_type() && a[i].dim() == 2 && w[i].dim() == 3 &&
                        a[i].size(0) == S && w[i].size(0) == E && w[i].size(1) == a[i].size(1) && w[i].size(2) == N,
                    "smoe_native::segment_mm: a_i (S, K_i) and w_i (E = len(counts) = ", E,
                    ", K_i, N), CPU tensors of one dtype; got a ", a[i].sizes(), " ", a[i].scalar_type(), " and w ",
                    w[i].sizes(), " ", w[i].scalar_type());
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
    run_spread(rows, T, [&](int64_t k) {
        const Piece& p = pieces[k];
        auto o = out.narrow(0, p.lo, p.rows);
        at::mm_out(o, a[0].narrow(0, p.lo, p.rows), w[0][p.expert]);
        for (size_t i = 1; i < a.size(); i++) o.addmm_(a[i].narrow(0, p.lo, p.rows), w[i][p.expert]);
    });
    return out;
}

struct Band {
    int64_t expert, lo, rows, o0, o1;
};

at::Tensor segment_wgrad(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef counts) {
    smoe_moe::check_segment_args("smoe_native::segment_wgrad", a, b, counts, at::kFloat);
    const int64_t E = int64_t(counts.size()), S = a.size(0), O = a.size(1), I = b.size(1);
    auto out = at::empty({E, O, I}, a.options());
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
    run_spread(work, T, [&](int64_t k) {
        const Band& p = bands[k];
        auto o = out[p.expert].narrow(0, p.o0, p.o1 - p.o0);
        at::mm_out(o, a.narrow(0, p.lo, p.rows).narrow(1, p.o0, p.o1 - p.o0).t(), b.narrow(0, p.lo, p.rows));
    });
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(smoe_native, m) {
    m.def("segment_mm(Tensor[] a, Tensor[] w, int[] counts) -> Tensor");
    m.def("segment_wgrad(Tensor a, Tensor b, int[] counts) -> Tensor");
}

TORCH_LIBRARY_IMPL(smoe_native, CPU, m) {
    m.impl("segment_mm", &segment_mm);
    m.impl("segment_wgrad", &segment_wgrad);
}
