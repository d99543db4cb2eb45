"""The official openai client against a live `smoe serve` (tiny random model, float64 so that batched
and one-at-a-time greedy decoding cannot differ): chat and completions, streaming and not, stop
strings, max_tokens, seeds, n > 1, 64 concurrent requests equal to their sequential results, and
cancelled streams freeing their blocks."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

from smoe import SamplingParams, Transformer, generate, load_tokenizer
from tests.serve.serve_helpers import API_KEY, MODEL, Server, make_model

pytestmark = pytest.mark.timeout(300)
TOK = load_tokenizer("mixtral")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("serve-model") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("serve-log") / "server.log", "--api-key", API_KEY,
               "--dtype", "fp64", "--block-size", "8", "--max-num-batched-tokens", "256")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(model_dir):
    """smoe.generate on the same weights in float64, one request at a time."""
    model = Transformer.from_pretrained(model_dir, dtype=torch.float64)
    tok = load_tokenizer(model_dir)
    return lambda prompt, **kw: generate(model, prompt, SamplingParams(**kw), tok)


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    m = server.metrics()
    for name in ("smoe_queue_length", "smoe_running_sequences", "smoe_kv_blocks_used", "smoe_kv_blocks_free",
                 "smoe_generation_tokens_per_second", "smoe_time_to_first_token_seconds_count",
                 "smoe_inter_token_latency_seconds_count"):
        assert name in m


def test_completions_stream_and_not_agree_with_generate(client, reference):
    prompt = "The quick brown fox"
    ref = reference(prompt, max_tokens=12)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == ref.text
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == len(TOK.encode(prompt))
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_stream_and_not(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    ids = TOK.encode_chat(messages)
    ref = reference(ids, max_tokens=10)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(ref.tokens)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_stop_strings_and_max_tokens(client, reference):
    prompt = "Once upon a time"
    full = reference(prompt, max_tokens=20).text
    stop = full[8:11]
    assert stop.strip()
    ref = reference(prompt, max_tokens=20, stop=[stop])
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=stop)
    assert out.choices[0].text == ref.text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[stop],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == ref.text
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


def test_seed_reproducibility_and_n(client):
    kw = dict(model=MODEL, prompt="Pick a word:", max_tokens=12, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=123, **kw).choices[0].text
    b = client.completions.create(seed=123, **kw).choices[0].text
    c = client.completions.create(seed=124, **kw).choices[0].text
    assert a == b and a != c
    out = client.completions.create(seed=123, n=3, **kw)
    assert [ch.index for ch in out.choices] == [0, 1, 2]
    assert out.choices[0].text == a and out.choices[1].text == c  # choice i is seeded seed + i
    assert out.usage.completion_tokens == 36 and out.usage.prompt_tokens == len(TOK.encode(kw["prompt"]))
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          n=2, temperature=0)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content
    streamed = client.completions.create(seed=123, n=2, stream=True, **kw)
    texts = ["", ""]
    for ch in streamed:
        texts[ch.choices[0].index] += ch.choices[0].text
    assert texts == [a, c]


def test_64_concurrent_greedy_requests_equal_sequential_and_free_every_block(server, reference):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (int(torch.randint(2, 80, (1,), generator=g)),), generator=g).tolist()
               for _ in range(64)]
    max_tokens = [2 + i % 15 for i in range(64)]
    refs = [reference([1] + p, max_tokens=m).text for p, m in zip(prompts, max_tokens)]

    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=240)
        async def one(i):
            if i % 2:  # half streaming, half not
                text = ""
                async for ch in await aclient.completions.create(model=MODEL, prompt=[1] + prompts[i],
                                                                 max_tokens=max_tokens[i], temperature=0, stream=True):
                    text += ch.choices[0].text
                return text
            out = await aclient.completions.create(model=MODEL, prompt=[1] + prompts[i], max_tokens=max_tokens[i],
                                                   temperature=0)
            return out.choices[0].text
        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await aclient.close()

    texts = asyncio.run(run())
    assert texts == refs
    m = server.wait_metrics(lambda m: m["smoe_kv_blocks_used"] == 0 and m["smoe_running_sequences"] == 0)
    assert m["smoe_kv_blocks_used"] == 0 and m["smoe_running_sequences"] == 0 and m["smoe_queue_length"] == 0


def test_cancelled_streams_free_their_blocks(server, client):
    before = server.metrics().get('smoe_request_finished_total{finish_reason="abort"}', 0)
    streams = [client.completions.create(model=MODEL, prompt=f"Count to a thousand {i}", max_tokens=400,
                                         temperature=0, stream=True, extra_body={"ignore_eos": True})
               for i in range(4)]
    for s in streams:
        for _, _ in zip(range(3), s):
            pass
    assert server.metrics()["smoe_kv_blocks_used"] > 0
    for s in streams:
        s.close()
    m = server.wait_metrics(lambda m: m["smoe_kv_blocks_used"] == 0
                            and m.get('smoe_request_finished_total{finish_reason="abort"}', 0) == before + 4)
    assert m["smoe_kv_blocks_used"] == 0 and m["smoe_running_sequences"] == 0
    assert m['smoe_request_finished_total{finish_reason="abort"}'] == before + 4
    assert client.completions.create(model=MODEL, prompt="still alive", max_tokens=2).usage.completion_tokens == 2


def test_echo_logprobs_serve_lm_eval_loglikelihood(server, model_dir):
    """lm-eval's local-completions scores a continuation with echo + logprobs; its parser reads ours."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    context, continuation = TOK.encode("The capital of France is"), TOK.encode(" Paris", bos=False)
    ids = context + continuation
    body = {"model": MODEL, "prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0,
            "seed": 1234}
    out = httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                     timeout=60).json()
    lp = out["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    [(total, greedy)] = LocalCompletionsAPI.parse_logprobs(out, ctxlens=[len(context)])
    model = Transformer.from_pretrained(model_dir, dtype=torch.float64)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)
    ref = sum(logp[i - 1, ids[i]].item() for i in range(len(context), len(ids)))
    assert total == pytest.approx(ref, abs=1e-6)
    assert greedy == all(logp[i - 1].argmax().item() == ids[i] for i in range(len(context), len(ids)))
