"""The MoE training losses against independent float64 computations and transformers' aux loss."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from smoe.model.attention import SelfAttention
from smoe.model.transformer import drop_over_capacity, route
from smoe.train.losses import (
    IGNORE,
    LMObjective,
    cross_entropy,
    expert_load,
    imbalance,
    load_balancing_loss,
    router_z_loss,
    slot_counts,
)


def ref_aux_f64(logits_NE: torch.Tensor, k: int, mask=None) -> float:
    """E * sum_e f_e P_e with plain Python loops in float64."""
    lg = logits_NE.double().tolist()
    N, E = len(lg), len(lg[0])
    m = [True] * N if mask is None else [bool(v) for v in mask.reshape(-1).tolist()]
    counts, psum, n = [0.0] * E, [0.0] * E, 0
    for row, keep in zip(lg, m):
        if not keep:
            continue
        n += 1
        mx = max(row)
        ex = [math.exp(v - mx) for v in row]
        s = sum(ex)
        for e in range(E):
            psum[e] += ex[e] / s
        for e in sorted(range(E), key=lambda e: -row[e])[:k]:
            counts[e] += 1
    return E * sum((counts[e] / (n * k)) * (psum[e] / n) for e in range(E))


def ref_z_f64(logits_NE: torch.Tensor) -> float:
    vals = []
    for row in logits_NE.double().tolist():
        mx = max(row)
        vals.append((mx + math.log(sum(math.exp(v - mx) for v in row))) ** 2)
    return sum(vals) / len(vals)


def layers(n_layers=3, N=40, E=8, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, E, generator=g) * scale for _ in range(n_layers)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_aux_loss_equals_float64_loop(k):
    lg = layers()
    want = sum(ref_aux_f64(x, k) for x in lg) / len(lg)
    assert load_balancing_loss(lg, k).item() == pytest.approx(want, rel=1e-5)


def test_aux_loss_with_mask_equals_float64_loop():
    lg = layers(N=30, seed=1)
    mask = torch.rand(30, generator=torch.Generator().manual_seed(2)) > 0.3
    want = sum(ref_aux_f64(x, 2, mask) for x in lg) / len(lg)
    assert load_balancing_loss(lg, 2, mask).item() == pytest.approx(want, rel=1e-5)


def test_micro_batch_parts_add_up_to_the_whole_batch():
    """Split a masked batch into unequal micro-batches: summed slot counts give the whole batch's expert load,
    and with that load each part's aux (and z) weighted by its routed tokens adds up to the whole batch's
    value and gradient (float64 reference for the value)."""
    lg = [x.requires_grad_() for x in layers(N=30, seed=3)]
    mask = torch.rand(30, generator=torch.Generator().manual_seed(4)) > 0.3
    parts = [(0, 4), (4, 17), (17, 30)]
    counts = [slot_counts([x[i:j] for x in lg], 2, mask[i:j]) for i, j in parts]
    n_total = sum(n for _, n in counts)
    load_LE = sum(c for c, _ in counts) / (n_total * 2)
    torch.testing.assert_close(load_LE, expert_load(lg, 2, mask))
    aux = sum(load_balancing_loss([x[i:j] for x in lg], 2, mask[i:j], load_LE) * mask[i:j].sum() / n_total
              for i, j in parts)
    z = sum(router_z_loss([x[i:j] for x in lg], mask[i:j]) * mask[i:j].sum() / n_total for i, j in parts)
    want = sum(ref_aux_f64(x, 2, mask) for x in lg) / len(lg)
    assert aux.item() == pytest.approx(want, rel=1e-5)
    g_parts = torch.autograd.grad(aux + z, lg)
    g_whole = torch.autograd.grad(load_balancing_loss(lg, 2, mask) + router_z_loss(lg, mask), lg)
    for a, b in zip(g_parts, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    own = sum(load_balancing_loss([x[i:j] for x in lg], 2, mask[i:j]) * mask[i:j].sum() / n_total for i, j in parts)
    assert abs(own.item() - want) > 1e-3  # each part's own load is not the batch's


def test_balanced_router_scores_one():
    # 8 experts, top-2, every expert chosen equally often and uniform probabilities -> exactly 1
    E, k = 8, 2
    eye = torch.eye(E)
    logits = torch.cat([eye[i] + eye[(i + 1) % E] for i in range(E)]).view(E, E) * 1e-3
    assert load_balancing_loss([logits], k).item() == pytest.approx(1.0, abs=1e-4)
    # all tokens to experts 0 and 1 with confident probabilities -> close to E / k = 4
    skewed = torch.zeros(64, E)
    skewed[:, :2] = 20.0
    assert load_balancing_loss([skewed], k).item() == pytest.approx(E / k, rel=1e-4)


@pytest.mark.parametrize("k", [1, 2])
def test_aux_loss_is_transformers_divided_by_k(k):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    lg = layers(n_layers=2, E=8)
    per_layer_hf = [load_balancing_loss_func((x,), num_experts=8, top_k=k).item() for x in lg]
    assert load_balancing_loss(lg, k).item() == pytest.approx(sum(per_layer_hf) / len(lg) / k, rel=1e-5)
    mask = torch.rand(4, 10, generator=torch.Generator().manual_seed(3)) > 0.4
    hf_masked = load_balancing_loss_func((lg[0],), num_experts=8, top_k=k, attention_mask=mask).item()
    assert load_balancing_loss([lg[0]], k, mask.reshape(-1)).item() == pytest.approx(hf_masked / k, rel=1e-5)


def test_z_loss_equals_float64_loop():
    lg = layers(scale=5.0)
    want = sum(ref_z_f64(x) for x in lg) / len(lg)
    assert router_z_loss(lg).item() == pytest.approx(want, rel=1e-5)
    mask = torch.zeros(40, dtype=torch.bool)
    mask[:10] = True
    want_m = sum(ref_z_f64(x[:10]) for x in lg) / len(lg)
    assert router_z_loss(lg, mask).item() == pytest.approx(want_m, rel=1e-5)


def test_aux_gradient_flows_through_probabilities_only():
    lg = [x.clone().requires_grad_() for x in layers(n_layers=1, N=16, E=4)]
    load_balancing_loss(lg, 2).backward()
    # d/dlogits of E * sum_e f_e * mean_n softmax_e, f_e held constant (float64 reference)
    x = lg[0].detach().double().requires_grad_()
    with torch.no_grad():
        f = torch.zeros(4, dtype=torch.float64)
        for row in torch.topk(x, 2, dim=-1).indices:
            f[row] += 1
        f /= 16 * 2
    (4 * (f * torch.softmax(x, -1).mean(0)).sum()).backward()
    torch.testing.assert_close(lg[0].grad.double(), x.grad, rtol=1e-5, atol=1e-8)


def test_cross_entropy_ignores_and_matches_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[0, :2] = IGNORE
    lp = torch.log_softmax(logits.double(), -1)
    keep = targets != IGNORE
    want = -lp[keep].gather(-1, targets[keep][:, None]).mean()
    assert cross_entropy(logits, targets).item() == pytest.approx(want.item(), rel=1e-6)
    none = torch.full((2, 5), IGNORE)
    assert cross_entropy(logits, none).item() == 0.0


def test_expert_load_and_imbalance():
    lg = layers(n_layers=2, N=50)
    load = expert_load(lg, 2)
    assert load.shape == (2, 8)
    torch.testing.assert_close(load.sum(-1), torch.ones(2))
    for layer, x in zip(load, lg):
        counts = torch.bincount(torch.topk(x, 2, -1).indices.reshape(-1), minlength=8).float() / 100
        torch.testing.assert_close(layer, counts)
    assert imbalance(torch.full((1, 8), 1 / 8)).item() == pytest.approx(1.0)
    assert imbalance(torch.tensor([[0.5, 0.5, 0.0, 0.0]])).item() == pytest.approx(2.0)


def test_expert_load_counts_what_route_chooses():
    """The load statistics count exactly the experts the model's router ran (smoe.model.transformer.route)."""
    model = tiny_model(0)
    inputs = []
    hooks = [layer.feed_forward.register_forward_hook(lambda m, a, out: inputs.append(a[0])) for layer in model.layers]
    tokens = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(1))
    _, rl = model(tokens, return_router_logits=True)
    for h in hooks:
        h.remove()
    load = expert_load(rl, 2)
    for i, layer in enumerate(model.layers):
        _, experts_NK, logits_NE = route(inputs[i].reshape(-1, 32), layer.feed_forward.gate.weight, 2)
        torch.testing.assert_close(logits_NE, rl[i])
        counts = torch.bincount(experts_NK.reshape(-1), minlength=4).float() / experts_NK.numel()
        torch.testing.assert_close(load[i], counts)


def test_lm_objective_combines_terms():
    model = tiny_model(0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (2, 16), generator=g)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    loss, m = LMObjective(aux_coef=0.1, z_coef=0.01)(model, batch)
    assert loss.item() == pytest.approx((m["ce"] + 0.1 * m["aux"] + 0.01 * m["z"]).item(), rel=1e-6)
    assert m["load"].shape == (2, 4)
    # segments: two packed documents give the same loss as scoring each one alone (positions restart)
    a, b = tokens[0, :8], tokens[0, 8:]
    seg = torch.tensor([[0] * 8 + [1] * 8])
    pos = torch.arange(16)[None]
    packed = model(tokens[:1], pos, SelfAttention(pos, segments=seg))
    alone_b = model(b[None], torch.arange(8, 16)[None])
    torch.testing.assert_close(packed[:, 8:], alone_b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed[:, :8], model(a[None]), rtol=1e-4, atol=1e-5)


def test_capacity_factor_drops_and_reports():
    g = torch.Generator().manual_seed(0)
    N, K, E = 32, 2, 4
    experts = torch.stack([torch.zeros(N, dtype=torch.long), torch.randint(1, E, (N,), generator=g)], 1)
    weights = torch.full((N, K), 0.5)
    w, dropped = drop_over_capacity(experts, weights, E, capacity_factor=1.0)
    cap = math.ceil(N * K / E)  # 16: expert 0 gets all 32 first choices, keeps the first 16 tokens
    assert torch.equal(w[:cap, 0], torch.full((cap,), 0.5)) and torch.equal(w[cap:, 0], torch.zeros(N - cap))
    kept_per_expert = torch.zeros(E)
    for e, wt in zip(experts.reshape(-1).tolist(), w.reshape(-1).tolist()):
        kept_per_expert[e] += wt > 0
    assert (kept_per_expert <= cap).all()
    assert int(dropped) == int((w == 0).sum())
    # a large capacity drops nothing; the model path is dropless by default
    w2, d2 = drop_over_capacity(experts, weights, E, capacity_factor=float(E))
    assert int(d2) == 0 and torch.equal(w2, weights)
    model = tiny_model(0)
    tokens = torch.randint(0, 128, (2, 16), generator=g)
    base = model(tokens)
    for layer in model.layers:
        layer.feed_forward.capacity_factor = 0.5
    dropped_logits = model(tokens)
    assert sum(int(layer.feed_forward.dropped) for layer in model.layers) > 0
    assert not torch.allclose(base, dropped_logits)
