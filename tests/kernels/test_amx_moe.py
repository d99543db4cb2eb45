"""smoe's fused MoE on AMX tiles (native.amx_moe, csrc/amx_moe.cpp): against float64 and the naive bf16 loop
over routings and shapes (empty experts, one expert taking every slot, several token blocks and hidden chunks),
its training form (amx_moe_keep) against the segment path's gradients, where grouped_moe takes them, and bad
inputs; the backward's weight gradients on AMX tiles (amx_segment_wgrad) against float64 and the library's
products. Runs on CPUs with AMX-BF16 (Sapphire Rapids and later); elsewhere only the build is checked
(test_native.py builds every instruction set)."""

from __future__ import annotations

import unittest.mock

import pytest
import torch

from smoe.kernels import grouped as G
from smoe.kernels import native
from smoe.kernels.naive import naive_moe
from tests.conftest import num_threads
from tests.kernels import moe_cases


@pytest.fixture(autouse=True)
def amx_kernel():
    if not native.amx():
        pytest.skip("needs a CPU with AMX-BF16 and a C++ compiler that builds for it")


def make(N, D, H, E, K, seed=0, skew=False):
    return moe_cases.make(N, D, H, E, K, seed=seed, skew=skew, dtype=torch.bfloat16)


@pytest.mark.parametrize("N,D,H,E,K,skew", [
    (1, 32, 32, 8, 2, False),      # one token: most experts empty
    (17, 64, 96, 8, 2, False),     # token tiles of 16 with a remainder
    (40, 64, 96, 4, 4, False),     # top-4
    (33, 32, 64, 8, 1, False),     # top-1
    (300, 64, 96, 8, 2, True),     # two experts take every slot: blocks of 256 tokens and a remainder
    (24, 128, 2080, 3, 2, False),  # hidden dim in chunks of 1024 and a remainder of 32
    (600, 512, 1056, 2, 2, True),  # weights past 2 MB per expert: blocks of 512 tokens and a remainder
])
def test_within_the_naive_loops_bf16_error(N, D, H, E, K, skew):
    # The op sums bf16 products in fp32, rounds h = silu(a1) * a3 once to bf16 and the output once; the naive loop
    # rounds a1, a3, silu, h, each expert's output and the running sum. Bound: the naive loop's own error against
    # float64, plus one bf16 rounding of the output's scale.
    x, w1, w2, w3, experts, weights = args = make(N, D, H, E, K, seed=N + H, skew=skew)
    y = native.amx_moe(*args)
    assert y.shape == (N, D) and y.dtype == torch.bfloat16
    ref = naive_moe(*(t.double() for t in (x, w1, w2, w3)), experts, weights.double())
    naive_err = (naive_moe(x, w1, w2, w3, experts, weights.bfloat16()).double() - ref).abs().max()
    assert (y.double() - ref).abs().max() <= naive_err + 2**-8 * ref.abs().max()
    # a token's output does not depend on the other tokens computed with it
    assert torch.equal(y[-1:], native.amx_moe(x[-1:], w1, w2, w3, experts[-1:], weights[-1:]))


def test_float64_formula_with_h_rounded_once():
    # the same computation in float64, h rounded to bf16 where the op rounds it: equal to within the fp32 sums
    # (and the odd h that such a difference rounds the other way) and the one rounding of the output
    x, w1, w2, w3, experts, weights = make(50, 64, 128, 4, 2, seed=7)
    y = native.amx_moe(x, w1, w2, w3, experts, weights).double()
    ref = torch.zeros(50, 64, dtype=torch.float64)
    for n in range(50):
        for k in range(2):
            e = experts[n, k]
            a1, a3 = w1[e].double() @ x[n].double(), w3[e].double() @ x[n].double()
            h = (torch.nn.functional.silu(a1) * a3).bfloat16().double()
            ref[n] += weights[n, k].double() * (w2[e].double() @ h)
    scale = ref.abs().max()
    assert (y - ref).abs().max() <= 2**-8 * scale
    assert (y - ref).abs().mean() <= 2**-11 * scale


@pytest.mark.parametrize("N,D,H,E,K,skew", [(17, 64, 96, 8, 2, False), (300, 64, 96, 8, 2, True),
                                          (24, 128, 2080, 3, 2, False)])
def test_keep_hands_back_the_pre_activations_in_sorted_slot_order(N, D, H, E, K, skew):
    x, w1, w2, w3, experts, weights = args = make(N, D, H, E, K, seed=N + 1, skew=skew)
    out, a1, a3 = native.amx_moe_keep(*args)
    assert torch.equal(out, native.amx_moe(*args))
    assert a1.shape == a3.shape == (N * K, H) and a1.dtype == torch.bfloat16
    token_S, _, counts = G.sort_by_expert(experts, E)
    expert_S = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    xs = x[token_S].double()
    for got, w in ((a1, w1), (a3, w3)):
        exact = torch.einsum("sd,shd->sh", xs, w[expert_S].double())
        mass = torch.einsum("sd,shd->sh", xs.abs(), w[expert_S].double().abs())
        # fp32 sums of exact products, rounded once to bf16
        assert ((got.double() - exact).abs() <= 2**-8 * exact.abs() + D * 2**-24 * mass + 1e-30).all()


@pytest.mark.parametrize("H", [96, 160, 1056])
def test_keep_is_the_same_on_any_split_of_hidden_tiles(H):
    # pairs of hidden tiles write whole lines of a1 and a3; a thread's range may start or end at an odd tile
    args = make(40, 64, H, 4, 2, seed=H)
    with num_threads(1):
        one = native.amx_moe_keep(*args)
    with num_threads(2):
        two = native.amx_moe_keep(*args)
    assert all(torch.equal(p, q) for p, q in zip(one, two))


@pytest.mark.parametrize("N,D,H,E,K,skew", [
    (300, 64, 96, 8, 2, True),     # two experts with every slot: shares of 300 slots, blocks of 256 and remainders
    (600, 512, 1056, 2, 2, True),  # weights past 2 MB per expert: each share in blocks of 512
    (400, 64, 2080, 4, 2, False),  # about 200 slots per expert, at the edge of a split; hidden chunks of 1024 and 32
])
def test_the_same_sums_when_the_threads_split_an_experts_slots(N, D, H, E, K, skew):
    # on 2 threads an expert with at least 2 x 96 slots is split by slots (each thread runs its share through both
    # products), fewer by hidden rows and output columns; every slot's sums are the same either way
    args = make(N, D, H, E, K, seed=N + H, skew=skew)
    counts = torch.bincount(args[4].reshape(-1), minlength=E)
    assert counts.max() >= 2 * 96
    with num_threads(1):
        one = native.amx_moe_keep(*args)
    with num_threads(2):
        two = native.amx_moe_keep(*args)
        assert torch.equal(two[0], native.amx_moe(*args))
    assert all(torch.equal(p, q) for p, q in zip(one, two))


def test_grouped_training_forward_takes_keep_with_the_segment_paths_gradients(monkeypatch):
    from tests.kernels.test_kernel_backends import run_with_grads
    args = make(64, 64, 96, 8, 2, seed=3)
    with unittest.mock.patch.object(native, "amx_moe_keep", wraps=native.amx_moe_keep) as op:
        y0, g0 = run_with_grads(G.grouped_moe, *args)
        assert op.call_count == 1
    monkeypatch.setattr(G, "amx_serves", lambda *t: False)
    y1, g1 = run_with_grads(G.grouped_moe, *args)
    # the two forwards round h (once here, after bf16 a1 and a3 there) and the output differently: a few bf16 steps
    tol = 2**-6
    assert (y0.double() - y1.double()).abs().max() <= tol * y1.double().abs().max()
    for a, b in zip(g0, g1):
        assert (a.double() - b.double()).abs().max() <= tol * b.double().abs().max() + 1e-6


def test_grouped_takes_it_from_two_slots_per_expert():
    x, w1, w2, w3, experts, weights = make(8, 64, 96, 8, 2)  # 16 slots = 2 per expert
    with unittest.mock.patch.object(native, "amx_moe", wraps=native.amx_moe) as op:
        with torch.no_grad():
            G.grouped_moe(x, w1, w2, w3, experts, weights)
            assert op.call_count == 1
            G.grouped_moe(x[:7], w1, w2, w3, experts[:7], weights[:7])  # 14 slots: native_moe
            assert op.call_count == 1
            G.grouped_moe(x.float(), w1.float(), w2.float(), w3.float(), experts, weights)  # fp32: not AMX
            odd = make(8, 48, 96, 8, 2)  # dim not a multiple of 32
            G.grouped_moe(*odd)
            assert op.call_count == 1
        xg = x.clone().requires_grad_()
        with unittest.mock.patch.object(native, "amx_moe_keep", wraps=native.amx_moe_keep) as keep:
            G.grouped_moe(xg, w1, w2, w3, experts, weights).float().sum().backward()  # training: amx_moe_keep
        assert op.call_count == 1 and keep.call_count == 1 and xg.grad is not None


def test_bad_inputs_are_named():
    x, w1, w2, w3, experts, weights = make(4, 64, 96, 4, 2)
    with pytest.raises(ValueError, match=r"expert index 4 out of range \[0, 4\)"):
        native.amx_moe(x, w1, w2, w3, experts + 2, weights)
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        native.amx_moe(x.float(), w1, w2, w3, experts, weights)
    with pytest.raises(RuntimeError, match="multiples of 32, got 48 and 96"):
        native.amx_moe(x[:, :48], w1[..., :48], w2[:, :48], w3[..., :48], experts, weights)
    with pytest.raises(RuntimeError, match=r"w2 \(E, D, H\)"):
        native.amx_moe(x, w1, w2.transpose(1, 2), w3, experts, weights)


@pytest.mark.parametrize("counts,M,N", [
    ([0, 5, 33, 64, 1], 96, 64),  # empty experts, runs of a chunk's remainder, one and several 32-row chunks
    ([130], 64, 32),              # one expert takes every row
    ([7, 0, 40], 32, 96),         # a narrower than b (w2's gradient)
    ([300, 17], 1024, 64),        # one expert with most rows: its 32 x 32 output blocks split across the threads
])
@pytest.mark.parametrize("threads", [1, 2])  # on 2, the first and third cases take whole experts per thread
def test_segment_wgrad_against_float64(counts, M, N, threads):
    g = torch.Generator().manual_seed(sum(counts) + M)
    a, b = torch.randn(sum(counts), M, generator=g).bfloat16(), torch.randn(sum(counts), N, generator=g).bfloat16()
    with num_threads(threads):
        got = native.amx_segment_wgrad(a, b, counts)
    with num_threads(3 - threads):
        assert torch.equal(got, native.amx_segment_wgrad(a, b, counts))  # the same sums on any number of threads
    assert got.shape == (len(counts), M, N) and got.dtype == torch.bfloat16
    lo = 0
    for e, c in enumerate(counts):
        ar, br = a[lo:lo + c].double(), b[lo:lo + c].double()
        exact, mass = ar.t() @ br, ar.abs().t() @ br.abs()
        # fp32 sums of exact products, rounded once to bf16
        assert ((got[e].double() - exact).abs() <= 2**-8 * exact.abs() + c * 2**-24 * mass + 1e-30).all(), e
        lo += c


def test_grouped_backward_takes_it_with_the_librarys_gradients(monkeypatch):
    from tests.kernels.test_kernel_backends import run_with_grads
    args = make(200, 64, 96, 8, 2, seed=5)
    with unittest.mock.patch.object(native, "amx_segment_wgrad", wraps=native.amx_segment_wgrad) as op:
        y0, g0 = run_with_grads(G.grouped_moe, *args)
        assert op.call_count == 3  # dL/dw1, dL/dw2, dL/dw3
    monkeypatch.setattr(G, "amx_wgrad_takes", lambda *t: False)
    y1, g1 = run_with_grads(G.grouped_moe, *args)
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):  # the same fp32 sums in another order, rounded once: a bf16 step at most
        assert (a.double() - b.double()).abs().max() <= 2**-7 * b.double().abs().max() + 1e-6


def test_segment_wgrad_bad_inputs_are_named():
    a, b = torch.randn(10, 64).bfloat16(), torch.randn(10, 32).bfloat16()
    with pytest.raises(ValueError, match="counts sum to 9, a and b have 10 rows"):
        native.amx_segment_wgrad(a, b, [4, 5])
    with pytest.raises(ValueError, match="negative count -1"):
        native.amx_segment_wgrad(a, b, [11, -1])
    with pytest.raises(RuntimeError, match="multiples of 32, got 48 and 32"):
        native.amx_segment_wgrad(a[:, :48], b, [10])
    with pytest.raises(RuntimeError, match=r"bfloat16 CPU tensors, got \[10, 64\] Float"):
        native.amx_segment_wgrad(a.float(), b, [10])


def test_probe_times_tile_products_and_names_bad_input():
    from smoe.kernels.timing import amx_ns_per_product
    rates = [native.amx_probe_ns(4096) for _ in range(3)]
    assert all(0 < r < 1e5 for r in rates)  # nanoseconds per product: about 6 on a free unit, 20-30 shared
    assert amx_ns_per_product() > 0 and amx_ns_per_product("meta") is None
    with pytest.raises(ValueError, match="at least 8 products"):
        native.amx_probe_ns(4)

