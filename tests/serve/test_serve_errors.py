"""Every error case of the server: OpenAI's error JSON with the right status, the server healthy after;
the queue limit (429); client disconnects; SIGTERM draining a running stream before exiting."""

from __future__ import annotations

import json
import signal
import subprocess
import threading

import httpx
import openai
import pytest

from tests.serve.serve_helpers import API_KEY, MODEL, Server, make_model

pytestmark = pytest.mark.timeout(300)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("serve-err-model") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("serve-err-log") / "server.log", "--api-key", API_KEY)
    yield s
    s.stop()


def _error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err["message"]


COMPLETION = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("path, body, status, param, says", [
    ("/v1/completions", b'{"model": "tiny-test", "prompt": ', 400, None, "could not parse the JSON body"),
    ("/v1/completions", b"[1, 2]", 400, None, "must be a JSON object"),
    ("/v1/completions", {"prompt": "x"}, 400, "model", "missing required field 'model'"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", "missing required field 'prompt'"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "missing required field 'messages'"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ("/v1/completions", {**COMPLETION, "prompt": {"a": 1}}, 400, "prompt", "prompt must be a string"),
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, 400, "temperature", "valid number"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages", "valid list"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "x"}]}, 400, "messages.0.role", "missing"),
    ("/v1/completions", {**COMPLETION, "stream": "yes"}, 400, "stream", "valid boolean"),
    ("/v1/completions", {**COMPLETION, "temperature": 2.5}, 400, "temperature", "temperature must be in [0, 2]"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, 400, "top_p", "top_p must be in (0, 1]"),
    ("/v1/completions", {**COMPLETION, "n": 0}, 400, "n", "n must be in [1, 64]"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens", "max_tokens must be >= 1"),
    ("/v1/completions", {**COMPLETION, "logprobs": 50}, 400, "logprobs", "logprobs must be in [0, 20]"),
    ("/v1/completions", {**COMPLETION, "top_k": -5}, 400, "top_k", "top_k must be"),
    ("/v1/completions", {**COMPLETION, "moe_top_k": 9}, 400, None, "moe_top_k must be <= the model's 8 experts"),
    ("/v1/completions", {**COMPLETION, "prompt": [5, 40000]}, 400, None, "token ids must be in [0, 32000)"),
    ("/v1/completions", {**COMPLETION, "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", "needs logprobs"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     400, "messages", "roles must alternate"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "a"}]}, 400, "messages",
     "unknown role"),
])
def test_bad_requests_get_openai_errors(server, path, body, status, param, says):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={**AUTH, "Content-Type": "application/json"})
    assert says in _error(r, status, param)


def test_unknown_model_context_overflow_auth_and_routes(server):
    r = httpx.post(f"{server.url}/v1/completions", json={**COMPLETION, "model": "gpt-9"}, headers=AUTH)
    assert "gpt-9" in _error(r, 404, "model", "model_not_found")
    r = httpx.post(f"{server.url}/v1/completions", json={**COMPLETION, "prompt": [1] + [500] * 100,
                                                         "max_tokens": 480}, headers=AUTH)
    msg = _error(r, 400, "prompt", "context_length_exceeded")
    assert "maximum context length is 512 tokens" in msg
    assert "581 tokens (101 in the prompt, 480 in the completion)" in msg
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "messages": [{"role": "user",
                   "content": "word " * 600}], "max_tokens": None}, headers=AUTH)
    assert "leaving no room" in _error(r, 400, "messages", "context_length_exceeded")
    assert "missing API key" in _error(httpx.post(f"{server.url}/v1/completions", json=COMPLETION), 401,
                                       code="invalid_api_key")
    r = httpx.post(f"{server.url}/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer wrong"})
    assert "incorrect API key" in _error(r, 401, code="invalid_api_key")
    _error(httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    _error(httpx.get(f"{server.url}/v1/nothing-here", headers=AUTH), 404)
    _error(httpx.get(f"{server.url}/v1/completions", headers=AUTH), 405)
    # the official client maps them to its exception classes
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=7)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="bad", max_retries=0).models.list()
    # nobody else was hurt: health, metrics and a normal request still work
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert server.metrics()['smoe_request_errors_total{status="400"}'] >= 3
    assert client.completions.create(model=MODEL, prompt="fine", max_tokens=3).usage.completion_tokens == 3


def test_non_streaming_client_disconnect_cancels(server):
    before = server.metrics().get('smoe_request_finished_total{finish_reason="abort"}', 0)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 480 tokens are done
        httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=0.5,
                   json={**COMPLETION, "max_tokens": 480, "ignore_eos": True, "prompt": "go " * 20})
    m = server.wait_metrics(lambda m: m.get('smoe_request_finished_total{finish_reason="abort"}', 0) == before + 1)
    assert m['smoe_request_finished_total{finish_reason="abort"}'] == before + 1
    m = server.wait_metrics(lambda m: m["smoe_kv_blocks_used"] == 0)
    assert m["smoe_kv_blocks_used"] == 0


@pytest.fixture(scope="module")
def one_slot_server(model_dir, tmp_path_factory):
    """One running sequence at a time and one waiting request at most."""
    s = Server(model_dir, tmp_path_factory.mktemp("serve-limit-log") / "server.log", "--max-num-seqs", "1",
               "--max-queue", "1", "--drain-timeout", "60")
    yield s
    s.stop()


def _open_stream(url: str, max_tokens: int) -> tuple[httpx.Client, httpx.Response]:
    c = httpx.Client(timeout=120)
    req = c.build_request("POST", f"{url}/v1/completions", json={
        "model": MODEL, "prompt": "a b c", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "stream": True})
    return c, c.send(req, stream=True)


def test_queue_full_gets_429_and_others_are_unaffected(one_slot_server):
    s = one_slot_server
    c, running = _open_stream(s.url, 500)
    lines = running.iter_lines()
    assert next(line for line in lines if line.startswith("data: "))  # it is running
    waiting: dict = {}
    t = threading.Thread(target=lambda: waiting.update(r=httpx.post(
        f"{s.url}/v1/completions", json={**COMPLETION, "max_tokens": 4}, timeout=120)))
    t.start()
    m = s.wait_metrics(lambda m: m["smoe_queue_length"] == 1)
    assert m["smoe_queue_length"] == 1 and m["smoe_running_sequences"] == 1
    r = httpx.post(f"{s.url}/v1/completions", json=COMPLETION, timeout=30)
    assert "queued (limit 1)" in _error(r, 429, code="rate_limit_exceeded")
    assert r.headers["retry-after"] == "1"
    running.close()  # the long stream goes away: the waiting request runs
    c.close()
    t.join(120)
    assert waiting["r"].status_code == 200 and waiting["r"].json()["usage"]["completion_tokens"] == 4
    m = s.wait_metrics(lambda m: m["smoe_kv_blocks_used"] == 0 and m["smoe_queue_length"] == 0)
    assert m["smoe_kv_blocks_used"] == 0


def test_sigterm_drains_running_streams_then_exits(one_slot_server):
    s = one_slot_server
    c, running = _open_stream(s.url, 48)
    lines = running.iter_lines()
    first = next(line for line in lines if line.startswith("data: "))
    s.proc.send_signal(signal.SIGTERM)
    rest = [line for line in lines if line.startswith("data: ")]
    c.close()
    assert rest[-1] == "data: [DONE]"
    events = [json.loads(x[6:]) for x in [first, *rest[:-1]]]
    assert len(events) == 48 and events[-1]["choices"][0]["finish_reason"] == "length"
    try:
        s.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail("smoe serve did not exit after SIGTERM")
    assert s.proc.returncode in (0, -signal.SIGTERM), s.log_text()
    assert "Waiting for connections to close" in s.log_text() or "Shutting down" in s.log_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{s.url}/health", timeout=5)
