"""The grouped CPU backend against the naive loop and a float64 formula: forward and every gradient, over
shapes and routings (hypothesis), both routing sorts (Python at decode sizes, tensor ops beyond), bf16,
the compile-friendly gather formulation, and bad expert ids."""

from __future__ import annotations

import unittest.mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smoe.kernels import grouped as G
from smoe.kernels import linear as L
from smoe.kernels import moe_experts
from smoe.kernels.naive import naive_moe


def make(N, D, H, E, K, seed=0, dtype=torch.float32, pool=None):
    """Random expert weights and a routing; pool < E restricts the choice to the first pool experts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w1 = torch.randn(E, H, D, generator=g) / D**0.5
    w2 = torch.randn(E, D, H, generator=g) / H**0.5
    w3 = torch.randn(E, H, D, generator=g) / D**0.5
    weights = torch.softmax(torch.randn(N, K, generator=g), -1)
    experts = torch.stack([torch.randperm(pool or E, generator=g)[:K] for _ in range(N)]).reshape(N, K)
    return [t.to(dtype) for t in (x, w1, w2, w3)] + [experts, weights.to(dtype)]


def run_with_grads(fn, x, w1, w2, w3, experts, weights):
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2, w3, weights)]
    y = fn(*leaves[:4], experts, leaves[4])
    g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * g).sum().backward()
    return y.detach(), [t.grad for t in leaves]


def assert_same_as_naive(args, tol=1e-5):
    # tol of each tensor's scale where that passes 1: a weight's gradient sums one product per token, and at 73 tokens
    # on one expert (H 1) w3's reached 65, where 1.1e-5 is 3 fp32 steps (hypothesis found it; either sum order is exact
    # to those steps)
    y0, g0 = run_with_grads(naive_moe, *args)
    y1, g1 = run_with_grads(G.grouped_moe, *args)
    assert (y0 - y1).abs().max() <= tol * max(1.0, y0.abs().max().item())
    for name, a, b in zip(("x", "w1", "w2", "w3", "weights"), g0, g1):
        assert a.shape == b.shape, name
        assert (a - b).abs().max() <= tol * max(1.0, a.abs().max().item()), name


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 80), D=st.integers(1, 24), H=st.integers(1, 24), E=st.integers(1, 9),
       K=st.integers(1, 4), seed=st.integers(0, 2**16), skew=st.booleans())
def test_property_forward_and_gradients_equal_naive(N, D, H, E, K, seed, skew):
    # N*K crosses PYTHON_SORT_MAX_SLOTS, so both sorts are drawn; skew leaves most experts empty
    K = min(K, E)
    assert_same_as_naive(make(N, D, H, E, K, seed, pool=K if skew else None))


@pytest.mark.parametrize("N", [1, 3, 32, 33, 200])  # Python sort up to 64 slots, tensor sort beyond
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_every_top_k_on_both_sorts(N, K):
    assert_same_as_naive(make(N, 12, 20, 6, K, seed=N + K))


@pytest.mark.parametrize("segment_op", [True, False])
@pytest.mark.parametrize("N, K, H, pool", [(1, 2, 20, None), (40, 2, 20, None), (200, 2, 20, 3), (300, 4, 4200, None)])
def test_inference_paths_equal_naive(N, K, H, pool, segment_op, monkeypatch):
    # no autograd, smoe's fused fp32 op off (test_f32_moe.py has it): the shared-buffer forward below
    # PER_EXPERT_MIN_SLOTS slots; from it native.segment_mm's products into the buffer, or expert by expert where the op
    # does not serve (with empty experts when pool < E); oneDNN's products for the 4200 x 64 weights
    monkeypatch.setattr(G, "f32_fused_takes", lambda *args, **kwargs: False)
    if not segment_op:
        monkeypatch.setattr(G.native, "segment_mm_serves", lambda xs, ws: False)
    x, w1, w2, w3, experts, weights = make(N, 64, H, 6, K, seed=N, pool=pool)
    watch = unittest.mock.patch.object(G, "_forward_per_expert", wraps=G._forward_per_expert)
    with torch.no_grad(), watch as per_expert:
        ref = naive_moe(x, w1, w2, w3, experts, weights)
        out = G.grouped_moe(x, w1, w2, w3, experts, weights)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    many = N * K >= G.PER_EXPERT_MIN_SLOTS and N * K > G.native.max_rows(x.dtype) * 6
    assert per_expert.called == (many and not G.segment_op_takes(N * K, x, w1))


def test_one_expert_takes_every_token_and_the_rest_are_empty():
    x, w1, w2, w3, _, weights = make(70, 8, 16, 5, 2)
    experts = torch.tensor([[4, 0]] * 70)
    assert_same_as_naive([x, w1, w2, w3, experts, weights])


def test_sorts_agree():
    g = torch.Generator().manual_seed(0)
    experts = torch.randint(0, 8, (30, 2), generator=g)
    small = G.sort_by_expert(experts, 8)
    old, G.PYTHON_SORT_MAX_SLOTS = G.PYTHON_SORT_MAX_SLOTS, 0
    try:
        big = G.sort_by_expert(experts, 8)
    finally:
        G.PYTHON_SORT_MAX_SLOTS = old
    assert torch.equal(small[0], big[0]) and torch.equal(small[1], big[1]) and small[2] == big[2]


def test_float64_formula():
    x, w1, w2, w3, experts, weights = make(7, 10, 14, 4, 2, dtype=torch.float64)
    y = G.grouped_moe(x, w1, w2, w3, experts, weights)
    ref = torch.zeros_like(y)
    for n in range(7):
        for k in range(2):
            e = experts[n, k]
            ref[n] += weights[n, k] * (w2[e] @ (torch.nn.functional.silu(w1[e] @ x[n]) * (w3[e] @ x[n])))
    assert (y - ref).abs().max() <= 1e-12


@pytest.mark.parametrize("N", [1, 5, 300])
@pytest.mark.parametrize("as_fp32", [False, True])
def test_bfloat16_within_naive_bfloat16_error(N, as_fp32, monkeypatch):
    # Both round the expert hidden and output to bf16 at the same places; grouped may additionally
    # round the router weight into h before w2. Bound: twice the naive loop's own bf16 error against
    # float64, plus one bf16 ulp of the output scale. as_fp32: products (and the backward) in fp32, as on
    # CPUs without bf16 instructions (smoe.kernels.linear.BF16_AS_FP32), else torch's bf16 products; at 300
    # tokens grouped's forward then stays in fp32 up to its output (native.segment_mm), fewer roundings.
    monkeypatch.setattr(L, "BF16_AS_FP32", as_fp32)
    args = make(N, 32, 48, 8, 2, seed=3, dtype=torch.bfloat16)
    x, w1, w2, w3, experts, weights = args
    ref = naive_moe(*(t.double() for t in (x, w1, w2, w3)), experts, weights.double())
    err = (G.grouped_moe(*args).double() - ref).abs().max()
    naive_err = (naive_moe(*args).double() - ref).abs().max()
    assert err <= 2 * naive_err + 2**-8 * ref.abs().max()
    # and the bf16 gradients agree with the naive loop's within the same kind of bound
    y0, g0 = run_with_grads(naive_moe, *args)
    y1, g1 = run_with_grads(G.grouped_moe, *args)
    for a, b in zip(g0, g1):
        assert (a.double() - b.double()).abs().max() <= 2**-6 * a.double().abs().max() + 1e-3


def test_gather_formulation_equals_naive():
    for N, K in [(1, 2), (4, 2), (3, 4)]:
        x, w1, w2, w3, experts, weights = make(N, 16, 24, 8, K, seed=N)
        y = G.gathered_moe(x, w1, w2, w3, experts, weights)
        assert (y - naive_moe(x, w1, w2, w3, experts, weights)).abs().max() <= 1e-5


def test_frozen_weights_get_no_gradient_and_input_still_does():
    x, w1, w2, w3, experts, weights = make(40, 8, 12, 4, 2)
    xr = x.clone().requires_grad_()
    G.grouped_moe(xr, w1, w2, w3, experts, weights).sum().backward()
    xn = x.clone().requires_grad_()
    naive_moe(xn, w1, w2, w3, experts, weights).sum().backward()
    assert (xr.grad - xn.grad).abs().max() <= 1e-5


def test_no_tokens_and_bad_expert_ids():
    x, w1, w2, w3, experts, weights = make(6, 8, 12, 4, 2)
    assert moe_experts(x[:0], w1, w2, w3, experts[:0], weights[:0], backend="grouped").shape == (0, 8)
    bad = experts.clone()
    bad[2, 1] = 4
    with pytest.raises(ValueError, match="out of range"):
        G.grouped_moe(x, w1, w2, w3, bad, weights)
    big = torch.cat([experts] * 20)
    big[7, 0] = 9
    with pytest.raises(ValueError, match="out of range"):
        G.grouped_moe(torch.cat([x] * 20), w1, w2, w3, big, torch.cat([weights] * 20))


def test_model_training_step_matches_naive():
    from tests.conftest import tiny_model
    grads = []
    for backend in ("naive", "grouped"):
        model = tiny_model(seed=3).train()
        model.set_moe_backend(backend)
        tokens = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(1))
        logits = model(tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert (grads[0][name] - grads[1][name]).abs().max() <= 1e-5, name


def test_all_experts_formulation_equals_naive():
    for N, K in [(1, 2), (8, 2), (5, 3)]:
        x, w1, w2, w3, experts, weights = make(N, 16, 24, 6, K, seed=N)
        y = G.all_experts_moe(x, w1, w2, w3, experts, weights)
        assert (y - naive_moe(x, w1, w2, w3, experts, weights)).abs().max() <= 1e-5


def test_unknown_backend_is_named():
    from smoe.kernels import get_backend
    with pytest.raises(ValueError, match="unknown MoE backend 'fast'"):
        get_backend("fast")


@pytest.mark.parametrize("backend", ["naive", "grouped"])
def test_experts_run_in_the_autocast_dtype(backend):
    # fp32 parameters under CPU bf16 autocast: the experts compute in bf16, as autocast's linear layers do (its casts
    # never reach the backends' own products), and the gradients reach the fp32 tensors in fp32
    x, w1, w2, w3, experts, weights = make(40, 64, 96, 8, 2, seed=7)
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2, w3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe_experts(*leaves, experts, weights, backend)
    assert y.dtype == torch.bfloat16
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    by_hand = [t.bfloat16().requires_grad_() for t in (x, w1, w2, w3)]
    y_bf16 = moe_experts(*by_hand, experts, weights.bfloat16(), backend)
    (y_bf16.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    assert torch.equal(y, y_bf16)
    for a, b in zip(leaves, by_hand):
        assert a.grad.dtype == torch.float32 and torch.equal(a.grad, b.grad.float())
