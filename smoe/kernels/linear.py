"""x @ w.T without autograd on the CPU, by whichever library path measured fastest for its shape.

nn.Linear keeps a weight as (out, in), so x @ w.T reads it transposed. With torch's CPU wheel (MKL
for fp32) on the AMD EPYC (Zen 4) these were measured on, that path is slow for a few rows, where w @ x.T,
which reads w row by row, took 1.4-1.8x less time for an expert's 512 x 256 weights at 2-4 rows and 1.7-3.6x
less for the 32000 x 256 output projection at 2-8 rows; for that wide output oneDNN's linear took 1.3-1.7x less
time than MKL at 16-128 rows, and for the medium preset's shapes (512-3072 wide) 5-20% less at 32-8192 rows
with AVX-512 (not with AVX2: see ONEDNN_ROWS_MIN) (`benchmarks/linear.py` measures every choice side by
side). A single row against a weight of at most 768 inputs goes through MKL as two (the row twice): its
one-row path (gemv) ran slower than its two-column product for those shapes (32000 x 256: 4.3 vs 2.4 ms;
1536 x 512: 319 vs 227 us; 512 x 256: 71 vs 53 us; 4096 x 768: 1.09 vs 0.84 ms), and faster from 1024
inputs (1024 x 3584: 1.03 vs 1.65 ms).
Taken only where no gradient is recorded (inference, the forward of the grouped MoE's autograd
Function) and not under torch.compile; other dtypes and devices take F.linear unchanged.

Where smoe's own kernels load (smoe.kernels.native: x86-64 with AVX2 or AVX-512), products of up to
native.max_rows(dtype) rows go through them instead: they read the weight once for all rows (AVX512-BF16,
bf16, 1-2 rows: 15-23 vs 7-8 GB/s for torch's bf16 path over 0.5-66 MB weights; AVX2, fp32, 2-8 rows:
1.3-2.8x less time than the paths above for the small preset's shapes). bf16 products with more rows, on a
CPU without bf16 instructions (AVX512-BF16, AMX), are computed as fp32 ones (BF16_AS_FP32), in training
too (Bf16ViaFp32Linear: the forward and both gradient products) and under CPU bf16 autocast (which would
otherwise take torch's emulated bf16 products: a training step of the quickstart model 5x slower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smoe.kernels import native

# rows computed as (w @ x.T).T: 2..SMALL_ROWS_MAX, or up to WIDE_SMALL_ROWS_MAX for a wide output; only for
# weights of at least SMALL_ROWS_MIN_WEIGHT elements (read from memory, not cache). SMALL_ROWS_MAX = 0: off
SMALL_ROWS_MAX, WIDE_SMALL_ROWS_MAX, SMALL_ROWS_MIN_WEIGHT = 4, 8, 1 << 16
# one row as a pair: weights of at least PAIR_MIN_OUT outputs and at most PAIR_MAX_IN inputs
PAIR_MIN_OUT, PAIR_MAX_IN = 256, 768
# Both rewrites above work around MKL (torch's CPU BLAS), which runs generic code for few-row products on
# other vendors' CPUs: on an Intel Xeon with AMX (1 thread, weights from memory) they took 1.1-2.4x the time
# of F.linear at 1-4 rows (1536 x 512: 521 vs 216 us at 1 row, 496 vs 210 at 2), so only other CPUs take them
FEW_ROWS_REWRITES = native.cpu_info()[0] != "GenuineIntel"
AMX_CPU = "amx_bf16" in native.cpu_info()[1]  # the CPUs the two AMX-only choices below were measured on
# eager bf16 products of AMX_TRANSPOSED_ROWS rows as (w @ x.T).T on CPUs with AMX (before smoe's kernel, which
# is slower there from 3 rows), where oneDNN tiles the weight's rows rather than x's few (Xeon with AMX, 1
# thread, weights from memory: 1536 x 512 at 8 rows 199 vs 273 us, 32000 x 1024 at 4-8 rows 5.6 vs 8.1 ms (the
# kernel 8.6-11.0); at 64 rows 0.78-0.89x the time; from 256 rows mixed, 0.9-1.25x)
AMX_TRANSPOSED_ROWS = range(3, 65) if AMX_CPU else range(0)
# oneDNN: outputs at least WIDE_MIN_OUT wide (a vocabulary projection) with other row counts up to WIDE_ROWS_MAX;
# narrower weights of at least ONEDNN_MIN_WEIGHT elements from ONEDNN_ROWS_MIN rows (fewer rows or smaller
# weights measured alike or mixed). Measured with AVX-512 (Zen 4); on an AVX2 CPU (Zen 3) oneDNN's products
# of the narrower weights took 2-17% more time than MKL's at 32-512 rows (the MoE layer at 4096 tokens 615 vs
# 532 ms) and the wide one's 28% more at 512 rows, so there only the wide one up to 128 rows takes it
AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
WIDE_MIN_OUT, WIDE_ROWS_MAX, ONEDNN_ROWS_MIN, ONEDNN_MIN_WEIGHT = 8192, 512 if AVX512 else 128, 32, 1 << 18
# ... but on CPUs with AMX, fp32 products of the narrower weights from MKL_FP32_MIN_ROWS rows stay with MKL: on an
# Intel Xeon with AMX (weights from memory, the two paths interleaved in one process) MKL took 0.88-0.99x oneDNN's
# time at 1024-2048 rows for the medium preset's 512-3072 wide weights (1 and 2 threads) and 1024 x 4096 (1 thread);
# at 512 rows 0.96-0.99x on 1 thread but 1.00-1.02x on 2, and at 64-256 rows mostly more than oneDNN (up to 1.16x)
MKL_FP32_MIN_ROWS = 1024 if AMX_CPU else None


def _onednn_linear_works() -> bool:
    try:
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 3), torch.ones(4, 3), None, "none", [], "")
        return bool(torch.equal(y, torch.full((2, 4), 3.0)))
    except Exception:  # torch built without oneDNN, or the op changed: keep MKL
        return False


ONEDNN = _onednn_linear_works()


def _bf16_products_are_emulated() -> bool:
    """Whether this CPU lacks the bf16 instructions (AVX512-BF16, AMX) oneDNN's bf16 products need: torch's
    bf16 matmul then takes a fallback ~10x slower than its fp32 one (benchmarks/linear.py, a Zen 3)."""
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except Exception:  # no oneDNN or no such op: assume hardware bf16 and keep torch's bf16 path
        return False


# bf16 products of at least BF16_AS_FP32_MIN_ROWS rows, beyond what smoe's kernel takes, run as fp32 ones
# where the CPU lacks bf16 instructions: the same exact bf16 products summed in fp32, rounded once to bf16.
# On a Zen 3, 1 thread: 2.9-6.9x less time than torch's bf16 path at 8-512 rows (1536 x 512, 512 x 1536,
# 32000 x 256); at 1 row converting the weight costs more than it saves (32000 x 256: 9.8 vs 2.6 ms)
BF16_AS_FP32, BF16_AS_FP32_MIN_ROWS = _bf16_products_are_emulated(), 8


def _fast_path_ok(x_MI: torch.Tensor, w_OI: torch.Tensor) -> bool:
    return (x_MI.device.type == "cpu" and x_MI.dtype == torch.float32 and w_OI.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x_MI.requires_grad or w_OI.requires_grad))
            and not torch.compiler.is_compiling())


def _amx_transposed(M: int, x: torch.Tensor, w_OI: torch.Tensor) -> bool:
    return (M in AMX_TRANSPOSED_ROWS and x.dtype == w_OI.dtype == torch.bfloat16 and x.device.type == "cpu"
            and not _records_grad(x, w_OI) and not torch.compiler.is_compiling())


def _small_rows(M: int, w_OI: torch.Tensor) -> bool:
    if not FEW_ROWS_REWRITES:
        return False
    most = WIDE_SMALL_ROWS_MAX if w_OI.shape[0] >= WIDE_MIN_OUT and SMALL_ROWS_MAX else SMALL_ROWS_MAX
    return 2 <= M <= most and w_OI.numel() >= SMALL_ROWS_MIN_WEIGHT


def _pair_row(M: int, w_OI: torch.Tensor) -> bool:
    return (FEW_ROWS_REWRITES and M == 1 and w_OI.shape[0] >= PAIR_MIN_OUT and w_OI.shape[1] <= PAIR_MAX_IN
            and w_OI.numel() >= SMALL_ROWS_MIN_WEIGHT)


def _as_pair(x_1I: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    """x_1I @ w_OI.T computed as w @ [x; x].T, keeping the first column: (1, O), a strided view."""
    return torch.mm(w_OI, x_1I.reshape(1, -1).expand(2, -1).contiguous().t())[:, 0][None]


def _onednn_rows(M: int, w_OI: torch.Tensor) -> bool:
    if not ONEDNN:
        return False
    if w_OI.shape[0] >= WIDE_MIN_OUT:
        return M <= WIDE_ROWS_MAX
    if MKL_FP32_MIN_ROWS is not None and M >= MKL_FP32_MIN_ROWS and w_OI.dtype == torch.float32:
        return False
    return AVX512 and M >= ONEDNN_ROWS_MIN and w_OI.numel() >= ONEDNN_MIN_WEIGHT


def _bf16_products(M: int, x: torch.Tensor, w_OI: torch.Tensor) -> bool:
    return (M >= BF16_AS_FP32_MIN_ROWS and compute_dtype(x) != x.dtype and w_OI.dtype == torch.bfloat16
            and not torch.compiler.is_compiling())


def _records_grad(x: torch.Tensor, w_OI: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or w_OI.requires_grad)


def bf16_as_fp32(M: int, x: torch.Tensor, w_OI: torch.Tensor) -> bool:
    """Whether x (M rows) @ w_OI.T, recording no gradient, is computed as an fp32 product (BF16_AS_FP32)."""
    return _bf16_products(M, x, w_OI) and not _records_grad(x, w_OI) and not _native_rows(M, x, w_OI)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype t's products are best computed in: float32 for CPU bf16 where BF16_AS_FP32, else t's own."""
    return torch.float32 if BF16_AS_FP32 and t.dtype == torch.bfloat16 and t.device.type == "cpu" else t.dtype


class Bf16ViaFp32Linear(torch.autograd.Function):
    """x @ w.T for bf16 x and w whose three products (forward, dx, dw) run in fp32, each rounded once to
    bf16: torch's emulated bf16 matmuls compute the same products, several times slower (BF16_AS_FP32)."""

    @staticmethod
    def forward(ctx, x, w_OI):
        ctx.save_for_backward(x, w_OI)
        return linear(x.float(), w_OI.float()).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, g):
        x, w_OI = ctx.saved_tensors
        g_MO = g.reshape(-1, g.shape[-1]).float()
        dx = (g_MO @ w_OI.float()).view(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = (g_MO.t() @ x.reshape(-1, x.shape[-1]).float()).to(w_OI.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


def _native_rows(M: int, x: torch.Tensor, w_OI: torch.Tensor) -> bool:
    return not torch.compiler.is_compiling() and 1 <= M <= native.max_rows(x.dtype) and native.serves(x, w_OI)


def mm_into(x_MI: torch.Tensor, w_OI: torch.Tensor, out_MO: torch.Tensor) -> torch.Tensor:
    """out_MO = x_MI @ w_OI.T, written into out_MO (e.g. rows of a larger buffer)."""
    M = x_MI.shape[0]
    if _amx_transposed(M, x_MI, w_OI):
        return out_MO.copy_(torch.mm(w_OI, x_MI.t()).t())
    if _native_rows(M, x_MI, w_OI):
        return out_MO.copy_(native.gemv(x_MI, w_OI))
    if bf16_as_fp32(M, x_MI, w_OI):
        return out_MO.copy_(linear(x_MI.float(), w_OI.float()))
    if _pair_row(M, w_OI) and _fast_path_ok(x_MI, w_OI):
        return out_MO.copy_(_as_pair(x_MI, w_OI))
    if _small_rows(M, w_OI) and _fast_path_ok(x_MI, w_OI):
        return out_MO.copy_(torch.mm(w_OI, x_MI.t()).t())
    if _onednn_rows(M, w_OI) and _fast_path_ok(x_MI, w_OI):  # oneDNN has no out=: one copy of the output
        return out_MO.copy_(torch.ops.mkldnn._linear_pointwise(x_MI, w_OI, None, "none", [], ""))
    return torch.mm(x_MI, w_OI.t(), out=out_MO)


def _emulated_bf16_autocast(x: torch.Tensor) -> bool:
    """CPU autocast to bf16 on a CPU without bf16 instructions (BF16_AS_FP32), outside torch.compile."""
    return (BF16_AS_FP32 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not torch.compiler.is_compiling())


def linear(x: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    """x (..., I) @ w_OI.T -> (..., O), as F.linear without bias."""
    if _emulated_bf16_autocast(x):  # what autocast does (bf16 in, bf16 out), by the bf16 rules below
        with torch.autocast("cpu", enabled=False):
            return linear(x.to(torch.bfloat16), w_OI.to(torch.bfloat16))
    M, O = x.numel() // x.shape[-1], w_OI.shape[0]
    if _amx_transposed(M, x, w_OI):
        return torch.mm(w_OI, x.reshape(M, -1).t()).t().contiguous().view(*x.shape[:-1], O)
    if _native_rows(M, x, w_OI):
        return native.gemv(x, w_OI)
    if bf16_as_fp32(M, x, w_OI):
        return linear(x.float(), w_OI.float()).to(torch.bfloat16)
    if _bf16_products(M, x, w_OI) and _records_grad(x, w_OI):  # training: all three products in fp32
        return Bf16ViaFp32Linear.apply(x, w_OI)
    if _pair_row(M, w_OI) and _fast_path_ok(x, w_OI):
        return _as_pair(x, w_OI).contiguous().view(*x.shape[:-1], O)
    if _small_rows(M, w_OI) and _fast_path_ok(x, w_OI):
        return torch.mm(w_OI, x.reshape(M, -1).t()).t().contiguous().view(*x.shape[:-1], O)
    if _onednn_rows(M, w_OI) and _fast_path_ok(x, w_OI):
        return torch.ops.mkldnn._linear_pointwise(x, w_OI, None, "none", [], "")
    return F.linear(x, w_OI)


# compiled matrix-vector reductions over weights of at least this many elements take a materialized input
MATERIALIZE_MIN_WEIGHT = 1 << 20


def materialize(x: torch.Tensor) -> torch.Tensor:
    """x itself (a view), which torch.compile nonetheless computes into a buffer of its own rather than
    fusing it into its consumers (inductor realizes the input of as_strided): the input of a compiled
    matrix-vector reduction is then computed once, not again inside the loop over every weight row.
    (An opaque custom op that copied x did the same at the cost of a call: as a view, the large model's
    AOT step took 34.4 vs 35.8 ms fp32 and 19.0 vs 19.6 ms bf16, the small one's alike.)"""
    return torch.as_strided(x, x.shape, x.stride())


def reduction_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x for a compiled multiply-and-sum over weight: for a large weight, materialized (recomputing x's
    producers once per weight row costs far more than writing x once) and in fp32 (the
    same values; a bf16 x would be converted again for every row: 21 -> 25 GB/s over bf16 weights)."""
    return materialize(x.float()) if weight.numel() >= MATERIALIZE_MIN_WEIGHT else x


class Linear(torch.nn.Linear):
    """A bias-free nn.Linear (same parameters and state-dict keys) whose forward calls `linear`."""

    def __init__(self, in_features: int, out_features: int, **kw):
        super().__init__(in_features, out_features, bias=False, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
