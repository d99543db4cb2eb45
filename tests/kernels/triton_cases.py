"""Cases for the Triton MoE backend against the naive loop, run in-process on a GPU, or on a CPU-only
machine by tests/kernels/test_triton_moe.py in a child process with TRITON_INTERPRET=1 (the interpreter
must be on before Triton is first imported, so it cannot be switched on inside a shared test process).
Shapes are small: the interpreter runs each program in numpy.
"""

from __future__ import annotations

import os

import pytest
import torch

try:  # a bare GPU machine may lack hypothesis: the property test is then skipped
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:
    given = None

pytest.importorskip("triton")

from smoe.kernels import BACKENDS, default_backend, get_backend  # noqa: E402
from smoe.kernels.naive import naive_moe  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run these cases on a GPU or with TRITON_INTERPRET=1 (see test_triton_moe.py)")

import smoe.kernels.triton_moe as tm  # noqa: E402


def make(N, D, H, E, K, seed=0, dtype=torch.float32, routing="random"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w1 = torch.randn(E, H, D, generator=g) / D**0.5
    w2 = torch.randn(E, D, H, generator=g) / H**0.5
    w3 = torch.randn(E, H, D, generator=g) / D**0.5
    weights = torch.softmax(torch.randn(N, K, generator=g), -1)
    if routing == "random":
        experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]) if N else torch.zeros(0, K)
    elif routing == "few experts":  # most experts get no token
        experts = torch.stack([torch.randperm(K, generator=g) for _ in range(N)]) + (E - K) // 2
    elif routing == "one expert takes every token":
        experts = torch.stack([torch.tensor([E - 1] + list(range(K - 1))) for _ in range(N)])
    else:
        raise ValueError(routing)
    ts = [t.to(DEVICE, dtype) for t in (x, w1, w2, w3)]
    return ts + [experts.long().to(DEVICE), weights.to(DEVICE, dtype)]


def reference64(x, w1, w2, w3, experts, weights):
    return naive_moe(*(t.double() for t in (x, w1, w2, w3)), experts, weights.double())


CASES = [  # (N, D, H, E, K, routing): decode layout (<= 16 slots) and sorted layout, odd sizes
    (1, 16, 32, 4, 2, "random"),
    (3, 24, 40, 8, 2, "random"),
    (8, 16, 32, 8, 2, "random"),
    (37, 16, 24, 6, 2, "random"),
    (29, 40, 72, 8, 3, "few experts"),
    (50, 32, 48, 4, 1, "one expert takes every token"),
    (21, 16, 16, 5, 4, "random"),
    (40, 17, 33, 8, 2, "few experts"),
    (300, 40, 72, 2, 2, "random"),  # > 64 slots per expert: the large-tile configuration
]


@pytest.mark.parametrize("n_slots", [2, 8, 100, 10_000])
def test_every_tile_config(n_slots):
    # each configuration block_config can pick (matrix-vector, per-expert blocks, sorted), forced onto one
    # routing of 90 slots
    x, w1, w2, w3, experts, weights = make(45, 24, 40, 6, 2, routing="few experts")
    y = tm.fused_moe(x, w1, w2, w3, experts, weights, config=tm.block_config(n_slots, 6))
    assert (y - naive_moe(x, w1, w2, w3, experts, weights)).abs().max() <= 1e-5


@pytest.mark.parametrize("N,D,H,E,K,routing", CASES)
def test_float32_equals_naive(N, D, H, E, K, routing):
    x, w1, w2, w3, experts, weights = make(N, D, H, E, K, routing=routing)
    y = tm.fused_moe(x, w1, w2, w3, experts, weights)
    ref = naive_moe(x, w1, w2, w3, experts, weights)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert (y - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("N,D,H,E,K,routing", CASES[:5])
def test_bfloat16_no_worse_than_naive_in_bfloat16(N, D, H, E, K, routing):
    # bf16 bound: products are exact in fp32 and accumulation is fp32, so the error is the rounding of
    # h and of each slot's output to bf16 (2^-9 relative each); we require no more than twice the error
    # of the naive loop run in bf16 (which rounds at the same places) plus one bf16 ulp of the output.
    args = make(N, D, H, E, K, routing=routing, dtype=torch.bfloat16)
    ref = reference64(*args)
    err = (tm.fused_moe(*args).double() - ref).abs().max()
    naive_err = (naive_moe(*args).double() - ref).abs().max()
    assert err <= 2 * naive_err + 2**-8 * ref.abs().max()


def test_align_blocks_covers_every_slot_once_in_single_expert_blocks():
    g = torch.Generator().manual_seed(3)
    # sorted layouts, then per-expert blocks (slots <= block_m, no sort)
    for N, E, K, bm in [(40, 8, 2, 16), (33, 5, 3, 32), (100, 8, 1, 16), (9, 4, 2, 16), (4, 8, 2, 16), (8, 4, 2, 16),
                        (1, 8, 2, 16), (16, 3, 1, 16)]:
        experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
        ids, blk, n_pad, capacity = tm.align_blocks(experts, E, bm)
        S = N * K
        n_pad = int(n_pad)
        assert n_pad <= capacity == ids.numel() and n_pad % bm == 0
        real = ids[ids < S]
        assert sorted(real.tolist()) == list(range(S))  # every slot exactly once
        assert (ids[n_pad:] == S).all()  # only padding past the padded row count
        flat = experts.reshape(-1)
        for b in range(n_pad // bm):
            rows = ids[b * bm:(b + 1) * bm]
            rows = rows[rows < S]
            assert (flat[rows] == blk[b]).all()  # one expert per block


def _property(N, D, H, E, K, seed, skew):
    K = min(K, E)
    g = torch.Generator().manual_seed(seed)
    x, w1, w2, w3, _, weights = make(N, D, H, E, K, seed=seed)
    pool = min(E, K + 1) if skew else E  # skewed: only a few experts ever chosen
    experts = torch.stack([torch.randperm(pool, generator=g)[:K] for _ in range(N)]).to(DEVICE)
    y = tm.fused_moe(x, w1, w2, w3, experts, weights)
    assert (y - naive_moe(x, w1, w2, w3, experts, weights)).abs().max() <= 1e-5


if given is not None:
    @settings(max_examples=12, deadline=None)
    @given(N=st.integers(1, 40), D=st.sampled_from([16, 20, 32]), H=st.sampled_from([16, 24, 48]),
           E=st.integers(2, 8), K=st.integers(1, 4), seed=st.integers(0, 2**16), skew=st.booleans())
    def test_property_any_shape_and_routing(N, D, H, E, K, seed, skew):
        _property(N, D, H, E, K, seed, skew)


def test_backend_in_a_model_matches_grouped():
    from tests.conftest import tiny_model
    model = tiny_model(seed=1).to(DEVICE)
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        model.set_moe_backend("grouped")
        ref = model(tokens)
        model.set_moe_backend("triton")
        out = model(tokens)
    assert (out - ref).abs().max() <= 1e-4


@pytest.mark.timeout(300)
def test_compiled_model_keeps_the_fused_kernels_as_one_op():
    # under torch.compile the triton backend is one opaque op per layer (not grouped's formulations), in one
    # graph, and the compiled model gives the eager model's logits
    from torch._inductor.compile_fx import compile_fx

    from tests.conftest import tiny_model
    model = tiny_model(seed=3).to(DEVICE)
    model.set_moe_backend("triton")
    tokens = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    targets = []

    def inductor_noting_ops(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(tokens)
        out = torch.compile(model, backend=inductor_noting_ops, fullgraph=True)(tokens)
    assert targets.count("smoe.triton_moe.default") == model.config.n_layers
    assert (out - ref).abs().max() <= 1e-4


def test_gradients_go_through_the_grouped_path():
    x, w1, w2, w3, experts, weights = make(13, 16, 24, 4, 2)
    grads = []
    for fn in (get_backend("triton"), naive_moe):
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2, w3, weights)]
        fn(*leaves[:4], experts, leaves[4]).pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-5


def test_under_autocast_the_kernels_run_in_its_dtype():
    from smoe.kernels import moe_experts
    x, w1, w2, w3, experts, weights = make(13, 16, 24, 4, 2)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = moe_experts(x, w1, w2, w3, experts, weights, "triton")
    by_hand = [t.bfloat16() for t in (x, w1, w2, w3)]
    with torch.no_grad():
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, moe_experts(*by_hand, experts, weights.bfloat16(), "triton"))


def test_registered_and_chosen_on_cuda_only():
    assert "triton" in BACKENDS
    assert default_backend(torch.device("cpu")) == "grouped"
    assert default_backend(torch.device("cuda")) == "triton"


def test_mixed_dtypes_are_refused_by_name():
    x, w1, w2, w3, experts, weights = make(4, 16, 16, 4, 2)
    with pytest.raises(ValueError, match="one dtype"):
        tm.fused_moe(x.double(), w1, w2, w3, experts, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 64), (2, 5, 48), (3, 200)])
def test_fused_rms_norm_equals_the_model_norm(shape, dtype):
    from smoe.kernels.triton_ops import rms_norm
    from smoe.model.transformer import RMSNorm
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(shape[-1], 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(shape[-1], generator=g) + 0.5)
    norm = norm.to(DEVICE, dtype)
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype)
    with torch.enable_grad():  # parameters that want gradients: the torch code
        ref = norm(x)
    out = rms_norm(x, norm.weight, norm.eps)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # the same roundings; only the order of the float32 sum of squares differs (a few float32 ulps of the
    # scale), so bf16 results agree but for rare last-bit ties
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-6)
    elif ON_GPU:
        ulp = 2.0**-7 * ref.float().abs()
        assert ((out.float() - ref.float()).abs() <= ulp).all()
        assert (out == ref).float().mean() > 0.99
    else:  # the interpreter narrows float32 to bf16 by truncation: two roundings, one ulp each, toward zero
        assert ((out.float() - ref.float()).abs() <= 2 * 2.0**-7 * ref.float().abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_equals_the_model_rope(dtype):
    from smoe.kernels.triton_ops import apply_rope as fused_rope
    from smoe.model import transformer as tf
    g = torch.Generator().manual_seed(1)
    B, T, H, hd = 2, 7, 3, 16
    x_BTHd = torch.randn(B, T, H, hd, generator=g).to(DEVICE, dtype)
    x = x_BTHd.transpose(1, 2)  # (B, H, T, hd) with the projection's strides, as the model hands it over
    positions = torch.randint(0, 5000, (B, T), generator=g).to(DEVICE)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)).to(DEVICE)
    cos, sin = tf.rope_cos_sin(positions, inv_freq, dtype)
    with torch.enable_grad():
        ref = tf.apply_rope(x.clone().requires_grad_(), cos, sin).detach()
    out = fused_rope(x, cos, sin)
    assert out.shape == ref.shape and out.stride() == x.stride()
    if dtype == torch.bfloat16:
        # each product rounded to bf16, then the sum: on a GPU an element may still differ in its last bit
        # (measured on an H200), and the interpreter narrows by truncation; either way within 3 roundings
        # of the terms, where a wrong rotation would be off by the terms themselves
        x1, x2 = x.float().chunk(2, dim=-1)
        scale = (x1.abs() + x2.abs()).repeat(1, 1, 1, 2)
        assert ((out.float() - ref.float()).abs() <= 3 * 2.0**-7 * scale).all()
    else:  # float32 may fuse a product into the sum (one rounding fewer)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not ON_GPU, reason="the model calls the fused ops on CUDA only")
def test_fused_ops_in_a_model_match_the_torch_code():
    from tests.conftest import tiny_model
    model = tiny_model(seed=2).to(DEVICE)
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.enable_grad():
        ref = model(tokens)  # parameters want gradients: norm and RoPE in torch
    with torch.no_grad():
        out = model(tokens)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,D,E,K", [(1, 64, 8, 2), (5, 48, 8, 2), (3, 40, 5, 3), (4, 32, 16, 1), (2, 600, 8, 4)])
def test_fused_router_equals_route(N, D, E, K, dtype):
    from smoe.kernels.triton_ops import route as fused_route
    from smoe.model.transformer import route
    g = torch.Generator().manual_seed(N * 100 + D)
    x = torch.randn(N, D, generator=g).to(DEVICE, dtype)
    gate = torch.randn(E, D, generator=g).to(DEVICE, dtype).requires_grad_()
    with torch.enable_grad():  # a gate that wants gradients: the torch code
        ref = [t.detach() for t in route(x, gate, K)]
    w, e, logits = fused_route(x, gate.detach(), K)
    torch.testing.assert_close(logits, ref[2], rtol=1e-5, atol=1e-5)  # float32 sums in another order
    assert torch.equal(e, ref[1])  # random logits: no near-ties
    torch.testing.assert_close(w, ref[0], rtol=1e-5, atol=1e-6)
    assert w.dtype == torch.float32 and e.dtype == torch.long and logits.dtype == torch.float32


def test_large_batches_take_the_grouped_path():
    from smoe.kernels.grouped import grouped_moe
    N = tm.FUSED_MAX_SLOTS // 2 + 1  # one token-slot over, with top-2
    args = make(N, 16, 24, 4, 2)
    assert torch.equal(get_backend("triton")(*args), grouped_moe(*args))
