"""The engine in a process of its own, for servers (as vLLM runs its engine core).

In one process the engine's step loop and the HTTP event loop take turns on one GIL: every model
step waits while streamed tokens are formatted and written, and the other way round. Here a child
process owns the model and the KV cache and runs the steps; the server process keeps the tokenizer,
checks requests, streams outputs and talks to the child over a pipe: `add`, `abort` and `stop` go
down, and after every step (or batch of commands) one message comes back with the step's outputs,
requests that failed, and the engine's counters.

`EngineProcess` has AsyncEngine's interface (add, abort, queue_length, snapshot, start, shutdown,
alive, dispatch, engine), so the server runs on either. Its `engine` is a model-less Engine (the
model built on the meta device, a KV pool of the child's size on meta) that checks requests and
token ids with the same code as the real one.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from smoe.engine.async_engine import Deliveries, OnOutput, call_all, route_outputs
from smoe.engine.engine import Engine, EngineConfig, EngineStats
from smoe.engine.kv import bytes_per_block
from smoe.generation import SamplingParams

log = logging.getLogger("smoe.engine")


def _child(conn, path: str, dtype, device, backend, config: EngineConfig) -> None:
    """The engine process: load, report, then take commands and step until told to stop."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C reaches the whole group: the server decides, and
        signal.signal(sig, signal.SIG_IGN)  # the child ends when the server stops it or its pipe closes
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s (engine): %(message)s")
    try:
        from smoe.engine.async_engine import AsyncEngine
        engine = AsyncEngine.from_pretrained(path, dtype=dtype, device=device, backend=backend, config=config).engine
    except BaseException as e:  # a bad checkpoint: the server reports it and exits
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    m = engine.model
    conn.send(("ready", {"n_blocks": engine.pool.n_blocks, "dtype": str(m.dtype).removeprefix("torch."),
                         "device": str(m.device)}))
    taken = 0  # add commands received so far
    try:
        while True:
            failed: list[tuple[str, BaseException]] = []
            idle = not engine.has_unfinished()
            while conn.poll(None if idle else 0):  # block only when there is nothing to step
                cmd = conn.recv()
                idle = False
                if cmd[0] == "add":
                    taken += 1
                    _, rid, ids, params = cmd
                    try:
                        engine.add_request(ids, params, rid)
                    except ValueError as e:
                        failed.append((rid, e))
                elif cmd[0] == "abort":
                    engine.abort(cmd[1])
                else:  # stop
                    return
            outputs = []
            if engine.has_unfinished():
                try:
                    outputs = engine.step()
                except Exception as e:  # a failed step fails its requests, not the server
                    log.exception("engine step failed; aborting %d requests", len(engine.seqs))
                    for rid in list(engine.seqs):
                        engine.abort(rid)
                        failed.append((rid, e))
            engine._update_stats()  # also after commands alone: an abort frees blocks without a step
            conn.send(("step", outputs, failed, dataclasses.replace(engine.stats), taken))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the server went away
        return


class EngineProcess:
    """An engine in a child process with AsyncEngine's interface; outputs arrive on a reader thread."""

    def __init__(self, path: str | Path, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, backend: str | None = None,
                 config: EngineConfig | None = None, start_timeout: float = 600.0):
        from smoe.checkpoint import read_config
        from smoe.model.transformer import Transformer
        from smoe.tokenizer import load_tokenizer
        config = config or EngineConfig()
        ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch or CUDA state
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child, name="smoe-engine", daemon=True,
                                 args=(child_conn, str(path), dtype, device, backend, config))
        self._proc.start()
        child_conn.close()
        if not self._conn.poll(start_timeout):
            self._proc.kill()
            raise RuntimeError(f"the engine process did not load {path} in {start_timeout:.0f} s")
        try:
            kind, info = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the engine process exited while loading {path} "
                               f"(exit code {self._proc.join(5) or self._proc.exitcode})") from None
        if kind == "error":
            self._proc.join(5)
            raise RuntimeError(f"the engine process could not load {path}: {info}")
        self.info = info
        try:  # the same request checks as the child's engine, on a model-less copy of it
            model_dtype = getattr(torch, info["dtype"])
            with torch.device("meta"):
                meta = Transformer(read_config(Path(path))[0]).to(model_dtype)
            cfg = meta.config
            per_block = bytes_per_block(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, config.block_size, model_dtype)
            self.engine = Engine(meta, load_tokenizer(path),
                                 dataclasses.replace(config, kv_cache_memory=info["n_blocks"] * per_block))
        except BaseException:  # no engine process left behind
            self._proc.kill()
            self._proc.join(5)
            raise
        self.stats = EngineStats(blocks_total=info["n_blocks"], blocks_free=info["n_blocks"])
        self.dispatch: Callable[[Deliveries], None] = call_all  # runs on the reader thread
        self._callbacks: dict[str, OnOutput] = {}
        self._send_lock = threading.Lock()
        self._sent = self._taken = 0
        self._stop = False
        self._reader: threading.Thread | None = None

    # ---- callers' side --------------------------------------------------------------------------

    def start(self) -> None:
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name="smoe-engine-reader", daemon=True)
            self._reader.start()

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, on_output: OnOutput) -> int:
        """Queue a request; returns its max new tokens. Raises ValueError now if it cannot run."""
        max_new = self.engine.check(len(prompt_ids), params)
        ids = self.engine.prompt_ids(prompt_ids)  # vocabulary check
        self._callbacks[request_id] = on_output
        with self._send_lock:
            self._sent += 1
            self._conn.send(("add", request_id, ids, params))
        return max_new

    def abort(self, request_id: str) -> None:
        """Cancel a request (its blocks are freed before the next step); no more outputs are delivered."""
        self._callbacks.pop(request_id, None)
        try:
            self._send(("abort", request_id))
        except (OSError, ValueError):  # the engine process is gone: nothing left to cancel
            pass

    def queue_length(self) -> int:
        """Requests accepted but not yet running: still on their way to the engine, or waiting in it."""
        return self._sent - self._taken + self.stats.waiting

    def snapshot(self) -> EngineStats:
        return self.stats

    @property
    def alive(self) -> bool:
        return (not self._stop and self._proc.is_alive() and self._reader is not None
                and self._reader.is_alive())

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine process; requests still unfinished are failed."""
        self._stop = True
        try:
            self._send(("stop",))
        except (OSError, ValueError):
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()
        if self._reader is not None:
            self._reader.join(timeout)

    # ---- reader thread --------------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                _, outputs, failed, stats, taken = self._conn.recv()
            except (EOFError, OSError):
                break
            self._taken, self.stats = taken, stats
            deliveries: Deliveries = []
            for rid, error in failed:
                cb = self._callbacks.pop(rid, None)
                if cb is not None:
                    deliveries.append((cb, error))
            deliveries += route_outputs(outputs, self._callbacks)
            if deliveries:
                self.dispatch(deliveries)
        if not self._stop:
            log.error("the engine process exited (exit code %s)", self._proc.exitcode)
        error = RuntimeError("the engine shut down" if self._stop else "the engine process exited")
        failed_all = [(cb, error) for cb in self._callbacks.values()]
        self._callbacks.clear()
        if failed_all:
            self.dispatch(failed_all)
