"""Inputs of one MoE layer for the fused-op tests (test_amx_moe.py, test_f32_moe.py): random weights scaled to unit
outputs, a top-k routing (or every token to experts 0..K-1) and softmax router weights."""

from __future__ import annotations

import torch


def make(N, D, H, E, K, seed=0, skew=False, dtype=torch.float32):
    """(x (N, D), w1, w2, w3, experts (N, K), weights (N, K) fp32), x and the weights in dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(dtype)
    w1, w3 = ((torch.randn(E, H, D, generator=g) / D**0.5).to(dtype) for _ in range(2))
    w2 = (torch.randn(E, D, H, generator=g) / H**0.5).to(dtype)
    experts = (torch.arange(K).expand(N, K).clone() if skew
               else torch.rand(N, E, generator=g).topk(K, -1).indices)
    weights = torch.softmax(torch.randn(N, K, generator=g), -1)
    return x, w1, w2, w3, experts, weights
