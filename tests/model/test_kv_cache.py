"""The cached generation path against one cache-less pass over prompt + output (mistral-inference's test)."""

import pytest
import torch

from smoe import generate
from smoe.model.attention import KVCache, SelfAttention
from tests.conftest import tiny_model


def logprobs_of(model, ids, start):
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].float()
    lp = torch.log_softmax(logits, -1)
    return torch.stack([lp[t - 1, ids[t]] for t in range(start, len(ids))])


@pytest.mark.parametrize("window", [None, 6, 11])
def test_cached_logprobs_equal_a_full_pass(window):
    model = tiny_model(seed=2, sliding_window=window)
    prompt = torch.randint(0, 128, (13,), generator=torch.Generator().manual_seed(5)).tolist()
    steps = []
    cache = KVCache.for_model(model, 1, 64)
    ids = list(prompt)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), attn=cache.step(torch.arange(len(ids))[None]))[:, -1]
        for _ in range(24):
            lp = torch.log_softmax(logits[0].float(), -1)
            nxt = int(torch.multinomial(lp.exp(), 1, generator=torch.Generator().manual_seed(len(ids))))
            steps.append(lp[nxt])
            ids.append(nxt)
            pos = torch.tensor([[len(ids) - 1]])
            logits = model(torch.tensor([[nxt]]), pos, cache.step(pos))[:, -1]
    full = logprobs_of(model, ids, len(prompt))
    assert torch.allclose(torch.stack(steps), full, atol=1e-4)


@pytest.mark.parametrize("window", [None, 4])
def test_chunked_prefill_through_a_rolling_buffer(window):
    # prefill in chunks bigger than the window: the rolling buffer must give the cache-less logits
    model = tiny_model(seed=4, sliding_window=window)
    ids = torch.randint(0, 128, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
        cache = KVCache.for_model(model, 1, 64)
        outs, t = [], 0
        for n in (5, 1, 9, 2, 6):
            pos = torch.arange(t, t + n)[None]
            outs.append(model(ids[:, t:t + n], pos, cache.step(pos)))
            t += n
    assert (torch.cat(outs, 1) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("window", [None, 5])
def test_batch_of_different_lengths_equals_each_alone(window):
    model = tiny_model(seed=6, sliding_window=window)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    batch = generate(model, prompts, max_tokens=12)
    for p, out in zip(prompts, batch):
        assert out.tokens == generate(model, p, max_tokens=12).tokens


def test_padding_and_packed_segments_do_not_leak():
    model = tiny_model(seed=7)
    a = torch.randint(0, 128, (1, 6))
    b = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        la, lb = model(a), model(b)
        packed = torch.cat([a, b], 1)
        pos = torch.cat([torch.arange(6), torch.arange(9)])[None]
        seg = torch.tensor([[0] * 6 + [1] * 9])
        lp = model(packed, pos, SelfAttention(pos, segments=seg))
    assert (lp[:, :6] - la).abs().max() <= 1e-5
    assert (lp[:, 6:] - lb).abs().max() <= 1e-5


def test_cache_overflow_is_a_clear_error():
    model = tiny_model()
    cache = KVCache.for_model(model, 1, 8)
    with pytest.raises(ValueError, match="KV cache holds 8 tokens"):
        cache.step(torch.arange(9)[None])
