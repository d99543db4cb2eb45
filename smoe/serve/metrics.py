"""Server metrics in the Prometheus text format (counters, gauges, histograms), no dependencies."""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """What the server counts; `render(engine_stats, queue_length)` makes the /metrics page."""

    def __init__(self, window_s: float = 10.0):
        self.lock = threading.Lock()
        self.ttft = Histogram()
        self.itl = Histogram()
        self.e2e = Histogram()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.errors: dict[int, int] = {}
        self.window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent outputs

    def token(self, n: int = 1) -> None:
        now = time.monotonic()
        with self.lock:
            self.generation_tokens += n
            self._recent.append((now, n))

    def request_done(self, reason: str, n_prompt: int, e2e_s: float) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.prompt_tokens += n_prompt
            self.e2e.observe(e2e_s)

    def error(self, status: int) -> None:
        with self.lock:
            self.errors[status] = self.errors.get(status, 0) + 1

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.window_s

    def render(self, stats, queue_length: int) -> str:
        tps = self.tokens_per_second()
        L: list[str] = []

        def metric(name: str, kind: str, help: str, lines: list[str]) -> None:
            L.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", *lines])

        metric("smoe_queue_length", "gauge", "Requests waiting to be scheduled.", [f"smoe_queue_length {queue_length}"])
        metric("smoe_running_sequences", "gauge", "Sequences in the running batch.",
               [f"smoe_running_sequences {stats.running}"])
        metric("smoe_kv_blocks_used", "gauge", "KV cache blocks in use.", [f"smoe_kv_blocks_used {stats.blocks_used}"])
        metric("smoe_kv_blocks_free", "gauge", "KV cache blocks free.", [f"smoe_kv_blocks_free {stats.blocks_free}"])
        metric("smoe_kv_blocks_total", "gauge", "KV cache blocks in the pool.",
               [f"smoe_kv_blocks_total {stats.blocks_total}"])
        metric("smoe_generation_tokens_per_second", "gauge",
               f"Generated tokens per second over the last {self.window_s:g} s.",
               [f"smoe_generation_tokens_per_second {tps:.3f}"])
        metric("smoe_preemptions_total", "counter", "Sequences preempted for recompute.",
               [f"smoe_preemptions_total {stats.preemptions}"])
        metric("smoe_engine_steps_total", "counter", "Engine steps run.", [f"smoe_engine_steps_total {stats.steps}"])
        with self.lock:
            metric("smoe_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                   [f"smoe_prompt_tokens_total {self.prompt_tokens}"])
            metric("smoe_generation_tokens_total", "counter", "Generated tokens.",
                   [f"smoe_generation_tokens_total {self.generation_tokens}"])
            metric("smoe_request_finished_total", "counter", "Finished sequences by finish reason.",
                   [f'smoe_request_finished_total{{finish_reason="{k}"}} {v}'
                    for k, v in sorted(self.finished.items())])
            metric("smoe_request_errors_total", "counter", "Requests answered with an error, by HTTP status.",
                   [f'smoe_request_errors_total{{status="{k}"}} {v}' for k, v in sorted(self.errors.items())])
            metric("smoe_time_to_first_token_seconds", "histogram", "Time from arrival to the first token.",
                   self.ttft.lines("smoe_time_to_first_token_seconds"))
            metric("smoe_inter_token_latency_seconds", "histogram", "Time between consecutive tokens of a sequence.",
                   self.itl.lines("smoe_inter_token_latency_seconds"))
            metric("smoe_e2e_request_latency_seconds", "histogram", "Time from arrival to the last token.",
                   self.e2e.lines("smoe_e2e_request_latency_seconds"))
        return "\n".join(L) + "\n"
