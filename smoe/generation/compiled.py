"""The decode step of the generation loop: eager, or compiled (on the CPU ahead of time by AOTInductor,
or by torch.compile; on CUDA a replayed CUDA graph of the eager or the torch.compile'd step).

Every step has the same signature (Step): tokens, positions and the KV cache in, StepOut (logits, the
greedy pick where the step made it, next positions) out.

Compiled on the CPU, one step (B new tokens into the KV cache) is a single graph whose only dynamic
sizes are the cache's length S and the n filled slots it attends over (so attention costs the
filled part, not the whole buffer, and one graph serves every prompt and cache length): MoE
through the fixed-shape formulations of smoe.kernels.grouped, and single-row linears as
fp32-accumulated reductions that inductor turns into one streaming pass over the weight (on this
CPU that reads bf16 weights at about twice the bandwidth of the library's single-row matmul, and fp32
tall-skinny ones too). If compiling fails the step falls back to eager with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from smoe.generation.sampling import argmax
from smoe.kernels import native
from smoe.kernels.linear import reduction_input
from smoe.model.attention import KVCache, _WriteThenAttend, visible

log = logging.getLogger("smoe.generation")

# linears with at most this many rows become reductions inside the compiled step
GEMV_MAX_ROWS = 1
# on the CPU, batches up to this size decode through a compiled step (single-row reductions); larger ones
# eagerly (AOT at batch 8 measured 453 tok/s against 611 eager for the small fp32 model: per-slot gathers).
CPU_COMPILE_MAX_BATCH = 1
# dtypes smoe's kernels serve (native.max_rows rows): batches up to this size, at most those rows (bf16 on a
# Zen 4, batch 8: AOT 2083 vs eager 1237 tok/s for the small model, 115 vs 94 for the large one)
NATIVE_COMPILE_MAX_BATCH = 8
# a static (CUDA graph) cache length is rounded up to a multiple of this, so similar prompts share a graph
STATIC_LEN_MULTIPLE = 256


class StepOut(NamedTuple):
    """What a decode step returns: the logits of the new position (B, V); the greedy pick (B,) where the
    step computed it (the AOT step does, inside its graph, with the logits still in cache), else None;
    the next step's positions (B, 1)."""

    logits: torch.Tensor
    greedy: torch.Tensor | None
    positions: torch.Tensor


# a decode step: (model, tokens (B,), positions (B, 1), KV cache, MoE top_k) -> StepOut; it appends one
# column to the cache
Step = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, KVCache, int | None], StepOut]
# the model part of a step: (model, tokens (B, 1), positions (B, 1), attention from KVCache.step, top_k) -> logits
Forward = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, object, int | None], torch.Tensor]


class RowLinear(TorchFunctionMode):
    """F.linear on up to native.max_rows rows by smoe's kernel where it serves the dtype (smoe.kernels.native);
    else on at most GEMV_MAX_ROWS rows as a multiply-and-sum accumulated in fp32 (for inductor)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.numel() // max(x.shape[-1], 1)
            if rows <= native.max_rows(x.dtype) and native.serves(x, w):
                y = native.gemv(x, w)
                return y if bias is None else y + bias
            if rows <= GEMV_MAX_ROWS:
                y = (reduction_input(x, w)[..., None, :] * w).sum(-1, dtype=torch.float32).to(x.dtype)
                return y if bias is None else y + bias
        return func(*args, **kwargs)


def eager_forward(model, tokens_B1: torch.Tensor, positions_B1: torch.Tensor, attn, top_k: int | None) -> torch.Tensor:
    """Logits (B, V) of the last position."""
    return model(tokens_B1, positions_B1, attn, top_k=top_k)[:, -1]


def _through_cache(forward: Forward, model, tokens_B: torch.Tensor, positions_B1: torch.Tensor, cache: KVCache,
                   top_k: int | None) -> StepOut:
    logits = forward(model, tokens_B[:, None], positions_B1, cache.step(positions_B1), top_k)
    return StepOut(logits, None, positions_B1 + 1)


def eager_step(model, tokens_B: torch.Tensor, positions_B1: torch.Tensor, cache: KVCache, top_k: int | None
               ) -> StepOut:
    """One decode step, eagerly."""
    return _through_cache(eager_forward, model, tokens_B, positions_B1, cache, top_k)


def _traced_step(model, tokens_B1, positions_B1, attn, top_k):
    with RowLinear():
        return model(tokens_B1, positions_B1, attn, top_k=top_k)[:, -1]


class CompiledStep:
    """eager_step through torch.compile (one graph per batch size, any cache length); eager if that fails.

    row_linear: single-row linears as reductions (RowLinear, for the CPU); without it they stay library
    matmuls (cuBLAS on CUDA) and inductor fuses the code between them."""

    static_cache = False

    def __init__(self, row_linear: bool = True):
        self.fn = torch.compile(_traced_step if row_linear else eager_forward, dynamic=False)
        self.failed: str | None = None
        self.cache_ref: Callable[[], object] | None = None  # the cache whose K/V sizes are marked (weakly)

    def _lengths_dynamic(self, attn) -> None:
        """Mark the attended length (every step's new mask) and the cache length (once per cache) as
        dynamic sizes."""
        if isinstance(attn, _WriteThenAttend):
            torch._dynamo.maybe_mark_dynamic(attn.mask, 3)
            if self.cache_ref is None or self.cache_ref() is not attn.cache:
                self.cache_ref = weakref.ref(attn.cache)
                for t in (*attn.cache.k, *attn.cache.v):
                    torch._dynamo.maybe_mark_dynamic(t, 2)

    def forward(self, model, tokens_B1, positions_B1, attn, top_k) -> torch.Tensor:
        """The compiled Forward (eager if compiling failed)."""
        if self.failed is None:
            try:
                native.used_for(model.dtype)  # built and loaded before tracing, which cannot build it
                self._lengths_dynamic(attn)
                return self.fn(model, tokens_B1, positions_B1, attn, top_k)
            except Exception as err:  # a missing C++ compiler, an unsupported op: keep generating, eagerly
                self.failed = f"{type(err).__name__}: {err}"
                warnings.warn(f"torch.compile of the decode step failed ({self.failed[:300]}); decoding eagerly",
                              stacklevel=2)
        return eager_forward(model, tokens_B1, positions_B1, attn, top_k)

    def __call__(self, model, tokens_B, positions_B1, cache, top_k) -> StepOut:
        return _through_cache(self.forward, model, tokens_B, positions_B1, cache, top_k)


class CUDAGraphStep:
    """On CUDA: a step (`inner`: the eager step, or a CompiledStep) captured once per generation as a
    CUDA graph and replayed per token.

    The step's inputs (tokens, positions, the cache slot and mask) are copied into fixed buffers;
    the K/V cache is written in place by the graph. The first step runs as it is (which also builds
    any Triton kernels and compiles), the second is captured. Needs a static cache and a sync-free MoE
    backend (`triton` at decode sizes); otherwise, or if capture fails, `inner` runs uncaptured (warned
    once).
    """

    static_cache = True

    def __init__(self, inner: Forward = eager_forward):
        self.inner = inner
        self.key = None
        self.graph = None
        self.failed: str | None = None

    def __call__(self, model, tokens_B, positions_B1, cache, top_k) -> StepOut:
        return _through_cache(self.forward, model, tokens_B, positions_B1, cache, top_k)

    def forward(self, model, tokens_B1, positions_B1, attn, top_k) -> torch.Tensor:
        """`inner`, replayed from the graph where it can be."""
        cache = getattr(attn, "cache", None)
        if (self.failed is not None or tokens_B1.device.type != "cuda" or cache is None or not cache.static
                or not hasattr(attn, "slots")):
            return self.inner(model, tokens_B1, positions_B1, attn, top_k)
        key = (id(model), id(cache), tuple(tokens_B1.shape), top_k)
        if key != self.key:  # a new generation: run this step uncaptured on a side stream, capture the next
            self.key, self.graph = key, None
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.inner(model, tokens_B1, positions_B1, attn, top_k)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            try:
                self._capture(model, tokens_B1, positions_B1, attn, top_k)
            except Exception as err:  # e.g. a backend that synchronises with the host
                self.failed = f"{type(err).__name__}: {err}"
                warnings.warn(f"CUDA graph capture of the decode step failed ({self.failed[:300]}); decoding "
                              f"without it", stacklevel=2)
                return self.inner(model, tokens_B1, positions_B1, attn, top_k)
        self.tokens.copy_(tokens_B1)
        self.positions.copy_(positions_B1)
        self.attn.slots.copy_(attn.slots)
        self.attn.mask.copy_(attn.mask)
        self.graph.replay()
        return self.out.clone()

    def _capture(self, model, tokens_B1, positions_B1, attn, top_k):
        self.tokens, self.positions = tokens_B1.clone(), positions_B1.clone()
        self.attn = type(attn)(attn.cache, attn.slots.clone(), attn.mask.clone())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self.inner(model, self.tokens, self.positions, self.attn, top_k)
        self.graph = graph


class _StepModule(torch.nn.Module):
    """The whole decode step as a module for torch.export, the cache's bookkeeping included, so that the
    loop around it runs no tensor op per token but reading the pick (each one costs tens of us here
    after the step has streamed the weights through the caches): it records the new column's positions
    in the cache's slot_pos, masks from them (attention.visible, as KVCache.step), writes K/V in place,
    and returns the logits, their argmax and the next positions."""

    def __init__(self, model: torch.nn.Module, top_k: int | None):
        super().__init__()
        self.model, self.top_k = model, top_k

    def forward(self, tokens_B, positions_B1, slot_1, slots_n, slot_pos_BS, ks: list[torch.Tensor],
                vs: list[torch.Tensor]):
        # slot_1: the new column's slot; slots_n: the first n slot numbers, the ones attended over (n is
        # a dynamic size); slot_pos_BS (B, S) and the K/V tensors (B, Hkv, S + 1, hd) are the cache's
        n = slots_n.shape[0]
        for t in (*ks, *vs):  # the cache's spare column: fewer slots attended than the buffer has
            torch._check(n < t.shape[2])
        slot_pos_BS.index_copy_(1, slot_1, positions_B1)
        mask = visible(slot_pos_BS[:, None, :n], positions_B1[:, :, None], self.model.config.sliding_window)
        attn = _WriteThenAttend(SimpleNamespace(k=ks, v=vs), slot_1, mask[:, None])
        logits = _traced_step(self.model, tokens_B[:, None], positions_B1, attn, self.top_k)
        return logits, argmax(logits), positions_B1 + 1  # the chunked argmax: 12 vs 21 us for 32000 bf16 logits

    def example(self, batch_size: int, cache_k: torch.Tensor) -> tuple[tuple, tuple]:
        """Example inputs for export (a short cache, half filled) and their dynamic sizes: the cache's
        slots S (its K/V tensors have S + 1) and the attended length n."""
        L, limit = self.model.config.n_layers, self.model.config.max_seq_len
        B, Hkv, hd = batch_size, cache_k.shape[1], cache_k.shape[3]
        S = min(63, limit)
        n = max(2, S // 2)
        kv = [torch.zeros(B, Hkv, S + 1, hd, dtype=cache_k.dtype) for _ in range(2 * L)]
        slot_pos = torch.full((B, S), -1)
        slot_pos[:, :n - 1] = torch.arange(n - 1)
        inputs = (torch.zeros(B, dtype=torch.long), torch.full((B, 1), n - 1), torch.tensor([n - 1]),
                  torch.arange(n), slot_pos, kv[:L], kv[L:])
        S_dim, n_dim = torch.export.Dim("slots", min=2, max=limit), torch.export.Dim("n", min=2, max=limit)
        return inputs, (None, None, None, {0: n_dim}, {1: S_dim}, [{2: S_dim + 1}] * L, [{2: S_dim + 1}] * L)


def _source_hash() -> str:
    """Hash of the code a compiled step is built from (model, kernels, this file) and of torch's version."""
    h = hashlib.sha256(torch.__version__.encode())
    root = Path(__file__).resolve().parents[1]
    for sub in ("model", "kernels", "kernels/csrc", "generation"):
        for f in sorted([*(root / sub).glob("*.py"), *(root / sub).glob("*.cpp")]):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


# packages built from other code (another smoe or torch version) are deleted once unused for this long
STALE_PACKAGE_DAYS = 30


def aot_cache_dir() -> Path:
    """Where AOT-compiled decode steps are kept: $SMOE_CACHE/aot, else ~/.cache/smoe/aot (XDG_CACHE_HOME)."""
    return native.cache_root() / "aot"


class AOTStep:
    """On the CPU: the decode step compiled ahead of time by AOTInductor and run from C++, without the
    per-token guard check and Python wrapper of torch.compile (the small model's step: 1.75 vs 2.1 ms).

    One package per model config, dtype, batch and top_k (any cache length: it is a dynamic size), built
    once (tens of seconds) and kept on disk (aot_cache_dir()). Its weights are the model's live
    parameters, not copies: if they are replaced (not updated in place) the step sees it at the next
    generation and rebinds. The graph also does the cache's bookkeeping and the greedy pick (_StepModule),
    so a token costs the loop one call and no tensor op of its own. Falls back to CompiledStep (warned
    once) if export or compilation fails.
    """

    static_cache = False

    def __init__(self, fallback: CompiledStep):
        self.fallback = fallback
        self.runners: dict[tuple, tuple[object, dict[str, torch.Tensor]]] = {}
        self.current: tuple | None = None  # this generation's cache and model (weakly), top_k and runner key
        self.failed: str | None = None

    def prepare(self, model, batch_size: int, cache, top_k: int | None) -> None:
        """Build or load the step for this model and batch before generating (the wait comes before any
        output, not after the first token)."""
        if self.failed is None and isinstance(cache, KVCache) and cache.k[0].is_cpu:
            try:
                self._load(model, batch_size, cache.k[0], top_k)
            except Exception as err:
                self._fail(err)

    def __call__(self, model, tokens_B, positions_B1, cache, top_k) -> StepOut:
        # the graph masks with the model's sliding window, as KVCache.for_model makes the cache
        if (self.failed is None and isinstance(cache, KVCache) and tokens_B.is_cpu
                and cache.window == model.config.sliding_window):
            slot, n = cache.column()
            try:
                run = self._runner(model, tokens_B.shape[0], cache, top_k)
                # the loader's own entry point: the model's call would flatten and unflatten pytrees
                logits, greedy, positions = run([tokens_B, positions_B1, cache.index[slot:slot + 1],
                                                 cache.index[:n], cache.slot_pos, *cache.k, *cache.v])
                cache.length += 1
                return StepOut(logits, greedy, positions)
            except Exception as err:  # export or AOT compile unsupported here: keep generating
                self._fail(err)
        return self.fallback(model, tokens_B, positions_B1, cache, top_k)

    def _fail(self, err: Exception) -> None:
        self.failed = f"{type(err).__name__}: {err}"
        warnings.warn(f"AOT compilation of the decode step failed ({self.failed[:300]}); using torch.compile",
                      stacklevel=3)

    def _load(self, model, batch_size: int, cache_k: torch.Tensor, top_k: int | None) -> tuple:
        # inductor fixes a kernel's thread count when it compiles it: one package per torch thread count;
        # the graph calls smoe's native kernels where they load (bf16), so that is part of the key too
        key = (id(model), batch_size, top_k, model.dtype, torch.get_num_threads(), native.used_for(model.dtype))
        if key not in self.runners:
            module = _StepModule(model, top_k)
            path = self._package(module, batch_size, cache_k, key)
            try:
                runner = torch._inductor.aoti_load_package(str(path))
            except Exception as err:  # a damaged package (e.g. a full disk): build it again, once
                log.warning("could not load %s (%s: %s); building it again", path, type(err).__name__, err)
                path.unlink(missing_ok=True)
                runner = torch._inductor.aoti_load_package(str(self._package(module, batch_size, cache_k, key)))
            self.runners[key] = (runner, {})
            weakref.finalize(model, self.runners.pop, key, None)  # drop the runner and its weights with the model
        return key

    def _runner(self, model, batch_size: int, cache: KVCache, top_k):
        current = self.current  # the next token of the same generation: nothing to look up again
        if current is not None and current[0]() is cache and current[1]() is model and current[2] == top_k:
            return self.runners[current[3]][0].loader.boxed_run
        key = self._load(model, batch_size, cache.k[0], top_k)
        runner, bound = self.runners[key]
        # a new generation (a new cache, not id()): (re)bind the live weights if any tensor was replaced
        live = {**dict(model.named_parameters(prefix="model")), **dict(model.named_buffers(prefix="model"))}
        want = {k: live[k].detach() for k in runner.get_constant_fqns()}
        if want.keys() != bound.keys() or any(want[k].data_ptr() != bound[k].data_ptr() for k in want):
            runner.load_constants(want, check_full_update=True, user_managed=True)
            bound.clear()
            bound.update(want)  # views that keep the memory the runner reads alive (even if p.data is swapped)
        self.current = (weakref.ref(cache), weakref.ref(model), top_k, key)
        return runner.loader.boxed_run

    @staticmethod
    def _package(module: _StepModule, batch_size: int, cache_k: torch.Tensor, key: tuple) -> Path:
        cfg, source = module.model.config.to_dict(), _source_hash()
        ident = json.dumps([cfg, str(key[3]), key[1:3], key[4], key[5], source], sort_keys=True, default=str)
        path = aot_cache_dir() / f"step-{source[:8]}-{hashlib.sha256(ident.encode()).hexdigest()[:24]}.pt2"
        if path.exists():
            os.utime(path)  # used now: see prune_stale_packages
        else:
            prune_stale_packages(path.parent, source)
            log.info("building the AOT-compiled decode step (once per model shape, kept in %s)", path.parent)
            t0 = time.perf_counter()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.stem}.{os.getpid()}.pt2")
            # export traces normal tensors (made outside inference mode); torch's own deprecation
            # warnings from inside export are not the user's to act on
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                example, dynamic = module.example(batch_size, cache_k)
                ep = torch.export.export(module, example, dynamic_shapes=dynamic, strict=False)
                torch._inductor.aoti_compile_and_package(
                    ep, package_path=str(tmp), inductor_configs={"aot_inductor.package_constants_in_so": False})
            os.replace(tmp, path)  # atomic: a concurrent or killed build never leaves a partial package
            log.info("built the decode step in %.0f s", time.perf_counter() - t0)
        return path


def prune_stale_packages(folder: Path, source: str) -> None:
    """Delete the packages in folder built from other code than `source` (_source_hash()) and unused
    for STALE_PACKAGE_DAYS, and partial builds a day old: nothing would read them again."""
    now = time.time()
    for f in folder.glob("step-*.pt2"):
        try:
            age_days = (now - f.stat().st_mtime) / 86400
            partial = f.stem.count(".") > 0  # step-<source>-<ident>.<pid>.pt2, left by a killed build
            if (partial and age_days > 1) or (not f.name.startswith(f"step-{source[:8]}-")
                                               and age_days > STALE_PACKAGE_DAYS):
                f.unlink()
        except OSError:  # removed meanwhile by another process, or not ours to remove
            pass


_compiled = CompiledStep()
_graphed = CUDAGraphStep()
# CUDA, compile="jit": inductor fuses the norms, RoPE, cache writes, router and residual adds between the
# cuBLAS projections and the Triton MoE op (smoe::triton_moe), and the result is captured as one graph
_graphed_compiled = CUDAGraphStep(CompiledStep(row_linear=False).forward)
_aot = AOTStep(_compiled)


COMPILE_MODES = (False, True, "aot", "jit")


def decode_step(compile: bool | str, device: torch.device | str = "cpu", batch_size: int = 1,
                dtype: torch.dtype | None = None) -> Step:
    """The step function the generation loop calls once per new token: eager (False), or compiled: on
    CUDA a replayed CUDA graph (of the eager step with True or "aot"; of the torch.compile'd step, fewer
    kernels per layer, with "jit"); on the CPU, for batches up to CPU_COMPILE_MAX_BATCH, or NATIVE_COMPILE_MAX_BATCH
    for a dtype smoe's kernel serves (beyond, the compiled step measured no faster than eager: benchmarks/decode.py),
    ahead of time (True or "aot": AOTStep, the fastest) or by torch.compile ("jit": nothing written outside
    torch's own cache)."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
    if not compile:
        return eager_step
    if torch.device(device).type == "cuda":
        return _graphed_compiled if compile == "jit" else _graphed
    most = CPU_COMPILE_MAX_BATCH
    if dtype is not None and native.used_for(dtype):
        most = min(NATIVE_COMPILE_MAX_BATCH, native.max_rows(dtype))
    if batch_size > most:
        return eager_step
    return _compiled if compile == "jit" else _aot


def static_len(n: int, limit: int) -> int:
    """Cache length for a compiled decode: n rounded up to STATIC_LEN_MULTIPLE, at most limit."""
    return min(limit, -(-n // STATIC_LEN_MULTIPLE) * STATIC_LEN_MULTIPLE)
