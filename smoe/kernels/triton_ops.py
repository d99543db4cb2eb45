"""One-launch Triton versions of the model's small per-layer ops for CUDA inference: RMSNorm, RoPE, router.

A decode step of a large MoE is mostly weight reads, but eagerly each RMSNorm is eight kernels, each
rotary embedding five and the router six; in a CUDA-graph replay these tiny kernels, not the bytes,
make up the rest of the step. Each kernel here rounds where the torch code in smoe/model/transformer.py
rounds (the Hugging Face order), so it returns the same values up to the last bit of some elements:
RoPE is built without fused multiply-adds (on an H200 Triton had fused a product into the sum, one
rounding fewer than torch), RMSNorm and the router's logits differ only in the order of a float32 sum
(the router's top-k breaks ties towards the lower expert id). The model calls them only on CUDA
without autograd (smoe.kernels.fused_ops_apply).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, s_x, s_o, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    x = tl.load(x_ptr + row * s_x + offs, mask=ok, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    # weight * y.to(x dtype), the product rounded to the output dtype: the torch order
    out = w.to(tl.float32) * y.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * s_o + offs, out.to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)) over the last dim, in float32, rounded as RMSNorm rounds."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    block = triton.next_power_of_2(D)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, D, x2.stride(0), out.stride(0), eps, BLOCK=block,
                                     num_warps=max(1, min(16, block // 256)))
    return out.view(*x.shape[:-1], D)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_heads, T,
                 s_xb, s_xh, s_xt, s_cb, s_ct, s_ob, s_oh, s_ot,
                 HALF: tl.constexpr, BLOCK: tl.constexpr):
    # one (b, head, t) row of hd = 2 * HALF: out = x * cos + rotate_half(x) * sin, each product rounded
    r = tl.program_id(0)
    t = r % T
    h = (r // T) % n_heads
    b = r // (T * n_heads)
    offs = tl.arange(0, BLOCK)
    ok = offs < HALF
    xb = x_ptr + b.to(tl.int64) * s_xb + h.to(tl.int64) * s_xh + t.to(tl.int64) * s_xt
    cb = b.to(tl.int64) * s_cb + t.to(tl.int64) * s_ct
    x1 = tl.load(xb + offs, mask=ok, other=0.0)
    x2 = tl.load(xb + HALF + offs, mask=ok, other=0.0)
    c1 = tl.load(cos_ptr + cb + offs, mask=ok, other=0.0)
    c2 = tl.load(cos_ptr + cb + HALF + offs, mask=ok, other=0.0)
    s1 = tl.load(sin_ptr + cb + offs, mask=ok, other=0.0)
    s2 = tl.load(sin_ptr + cb + HALF + offs, mask=ok, other=0.0)
    dt = out_ptr.dtype.element_ty
    a1 = (x1.to(tl.float32) * c1.to(tl.float32)).to(dt).to(tl.float32)
    a2 = (x2.to(tl.float32) * c2.to(tl.float32)).to(dt).to(tl.float32)
    r1 = (-x2.to(tl.float32) * s1.to(tl.float32)).to(dt).to(tl.float32)  # rotate_half(x) = (-x2, x1)
    r2 = (x1.to(tl.float32) * s2.to(tl.float32)).to(dt).to(tl.float32)
    ob = out_ptr + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + t.to(tl.int64) * s_ot
    tl.store(ob + offs, (a1 + r1).to(dt), mask=ok)
    tl.store(ob + HALF + offs, (a2 + r2).to(dt), mask=ok)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, h, T, hd) with cos, sin (B, 1, T, hd) in x's dtype: the rotate-half layout."""
    B, n_heads, T, hd = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.expand(B, 1, T, hd), sin.expand(B, 1, T, hd)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty_like(x)  # x's strides (a transposed projection stays transposed)
    half = hd // 2
    _rope_kernel[(B * n_heads * T,)](x, cos, sin, out, n_heads, T, x.stride(0), x.stride(1), x.stride(2),
                                     cos.stride(0), cos.stride(2), out.stride(0), out.stride(1), out.stride(2),
                                     HALF=half, BLOCK=triton.next_power_of_2(half), num_warps=1,
                                     enable_fp_fusion=False)  # round each product, as torch does
    return out


@triton.jit
def _route_kernel(x_ptr, g_ptr, w_ptr, e_ptr, logits_ptr, D, E, s_xn, s_ge,
                  K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    # one token: float32 logits over the E experts, the top K by repeated argmax (ties to the lower
    # index), softmax over the K chosen logits
    n = tl.program_id(0).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = offs_d < D - d0
        xd = tl.load(x_ptr + n * s_xn + d0 + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs_e[:, None] * s_ge + d0 + offs_d[None, :], mask=e_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += g * xd[None, :]
    logits = tl.sum(acc, axis=1)
    tl.store(logits_ptr + n * E + offs_e, logits, mask=e_ok)
    rest = tl.where(e_ok, logits, float("-inf"))
    top = tl.max(rest, axis=0)
    chosen = offs_e < 0  # all False
    for k in tl.static_range(K):
        best = tl.max(rest, axis=0)
        idx = tl.min(tl.where(rest == best, offs_e, BLOCK_E), axis=0)
        tl.store(e_ptr + n * K + k, idx.to(tl.int64))
        chosen = chosen | (offs_e == idx)
        rest = tl.where(offs_e == idx, float("-inf"), rest)
    p = tl.where(chosen, tl.exp(logits - top), 0.0)
    p = p / tl.sum(p, axis=0)
    # the weights in the order of the chosen experts (descending logits), read back by expert id
    rest = tl.where(e_ok, logits, float("-inf"))
    for k in tl.static_range(K):
        best = tl.max(rest, axis=0)
        idx = tl.min(tl.where(rest == best, offs_e, BLOCK_E), axis=0)
        tl.store(w_ptr + n * K + k, tl.sum(tl.where(offs_e == idx, p, 0.0), axis=0))
        rest = tl.where(offs_e == idx, float("-inf"), rest)


def route(x_ND: torch.Tensor, gate_weight_ED: torch.Tensor, top_k: int
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """smoe.model.transformer.route in one launch: (weights_NK float32, experts_NK, logits_NE float32)."""
    N, D = x_ND.shape
    E = gate_weight_ED.shape[0]
    if x_ND.stride(1) != 1:
        x_ND = x_ND.contiguous()
    if gate_weight_ED.stride(1) != 1:
        gate_weight_ED = gate_weight_ED.contiguous()
    weights = torch.empty(N, top_k, dtype=torch.float32, device=x_ND.device)
    experts = torch.empty(N, top_k, dtype=torch.long, device=x_ND.device)
    logits = torch.empty(N, E, dtype=torch.float32, device=x_ND.device)
    block_e = triton.next_power_of_2(E)
    _route_kernel[(N,)](x_ND, gate_weight_ED, weights, experts, logits, D, E, x_ND.stride(0),
                        gate_weight_ED.stride(0), K=top_k, BLOCK_E=block_e,
                        BLOCK_D=max(16, min(512, 4096 // block_e)), num_warps=4)
    return weights, experts, logits
