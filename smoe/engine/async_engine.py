"""An Engine driven by one background thread, for servers: thread-safe add/abort, outputs by callback.

The thread takes queued commands (add, abort) before every step, runs steps while any request is
unfinished and sleeps on an event otherwise. Each request's callback runs on the engine thread (a
server hands the output over to its event loop from there). If a step raises, every unfinished
request gets the exception and the engine carries on with an empty batch. A server sets `dispatch`
to hand a whole step's outputs to its event loop at once (one wake-up per step, not per token).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from smoe.engine.engine import Engine, EngineConfig, EngineStats, StepOutput
from smoe.generation import SamplingParams

log = logging.getLogger("smoe.engine")

OnOutput = Callable[[StepOutput | BaseException], None]
Deliveries = list[tuple[OnOutput, StepOutput | BaseException]]


def call_all(deliveries: Deliveries) -> None:
    for cb, out in deliveries:
        cb(out)


def route_outputs(outputs: list[StepOutput], callbacks: dict[str, OnOutput]) -> Deliveries:
    """Pair a step's outputs with their requests' callbacks; finished requests leave `callbacks`."""
    deliveries: Deliveries = []
    for out in outputs:
        cb = callbacks.get(out.request_id)
        if out.finish_reason is not None:
            callbacks.pop(out.request_id, None)
        if cb is not None:
            deliveries.append((cb, out))
    return deliveries


class AsyncEngine:
    """Runs `engine.step()` in a daemon thread; callers on any thread add and abort requests."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._pending = 0  # adds queued, not yet taken by the engine thread
        self._callbacks: dict[str, OnOutput] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self.dispatch: Callable[[Deliveries], None] = call_all  # runs on the engine thread
        self.stats = dataclasses.replace(engine.stats)  # a snapshot, replaced after every step

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype | None = None,
                        device: str | torch.device | None = None, backend: str | None = None,
                        config: EngineConfig | None = None) -> AsyncEngine:
        """Load a checkpoint and its tokenizer into an engine (dtype also 'fp64' for exact tests)."""
        from smoe.model.transformer import Transformer
        from smoe.tokenizer import load_tokenizer
        if dtype in ("fp64", "float64"):
            dtype = torch.float64
        model = Transformer.from_pretrained(path, dtype=dtype, device=device)
        if backend:
            model.set_moe_backend(backend)
        return cls(Engine(model, load_tokenizer(path), config))

    # ---- callers' side --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="smoe-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still unfinished are aborted."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, on_output: OnOutput) -> int:
        """Queue a request; returns its max new tokens. Raises ValueError now if it cannot run."""
        max_new = self.engine.check(len(prompt_ids), params)
        self.engine.prompt_ids(prompt_ids)  # vocabulary check
        with self._lock:
            self._pending += 1
        self._cmds.put(("add", request_id, prompt_ids, params, on_output))
        self._wake.set()
        return max_new

    def abort(self, request_id: str) -> None:
        """Cancel a request (its blocks are freed before the next step); no more outputs are delivered."""
        self._cmds.put(("abort", request_id))
        self._wake.set()

    def queue_length(self) -> int:
        """Requests accepted but not yet running: queued adds plus the scheduler's waiting ones."""
        return self._pending + self.stats.waiting

    # ---- engine thread --------------------------------------------------------------------------

    def _take_commands(self) -> None:
        failed: Deliveries = []
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                _, rid, ids, params, cb = cmd
                with self._lock:
                    self._pending -= 1
                try:
                    self.engine.add_request(ids, params, rid)
                    self._callbacks[rid] = cb
                except ValueError as e:
                    failed.append((cb, e))
            else:
                self._callbacks.pop(cmd[1], None)
                self.engine.abort(cmd[1])
        if failed:
            self.dispatch(failed)

    def _run(self) -> None:
        engine = self.engine
        while True:
            self._take_commands()
            self.stats = dataclasses.replace(engine.stats)
            if self._stop:
                break
            if not engine.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # a failed step fails its requests, not the server
                log.exception("engine step failed; aborting %d requests", len(engine.seqs))
                self._fail_all(e)
                continue
            deliveries = route_outputs(outputs, self._callbacks)
            self.stats = dataclasses.replace(engine.stats)
            if deliveries:
                self.dispatch(deliveries)
        self._fail_all(RuntimeError("the engine shut down"))
        self.stats = dataclasses.replace(self.engine.stats)

    def _fail_all(self, error: BaseException) -> None:
        failed: Deliveries = []
        for rid in list(self.engine.seqs):
            self.engine.abort(rid)
            cb = self._callbacks.pop(rid, None)
            if cb is not None:
                failed.append((cb, error))
        if failed:
            self.dispatch(failed)

    def snapshot(self) -> EngineStats:
        return self.stats
