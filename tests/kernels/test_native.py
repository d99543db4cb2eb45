"""smoe's own bf16 CPU kernels (smoe.kernels.native): against float64, in the linears and the compiled
decode step that use them, and the fallback to torch's code when they cannot be built."""

from __future__ import annotations

import unittest.mock

import pytest
import torch
import torch.nn.functional as F

from smoe.generation import compiled
from smoe.kernels import linear, native
from smoe.model.attention import KVCache
from tests.conftest import tiny_model


@pytest.fixture
def native_kernel():
    """Skips where the kernel cannot load; asked for at run time, once the session's temporary SMOE_CACHE is
    set (at collection the build would go to the user's cache)."""
    if not native.available():
        pytest.skip("needs an x86 CPU with AVX512-BF16 and a C++ compiler")


needs_native = pytest.mark.usefixtures("native_kernel")
U = 2.0**-8  # bf16 unit roundoff
F32 = 2.0**-24


def _bound(x, w, out_rounding: float) -> torch.Tensor:
    """|computed - exact| for products summed in fp32 (each product exact), then rounded by out_rounding."""
    exact = x.double() @ w.double().t()
    mass = x.double().abs() @ w.double().abs().t()
    return exact, out_rounding * exact.abs() + x.shape[-1] * F32 * mass * (1 + out_rounding) + 1e-30


@needs_native
@pytest.mark.parametrize("M", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("I", [32, 100, 256, 1000])
@pytest.mark.parametrize("O", [1, 37, 300])
def test_gemv_within_the_fp32_sum_bound_and_one_rounding(M, I, O):
    g = torch.Generator().manual_seed(M * 1000 + I + O)
    x, w = torch.randn(M, I, generator=g).bfloat16(), torch.randn(O, I, generator=g).bfloat16()
    y = native.gemv(x, w)
    assert y.shape == (M, O) and y.dtype == torch.bfloat16
    exact, bound = _bound(x, w, U)
    assert ((y.double() - exact).abs() <= bound).all()
    # torch's bf16 product rounds the same sum once: at most one bf16 step apart
    assert ((y.double() - F.linear(x, w).double()).abs() <= 2 * bound).all()


@needs_native
def test_gemv_takes_strided_and_batched_rows():
    x, w = torch.randn(2, 3, 64).bfloat16(), torch.randn(24, 64).bfloat16()
    assert torch.equal(native.gemv(x, w), native.gemv(x.reshape(6, 64), w).view(2, 3, 24))
    xs = torch.randn(5, 128).bfloat16()[:, ::2]  # a non-contiguous view
    assert torch.equal(native.gemv(xs, w), native.gemv(xs.contiguous(), w))


@needs_native
@pytest.mark.parametrize("shared", [True, False])
def test_expert_gemv_equals_each_experts_product(shared):
    g = torch.Generator().manual_seed(3)
    N, K, E, O, I = 5, 2, 4, 40, 96
    w = torch.randn(E, O, I, generator=g).bfloat16()
    experts = torch.randint(0, E, (N, K), generator=g)
    x = torch.randn(N, 1 if shared else K, I, generator=g).bfloat16()
    y = native.expert_gemv(x, w, experts)
    assert y.shape == (N, K, O) and y.dtype == torch.float32
    for n in range(N):
        for k in range(K):
            xk = x[n, 0 if shared else k][None]
            exact, bound = _bound(xk, w[experts[n, k]], 0.0)
            assert ((y[n, k].double() - exact[0]).abs() <= bound[0]).all()


@needs_native
def test_bad_inputs_are_named():
    w = torch.randn(3, 8, 32).bfloat16()
    with pytest.raises(RuntimeError, match="expert id 3 outside 0..2"):
        native.expert_gemv(torch.randn(1, 1, 32).bfloat16(), w, torch.tensor([[0, 3]]))
    with pytest.raises(RuntimeError, match="x must be a bfloat16 CPU tensor"):
        native.gemv(torch.randn(1, 32), w[0])
    with pytest.raises(RuntimeError, match=r"x \(M, I\) and w \(O, I\)"):
        native.gemv(torch.randn(1, 16).bfloat16(), w[0])


@needs_native
def test_linear_takes_the_kernel_for_few_bf16_rows_only():
    w = torch.randn(300, 64).bfloat16()
    for M in (1, linear.NATIVE_MAX_ROWS):
        x = torch.randn(M, 64).bfloat16()
        assert torch.equal(linear.linear(x, w), native.gemv(x, w))
        out = torch.empty(M, 300, dtype=torch.bfloat16)
        assert torch.equal(linear.mm_into(x, w, out), native.gemv(x, w))
    x = torch.randn(linear.NATIVE_MAX_ROWS + 1, 64).bfloat16()
    assert torch.equal(linear.linear(x, w), F.linear(x, w))
    with native.disabled():  # as SMOE_NATIVE=0, for side-by-side benchmarks
        assert torch.equal(linear.linear(x[:1], w), F.linear(x[:1], w))
    assert native.available()
    # with a gradient to record, torch's code
    wg = w.float().requires_grad_()
    assert linear.linear(torch.randn(1, 64), wg).requires_grad


def _forced_logits(model, prompts: torch.Tensor, tokens: torch.Tensor, step_fn, pad: int = 0) -> torch.Tensor:
    """Logits (steps, B, V) of decode steps fed tokens (steps, B) after an eager prefill of prompts (B, T),
    so two step functions see the same inputs; the last row left-padded by `pad` columns."""
    cache = KVCache.for_model(model, prompts.shape[0], 32)
    out = []
    with torch.inference_mode():
        valid = torch.ones(prompts.shape, dtype=torch.bool)
        valid[-1, :pad] = False
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        model(prompts, pos, cache.step(pos, valid if pad else None))
        nxt = pos[:, -1:] + 1
        for t in tokens:
            step = step_fn(model, t, nxt, cache, None)
            out.append(step.logits.float())
            nxt = step.positions
    return torch.stack(out)


@needs_native
@pytest.mark.timeout(600)
@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_bf16_decode_calls_the_kernel_and_matches_eager(monkeypatch, tmp_path, batch):
    # the compiled step's linears of up to 8 rows and its MoE run the native ops, in torch.compile and in
    # the AOT package alike; eager decode uses the same kernel for its few rows. bf16 activations are
    # rounded at other places than eagerly: logits within a few bf16 steps (1 measured). The batch's
    # last prompt is left-padded: its padding slots stay masked in every step
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path))
    from torch._inductor.utils import run_and_get_code
    model = tiny_model(seed=5).to(torch.bfloat16)
    g = torch.Generator().manual_seed(batch)
    prompts, tokens = torch.randint(0, 128, (batch, 5), generator=g), torch.randint(0, 128, (10, batch), generator=g)
    pad = 2 if batch > 1 else 0
    eager = _forced_logits(model, prompts, tokens, compiled.eager_step, pad)
    tol = 4 * U * eager.abs().max().item()
    jit, aot = compiled.CompiledStep(), compiled.AOTStep(compiled.CompiledStep())
    torch._dynamo.reset()
    logits, codes = run_and_get_code(_forced_logits, model, prompts, tokens, jit, pad)
    code = "\n".join(codes)
    assert "smoe_native.gemv" in code and "smoe_native.expert_gemv" in code and jit.failed is None
    torch.testing.assert_close(logits, eager, rtol=0, atol=tol)
    torch.testing.assert_close(_forced_logits(model, prompts, tokens, aot, pad), eager, rtol=0, atol=tol)
    assert aot.failed is None and len(list(tmp_path.glob("aot/*.pt2"))) == 1


@needs_native
def test_bf16_batches_up_to_the_kernels_rows_decode_compiled():
    bf16, f32 = torch.bfloat16, torch.float32
    assert compiled.decode_step(True, "cpu", linear.NATIVE_MAX_ROWS, bf16) is compiled._aot
    assert compiled.decode_step("jit", "cpu", 2, bf16) is compiled._compiled
    assert compiled.decode_step(True, "cpu", linear.NATIVE_MAX_ROWS + 1, bf16) is compiled.eager_step
    assert compiled.decode_step(True, "cpu", 2, f32) is compiled.eager_step
    with native.disabled():
        assert compiled.decode_step(True, "cpu", 2, bf16) is compiled.eager_step


def test_unbuildable_kernels_warn_once_and_torch_code_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("SMOE_CACHE", str(tmp_path))
    monkeypatch.setitem(native._state, "loaded", None)
    monkeypatch.setattr(native, "cpu_has_avx512_bf16", lambda: True)
    monkeypatch.setattr(native, "_build_command", lambda out: ["false"])
    with pytest.warns(UserWarning, match="bf16 CPU kernels are unavailable"):
        assert not native.available()
    assert not native.available() and not list(tmp_path.glob("native/*"))  # tried once, nothing left behind
    x, w = torch.randn(2, 64).bfloat16(), torch.randn(30, 64).bfloat16()
    assert torch.equal(linear.linear(x, w), F.linear(x, w))
    monkeypatch.setitem(native._state, "loaded", None)
    monkeypatch.setenv("SMOE_NATIVE", "0")
    assert not native.available()


@needs_native
@pytest.mark.parametrize("N,skew", [(1, False), (7, False), (16, True), (32, False)])
def test_grouped_bf16_inference_takes_the_kernel_within_naive_error(N, skew):
    # few token-slots of bf16 inference (up to 8 per expert on average): grouped_moe is native_moe (each
    # touched expert read once per 8 of its slots; skew: one expert takes all 32 slots), within the bf16
    # bound of the naive loop; beyond, the sorted per-expert products
    from smoe.kernels import grouped as G
    from smoe.kernels.naive import naive_moe
    g = torch.Generator().manual_seed(N)
    D, H, E, K = 64, 96, 8, 2
    x = torch.randn(N, D, generator=g).bfloat16()
    w1, w3 = (torch.randn(E, H, D, generator=g).bfloat16() * 0.2 for _ in range(2))
    w2 = torch.randn(E, D, H, generator=g).bfloat16() * 0.2
    experts = torch.zeros(N, K, dtype=torch.long) if skew else torch.rand(N, E, generator=g).topk(K, -1).indices
    weights = torch.softmax(torch.randn(N, K, generator=g), -1).bfloat16()
    args = (x, w1, w2, w3, experts, weights)
    y = G.grouped_moe(*args)
    assert torch.equal(y, G.native_moe(*args))
    if N == 32:  # 64 slots of 8 experts: the limit; one token more and the library's products run
        more = (torch.cat([x, x[:1]]), w1, w2, w3, torch.cat([experts, experts[:1]]), torch.cat([weights, weights[:1]]))
        with unittest.mock.patch.object(G, "native_moe", side_effect=AssertionError("not past the limit")):
            G.grouped_moe(*more)
    ref = naive_moe(*(t.double() for t in (x, w1, w2, w3)), experts, weights.double())
    naive_err = (naive_moe(*args).double() - ref).abs().max()
    assert (y.double() - ref).abs().max() <= 2 * naive_err + U * ref.abs().max()
