"""Sampling against naive references, seeds, stop conditions and streaming."""

import pytest
import torch

from smoe import SamplingParams, generate, stream
from smoe.generation import filter_logits, sample
from smoe.generation.loop import StopChecker
from smoe.tokenizer import load_tokenizer
from tests.conftest import tiny_model


def test_filter_logits_matches_a_naive_nucleus():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits = torch.randn(40, generator=g) * 3
        top_k, top_p = int(torch.randint(0, 12, (1,), generator=g)), float(torch.rand(1, generator=g))
        out = filter_logits(logits, top_k, top_p)
        # naive: sort, keep top_k, then keep the shortest prefix whose probability reaches top_p
        order = sorted(range(40), key=lambda i: -logits[i].item())
        keep = order[:top_k] if top_k else order
        kept_logits = torch.tensor([logits[i].item() for i in keep])
        probs = torch.softmax(kept_logits, 0).tolist()
        mass, nucleus = 0.0, []
        for i, p in zip(keep, probs):
            if mass >= top_p:
                break
            nucleus.append(i)
            mass += p
        assert sorted(torch.isfinite(out).nonzero().flatten().tolist()) == sorted(nucleus)


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.cat([sample(logits, [p], [gen]) for _ in range(4000)]), minlength=4)
    assert torch.allclose(counts / 4000, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    p = SamplingParams(temperature=1.0, top_p=0.7)  # keeps ids 0 and 1 only
    counts = torch.bincount(torch.cat([sample(logits, [p], [gen]) for _ in range(2000)]), minlength=4)
    assert counts[2:].sum() == 0 and abs(counts[0] / 2000 - 0.5 / 0.8) < 0.04


def test_greedy_is_argmax_and_temperature_zero():
    logits = torch.randn(3, 50)
    assert torch.equal(sample(logits, [SamplingParams()] * 3, [None] * 3), logits.argmax(-1))


def test_chunked_argmax_equals_torch_argmax_with_ties_and_nans():
    from smoe.generation.sampling import argmax
    g = torch.Generator().manual_seed(0)
    for V in (32000, 4096, 4000, 50):  # chunked (two sizes), and the plain fallbacks
        x = torch.randint(0, 6, (7, V), generator=g).float()  # many ties for the maximum
        x[1] = float("-inf")
        x[2, [5, 900 % V, V - 1]] = float("nan")  # NaN counts as the largest, the first one wins
        x[3, -1] = 10.0
        x[4, 0] = 10.0
        assert torch.equal(argmax(x), torch.argmax(x, dim=-1)), V
        assert torch.equal(argmax(x[:1]), torch.argmax(x[:1], dim=-1))


def test_seed_reproducible_and_batch_independent():
    model = tiny_model(seed=1)
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a = generate(model, [5, 6, 7], **kw).tokens
    assert a == generate(model, [5, 6, 7], **kw).tokens
    assert a != generate(model, [5, 6, 7], **{**kw, "seed": 8}).tokens


def test_max_tokens_and_stop_ids():
    model = tiny_model(seed=2)
    out = generate(model, [1, 2, 3], max_tokens=9)
    assert len(out.tokens) == 9 and out.finish_reason == "length"
    stop_at = out.tokens[4]
    first = out.tokens.index(stop_at)
    out2 = generate(model, [1, 2, 3], max_tokens=9, stop_token_ids=[stop_at])
    assert out2.tokens == out.tokens[: first + 1] and out2.finish_reason == "stop"


def test_moe_top_k_override_changes_the_computation():
    model = tiny_model(seed=3)
    tokens = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        one = model(tokens, top_k=1)
        ref = tiny_model(seed=3, top_k=1)(tokens)
        assert (one - ref).abs().max() <= 1e-6
        assert (model(tokens, top_k=2) - model(tokens)).abs().max() == 0
        logits, router = model(tokens, return_router_logits=True)
        assert len(router) == 2 and router[0].shape == (10, 4) and router[0].dtype == torch.float32


def test_context_overflow_is_clear():
    model = tiny_model(max_seq_len=16)
    with pytest.raises(ValueError, match="does not fit the model's context of 16"):
        generate(model, list(range(1, 20)), max_tokens=4)
    # max_tokens is cut to what fits
    assert len(generate(model, list(range(1, 10)), max_tokens=40).tokens) == 7


class FakeTok:
    """Ids are characters: enough to test stop strings exactly."""
    eos_id = 0
    alphabet = "#abcdefghij\n "

    def decode(self, ids):
        return "".join(self.alphabet[i % len(self.alphabet)] for i in ids if i != 0)


def run_checker(text_ids, stops):
    tok = FakeTok()
    c = StopChecker(tok, stops)
    out, hit = "", False
    for i, t in enumerate(text_ids):
        delta, hit = c.add(t, final=i == len(text_ids) - 1)
        out += delta
        if hit:
            break
    return out, hit


def test_stop_strings_cut_and_never_leak():
    ids = [FakeTok.alphabet.index(ch) for ch in "ab cd\n\nef"]
    out, hit = run_checker(ids, ["\n\n"])
    assert (out, hit) == ("ab cd", True)
    out, hit = run_checker(ids, ["zz"])
    assert (out, hit) == ("ab cd\n\nef", False)
    out, hit = run_checker(ids, ["d\n", "b c"])
    assert (out, hit) == ("a", True)


def test_streaming_text_equals_the_final_text():
    model = tiny_model(seed=5, vocab_size=32000, dim=32)
    tok = load_tokenizer("mixtral")
    events = list(stream(model, "Hello there", tokenizer=tok, max_tokens=20, temperature=1.0, seed=3))
    full = generate(model, "Hello there", tokenizer=tok, max_tokens=20, temperature=1.0, seed=3)
    assert "".join(e.text for e in events) == full.text == tok.decode(full.tokens)
    assert events[-1].finish_reason == full.finish_reason
    # a stop string taken from the text itself ends generation right before it
    if len(full.text) > 6:
        stop = full.text[3:6]
        cut = generate(model, "Hello there", tokenizer=tok, max_tokens=20, temperature=1.0, seed=3, stop=[stop])
        assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]


def test_bad_sampling_values_are_named():
    for kw, needle in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0},
                       "max_tokens"), ({"top_k": -2}, "top_k")]:
        with pytest.raises(ValueError, match=needle):
            SamplingParams(**kw)
