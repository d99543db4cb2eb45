"""Every MoE backend against the naive loop: outputs and gradients, including odd routings."""

import pytest
import torch

from smoe.kernels import BACKENDS, get_backend, moe_experts

CPU_BACKENDS = [b for b in BACKENDS if b not in ("naive", "triton")]


def make(N=37, D=16, H=24, E=6, K=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w1 = torch.randn(E, H, D, generator=g) / D**0.5
    w2 = torch.randn(E, D, H, generator=g) / H**0.5
    w3 = torch.randn(E, H, D, generator=g) / D**0.5
    weights = torch.softmax(torch.randn(N, K, generator=g), -1)
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    return [t.to(dtype) for t in (x, w1, w2, w3)] + [experts, weights.to(dtype)]


def routings(N, E, K):
    g = torch.Generator().manual_seed(1)
    yield "random", torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    yield "some experts empty", torch.stack([torch.randperm(2, generator=g)[:K] for _ in range(N)]) + 1
    every = torch.stack([torch.tensor([3] + [e for e in range(E) if e != 3][: K - 1]) for _ in range(N)])
    yield "one expert takes every token", every
    one = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(N)])
    one[5] = torch.tensor([E - 1] + one[5, 1:].tolist())  # the last expert gets exactly one token
    yield "one expert gets one token", one


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("K", [1, 2])
def test_forward_and_grad_equal_naive(backend, K):
    x, w1, w2, w3, _, weights = make(K=K)
    for name, experts in routings(x.shape[0], w1.shape[0], K):
        outs, grads = [], []
        for b in ("naive", backend):
            leaves = [t.clone().requires_grad_() for t in (x, w1, w2, w3, weights)]
            y = moe_experts(*leaves[:4], experts, leaves[4], backend=b)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            outs.append(y.detach())
            grads.append([t.grad for t in leaves])
        assert (outs[0] - outs[1]).abs().max() <= 1e-5, name
        for g0, g1 in zip(*grads):
            assert (g0 - g1).abs().max() <= 1e-5, name


def test_naive_equals_float64_formula():
    x, w1, w2, w3, experts, weights = make(N=5, K=2)
    y = get_backend("naive")(x, w1, w2, w3, experts, weights).double()
    ref = torch.zeros_like(y)
    for n in range(5):
        for k in range(2):
            e = experts[n, k]
            xd = x[n].double()
            h = torch.nn.functional.silu(w1[e].double() @ xd) * (w3[e].double() @ xd)
            ref[n] += weights[n, k].double() * (w2[e].double() @ h)
    assert (y - ref).abs().max() <= 1e-5


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown MoE backend 'fast'"):
        get_backend("fast")
