"""Dropless sorted dispatch on the CPU: sort token-slots by expert, one matmul per active expert.

The S = N*K token-slots are sorted by expert once; x is gathered once into expert order (x_SD), each
active expert multiplies its contiguous run of rows (written in place into one S-row buffer, so no
concatenation), and the router-weighted outputs go back with one scatter-add. Empty experts cost
nothing and no expert weight is ever copied, so a decode step reads only the chosen experts' weights.
Autograd goes through a hand-written backward (the same segment matmuls, MegaBlocks-style) that
keeps only the two S x H pre-activations. fp32 products of many rows go through smoe's op that spreads the experts
over the threads (native.segment_mm), and where it does not load, fp32 inference on many slots runs expert by expert
(gather, SwiGLU, scatter-add per expert), since its faster library products come in new tensors. Inference
beyond the smallest sizes takes smoe's fused ops: native.amx_moe (bf16, CPUs with AMX) and native.f32_moe (fp32,
CPUs with AMX; on AVX2 ones for inference below F32_AVX2_MAX_SLOTS_PER_EXPERT, training within
F32_AVX2_KEEP_SLOTS_PER_EXPERT).

Under torch.compile (decode only: few tokens) the per-expert loop would break the graph, so fixed-
shape formulations are used instead: a gather (inductor fuses the indexed weight loads into the
reduction, so no weight is copied) while slots are fewer than experts, else every expert once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smoe.kernels import native
from smoe.kernels.linear import bf16_as_fp32, compute_dtype, linear, mm_into, reduction_input

# token-slots up to which the compiled (gather) formulation is used under torch.compile
COMPILED_GATHER_MAX_SLOTS = 32
# bf16 inference with at least this many token-slots per expert on average takes the fused AMX op where it
# serves (amx_serves); fewer take native_moe (medium preset's experts, 1 thread, on a Xeon with AMX: 1.71 vs
# 1.71 ms at 8 tokens, 1.72 vs 2.31 at 16, 2.06 vs 6.80 at 64; at 1-4 tokens native_moe 7-9% faster)
AMX_MIN_SLOTS_PER_EXPERT = 2
# fp32 training's forward takes the fused op's AVX-512 build (native.f32_moe_keep, where it serves) from this many
# token-slots per expert on average; fewer take the segment path (medium preset's experts, 1 thread of a Xeon with AMX,
# forward+backward against the segment path: 0.88-0.91x at up to 1 slot per expert, 0.98x at 2-3, 1.04x at 4, 1.11x at
# 8)
F32_KEEP_MIN_SLOTS_PER_EXPERT = 4
# the fused fp32 op's AVX2 build (native.f32_moe's on CPUs without AVX-512) is taken for inference below this many
# token-slots per expert on average; from there the library's products of an expert's many rows are as fast (the medium
# preset's experts on a Zen 3, in-process against the library path: 0.75-0.88x the time at 128 per expert on 1-2
# threads, 0.92-1.04x at 256, 0.96-1.01x at 1024; training's forward: F32_AVX2_KEEP_SLOTS_PER_EXPERT). Measured again
# once the library path's SwiGLU was vectorized and its products spread the experts over the threads: at 128 per expert
# it took 0.97-1.00x the op's time, at 32 1.11-1.30x. Once the op's down kept its operands in L1 and L2 (token panels of
# h^T, passes of w2): the op 0.89x the library path's time at 128 per expert on 1 thread, 0.86x on 2; at 256 0.98x and
# 1.06x, at 512 (2 threads) 0.98x, at 1024 (1 thread) 1.11x
F32_AVX2_MAX_SLOTS_PER_EXPERT = 256
# training's forward takes the AVX2 build's f32_moe_keep from the first to below the second of these token-slots per
# expert on average, else the segment path. The medium preset's layer on a Zen 3, forward+backward with it against
# without it in one process, medians of paired ratios (1 / 2 threads): fp32 0.98x / 0.95x the time at 6 per expert,
# 0.98x / 0.99x at 8, 0.90x / 0.93x at 16, 0.94x / 0.90x at 32, 0.98x / 0.98x at 64, 0.99x / 1.00x at 128 (its
# keep_rows, the pre-activations transposed into rows, costs 3-8% of the op's forward); bf16 weights 0.92x / 0.94x at
# 16, 0.96x / 0.96x at 32, 0.98x / 1.04x at 64. Unpaired medians: 1.03-1.05x at 4, 1.04x / 1.06x at 192
F32_AVX2_KEEP_SLOTS_PER_EXPERT = (6, 64)
# fp32 forward products of at least this many rows per expert on average go through native.segment_mm (experts spread
# over the threads) rather than a library product per expert spread over them, whose paths for few rows (native.gemv up
# to native.max_rows) are faster below it: the medium preset's experts on a Zen 3, the op's time against theirs for
# w1's and w2's products, at 8 per expert 1.3-1.6x and 1.0-1.1x, at 12 1.15x and 0.86-0.95x, at 16 1.0 and 0.85 on 1
# thread, 0.99 and 0.75 on 2; at 32 1.0 and 0.98 on 1, 0.80 and 0.77 on 2; at 128 1.0 and 0.99 on 1, 0.91 on 2; at 1024
# 0.99-1.01
SEGMENT_OP_MIN_SLOTS_PER_EXPERT = 16
# where the fused fp32 op takes the experts (f32_fused_takes), native_moe takes inference of at most this many
# token-slots per expert on average (or native.max_rows, if fewer): bf16 on a Zen 3 (the op computing it in fp32), the
# medium preset's experts, the op's time against native_moe's (whose bf16 range there is 64 rows) on 1 / 2 threads:
# 1.41x / 1.44x at 8 per expert, 0.98x / 1.12x at 16, 0.79x / 0.99x at 32, 0.68x / 0.83x at 64
NATIVE_MOE_MAX_SLOTS_FUSED = 16
# token-slots up to which the routing is sorted in Python rather than with tensor ops
PYTHON_SORT_MAX_SLOTS = 64
# fp32 inference on the CPU with at least this many token-slots, where native.segment_mm does not take its products
# (segment_op_takes), runs expert by expert (gather, SwiGLU, scatter-add each): oneDNN's products cannot be written into
# a shared buffer, and copying them there cost 10% at 4096 tokens (bf16, whose products go straight into the buffer,
# measured 4% slower per expert). The op writes them there: the medium preset's experts on a Zen 3 at 1024-4096 tokens,
# 0.91-0.96x the time of expert by expert on 2 threads, 0.97-1.00x on 1
PER_EXPERT_MIN_SLOTS = 256


def sort_by_expert(experts_NK: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Token index and slot order of the N*K token-slots sorted by expert, and tokens per expert.

    Few slots (decode) are sorted in Python from one host copy, which costs less than the tensor ops.
    """
    S, K = experts_NK.numel(), experts_NK.shape[-1]
    if S <= PYTHON_SORT_MAX_SLOTS:
        flat = experts_NK.reshape(-1).tolist()
        if flat and not 0 <= min(flat) <= max(flat) < n_experts:
            raise ValueError(f"expert index out of range [0, {n_experts}): {min(flat)}..{max(flat)}")
        order = sorted(range(S), key=flat.__getitem__)
        counts = [0] * n_experts
        for e in flat:
            counts[e] += 1
        dev = experts_NK.device
        return (torch.tensor([s // K for s in order], device=dev), torch.tensor(order, device=dev), counts)
    flat_S = experts_NK.reshape(-1)
    order_S = torch.argsort(flat_S, stable=True)
    token_S = order_S // K
    counts = torch.bincount(flat_S, minlength=n_experts).tolist()
    if len(counts) > n_experts:
        raise ValueError(f"expert index {len(counts) - 1} out of range for {n_experts} experts")
    return token_S, order_S, counts


def segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of each non-empty expert's run of sorted rows."""
    out, lo = [], 0
    for e, c in enumerate(counts):
        if c:
            out.append((e, lo, lo + c))
            lo += c
    return out


class _Converted:
    """One expert's weight at a time in another dtype, copied into one reused buffer (a fresh tensor per
    expert costs its page faults: a 1536 x 512 bf16 -> fp32 conversion 300-450 us against 110 us)."""

    def __init__(self, w_EOI: torch.Tensor, dtype: torch.dtype):
        self.w_EOI, self.buf = w_EOI, None if w_EOI.dtype == dtype else w_EOI.new_empty(w_EOI.shape[1:], dtype=dtype)

    def __getitem__(self, e: int) -> torch.Tensor:
        return self.w_EOI[e] if self.buf is None else self.buf.copy_(self.w_EOI[e])


def segment_op_takes(rows: int, x: torch.Tensor, w_EOI: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether segment_mm of rows rows of x, multiplied in dtype (default x's), runs as native.segment_mm: float32
    products (of float32 or bfloat16 weights) from SEGMENT_OP_MIN_SLOTS_PER_EXPERT rows per expert on average, where the
    op serves."""
    dtype = dtype or x.dtype
    return (dtype == torch.float32 and w_EOI.dtype in (torch.float32, torch.bfloat16)
            and rows >= SEGMENT_OP_MIN_SLOTS_PER_EXPERT * w_EOI.shape[0]
            and native.segment_mm_serves([x if x.dtype == dtype else x.new_empty(0, dtype=dtype)], [w_EOI]))


def segment_mm(x_SI: torch.Tensor, w_EOI: torch.Tensor, segs: list[tuple[int, int, int]],
               out_SO: torch.Tensor | None = None) -> torch.Tensor:
    """Each run of rows of x_SI times its expert's weight transposed, in one [S, O] buffer (out_SO, if given, may be
    it). Runs that smoe.kernels.linear computes as fp32 (bf16_as_fp32) share one fp32 copy of x and of a weight.

    Where segment_op_takes, smoe's op (native.segment_mm: the same library products, the experts spread over the
    threads; fp32 x with bf16 weights converted an expert at a time)."""
    if segment_op_takes(x_SI.shape[0], x_SI, w_EOI):
        return native.segment_mm([x_SI], [w_EOI.transpose(1, 2)], counts_of(segs, w_EOI.shape[0]))
    if out_SO is None:
        out_SO = x_SI.new_empty(x_SI.shape[0], w_EOI.shape[1])
    x32 = w32 = None
    for e, lo, hi in segs:
        if bf16_as_fp32(hi - lo, x_SI, w_EOI):
            if x32 is None:
                x32, w32 = x_SI.float(), _Converted(w_EOI, torch.float32)
            out_SO[lo:hi].copy_(linear(x32[lo:hi], w32[e]))  # linear's choice of fp32 path
        else:
            mm_into(x_SI[lo:hi], w_EOI[e], out_SO[lo:hi])
    return out_SO


def counts_of(segs: list[tuple[int, int, int]], n_experts: int) -> list[int]:
    """Rows per expert (0 for an empty one) from segments()'s runs."""
    counts = [0] * n_experts
    for e, lo, hi in segs:
        counts[e] = hi - lo
    return counts


def segment_mm_t(xs_SI: list[torch.Tensor], ws_EIO: list[torch.Tensor], segs: list[tuple[int, int, int]]
                 ) -> torch.Tensor:
    """Each run of rows times its expert's weight (not transposed), summed over the (x, w) pairs: out[run] = sum_i
    xs[i][run] @ ws[i][e], [S, I_i] @ [I_i, O], in x's dtype (a weight of another dtype is converted one expert at a
    time). The backward's dL/dh (one pair) and dL/dx (w1's and w3's).

    smoe's op (native.segment_mm) where it serves: the same library products, the experts spread over the threads
    (the medium preset's experts, bf16 on 2 threads of a Xeon with AMX: dL/dx 1.26-1.29x faster at 512 tokens,
    1.63-2.01x at 4096; dL/dh 1.13-1.22x and 1.00-1.12x; fp32 1.00-1.09x; 1 thread alike), fp32 xs with bf16
    weights too (bf16 training on a CPU without bf16 products), each expert's converted on its thread."""
    if native.segment_mm_serves(xs_SI, ws_EIO):
        return native.segment_mm(xs_SI, ws_EIO, counts_of(segs, ws_EIO[0].shape[0]))
    out_SO = xs_SI[0].new_empty(xs_SI[0].shape[0], ws_EIO[0].shape[2])
    ws = [_Converted(w, x.dtype) for x, w in zip(xs_SI, ws_EIO)]
    for e, lo, hi in segs:
        torch.mm(xs_SI[0][lo:hi], ws[0][e], out=out_SO[lo:hi])
        for x, w in zip(xs_SI[1:], ws[1:]):
            out_SO[lo:hi].addmm_(x[lo:hi], w[e])
    return out_SO


def amx_wgrad_takes(a_SO: torch.Tensor, b_SI: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether segment_wgrad runs as smoe's AMX op (native.amx_segment_wgrad): bf16 in and out on a CPU with AMX,
    widths multiples of 32, outside torch.compile."""
    return (a_SO.dtype == b_SI.dtype == (dtype or a_SO.dtype) == torch.bfloat16 and a_SO.is_cpu and b_SI.is_cpu
            and a_SO.shape[1] % 32 == 0 and b_SI.shape[1] % 32 == 0 and not torch.compiler.is_compiling()
            and native.amx())


def segment_wgrad(a_SO: torch.Tensor, b_SI: torch.Tensor, segs: list[tuple[int, int, int]], n_experts: int,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per expert a[run].T @ b[run]: the gradient of a stacked weight (E, O, I), in dtype (default a's:
    another one is rounded from a's one expert at a time); zero for empty experts.

    bf16 on a CPU with AMX runs as smoe's op (amx_wgrad_takes), which packs each expert's rows once: oneDNN's
    products repack theirs and read a transposed left side slowly (w1's and w3's gradients, a = dL/da1, took 1.7x
    the time of w2's for the same work). The medium preset's layer, bf16 forward+backward, 1 thread of a Xeon with
    AMX, in-process A/B: 1.14-1.16x faster at 512 tokens, 1.07x at 4096 with the op for w1 and w3; w2's too: 1.04x
    more at 512, 1.0-1.02x at 4096."""
    if amx_wgrad_takes(a_SO, b_SI, dtype):
        return native.amx_segment_wgrad(a_SO, b_SI, counts_of(segs, n_experts))
    # fp32 on a CPU with AMX: smoe's kernel for runs of up to 256 rows (the medium preset's layer at 512 tokens, 1
    # thread of a Xeon with AMX: each of the three 1.14-1.16x faster than the library's products, whose gradient
    # writes go through the cache; 1.04-1.06x on 2 threads)
    if (dtype or a_SO.dtype) == torch.float32 and native.f32_wgrad_serves(a_SO, b_SI):
        return native.f32_segment_wgrad(a_SO, b_SI, counts_of(segs, n_experts))
    # other fp32: the library's products, the experts spread over the threads (native.segment_wgrad), where it serves.
    # The medium preset's layer on a Zen 3, each gradient against a product per expert spread over the threads:
    # 0.90-0.97x the time at 512 tokens on 2 threads (0.92-0.96 with 3/4 of the tokens on two experts), 0.95-0.98 at
    # 4096 on 1 and 2, 0.83-0.98 at 16-64 on 2, 0.98-1.01 at 64-512 on 1
    # fp32 sums rounded to bf16 weights' gradients too (bf16 training on a CPU without bf16 products)
    if ((dtype or a_SO.dtype) in (torch.float32, torch.bfloat16) and a_SO.dtype == torch.float32
            and native.segment_mm_serves([a_SO], [b_SI])):
        return native.segment_wgrad(a_SO, b_SI, counts_of(segs, n_experts), dtype or a_SO.dtype)
    out_EOI = a_SO.new_empty(n_experts, a_SO.shape[1], b_SI.shape[1], dtype=dtype or a_SO.dtype)
    buf = None if out_EOI.dtype == a_SO.dtype else a_SO.new_empty(out_EOI.shape[1:])
    # oneDNN's bf16 product takes a transposed left side slowly: where a is the narrower side (w2's gradient,
    # a = dL/dy), a contiguous copy of a.T goes first (measured on a Xeon with AMX before the op above took its
    # gradients: the medium preset's layer, bf16 forward+backward, 1.02-1.05x faster at 512 tokens, 1.03-1.06x at
    # 4096; fp32 (MKL) 0.98-1.0x: not there). CPUs with bf16 products but no AMX (Zen 4) keep it
    transpose_a = a_SO.dtype == torch.bfloat16 and a_SO.is_cpu and a_SO.shape[1] < b_SI.shape[1]
    active = set()
    for e, lo, hi in segs:
        a_OR = a_SO[lo:hi].t().contiguous() if transpose_a else a_SO[lo:hi].t()
        if buf is None:
            torch.mm(a_OR, b_SI[lo:hi], out=out_EOI[e])
        else:
            out_EOI[e].copy_(torch.mm(a_OR, b_SI[lo:hi], out=buf))
        active.add(e)
    for e in range(n_experts):
        if e not in active:
            out_EOI[e].zero_()
    return out_EOI


def swiglu(a1_SH: torch.Tensor, a3_SH: torch.Tensor, out_SH: torch.Tensor | None = None) -> torch.Tensor:
    """silu(a1) * a3 into out (a new tensor if None; may be a1 itself): smoe's one-pass kernel where it loads
    (native.swiglu), else torch's two passes."""
    if native.swiglu_serves(a1_SH, a3_SH) and (out_SH is None or native.swiglu_serves(out_SH)):
        return native.swiglu(a1_SH, a3_SH, torch.empty_like(a1_SH) if out_SH is None else out_SH)
    if out_SH is a1_SH:
        return F.silu(a1_SH, inplace=True).mul_(a3_SH)
    return torch.mul(F.silu(a1_SH), a3_SH, out=out_SH)


def swiglu_backward(dh_SH: torch.Tensor, a1_SH: torch.Tensor, a3_SH: torch.Tensor, w_S: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The expert hidden's backward for outputs w[s] h[s], h = silu(a1) * a3, given dh = dL/d(w h): (dL/da1, dL/da3,
    w h in a1's dtype; dL/dw), dh's memory reused. One pass by smoe's kernel where it loads, else torch's."""
    w_S = w_S.to(a1_SH.dtype)
    if native.swiglu_serves(dh_SH, a1_SH, a3_SH, w_S):
        return native.swiglu_backward(dh_SH, a1_SH, a3_SH, w_S)
    # elementwise passes over S x H are what costs beyond the matmuls (bf16 ones especially): keep them few
    silu_SH = F.silu(a1_SH)
    hw_SH = silu_SH * a3_SH  # unweighted expert hidden, weighted below
    dw_S = torch.linalg.vecdot(dh_SH, hw_SH)
    hw_SH.mul_(w_S[:, None])
    dh_SH.mul_(w_S[:, None])  # dL/dh
    da3_SH = silu_SH.mul_(dh_SH)
    da1_SH = torch.ops.aten.silu_backward(dh_SH.mul_(a3_SH), a1_SH)
    return da1_SH, da3_SH, hw_SH, dw_S


def _forward_per_expert(x_ND, w1_EHD, w2_EDH, w3_EHD, token_S, w_S, segs):
    """Inference on many slots: each expert gathers, runs and scatter-adds its own rows in turn, so its
    S_e x H intermediates stay in cache and no product is copied into a shared S-row buffer."""
    out_ND = torch.zeros_like(x_ND)
    for e, lo, hi in segs:
        tok = token_S[lo:hi]
        x_RD = x_ND.index_select(0, tok)
        a1_RH = linear(x_RD, w1_EHD[e])
        h_RH = swiglu(a1_RH, linear(x_RD, w3_EHD[e]), out_SH=a1_RH)
        out_ND.index_add_(0, tok, linear(h_RH, w2_EDH[e]).mul_(w_S[lo:hi, None]))
    return out_ND


def _forward(x_ND, w1_EHD, w2_EDH, w3_EHD, token_S, w_S, segs, keep: bool):
    """The expert compute on sorted slots; returns out_ND and, if keep, (a1_SH, a3_SH) for backward."""
    S = token_S.shape[0]
    # bf16 on a CPU without bf16 products, where native.segment_mm takes the products: everything in fp32 (the weights
    # converted an expert at a time on the thread that multiplies them), the output rounded once to bf16; the kept
    # pre-activations stay fp32, which the backward computes in. Before, each expert's product ran on all threads and
    # was rounded into a bf16 buffer. The medium preset's layer on a Zen 3, in-process A/B, the time with it / before:
    # forward 0.96-0.97 at 512 tokens on 1 thread, 0.69-0.88 on 2; 0.99 and 0.87-0.91 at 4096; forward+backward (with
    # the backward's ops below taking bf16 weights too) 0.95-0.98 at 128-512 tokens on 1 thread, 0.71-0.90 on 2
    ct = compute_dtype(x_ND)
    if ct != x_ND.dtype and not segment_op_takes(S, x_ND, w1_EHD, ct):
        ct = x_ND.dtype
    if (not keep and S >= PER_EXPERT_MIN_SLOTS and x_ND.dtype == torch.float32 and x_ND.is_cpu
            and not segment_op_takes(S, x_ND, w1_EHD)):
        return _forward_per_expert(x_ND, w1_EHD, w2_EDH, w3_EHD, token_S, w_S, segs), None
    x_SD = x_ND.index_select(0, token_S).to(ct)
    w_S = w_S.to(ct)
    a1_SH = segment_mm(x_SD, w1_EHD, segs)
    a3_SH = segment_mm(x_SD, w3_EHD, segs)
    h_SH = swiglu(a1_SH, a3_SH, out_SH=None if keep else a1_SH)
    # the router weight goes on the narrower side of w2, (w h) W2^T = w (h W2^T): one pass over fewer elements
    weight_after = w2_EDH.shape[1] < w2_EDH.shape[2]  # D < H, as in every Mixtral
    if not weight_after:
        h_SH.mul_(w_S[:, None])
    y_SD = segment_mm(h_SH, w2_EDH, segs, out_SO=x_SD)  # x_SD is no longer needed: its rows may take y
    if weight_after:
        y_SD.mul_(w_S[:, None])
    if x_ND.shape[0] == 1:  # a single token: its K rows are all of y
        out_ND = y_SD.sum(0, keepdim=True)
    else:
        out_ND = y_SD.new_zeros(x_ND.shape).index_add_(0, token_S, y_SD)
    return out_ND.to(x_ND.dtype), ((a1_SH, a3_SH) if keep else None)


class GroupedMoE(torch.autograd.Function):
    """Sorted-dispatch MoE experts with a segment-matmul backward."""

    @staticmethod
    def forward(ctx, x_ND, w1_EHD, w2_EDH, w3_EHD, weights_NK, experts_NK):
        token_S, order_S, counts = sort_by_expert(experts_NK, w1_EHD.shape[0])
        segs = segments(counts)
        w_S = weights_NK.reshape(-1)[order_S].to(x_ND.dtype)
        if amx_takes(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK):
            # the fused forward, which also hands back the pre-activations in this sorted order
            out_ND, a1_SH, a3_SH = native.amx_moe_keep(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK,
                                                       weights_NK.to(x_ND.dtype).float())
        elif f32_fused_takes(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, keep=True):
            # bf16 where BF16_AS_FP32: x converted, fp32 pre-activations (the backward's dtype), out rounded once
            out_ND, a1_SH, a3_SH = native.f32_moe_keep(x_ND.to(compute_dtype(x_ND)), w1_EHD, w2_EDH, w3_EHD, experts_NK,
                                                       weights_NK)
            out_ND = out_ND.to(x_ND.dtype)
        else:
            out_ND, (a1_SH, a3_SH) = _forward(x_ND, w1_EHD, w2_EDH, w3_EHD, token_S, w_S, segs, keep=True)
        ctx.save_for_backward(x_ND, w1_EHD, w2_EDH, w3_EHD, token_S, order_S, w_S, a1_SH, a3_SH)
        ctx.segs, ctx.weights_dtype, ctx.weights_shape = segs, weights_NK.dtype, weights_NK.shape
        return out_ND

    @staticmethod
    def backward(ctx, g_ND):
        x_ND, w1_EHD, w2_EDH, w3_EHD, token_S, order_S, w_S, a1_SH, a3_SH = ctx.saved_tensors
        segs, E, x_dtype, w_dtype = ctx.segs, w1_EHD.shape[0], x_ND.dtype, w1_EHD.dtype
        # bf16 on a CPU without bf16 instructions: the whole backward in fp32 (its emulated bf16 matmuls are
        # several times slower), each gradient rounded once at the end; the weights convert expert by expert
        ct = compute_dtype(g_ND)
        g_ND, x_ND, w_S, a1_SH, a3_SH = (t.to(ct) for t in (g_ND, x_ND, w_S, a1_SH, a3_SH))
        need_x, need_w1, need_w2, need_w3, need_weights = ctx.needs_input_grad[:5]
        g_SD = g_ND.contiguous().index_select(0, token_S)
        dh_SH = segment_mm_t([g_SD], [w2_EDH], segs)  # dL/d(w h): [S, D] @ [D, H]
        da1_SH, da3_SH, hw_SH, dw_S = swiglu_backward(dh_SH, a1_SH, a3_SH, w_S)
        d_weights = None
        if need_weights:
            d_weights = torch.empty_like(dw_S).index_copy_(0, order_S, dw_S)
            d_weights = d_weights.view(ctx.weights_shape).to(ctx.weights_dtype)
        d_w2 = segment_wgrad(g_SD, hw_SH, segs, E, w_dtype) if need_w2 else None
        x_SD = x_ND.index_select(0, token_S)
        d_w1 = segment_wgrad(da1_SH, x_SD, segs, E, w_dtype) if need_w1 else None
        d_w3 = segment_wgrad(da3_SH, x_SD, segs, E, w_dtype) if need_w3 else None
        d_x = None
        if need_x:
            dx_SD = segment_mm_t([da1_SH, da3_SH], [w1_EHD, w3_EHD], segs)
            d_x = torch.zeros_like(x_ND).index_add_(0, token_S, dx_SD).to(x_dtype)
        return d_x, d_w1, d_w2, d_w3, d_weights, None


def native_moe(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
               experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """Inference on the CPU by smoe's kernel (smoe.kernels.native), eager or compiled: each touched expert's
    weights are read once for all its token-slots, with no sort, gather or scatter."""
    return native.moe_gemv(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK)


def gathered_moe(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
                 experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """Each token-slot reads its expert's rows through indexing: a fixed-shape graph for torch.compile.

    Eagerly this would copy K expert weights per token; compiled, inductor fuses the indexed loads
    into the fp32-accumulated reductions, so it is a fused gather + matrix-vector product.
    """
    x_N11D = reduction_input(x_ND, w1_EHD[0])[:, None, None, :]
    a1_NKH = (w1_EHD[experts_NK] * x_N11D).sum(-1, dtype=torch.float32)
    a3_NKH = (w3_EHD[experts_NK] * x_N11D).sum(-1, dtype=torch.float32)
    h_NKH = (F.silu(a1_NKH) * a3_NKH * weights_NK[..., None].float()).to(x_ND.dtype)
    h_NKH = reduction_input(h_NKH, w2_EDH[0])
    y_NKD = (w2_EDH[experts_NK] * h_NKH[:, :, None, :]).sum(-1, dtype=torch.float32)
    return y_NKD.sum(1).to(x_ND.dtype)


def all_experts_moe(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
                    experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """Every token through every expert, unchosen ones weighted 0: a fixed-shape graph that reads each
    expert's weights once, for torch.compile when a few tokens already touch (nearly) all experts."""
    E = w1_EHD.shape[0]
    x_END = x_ND.expand(E, *x_ND.shape)
    h_ENH = F.silu(torch.bmm(x_END, w1_EHD.transpose(1, 2))) * torch.bmm(x_END, w3_EHD.transpose(1, 2))
    combine_NE = torch.zeros(x_ND.shape[0], E, dtype=weights_NK.dtype, device=x_ND.device)
    combine_NE = combine_NE.scatter_add(1, experts_NK, weights_NK)
    h_ENH = h_ENH * combine_NE.t()[:, :, None].to(h_ENH.dtype)
    return torch.bmm(h_ENH, w2_EDH.transpose(1, 2)).sum(0)


def amx_serves(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor) -> bool:
    """Whether smoe's fused AMX MoE (native.amx_moe) takes these tensors: bf16 on the CPU, dim and hidden dim
    multiples of 32, outside torch.compile, on a CPU with AMX where the kernels loaded (the caller checks grad)."""
    return (x_ND.dtype == w1_EHD.dtype == w2_EDH.dtype == w3_EHD.dtype == torch.bfloat16 and x_ND.device.type == "cpu"
            and w1_EHD.device.type == "cpu" and x_ND.shape[-1] % 32 == 0 and w1_EHD.shape[1] % 32 == 0
            and not torch.compiler.is_compiling() and native.amx())


def amx_takes(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
              experts_NK: torch.Tensor) -> bool:
    """Whether the experts run as the fused AMX op (amx_moe, or amx_moe_keep under autograd): where it serves
    (amx_serves), from AMX_MIN_SLOTS_PER_EXPERT token-slots per expert on average."""
    return experts_NK.numel() >= AMX_MIN_SLOTS_PER_EXPERT * w1_EHD.shape[0] and amx_serves(x_ND, w1_EHD, w2_EDH,
                                                                                              w3_EHD)


def f32_fused_takes(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
                    experts_NK: torch.Tensor, keep: bool = False) -> bool:
    """Whether experts computed in fp32 (fp32 ones, and bf16 ones where BF16_AS_FP32) run as smoe's fused op (f32_moe,
    or f32_moe_keep for training's forward where keep) where it serves: the AVX-512 build for inference at any size and
    for training from F32_KEEP_MIN_SLOTS_PER_EXPERT slots per expert on average, the AVX2 build for inference below
    F32_AVX2_MAX_SLOTS_PER_EXPERT and for training within F32_AVX2_KEEP_SLOTS_PER_EXPERT."""
    S, E = experts_NK.numel(), w1_EHD.shape[0]
    if native.amx():
        sized = not keep or S >= F32_KEEP_MIN_SLOTS_PER_EXPERT * E
    else:
        lo, hi = F32_AVX2_KEEP_SLOTS_PER_EXPERT if keep else (0, F32_AVX2_MAX_SLOTS_PER_EXPERT)
        sized = lo * E <= S < hi * E
    return sized and native.f32_moe_serves(x_ND, w1_EHD, w2_EDH, w3_EHD, compute_dtype(x_ND))


def native_moe_takes(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
                     experts_NK: torch.Tensor) -> bool:
    """Whether inference (the caller checks grad) runs as native_moe: up to native.max_rows token-slots per expert on
    average where its kernel serves, up to NATIVE_MOE_MAX_SLOTS_FUSED where the fused fp32 op takes the experts. The
    op's checks (3-9 us) come last, so a decode step does not pay them."""
    S, E = experts_NK.numel(), w1_EHD.shape[0]
    return (S <= native.max_rows(x_ND.dtype) * E and native.serves(x_ND, w1_EHD)
            and (S <= NATIVE_MOE_MAX_SLOTS_FUSED * E or not f32_fused_takes(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK)))


def grouped_moe(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
                experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """Gather tokens once in expert order, run each active expert's rows as one matmul, scatter-add back."""
    if x_ND.shape[0] == 0:
        return torch.zeros_like(x_ND)
    tensors = (x_ND, w1_EHD, w2_EDH, w3_EHD, weights_NK)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    # inference with at most native.max_rows token-slots per expert on average: smoe's kernel reads each touched
    # expert once per pass of its slots, with no sort, gather or scatter (against the library's per-expert
    # products on sorted rows, bf16 on a Zen 4 at 8 per expert: 1.30x faster for the medium preset's experts,
    # equal for dim 1024, H 3584; at 16 per expert 1.31x and 0.68x)
    # bf16 inference on a CPU with AMX from AMX_MIN_SLOTS_PER_EXPERT slots per expert: the fused AMX op
    if not grad and amx_takes(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK):
        return native.amx_moe(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK.float())
    if not grad and native_moe_takes(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK):
        return native_moe(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK)  # eager or compiled
    # fp32 inference on more slots: the fused fp32 op where f32_fused_takes (the medium preset's experts, 1 thread of a
    # Xeon with AMX, against the library's per-expert products: 1.9x faster at 64 tokens, 1.6x at 128, 1.2x at 512)
    if not grad and f32_fused_takes(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK):
        ct = compute_dtype(x_ND)  # bf16 where BF16_AS_FP32: x converted, fp32 products of bf16 weights, rounded once
        return native.f32_moe(x_ND.to(ct), w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK).to(x_ND.dtype)
    if torch.compiler.is_compiling() and experts_NK.numel() <= COMPILED_GATHER_MAX_SLOTS:
        # fixed-shape formulations (no host sync, no graph break): per-slot gathers while the slots are
        # fewer than the experts, else every expert once
        fn = gathered_moe if experts_NK.numel() < w1_EHD.shape[0] else all_experts_moe
        return fn(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK)
    if grad:
        return GroupedMoE.apply(x_ND, w1_EHD, w2_EDH, w3_EHD, weights_NK, experts_NK)
    token_S, order_S, counts = sort_by_expert(experts_NK, w1_EHD.shape[0])
    w_S = weights_NK.reshape(-1)[order_S].to(x_ND.dtype)
    return _forward(x_ND, w1_EHD, w2_EDH, w3_EHD, token_S, w_S, segments(counts), keep=False)[0]
