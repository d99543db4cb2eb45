"""MoE expert compute backends behind one seam.

Every backend computes, for tokens x_ND routed to experts_NK with weights_NK,
    out_ND = sum_k weights_NK[:, k] * SwiGLU_{experts_NK[:, k]}(x_ND)
with stacked expert weights w1_EHD, w3_EHD (dim -> hidden) and w2_EDH (hidden -> dim).
Legend: N tokens, K chosen experts per token, E experts, D model dim, H expert hidden dim.

Backends: `naive` (the reference loop), `grouped` (sorted dispatch + per-expert matmuls, with its own
backward; the CPU default), `triton` (fused Triton kernels up to 1024 token-slots, the CUDA default,
registered when Triton is installed; `grouped` for gradients and larger batches; under torch.compile
one opaque op, smoe::triton_moe). Benchmarks:
benchmarks/moe_layer.py, benchmarks/moe_tune.py (the kernels' tilings).
"""

from __future__ import annotations

import importlib.util
import warnings
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


HAVE_TRITON = importlib.util.find_spec("triton") is not None
if HAVE_TRITON:
    register_backend("triton", _triton_moe)

# widest row the fused RMSNorm kernel takes in one program (wider rows use the torch code)
FUSED_NORM_MAX_DIM = 32768
# tokens up to which the fused router runs (one program per token, each reading the whole gate: decode sizes)
ROUTE_MAX_TOKENS = 256
_fused = {"broken": None}


def fused_ops_apply(*tensors: torch.Tensor) -> bool:
    """Whether the one-launch Triton RMSNorm, RoPE and router (smoe.kernels.triton_ops) serve these tensors: on
    CUDA with Triton, without autograd, outside torch.compile, and only if the kernels built here."""
    return (tensors[0].is_cuda and HAVE_TRITON and _fused["broken"] is None
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors)))


def fused_op(name: str, *args) -> torch.Tensor | None:
    """smoe.kernels.triton_ops.<name>(*args), or None (warned once) if its kernel cannot run on this GPU."""
    try:
        from smoe.kernels import triton_ops
        return getattr(triton_ops, name)(*args)
    except Exception as err:  # Triton's compile and launch errors have no common base class
        _fused["broken"] = f"{type(err).__name__}: {err}"
        warnings.warn(f"the fused Triton {name} failed on this device ({_fused['broken'][:300]}); "
                      f"using the torch code", stacklevel=2)
        return None


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
    """Run the chosen experts of every token and sum their outputs with the router weights.

    Under autocast the experts run in its dtype, as its linear layers do: x, the weights and the router weights
    cast (gradients reach fp32 parameters in fp32), the output in that dtype. The backends' own products (custom
    ops, out= matmuls) are not ones autocast casts, so without this an autocast model's experts stayed fp32."""
    dev = x_ND.device.type
    if torch.is_autocast_enabled(dev) and x_ND.is_floating_point():
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return moe_experts(*(t.to(dt) for t in (x_ND, w1_EHD, w2_EDH, w3_EHD)), experts_NK, weights_NK.to(dt),
                               backend)
    fn = get_backend(backend or default_backend(x_ND.device))
    return fn(x_ND, w1_EHD, w2_EDH, w3_EHD, experts_NK, weights_NK)
