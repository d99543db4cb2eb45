"""The engine against smoe.generate: greedy token identity alone and in a batch of 64, chunked prefill,
preemption, sliding window, per-request MoE top-k, seeded sampling, stops and log-probabilities.

Exactness: alone, the engine runs the same matmul shapes as smoe.generate (prefill M=prompt, decode
M=1), so fp32 outputs are bit-identical. Batched, CPU GEMMs pick other kernels for other row counts
(fp32 rows differ by ~1e-6), so batch tests run in float64 (rows differ by ~1e-15; the router's
float32 logits then only flip on ties closer than ~1e-8), where greedy ties cannot flip.
"""

import pytest
import torch

from smoe import LLM, SamplingParams, generate
from smoe.tokenizer import load_tokenizer
from tests.conftest import tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _prompts(n: int, vocab: int, seed: int, lo: int = 1, hi: int = 60) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _check_all_free(llm: LLM) -> None:
    assert llm.engine.pool.num_used == 0
    assert not llm.engine.has_unfinished()


def test_greedy_alone_is_bit_identical_in_fp32():
    model = tiny_model(0)
    llm = LLM(model, block_size=4)
    params = SamplingParams(max_tokens=20)
    for prompt in _prompts(6, 128, seed=1):
        ref = generate(model, prompt, params)
        out = llm.generate(prompt, params, use_tqdm=False)
        assert out.tokens == ref.tokens and out.finish_reason == ref.finish_reason == "length"
    _check_all_free(llm)


def test_greedy_batch_of_64_different_requests_equals_generate():
    model = tiny_model(1, vocab_size=512).double()
    prompts = _prompts(64, 512, seed=2, hi=90)
    max_tokens = [4 + i % 29 for i in range(64)]  # different lengths out as well as in
    params = [SamplingParams(max_tokens=m) for m in max_tokens]
    llm = LLM(model, block_size=8, max_num_batched_tokens=256)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, sp, out in zip(prompts, params, outs):
        ref = generate(model, p, sp)
        assert out.tokens == ref.tokens
        assert out.finish_reason == "length" and len(out.tokens) == sp.max_tokens
    _check_all_free(llm)


def test_chunked_prefill_and_preemption_keep_outputs_identical():
    model = tiny_model(2).double()
    prompts = _prompts(24, 128, seed=3, lo=20, hi=100)
    params = SamplingParams(max_tokens=24)
    refs = [generate(model, p, params).tokens for p in prompts]
    # 7-token steps split every prompt into chunks; 40 blocks of 4 tokens hold ~1.3 full sequences
    llm = LLM(model, block_size=4, max_num_batched_tokens=7, kv_cache_memory=40 * 4 * llm_bytes_per_token(model))
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.tokens for o in outs] == refs
    assert llm.engine.scheduler.num_preemptions > 0
    _check_all_free(llm)


def llm_bytes_per_token(model) -> int:
    cfg = model.config
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * model.dtype.itemsize


def test_sliding_window_drops_blocks_and_matches_generate():
    window, bs = 16, 4
    model = tiny_model(3, sliding_window=window).double()
    prompts = _prompts(8, 128, seed=4, lo=30, hi=70)
    params = SamplingParams(max_tokens=40)
    llm = LLM(model, block_size=bs, max_num_batched_tokens=12)
    engine = llm.engine
    ids = [engine.add_request(p, params) for p in prompts]
    tokens = {i: [] for i in ids}
    peak = 0
    while engine.has_unfinished():
        for ev in engine.step():
            tokens[ev.request_id].append(ev.token)
        peak = max(peak, max((sum(b >= 0 for b in s.blocks) for s in engine.scheduler.running), default=0))
    # a sequence never holds more than the window plus one step's chunk, plus a straddling block
    assert peak <= -(-(window + 12) // bs) + 1
    for rid, p in zip(ids, prompts):
        assert tokens[rid] == generate(model, p, params).tokens
    assert engine.pool.num_used == 0


def test_per_request_moe_top_k_runs_in_its_own_forward():
    model = tiny_model(4, n_experts=4, top_k=2).double()
    prompts = _prompts(12, 128, seed=5)
    params = [SamplingParams(max_tokens=12, moe_top_k=(None, 1, 3)[i % 3]) for i in range(12)]
    outs = LLM(model, block_size=8).generate(prompts, params, use_tqdm=False)
    for p, sp, out in zip(prompts, params, outs):
        assert out.tokens == generate(model, p, sp).tokens
    with pytest.raises(ValueError, match="moe_top_k must be <= the model's 4 experts"):
        LLM(model).generate([1, 2], SamplingParams(moe_top_k=5), use_tqdm=False)


def test_seeded_sampling_matches_generate_whatever_the_batch():
    model = tiny_model(5).double()
    prompts = _prompts(8, 128, seed=6)
    params = SamplingParams(max_tokens=16, temperature=0.9, top_k=20, top_p=0.9, seed=11)
    refs = generate(model, prompts, params)  # one left-padded batch; row b seeded with seed + b
    llm = LLM(model, block_size=8)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.tokens for o in outs] == [r.tokens for r in refs]
    # the same request (seed 11 + 3) alone repeats its tokens
    alone = llm.generate(prompts[3], SamplingParams(max_tokens=16, temperature=0.9, top_k=20, top_p=0.9, seed=14),
                         use_tqdm=False)
    assert alone.tokens == outs[3].tokens
    # unseeded requests still complete
    assert all(o.finish_reason == "length" for o in llm.generate(prompts, SamplingParams(max_tokens=5, temperature=1),
                                                                  use_tqdm=False))


def test_text_prompts_stop_strings_stop_ids_and_eos_match_generate():
    tok = load_tokenizer("mixtral")
    model = tiny_model(6, vocab_size=32000, dim=32)
    prompts = ["The cat sat on the mat", "Once upon a time, in a land far away"]
    llm = LLM(model, tok, block_size=4)
    greedy = [generate(model, p, SamplingParams(max_tokens=16), tok) for p in prompts]
    for p, g in zip(prompts, greedy):
        text = g.text
        stop = text[len(text) // 2: len(text) // 2 + 3]
        if not stop.strip():
            continue
        for params in (SamplingParams(max_tokens=16, stop=[stop]),
                       SamplingParams(max_tokens=16, stop_token_ids=[g.tokens[5]]),
                       SamplingParams(max_tokens=16, stop_token_ids=[tok.eos_id], ignore_eos=True)):
            ref = generate(model, p, params, tok)
            out = llm.generate(p, params, use_tqdm=False)
            assert (out.tokens, out.text, out.finish_reason) == (ref.tokens, ref.text, ref.finish_reason)
        assert llm.generate(p, SamplingParams(max_tokens=16, stop=[stop]), use_tqdm=False).finish_reason == "stop"
    # EOS ends a sequence like in generate: force it by making EOS the argmax of every step
    with torch.no_grad():
        model.output.weight[tok.eos_id] = model.output.weight[g.tokens[0]] * 50
    ref = generate(model, prompts[0], SamplingParams(max_tokens=10), tok)
    out = llm.generate(prompts[0], SamplingParams(max_tokens=10), use_tqdm=False)
    assert (out.tokens, out.text, out.finish_reason) == (ref.tokens, ref.text, ref.finish_reason)
    _check_all_free(llm)


def test_logprobs_and_prompt_logprobs_equal_a_full_forward():
    model = tiny_model(7).double()
    prompts = _prompts(5, 128, seed=7, lo=3, hi=30)
    params = SamplingParams(max_tokens=6, logprobs=3, prompt_logprobs=2)
    outs = LLM(model, block_size=4, max_num_batched_tokens=9).generate(prompts, params, use_tqdm=False)
    for p, out in zip(prompts, outs):
        full = p + out.tokens
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full]))[0].float(), -1)  # (T, V)
        assert len(out.prompt_logprobs) == len(p) - 1
        for i, (lp, top) in enumerate(out.prompt_logprobs):  # scores prompt token i + 1
            assert lp == pytest.approx(logp[i, p[i + 1]].item(), abs=1e-5)
            assert [t for t, _ in top] == logp[i].topk(2).indices.tolist()
        for j, (lp, top) in enumerate(out.logprobs):
            row = logp[len(p) - 1 + j]
            assert lp == pytest.approx(row[out.tokens[j]].item(), abs=1e-5)
            assert top[0][0] == out.tokens[j]  # greedy: the chosen token is the most likely
            assert [v for _, v in top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-5)


def test_abort_frees_blocks_at_once_and_bad_requests_fail_clearly():
    model = tiny_model(8)
    llm = LLM(model, block_size=4, kv_cache_memory=64 * 4 * llm_bytes_per_token(model))
    engine = llm.engine
    a = engine.add_request(list(range(1, 30)), SamplingParams(max_tokens=50))
    b = engine.add_request(list(range(1, 10)), SamplingParams(max_tokens=50))
    for _ in range(3):
        engine.step()
    used = engine.pool.num_used
    assert used > 0
    final = engine.abort(a)
    assert final.finish_reason == "abort" and engine.pool.num_used < used
    engine.abort(b)
    assert engine.pool.num_used == 0 and not engine.has_unfinished()
    assert engine.abort("unknown") is None
    with pytest.raises(ValueError, match="does not fit the model's context of 256"):
        engine.add_request([1] * 300, SamplingParams())
    small = LLM(model, block_size=4, kv_cache_memory=8 * 4 * llm_bytes_per_token(model)).engine
    with pytest.raises(ValueError, match=r"40 prompt \+ 10 new tokens need 13 KV blocks of 4 tokens; the KV cache has 8"
                       ):
        small.add_request([1] * 40, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\); got 500"):
        engine.add_request([1, 500], SamplingParams())
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.add_request([1, 2], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        engine.add_request("text", SamplingParams())
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request([], SamplingParams())


def test_llm_loads_a_checkpoint_directory_with_its_tokenizer(tmp_path):
    from smoe.checkpoint import init_random
    from smoe.model.config import get_preset
    model = init_random(get_preset("tiny").replace(n_layers=1, max_seq_len=128), tmp_path / "m", seed=3)
    tok = load_tokenizer(tmp_path / "m")
    llm = LLM(tmp_path / "m")
    prompts = ["Hello world", "A longer prompt about mixtures of experts"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=6), use_tqdm=False)
    assert [o.text for o in outs] == [generate(model, p, SamplingParams(max_tokens=6), tok).text for p in prompts]
    assert all(o.text and o.finish_reason == "length" for o in outs)
