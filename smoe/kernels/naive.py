"""The reference MoE backend: a plain loop over experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_moe(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
              experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """For each expert, run its SwiGLU on the tokens that chose it and add the weighted result."""
    out_ND = torch.zeros_like(x_ND)
    for e in range(w1_EHD.shape[0]):
        token_idx, slot_idx = torch.where(experts_NK == e)
        if token_idx.numel() == 0:
            continue
        x_nD = x_ND[token_idx]
        h_nH = F.silu(x_nD @ w1_EHD[e].t()) * (x_nD @ w3_EHD[e].t())
        y_nD = h_nH @ w2_EDH[e].t()
        out_ND = out_ND.index_add(0, token_idx, y_nD * weights_NK[token_idx, slot_idx, None].to(y_nD.dtype))
    return out_ND
