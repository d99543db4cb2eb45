"""The compiled decode step (torch.compile or AOTInductor on the CPU, CUDA graphs on a GPU) and the
static KV cache CUDA graphs need: the same tokens as the eager loop, one graph for every cache length,
and a clean eager fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from smoe import generate
from smoe.generation import compiled
from smoe.kernels import linear
from smoe.model.attention import KVCache
from tests.conftest import tiny_model


@pytest.mark.parametrize("window", [None, 5])
def test_static_cache_gives_the_same_logits(window):
    model = tiny_model(seed=2, sliding_window=window)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (2, 7), generator=g)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    outs = []
    with torch.no_grad():
        for static in (False, True):
            cache = KVCache.for_model(model, 2, 32, static=static)
            steps = [model(tokens, positions, cache.step(positions, valid))[:, -1]]
            pos = positions[:, -1:] + 1
            for t in range(9):
                nxt = torch.tensor([[t + 3], [t + 40]])
                steps.append(model(nxt, pos, cache.step(pos))[:, -1])
                pos = pos + 1
            outs.append(torch.stack(steps))
    assert (outs[0] - outs[1]).abs().max() <= 1e-5


def test_row_linear_mode_equals_linear():
    x, w, b = torch.randn(1, 1, 24), torch.randn(40, 24), torch.randn(40)
    with compiled.RowLinear():
        y, yb, y2 = F.linear(x, w), F.linear(x, w, b), F.linear(torch.randn(3, 24), w)
    assert (y - F.linear(x, w)).abs().max() <= 1e-5 and (yb - F.linear(x, w, b)).abs().max() <= 1e-5
    assert y2.shape == (3, 40)


def test_static_len_rounds_up_within_the_context():
    assert compiled.static_len(1, 4096) == 256
    assert compiled.static_len(257, 4096) == 512
    assert compiled.static_len(300, 300) == 300


@pytest.mark.timeout(300)
@pytest.mark.parametrize("materialize_min", [None, 0])
def test_compiled_decode_gives_the_eager_tokens(monkeypatch, materialize_min):
    # batch 1 of a 4-expert top-2 model: the gather formulation and the single-row reductions, with the
    # inputs of the reductions fused (tiny weights) or materialized first (as for large weights)
    if materialize_min is not None:
        monkeypatch.setattr(linear, "MATERIALIZE_MIN_WEIGHT", materialize_min)
    model = tiny_model(seed=5)
    prompt = [3, 17, 42, 9, 100]
    eager = generate(model, prompt, max_tokens=12)
    fast = generate(model, prompt, max_tokens=12, compile="jit")
    assert fast.tokens == eager.tokens
    assert compiled._compiled.failed is None


@pytest.mark.timeout(300)
def test_compiled_decode_is_one_graph_for_every_cache_length(monkeypatch):
    # the attended length grows every step and the cache length follows the prompt and max_tokens:
    # both are dynamic sizes, so nothing recompiles
    from torch._dynamo.utils import counters
    monkeypatch.setattr(compiled, "_compiled", compiled.CompiledStep())
    model = tiny_model(seed=8)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    for prompt, n in (([3, 17, 42], 9), ([5, 6, 7, 8, 9, 10, 11], 20), ([1, 2], 4)):
        fast = generate(model, prompt, max_tokens=n, compile="jit")
        assert fast.tokens == generate(model, prompt, max_tokens=n).tokens
    assert counters["stats"]["unique_graphs"] - before == 1 and compiled._compiled.failed is None


@pytest.mark.timeout(300)
def test_compiled_decode_past_a_sliding_window(monkeypatch):
    # a rolling buffer of 5 slots: once full, every step attends over all of it and overwrites the oldest
    monkeypatch.setattr(compiled, "_compiled", compiled.CompiledStep())
    model = tiny_model(seed=9, sliding_window=5)
    prompt = [3, 17, 42]
    assert generate(model, prompt, max_tokens=12, compile="jit").tokens == generate(model, prompt, max_tokens=12).tokens
    assert compiled._compiled.failed is None


def test_compile_failure_falls_back_to_eager(monkeypatch):
    model = tiny_model(seed=6)
    step = compiled.CompiledStep()

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    step.fn = broken
    monkeypatch.setattr(compiled, "_compiled", step)
    eager = generate(model, [1, 2, 3], max_tokens=5)
    with pytest.warns(UserWarning, match="decoding eagerly"):
        out = generate(model, [1, 2, 3], max_tokens=5, compile="jit")
    assert out.tokens == eager.tokens and step.failed.startswith("RuntimeError")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_gives_the_eager_tokens():
    model = tiny_model(seed=7).cuda()
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    eager = generate(model, prompts, max_tokens=10)
    fast = generate(model, prompts, max_tokens=10, compile=True)
    assert [c.tokens for c in fast] == [c.tokens for c in eager]
    assert compiled._graphed.failed is None and compiled._graphed.graph is not None


@pytest.mark.timeout(300)
def test_cuda_compiled_graph_step_gives_the_eager_tokens_on_a_static_cache(monkeypatch):
    # compile="jit" on CUDA captures the torch.compile'd step (library linears, no RowLinear) over the static
    # cache; off CUDA the same object runs that compiled step uncaptured, which this checks on the CPU
    from smoe.generation import loop
    assert compiled.decode_step("jit", "cuda") is compiled._graphed_compiled
    assert compiled.decode_step(True, "cuda") is compiled._graphed
    step = compiled.CUDAGraphStep(compiled.CompiledStep(row_linear=False).forward)
    monkeypatch.setattr(loop, "decode_step", lambda *args: step)
    model = tiny_model(seed=11, sliding_window=6)
    prompts = [[5, 6, 7, 8], [9, 10]]
    eager = generate(model, prompts, max_tokens=10)
    fast = generate(model, prompts, max_tokens=10, compile="jit")
    assert [c.tokens for c in fast] == [c.tokens for c in eager]
    assert step.inner.__self__.failed is None and step.graph is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_of_the_compiled_step_gives_the_eager_tokens():
    model = tiny_model(seed=7).cuda()
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    eager = generate(model, prompts, max_tokens=10)
    fast = generate(model, prompts, max_tokens=10, compile="jit")
    assert [c.tokens for c in fast] == [c.tokens for c in eager]
    step = compiled._graphed_compiled
    assert step.failed is None and step.inner.__self__.failed is None and step.graph is not None


def test_single_query_attention_equals_sdpa():
    from smoe.model.attention import attend_one, sdpa
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 8, 1, 16, generator=g), torch.randn(2, 2, 30, 16, generator=g), torch.randn(2, 2, 30, 16)
    mask = torch.rand(2, 1, 1, 30, generator=g) > 0.3
    mask[..., 0] = True
    assert (attend_one(q, k, v, mask) - sdpa(q, k, v, mask)).abs().max() <= 1e-5


def test_materialize_is_a_view_that_compiles_to_its_own_buffer():
    x = torch.randn(3, 8)
    y = linear.materialize(x[1:])
    assert torch.equal(y, x[1:]) and y.data_ptr() == x[1:].data_ptr()
    fn = torch.compile(lambda x, w: (linear.materialize(x * 2)[:, None, :] * w).sum(-1), dynamic=False)
    w = torch.randn(5, 8)
    torch.testing.assert_close(fn(x, w), (x * 2) @ w.T, rtol=1e-5, atol=1e-5)
    # x * 2 gets a loop of its own that writes a buffer the reduction reads (one graph, no break);
    # without materialize it is recomputed inside the reduction's loop
    from torch._inductor.utils import run_and_get_code
    fused = torch.compile(lambda x, w: ((x * 2)[:, None, :] * w).sum(-1), dynamic=False)
    _, (code,) = run_and_get_code(fn, x, w)
    _, (fused_code,) = run_and_get_code(fused, x, w)
    assert code.count("for(") > fused_code.count("for(")


def _greedy_logits(model, prompt, steps, step_fn, length=32, static=True):
    """Logits of each greedy step, decoding with step_fn over a KV cache of `length` (eager prefill)."""
    cache = KVCache.for_model(model, 1, length, static=static)
    logits, out = None, []
    with torch.inference_mode():
        pos = torch.arange(len(prompt))[None]
        logits = model(torch.tensor([prompt]), pos, cache.step(pos))[:, -1]
        nxt = pos[:, -1:] + 1
        for _ in range(steps):
            out.append(logits)
            step = step_fn(model, logits.argmax(-1), nxt, cache, None)
            if step.greedy is not None:  # the AOT step picks inside its graph: the same as torch.argmax
                assert torch.equal(step.greedy, step.logits.argmax(-1))
            logits, nxt = step.logits, step.positions
    assert cache.length == len(prompt) + steps
    return torch.cat(out)


@pytest.mark.timeout(600)
def test_aot_decode_equals_eager_and_follows_replaced_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path))
    step = compiled.AOTStep(compiled.CompiledStep())
    model, other = tiny_model(seed=11), tiny_model(seed=12)  # same config: one package, two weight sets
    prompt = [3, 17, 42, 9, 100]
    eager = compiled.eager_step
    for m, length, static in ((model, 32, True), (other, 32, True), (model, 15, False), (model, 40, False)):
        # a whole-buffer cache or one that attends over its filled slots, of any length: one package
        torch.testing.assert_close(_greedy_logits(m, prompt, 10, step, length, static),
                                   _greedy_logits(m, prompt, 10, eager, length, static), rtol=1e-5, atol=1e-5)
    assert step.failed is None and len(list(tmp_path.glob("aot/*.pt2"))) == 1
    # parameters replaced (not updated in place): the next generation rebinds to the new tensors
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data * 0.5 + 0.01
    torch.testing.assert_close(_greedy_logits(model, prompt, 6, step), _greedy_logits(model, prompt, 6, eager),
                               rtol=1e-5, atol=1e-5)
    # through generate (compile=True is AOT on the CPU): same tokens as eager; the package is reused
    # from disk by a fresh step
    monkeypatch.setattr(compiled, "_aot", compiled.AOTStep(compiled.CompiledStep()))
    assert generate(model, prompt, max_tokens=12, compile=True).tokens == generate(model, prompt, max_tokens=12).tokens
    assert compiled._aot.failed is None and len(list(tmp_path.glob("aot/*.pt2"))) == 1
    # a damaged package is built again, not a reason to fall back
    (package,) = tmp_path.glob("aot/*.pt2")
    package.write_bytes(b"not a zip archive")
    monkeypatch.setattr(compiled, "_aot", compiled.AOTStep(compiled.CompiledStep()))
    assert generate(model, prompt, max_tokens=6, compile=True).tokens == generate(model, prompt, max_tokens=6).tokens
    assert compiled._aot.failed is None and package.stat().st_size > 1000
    # inductor fixes each kernel's thread count when it compiles it: another count gets its own package
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads == 1 else 1)
    try:
        torch.testing.assert_close(_greedy_logits(model, prompt, 6, step), _greedy_logits(model, prompt, 6, eager),
                                   rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
    assert step.failed is None and len(list(tmp_path.glob("aot/*.pt2"))) == 2
    # one new token needs no decode step: nothing is built for it
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path / "unused"))
    monkeypatch.setattr(compiled, "_aot", compiled.AOTStep(compiled.CompiledStep()))
    assert len(generate(other, prompt, max_tokens=1, compile=True).tokens) == 1
    assert not (tmp_path / "unused").exists()
    with pytest.raises(ValueError, match="compile must be"):
        compiled.decode_step("fast")


@pytest.mark.timeout(600)
def test_aot_step_keeps_the_cache_bookkeeping_past_a_sliding_window(monkeypatch, tmp_path):
    # the AOT graph records positions and masks itself (the loop runs no KVCache.step): past a rolling
    # buffer of 5 slots it overwrites the oldest and attends over all of them, as the eager step does
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path))
    step = compiled.AOTStep(compiled.CompiledStep())
    monkeypatch.setattr(compiled, "_aot", step)
    model = tiny_model(seed=9, sliding_window=5)
    prompt = [3, 17, 42]
    torch.testing.assert_close(_greedy_logits(model, prompt, 12, step, 32, False),
                               _greedy_logits(model, prompt, 12, compiled.eager_step, 32, False), rtol=1e-5, atol=1e-5)
    assert generate(model, prompt, max_tokens=12, compile=True).tokens == generate(model, prompt, max_tokens=12).tokens
    assert step.failed is None
    # sampling still draws from the step's logits (the graph's greedy pick is only used at temperature 0)
    hot = {"max_tokens": 8, "temperature": 1.0, "seed": 3}
    assert generate(model, prompt, compile=True, **hot).tokens == generate(model, prompt, **hot).tokens


def test_aot_failure_falls_back_to_torch_compile(monkeypatch, tmp_path):
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path))
    fallback_calls = []

    def fallback(model, *args):
        fallback_calls.append(1)
        return compiled.eager_step(model, *args)

    step = compiled.AOTStep(fallback)
    monkeypatch.setattr(compiled.torch.export, "export", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")))
    monkeypatch.setattr(compiled, "_aot", step)
    model = tiny_model(seed=6)
    with pytest.warns(UserWarning, match="AOT compilation of the decode step failed"):
        out = generate(model, [1, 2, 3], max_tokens=5, compile="aot")
    assert out.tokens == generate(model, [1, 2, 3], max_tokens=5).tokens
    assert step.failed.startswith("RuntimeError") and fallback_calls


def test_stale_packages_are_pruned(tmp_path):
    import os
    import time
    now, month = time.time(), 40 * 86400
    ages = {"step-aaaaaaaa-1.pt2": month,  # this code's: kept however old
            "step-bbbbbbbb-2.pt2": month,  # other code's, unused for 40 days: deleted
            "step-bbbbbbbb-3.pt2": 0,  # other code's, used today: kept
            "step-aaaaaaaa-4.123.pt2": 2 * 86400,  # a killed build's leftover: deleted
            "step-aaaaaaaa-5.456.pt2": 0,  # a build in progress: kept
            "notes.txt": month}
    for name, age in ages.items():
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (now - age, now - age))
    compiled.prune_stale_packages(tmp_path, "a" * 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt", "step-aaaaaaaa-1.pt2", "step-aaaaaaaa-5.456.pt2", "step-bbbbbbbb-3.pt2"]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_compiled_router_picks_what_topk_picks(k):
    # under compile the router's top-k is k fused max-reductions (no library topk call in the step)
    from smoe.model.transformer import route
    g = torch.Generator().manual_seed(k)
    x, w = torch.randn(5, 16, generator=g), torch.randn(8, 16, generator=g)
    got = torch.compile(route, fullgraph=True)(x, w, k)
    for a, b in zip(got, route(x, w, k)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
