"""A live `smoe serve` subprocess on a tiny random model, for the server tests (loopback only)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from smoe.checkpoint import init_random
from smoe.model.config import get_preset

API_KEY = "sk-smoe-test"
MODEL = "tiny-test"


def make_model(out: Path, seed: int = 0) -> Path:
    """The tiny preset (vocab 32000, Mixtral tokenizer) with random weights, once per folder."""
    if not (out / "config.json").exists():
        init_random(get_preset("tiny").replace(max_seq_len=512), out, seed=seed)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m smoe.cli serve` in a subprocess; `url` once /health answers."""

    def __init__(self, model_dir: Path, log: Path, *args: str, name: str = MODEL, startup_s: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "smoe.cli", "serve", str(model_dir), "--port", str(self.port),
               "--served-model-name", name, *args]
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smoe serve exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"smoe serve did not come up in {startup_s} s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            m = re.fullmatch(r"([a-z_]+(?:\{[^}]*\})?) ([0-9.eE+-]+)", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def wait_metrics(self, pred, timeout: float = 30.0) -> dict[str, float]:
        """Poll /metrics until pred(metrics) holds (bounded); returns the last metrics."""
        deadline = time.monotonic() + timeout
        m = self.metrics()
        while not pred(m) and time.monotonic() < deadline:
            time.sleep(0.1)
            m = self.metrics()
        return m

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
