"""The engine in its own process (smoe.engine.process.EngineProcess, the default of `smoe serve`): the same
tokens as smoe.generate, aborts free blocks, queue counts, clear errors, and the thread mode still serving."""

from __future__ import annotations

import threading

import httpx
import pytest

from smoe import SamplingParams, Transformer, generate
from smoe.engine import EngineConfig
from smoe.engine.process import EngineProcess
from tests.serve.serve_helpers import MODEL, Server, make_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("engine-process-model"))


class Collect:
    """Callbacks of several requests; `wait()` until all finished."""

    def __init__(self, n: int):
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, str] = {}
        self.errors: dict[str, BaseException] = {}
        self.left, self.done = n, threading.Event()

    def callback(self, rid: str):
        def on_output(out) -> None:
            if isinstance(out, BaseException):
                self.errors[rid] = out
            else:
                if out.token is not None:
                    self.tokens.setdefault(rid, []).append(out.token)
                if out.finish_reason is None:
                    return
                self.finish[rid] = out.finish_reason
            self.left -= 1
            if self.left == 0:
                self.done.set()
        return on_output

    def wait(self, timeout: float = 60.0) -> None:
        assert self.done.wait(timeout), f"{self.left} requests unfinished"


@pytest.mark.timeout(180)
def test_engine_process_streams_the_tokens_of_generate(model_dir, one_thread, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child's threads too: the same kernels as this process
    model = Transformer.from_pretrained(model_dir)
    prompts = [[1, 5, 9, 200, 7], [1, 3000], [1, 42, 43, 44, 45, 46, 47, 48]]
    ep = EngineProcess(model_dir, config=EngineConfig(max_num_seqs=1))  # one at a time: generate's matmul shapes
    try:
        ep.start()
        assert ep.alive and ep.engine.model.device.type == "meta"  # the server process holds no weights
        got = Collect(len(prompts))
        for i, p in enumerate(prompts):
            assert ep.add(f"r{i}", p, SamplingParams(max_tokens=12), got.callback(f"r{i}")) == 12
        got.wait()
        for i, p in enumerate(prompts):
            assert got.tokens[f"r{i}"] == generate(model, p, SamplingParams(max_tokens=12)).tokens
            assert got.finish[f"r{i}"] == "length"
        stats = ep.snapshot()
        assert stats.blocks_used == 0 and stats.generated_tokens == 36 and ep.queue_length() == 0
    finally:
        ep.shutdown()
    assert not ep.alive and not ep._proc.is_alive()


@pytest.mark.timeout(180)
def test_engine_process_checks_aborts_and_fails_requests_clearly(model_dir, tmp_path):
    ep = EngineProcess(model_dir, config=EngineConfig(max_num_seqs=1))
    try:
        ep.start()
        with pytest.raises(ValueError, match="prompt token ids must be in"):  # checked in the server process
            ep.add("bad", [1, 10**6], SamplingParams(max_tokens=2), lambda out: None)
        with pytest.raises(ValueError, match="does not fit the model's context"):
            ep.add("long", [1] * 600, SamplingParams(max_tokens=2), lambda out: None)
        first = threading.Event()
        ep.add("long-run", [1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True), lambda out: first.set())
        assert first.wait(60)
        queued = Collect(1)
        ep.add("queued", [1, 4], SamplingParams(max_tokens=3), queued.callback("queued"))
        deadline = threading.Event()
        while ep.snapshot().waiting != 1 and not deadline.wait(0.05):
            pass
        assert ep.queue_length() == 1  # one slot: the second request waits
        ep.abort("long-run")
        queued.wait()
        assert len(queued.tokens["queued"]) == 3
        while ep.snapshot().blocks_used and not deadline.wait(0.05):
            pass
        assert ep.snapshot().blocks_used == 0
    finally:
        ep.shutdown()
    with pytest.raises(RuntimeError, match="could not load"):
        EngineProcess(tmp_path)  # an empty folder: the child's error comes back as the reason


@pytest.mark.timeout(180)
def test_serve_with_the_engine_on_a_thread(model_dir, tmp_path):
    server = Server(model_dir, tmp_path / "server.log", "--engine-thread")
    try:
        r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "a b c", "max_tokens": 5,
                                                             "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert "(engine thread)" in server.log_text()
    finally:
        server.stop()


@pytest.mark.timeout(180)
def test_a_dead_engine_process_fails_its_requests_and_reports_not_alive(model_dir):
    ep = EngineProcess(model_dir)
    try:
        ep.start()
        got = Collect(1)
        first = threading.Event()

        def on_output(out):
            first.set()
            got.callback("r")(out)
        ep.add("r", [1, 2, 3], SamplingParams(max_tokens=400, ignore_eos=True), on_output)
        assert first.wait(60)
        ep._proc.kill()  # the engine process dies mid-request
        got.wait()
        assert isinstance(got.errors["r"], RuntimeError) and "engine process exited" in str(got.errors["r"])
        assert not ep.alive  # the server's /health then answers 503
    finally:
        ep.shutdown()
