"""The decode step of the generation loop: eager, or compiled (torch.compile on the CPU, a replayed
CUDA graph on CUDA).

Compiled on the CPU, one step (B new tokens into a static KV cache) is a single fixed-shape graph: attention
over the whole cache buffer with a mask (KVCache(static=True)), MoE through the fixed-shape
formulations of smoe.kernels.grouped, and single-row linears as fp32-accumulated reductions that
inductor turns into one streaming pass over the weight (on this CPU that reads bf16 weights at
about twice the bandwidth of the library's single-row matmul, and fp32 tall-skinny ones too).
If compiling fails the step falls back to eager with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from smoe.kernels.linear import reduction_input

# linears with at most this many rows become reductions inside the compiled step
GEMV_MAX_ROWS = 1
# on the CPU, batches up to this size decode through torch.compile (single-row reductions); larger ones eagerly
CPU_COMPILE_MAX_BATCH = 1
# the static cache length is rounded up to a multiple of this, so prompts of similar length share a graph
STATIC_LEN_MULTIPLE = 256

Step = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, object, int | None], torch.Tensor]


class RowLinear(TorchFunctionMode):
    """F.linear on at most GEMV_MAX_ROWS rows as a multiply-and-sum accumulated in fp32 (for inductor)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.numel() // max(x.shape[-1], 1) <= GEMV_MAX_ROWS:
                y = (reduction_input(x, w)[..., None, :] * w).sum(-1, dtype=torch.float32).to(x.dtype)
                return y if bias is None else y + bias
        return func(*args, **kwargs)


def eager_step(model, tokens_B1: torch.Tensor, positions_B1: torch.Tensor, attn, top_k: int | None) -> torch.Tensor:
    """Logits (B, V) of the last position."""
    return model(tokens_B1, positions_B1, attn, top_k=top_k)[:, -1]


def _traced_step(model, tokens_B1, positions_B1, attn, top_k):
    with RowLinear():
        return model(tokens_B1, positions_B1, attn, top_k=top_k)[:, -1]


class CompiledStep:
    """eager_step through torch.compile (one graph per batch size and cache length); eager if that fails."""

    def __init__(self):
        self.fn = torch.compile(_traced_step, dynamic=False)
        self.failed: str | None = None

    def __call__(self, model, tokens_B1, positions_B1, attn, top_k):
        if self.failed is None:
            try:
                return self.fn(model, tokens_B1, positions_B1, attn, top_k)
            except Exception as err:  # a missing C++ compiler, an unsupported op: keep generating, eagerly
                self.failed = f"{type(err).__name__}: {err}"
                warnings.warn(f"torch.compile of the decode step failed ({self.failed[:300]}); decoding eagerly",
                              stacklevel=2)
        return eager_step(model, tokens_B1, positions_B1, attn, top_k)


class CUDAGraphStep:
    """On CUDA: the eager step captured once per generation as a CUDA graph and replayed per token.

    The step's inputs (tokens, positions, the cache slot and mask) are copied into fixed buffers;
    the K/V cache is written in place by the graph. The first step runs eagerly (which also builds
    any Triton kernels), the second is captured. Needs a static cache and a sync-free MoE backend
    (`triton` at decode sizes); otherwise, or if capture fails, the step stays eager (warned once).
    """

    def __init__(self):
        self.key = None
        self.graph = None
        self.failed: str | None = None

    def __call__(self, model, tokens_B1, positions_B1, attn, top_k):
        cache = getattr(attn, "cache", None)
        if (self.failed is not None or tokens_B1.device.type != "cuda" or cache is None or not cache.static
                or not hasattr(attn, "slots")):
            return eager_step(model, tokens_B1, positions_B1, attn, top_k)
        key = (id(model), id(cache), tuple(tokens_B1.shape), top_k)
        if key != self.key:  # a new generation: run this step eagerly on a side stream, capture the next
            self.key, self.graph = key, None
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = eager_step(model, tokens_B1, positions_B1, attn, top_k)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            try:
                self._capture(model, tokens_B1, positions_B1, attn, top_k)
            except Exception as err:  # e.g. a backend that synchronises with the host
                self.failed = f"{type(err).__name__}: {err}"
                warnings.warn(f"CUDA graph capture of the decode step failed ({self.failed[:300]}); decoding eagerly",
                              stacklevel=2)
                return eager_step(model, tokens_B1, positions_B1, attn, top_k)
        self.tokens.copy_(tokens_B1)
        self.positions.copy_(positions_B1)
        self.attn.slots.copy_(attn.slots)
        self.attn.mask.copy_(attn.mask)
        self.graph.replay()
        return self.out.clone()

    def _capture(self, model, tokens_B1, positions_B1, attn, top_k):
        self.tokens, self.positions = tokens_B1.clone(), positions_B1.clone()
        self.attn = type(attn)(attn.cache, attn.slots.clone(), attn.n, attn.mask.clone())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = eager_step(model, self.tokens, self.positions, self.attn, top_k)
        self.graph = graph


_compiled = CompiledStep()
_graphed = CUDAGraphStep()


def decode_step(compile: bool, device: torch.device | str = "cpu", batch_size: int = 1) -> Step:
    """The step function the generation loop calls once per new token: eager, or with compile=True a
    replayed CUDA graph on CUDA and torch.compile on the CPU for batches up to CPU_COMPILE_MAX_BATCH
    (beyond it the compiled step measured no faster than eager: benchmarks/decode.py)."""
    if not compile:
        return eager_step
    if torch.device(device).type == "cuda":
        return _graphed
    return _compiled if batch_size <= CPU_COMPILE_MAX_BATCH else eager_step


def static_len(n: int, limit: int) -> int:
    """Cache length for a compiled decode: n rounded up to STATIC_LEN_MULTIPLE, at most limit."""
    return min(limit, -(-n // STATIC_LEN_MULTIPLE) * STATIC_LEN_MULTIPLE)
