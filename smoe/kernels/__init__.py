"""MoE expert compute backends behind one seam.

Every backend computes, for tokens x_ND routed to experts_NK with weights_NK,
    out_ND = sum_k weights_NK[:, k] * SwiGLU_{experts_NK[:, k]}(x_ND)
with stacked expert weights w1_EHD, w3_EHD (dim -> hidden) and w2_EDH (hidden -> dim).
Legend: N tokens, K chosen experts per token, E experts, D model dim, H expert hidden dim.

Backends: `naive` (the reference loop), `grouped` (sorted dispatch + per-expert matmuls, with its own
backward; the CPU default), `triton` (fused Triton kernels, the CUDA default, registered when Triton
is installed; falls back to `grouped` for gradients). Benchmarks: benchmarks/moe_layer.py.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from smoe.kernels.grouped import grouped_moe
from smoe.kernels.naive import naive_moe

MoEFn = Callable[..., torch.Tensor]

BACKENDS: dict[str, MoEFn] = {"naive": naive_moe, "grouped": grouped_moe}


def register_backend(name: str, fn: MoEFn) -> None:
    """Add a backend under a name (used by optional GPU kernels)."""
    BACKENDS[name] = fn


def _triton_moe(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
                experts_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """The `triton` backend (fused GPU kernels), imported on first use since Triton is optional."""
    from smoe.kernels.triton_moe import triton_moe
    return triton_moe(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK)


if importlib.util.find_spec("triton") is not None:
    register_backend("triton", _triton_moe)


def get_backend(name: str) -> MoEFn:
    """Look a backend up by name; the error lists the known ones."""
    if name not in BACKENDS:
        raise ValueError(f"unknown MoE backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name]


def default_backend(device: torch.device) -> str:
    """The fastest backend available for tensors on this device."""
    if device.type == "cuda" and "triton" in BACKENDS:
        return "triton"
    return "grouped"


def moe_experts(x_ND: torch.Tensor, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor,
                experts_NK: torch.Tensor, weights_NK: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Run the chosen experts of every token and sum their outputs with the router weights."""
    fn = get_backend(backend or default_backend(x_ND.device))
    return fn(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK)
