"""smoe's fused fp32 MoE (native.f32_moe, csrc/f32_moe.cpp): against float64 and the naive fp32 loop over routings and
shapes (empty experts, one expert taking every slot, blocks of 128 tokens and a remainder, hidden chunks, blocks'
last tokens as rows), on 1 and 2 threads (an expert's slots split between them), its training form (f32_moe_keep)
against float64 and the segment path's gradients, where grouped_moe takes them, and bad inputs; the backward's fp32
weight gradients (f32_segment_wgrad) against float64 and the library. Runs where the "amx" build (Xeons with AMX:
csrc/f32_moe.cpp, 16 lanes) or the "avx2" one (csrc/f32_moe_avx2.cpp, 8 lanes, no block tails as rows and no weight
gradients) loads; elsewhere only the build is checked (test_native.py builds every instruction set)."""

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
def f32_kernel():
    if not native.f32_fused():
        pytest.skip("needs the kernels' amx or avx2 build (an x86-64 CPU and a C++ compiler that builds for it)")


needs_amx = pytest.mark.skipif("not native.amx()", reason="f32_segment_wgrad is in the amx build only")


def make(N, D, H, E, K, seed=0, skew=False):
    return moe_cases.make(N, D, H, E, K, seed=seed, skew=skew, dtype=torch.float32)


@pytest.mark.parametrize("N,D,H,E,K,skew", [
    (1, 16, 5, 8, 2, False),       # one token: most experts empty; 5 hidden rows = a panel of 3 and one of 2
    (17, 64, 96, 8, 2, False),     # vectors of 16 tokens with a remainder
    (40, 48, 97, 4, 4, False),     # top-4, a hidden dim with a 1-row panel
    (33, 32, 64, 8, 1, False),     # top-1
    (300, 64, 96, 8, 2, True),     # two experts take every slot: pieces of 128 tokens and a remainder
    (24, 32, 2080, 3, 2, False),   # hidden dim in chunks of 1024 and a remainder of 32
    (150, 512, 1536, 8, 2, False),  # the medium preset's experts
])
@pytest.mark.parametrize("threads", [1, 2])
def test_against_float64_within_fp32_error(N, D, H, E, K, skew, threads):
    # fp32 products summed in another order than the naive loop's: within a few fp32 steps of the output's scale of
    # float64, and of the naive fp32 loop within the fp32 bound (that loop's own error reaches 1e-6 here)
    x, w1, w2, w3, experts, weights = args = make(N, D, H, E, K, seed=N + H, skew=skew)
    with num_threads(threads):
        y = native.f32_moe(*args)
    assert y.shape == (N, D) and y.dtype == torch.float32
    ref = naive_moe(*(t.double() for t in (x, w1, w2, w3)), experts, weights.double())
    scale = ref.abs().max()
    assert (y.double() - ref).abs().max() <= 1e-6 * scale
    assert (y - naive_moe(*args)).abs().max() <= 1e-5 * scale
    # a token's output does not depend on the other tokens computed with it (up to the order of its experts' sums)
    last = native.f32_moe(x[-1:], w1, w2, w3, experts[-1:], weights[-1:])
    assert (y[-1:] - last).abs().max() <= 1e-6 * scale


def routed(counts, D, H, seed=0):
    """make()'s tensors with K = 1 and counts[e] tokens routed to expert e, the tokens in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    x, w1, w2, w3, _, _ = make(sum(counts), D, H, len(counts), 1, seed=seed)
    experts = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    experts = experts[torch.randperm(len(experts), generator=g)][:, None]
    return x, w1, w2, w3, experts, torch.rand(len(experts), 1, generator=g) + 0.5


# tokens per expert: a block's last n % 16 tokens are rows, not padded lanes, when few (up to 7) past 64 lanes or more
# (70, 116, 263 = 2 x 128 + 7), up to 4 where the last lane pass has one vector (84 = 80 + 4; 86 keeps lanes); a
# remainder of up to 11 past a whole block joins it (139, 133); too many past the lanes (90: 80 + 10; 124), too few
# lanes (40), an empty expert and whole vectors keep lanes
TAIL_COUNTS = [70, 139, 90, 0, 40, 116, 263, 133, 124, 64, 84, 86]


@pytest.mark.parametrize("H", [96, 1100])  # 1100: a hidden chunk of 1024 and one of 76 (not a multiple of 16)
@pytest.mark.parametrize("threads", [1, 2])
def test_block_tails_as_rows_against_float64(H, threads):
    x, w1, w2, w3, experts, weights = args = routed(TAIL_COUNTS, 64, H, seed=H)
    with num_threads(threads):
        y = native.f32_moe(*args)
        out, a1, a3 = native.f32_moe_keep(*args)
    ref = naive_moe(*(t.double() for t in (x, w1, w2, w3)), experts, weights.double())
    # fp32 sums of H products: the lanes' own (sequential) sums err up to 1.2e-6 of the scale at H 1100
    assert (y.double() - ref).abs().max() <= (1e-6 if H < 1024 else 2e-6) * ref.abs().max()
    assert torch.equal(out, y)
    token_S, _, counts = G.sort_by_expert(experts, len(TAIL_COUNTS))
    expert_S = torch.repeat_interleave(torch.arange(len(TAIL_COUNTS)), torch.tensor(counts))
    xs = x[token_S].double()
    for got, w in ((a1, w1), (a3, w3)):
        exact = torch.einsum("sd,shd->sh", xs, w[expert_S].double())
        mass = torch.einsum("sd,shd->sh", xs.abs(), w[expert_S].double().abs())
        assert ((got.double() - exact).abs() <= 64 * 2**-24 * mass).all()


# tokens per expert as 8-token vectors 1, 2, 3, 4 (two panels of 2 in the avx2 build's down, not 3 + 1), 4,
# 7 (3 + 2 + 2), 7, 10, 13 and 1: every token-panel layout of h^T; H 600: hidden chunks of 512 and 88, the first in
# two passes of the down; D 272: passes of 128 rows of w2 and a remainder, and on 2 threads a split of the rows inside
# a pass
PANEL_COUNTS = [8, 9, 24, 25, 32, 49, 56, 73, 104, 7]


@pytest.mark.parametrize("D", [64, 272])
@pytest.mark.parametrize("threads", [1, 2])
def test_token_panels_and_down_passes_against_float64(D, threads):
    x, w1, w2, w3, experts, weights = args = routed(PANEL_COUNTS, D, 600, seed=D)
    with num_threads(threads):
        y = native.f32_moe(*args)
        out, _, _ = native.f32_moe_keep(*args)
    ref = naive_moe(*(t.double() for t in (x, w1, w2, w3)), experts, weights.double())
    assert (y.double() - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert torch.equal(out, y)


needs_avx2_build = pytest.mark.skipif("native.amx()", reason="the avx2 build's bf16 weights")


@needs_avx2_build
@pytest.mark.parametrize("D,H", [(64, 601), (272, 96)])  # 601: a chunk of 512 and one of 89 (a pass's tail of 1)
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_weights_give_the_products_of_their_fp32_values(D, H, threads):
    # each panel's bf16 rows are converted exactly to fp32 before its products: the same sums as fp32 weights
    x, w1, w2, w3, experts, weights = routed(PANEL_COUNTS + [300], D, H, seed=H)
    w1, w2, w3 = (w.bfloat16() for w in (w1, w2, w3))
    with num_threads(threads):
        y = native.f32_moe(x, w1, w2, w3, experts, weights)
        assert torch.equal(y, native.f32_moe(x, w1.float(), w2.float(), w3.float(), experts, weights))
    assert y.dtype == torch.float32
    ref = naive_moe(*(t.double() for t in (x, w1, w2, w3)), experts, weights.double())
    assert (y.double() - ref).abs().max() <= 1e-6 * ref.abs().max()


@needs_avx2_build
def test_grouped_takes_it_for_bf16_inference_computed_in_fp32():
    # BF16_AS_FP32 (no bf16 products): from NATIVE_MOE_MAX_SLOTS_FUSED slots per expert, x converted and the output
    # rounded once to bf16; up to it native_moe
    if G.compute_dtype(torch.empty(0, dtype=torch.bfloat16)) != torch.float32:
        pytest.skip("this CPU has bf16 products")
    few = G.NATIVE_MOE_MAX_SLOTS_FUSED * 8 // 2  # tokens up to which native_moe takes them (8 experts, top-2)
    x, w1, w2, w3, experts, weights = (t.bfloat16() if t.is_floating_point() else t
                                       for t in make(few + 8, 64, 96, 8, 2, seed=4))
    weights = weights.float()
    with unittest.mock.patch.object(native, "f32_moe", wraps=native.f32_moe) as op, torch.no_grad():
        y = G.grouped_moe(x, w1, w2, w3, experts, weights)
        assert op.call_count == 1 and y.dtype == torch.bfloat16
        G.grouped_moe(x[:few], w1, w2, w3, experts[:few], weights[:few])
        assert op.call_count == 1
    ref = naive_moe(*(t.double() for t in (x, w1, w2, w3)), experts, weights.double())
    assert ((y.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-6 * ref.abs().max()).all()  # one bf16 rounding


# on 2 threads an expert of 2 x 128 slots or more is split by slots, each thread's share ending on a multiple of 16:
# 270 = 128 + 142, 300 = 144 + 156, 393 = 192 + 201 (its last 9 slots are rows on 1 thread, in a block of 137, and
# lanes on 2, in a block of 73); 200 and 40 are split by hidden rows and output columns
SPLIT_COUNTS = [270, 40, 300, 0, 393, 200]


@pytest.mark.parametrize("H", [96, 1100])
def test_two_threads_splitting_an_experts_slots_against_float64(H):
    x, w1, w2, w3, experts, weights = args = routed(SPLIT_COUNTS, 64, H, seed=H + 1)
    with num_threads(1):
        one = native.f32_moe_keep(*args)
    with num_threads(2):
        y = native.f32_moe(*args)
        out, a1, a3 = native.f32_moe_keep(*args)
    assert torch.equal(out, y)
    ref = naive_moe(*(t.double() for t in (x, w1, w2, w3)), experts, weights.double())
    scale = ref.abs().max()
    assert (y.double() - ref).abs().max() <= (1e-6 if H < 1024 else 2e-6) * scale
    # the same sums as on 1 thread but, in the amx build, for an expert's last few slots, lanes on one thread count and
    # rows on the other (the avx2 build has no rows: the same sums everywhere)
    assert (y - one[0]).abs().max() <= 1e-6 * scale
    token_S, _, counts = G.sort_by_expert(experts, len(SPLIT_COUNTS))
    expert_S = torch.repeat_interleave(torch.arange(len(SPLIT_COUNTS)), torch.tensor(counts))
    same = torch.ones(len(token_S), dtype=torch.bool)
    if native.amx():
        same[sum(SPLIT_COUNTS[:5]) - 9:sum(SPLIT_COUNTS[:5])] = False
        assert not torch.equal(a1[~same], one[1][~same])  # so the slots were split
    assert torch.equal(a1[same], one[1][same]) and torch.equal(a3[same], one[2][same])
    xs = x[token_S].double()
    for got, w in ((a1, w1), (a3, w3)):
        exact = torch.einsum("sd,shd->sh", xs, w[expert_S].double())
        mass = torch.einsum("sd,shd->sh", xs.abs(), w[expert_S].double().abs())
        assert ((got.double() - exact).abs() <= 64 * 2**-24 * mass).all()


@pytest.mark.parametrize("N,D,H,E,K,skew", [(17, 64, 96, 8, 2, False), (300, 64, 96, 8, 2, True),
                                          (24, 32, 2085, 3, 2, False)])  # chunks of 1024 and a 37-unit remainder
@pytest.mark.parametrize("threads", [1, 2])
def test_keep_hands_back_the_pre_activations_in_sorted_slot_order(N, D, H, E, K, skew, threads):
    x, w1, w2, w3, experts, weights = args = make(N, D, H, E, K, seed=N + 1, skew=skew)
    with num_threads(threads):
        out, a1, a3 = native.f32_moe_keep(*args)
    assert torch.equal(out, native.f32_moe(*args))
    assert a1.shape == a3.shape == (N * K, H) and a1.dtype == torch.float32
    token_S, _, counts = G.sort_by_expert(experts, E)
    expert_S = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))
    xs = x[token_S].double()
    for got, w in ((a1, w1), (a3, w3)):
        exact = torch.einsum("sd,shd->sh", xs, w[expert_S].double())
        mass = torch.einsum("sd,shd->sh", xs.abs(), w[expert_S].double().abs())
        assert ((got.double() - exact).abs() <= D * 2**-24 * mass).all()  # fp32 sums of D products


def test_grouped_training_forward_takes_keep_with_the_segment_paths_gradients(monkeypatch):
    # training's forward from F32_KEEP_MIN_SLOTS_PER_EXPERT slots per expert (amx build), within
    # F32_AVX2_KEEP_SLOTS_PER_EXPERT (avx2 build); the same gradients as the segment path's
    from tests.kernels.test_kernel_backends import run_with_grads
    args = make(64, 64, 96, 8, 2, seed=3)  # 16 slots per expert: in both builds' ranges
    lo, hi = G.F32_AVX2_KEEP_SLOTS_PER_EXPERT
    assert G.F32_KEEP_MIN_SLOTS_PER_EXPERT <= 16 and lo <= 16 < hi
    with unittest.mock.patch.object(native, "f32_moe_keep", wraps=native.f32_moe_keep) as op:
        y0, g0 = run_with_grads(G.grouped_moe, *args)
        assert op.call_count == 1
        run_with_grads(G.grouped_moe, *make(15, 64, 96, 8, 2, seed=3))  # 30 slots: under 4 per expert
        assert op.call_count == 1
        if not native.amx():  # hi slots per expert on average: the segment path again
            run_with_grads(G.grouped_moe, *make(hi * 4, 64, 96, 8, 2, seed=3))
            assert op.call_count == 1
    monkeypatch.setattr(native, "f32_moe_serves", lambda *t: False)
    y1, g1 = run_with_grads(G.grouped_moe, *args)
    assert (y0 - y1).abs().max() <= 1e-6 * y1.abs().max()
    for a, b in zip(g0, g1):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_no_tokens_and_every_expert_empty_but_one():
    x, w1, w2, w3, experts, weights = make(0, 32, 64, 4, 2)
    assert native.f32_moe(x, w1, w2, w3, experts, weights).shape == (0, 32)
    x, w1, w2, w3, experts, weights = make(70, 32, 64, 4, 1, skew=True)  # expert 0 takes all; 1-3 empty
    ref = naive_moe(*(t.double() for t in (x, w1, w2, w3)), experts, weights.double())
    assert (native.f32_moe(x, w1, w2, w3, experts, weights).double() - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_grouped_takes_it_for_fp32_inference_past_the_decode_kernel():
    few = native.max_rows(torch.float32) * 8 // 2  # tokens up to which native_moe takes them (8 experts, top-2)
    x, w1, w2, w3, experts, weights = make(few + 8, 64, 96, 8, 2)  # past native_moe's slots per expert
    with unittest.mock.patch.object(native, "f32_moe", wraps=native.f32_moe) as op:
        with torch.no_grad():
            y = G.grouped_moe(x, w1, w2, w3, experts, weights)
            assert op.call_count == 1
            G.grouped_moe(x[:few], w1, w2, w3, experts[:few], weights[:few])  # native_moe
            G.grouped_moe(*(t.bfloat16() for t in (x, w1, w2, w3)), experts, weights)  # bf16: amx_moe (avx2: this op)
            assert op.call_count == 1 + (not native.amx())
        xg = x.clone().requires_grad_()
        with unittest.mock.patch.object(native, "f32_moe_keep", wraps=native.f32_moe_keep) as keep:
            G.grouped_moe(xg, w1, w2, w3, experts, weights).sum().backward()  # training: f32_moe_keep where it takes
        takes = G.f32_fused_takes(x, w1, w2, w3, experts, keep=True)
        assert op.call_count == 1 + (not native.amx()) and keep.call_count == int(takes)
        assert xg.grad is not None
    with native.disabled(), torch.no_grad():
        assert (y - G.grouped_moe(x, w1, w2, w3, experts, weights)).abs().max() <= 1e-6 * y.abs().max()


def test_bad_inputs_are_named():
    x, w1, w2, w3, experts, weights = make(4, 64, 96, 4, 2)
    with pytest.raises(ValueError, match=r"expert index 4 out of range \[0, 4\)"):
        native.f32_moe(x, w1, w2, w3, experts + 2, weights)
    with pytest.raises(RuntimeError, match="must be float32"):
        native.f32_moe(x.bfloat16(), w1, w2, w3, experts, weights)
    with pytest.raises(RuntimeError, match="dim must be a multiple of 16, got 40"):
        native.f32_moe(x[:, :40], w1[..., :40], w2[:, :40], w3[..., :40], experts, weights)
    with pytest.raises(RuntimeError, match=r"w2 \(E, D, H\)"):
        native.f32_moe(x, w1, w2.transpose(1, 2), w3, experts, weights)
    with pytest.raises(RuntimeError, match=r"experts and weights \(N, K\)"):
        native.f32_moe(x, w1, w2, w3, experts, weights[:, :1])
    if not native.amx():  # the avx2 build takes bf16 weights, all three
        with pytest.raises(RuntimeError, match="the expert weights bfloat16, got Float, BFloat16, Float, BFloat16"):
            native.f32_moe(x, w1.bfloat16(), w2, w3.bfloat16(), experts, weights)
        with pytest.raises(RuntimeError, match="x must be float32"):
            native.f32_moe(x.bfloat16(), w1.bfloat16(), w2.bfloat16(), w3.bfloat16(), experts, weights)


@needs_amx
@pytest.mark.parametrize("counts,M,N", [
    ([0, 5, 33, 64, 1], 96, 64),  # empty experts, runs shorter than a 16-row block
    ([130], 61, 32),              # one expert takes every row; M not a multiple of 16 or of the 6-row panels
    ([7, 0, 40], 32, 96),         # a narrower than b (w2's gradient)
    ([300, 17, 256], 1024, 48),   # a run past 256 rows (the library's product) beside ones the kernel takes
])
@pytest.mark.parametrize("threads", [1, 2])
def test_segment_wgrad_against_float64(counts, M, N, threads):
    g = torch.Generator().manual_seed(sum(counts) + M)
    a, b = torch.randn(sum(counts), M, generator=g), torch.randn(sum(counts), N, generator=g)
    with num_threads(threads):
        out = native.f32_segment_wgrad(a, b, counts)
    assert out.shape == (len(counts), M, N) and out.dtype == torch.float32
    lo = 0
    for e, c in enumerate(counts):
        exact = a[lo:lo + c].double().T @ b[lo:lo + c].double()
        mass = a[lo:lo + c].double().abs().T @ b[lo:lo + c].double().abs()
        assert ((out[e].double() - exact).abs() <= c * 2**-24 * mass).all()  # fp32 sums of c products
        lo += c


@needs_amx
def test_grouped_backward_takes_segment_wgrad_with_the_librarys_gradients(monkeypatch):
    from tests.kernels.test_kernel_backends import run_with_grads
    args = make(64, 64, 96, 8, 2, seed=5)
    with unittest.mock.patch.object(native, "f32_segment_wgrad", wraps=native.f32_segment_wgrad) as op:
        y0, g0 = run_with_grads(G.grouped_moe, *args)
        assert op.call_count == 3  # w1's, w2's and w3's
    monkeypatch.setattr(native, "f32_wgrad_serves", lambda *t: False)
    y1, g1 = run_with_grads(G.grouped_moe, *args)
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@needs_amx
def test_segment_wgrad_bad_inputs_are_named():
    a, b = torch.randn(10, 32), torch.randn(10, 48)
    with pytest.raises(ValueError, match="counts sum to 9, a and b have 10 rows"):
        native.f32_segment_wgrad(a, b, [4, 5])
    with pytest.raises(ValueError, match="negative count -1"):
        native.f32_segment_wgrad(a, b, [11, -1])
    with pytest.raises(RuntimeError, match="width must be a multiple of 16, got 40"):
        native.f32_segment_wgrad(a, b[:, :40], [10])
    with pytest.raises(RuntimeError, match=r"a \(S, M\) and b \(S, N\), float32"):
        native.f32_segment_wgrad(a.bfloat16(), b, [10])


@pytest.mark.skipif("native.amx()", reason="the avx2 build's size limit")
def test_avx2_build_leaves_many_slots_per_expert_and_training_to_the_library():
    # from F32_AVX2_MAX_SLOTS_PER_EXPERT slots per expert on average the library's products of an expert's rows are as
    # fast, and training's forward keeps the segment path there: the same outputs to fp32's error
    limit = G.F32_AVX2_MAX_SLOTS_PER_EXPERT
    x, w1, w2, w3, experts, weights = make(limit * 2, 32, 48, 4, 2, seed=9)  # limit slots per expert on average
    with unittest.mock.patch.object(native, "f32_moe", wraps=native.f32_moe) as op, \
            unittest.mock.patch.object(native, "f32_moe_keep", wraps=native.f32_moe_keep) as keep:
        with torch.no_grad():
            y = G.grouped_moe(x, w1, w2, w3, experts, weights)
            G.grouped_moe(x[:-1], w1, w2, w3, experts[:-1], weights[:-1])  # just under the limit: the op
        G.grouped_moe(x[:-1].clone().requires_grad_(), w1, w2, w3, experts[:-1], weights[:-1]).sum().backward()
        assert op.call_count == 1 and keep.call_count == 0
    assert (y - native.f32_moe(x, w1, w2, w3, experts, weights)).abs().max() <= 1e-6 * y.abs().max()
