"""Dropless sorted dispatch: sort token-slots by expert, one grouped matmul per projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sort_by_expert(experts_NK: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token index and slot order of the N*K token-slots sorted by expert, and tokens per expert."""
    flat_S = experts_NK.reshape(-1)
    order_S = torch.argsort(flat_S, stable=True)
    token_S = order_S // experts_NK.shape[1]
    counts_E = torch.bincount(flat_S, minlength=n_experts)
    return token_S, order_S, counts_E


def segment_mm(x_SI: torch.Tensor, w_EOI: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of x_SI, grouped by expert in order, times that expert's weight transposed: [S, O]."""
    out = [x @ w_EOI[e].t() for e, x in enumerate(torch.split(x_SI, counts)) if counts[e]]
    if not out:
        return x_SI.new_zeros(0, w_EOI.shape[1])
    return torch.cat(out) if len(out) > 1 else out[0]


def grouped_moe(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
                experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """Gather tokens once in expert order, run each expert's rows as one matmul, scatter-add back."""
    token_S, order_S, counts_E = sort_by_expert(experts_NK, w1_EHD.shape[0])
    counts = counts_E.tolist()
    x_SD = x_ND[token_S]
    h_SH = F.silu(segment_mm(x_SD, w1_EHD, counts)) * segment_mm(x_SD, w3_EHD, counts)
    y_SD = segment_mm(h_SH, w2_EDH, counts)
    w_S = weights_NK.reshape(-1)[order_S].to(y_SD.dtype)
    return torch.zeros_like(x_ND).index_add(0, token_S, y_SD * w_S[:, None])
