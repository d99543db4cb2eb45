"""Timing helpers for benchmarks on a shared, noisy machine: interleaved rounds, medians, bandwidth."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from smoe.kernels import native
from smoe.kernels.memory import huge_empty


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (a no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], repeat: int = 7, warmup: int = 1,
                     device: torch.device | str | None = None, min_seconds: float = 0.0) -> dict[str, list[float]]:
    """Seconds per call of each function, run in interleaved rounds so that load from other
    processes hits every candidate alike, in reversed order every other round (so none always runs in
    another's wake). Calls each function warmup times first, then repeat rounds (more while the total
    is under min_seconds, up to 5x repeat)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    start = time.perf_counter()
    rounds = 0
    while rounds < repeat or (time.perf_counter() - start < min_seconds and rounds < 5 * repeat):
        for name, fn in (order if rounds % 2 == 0 else order[::-1]):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - t)
        rounds += 1
    return samples


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median over rounds of a's time over b's in the same round (time_interleaved's samples): where the
    machine's speed drifts between rounds, the drift cancels in each round's ratio, not in a ratio of medians."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_ratio needs the same number of rounds of each, got {len(a)} and {len(b)}")
    return statistics.median(x / y for x, y in zip(a, b))


def amx_ns_per_product(device: torch.device | str = "cpu") -> float | None:
    """The CPU's AMX tile unit's rate now, in nanoseconds per tile product (native.amx_probe_ns, about 1 ms); None
    off the CPU or where smoe's AMX kernels are not loaded. On a VM whose core another VM shares it varies 3-4x
    within seconds, and every bf16 product with it: benchmarks print it beside their timings."""
    if torch.device(device).type != "cpu" or not native.amx():
        return None
    return native.amx_probe_ns()


def bandwidth_probe(nbytes: int = 512 * 2**20, device: torch.device | str = "cpu") -> Callable[[int], float]:
    """A streaming-read bandwidth probe over one float32 buffer far larger than cache (on the CPU in huge
    pages, as smoe places weights), allocated once: probe(repeat) is the best bytes/s of repeat sums.

    On the CPU, where smoe's kernels load, each round also sums the buffer as 4 and as 8 sequential streams
    at once (smoe_native::stream_sum), as those kernels read weights: one core reads memory faster so
    (16-18 vs 12-15 GB/s on a Zen 3 here) than torch's one-stream sum, and the faster read is the roofline."""
    buf = huge_empty((nbytes // 4,), torch.float32, device).fill_(1.0)
    reads = [buf.sum]
    if torch.device(device).type == "cpu" and native.available():
        reads += [lambda s=s: torch.ops.smoe_native.stream_sum(buf, s) for s in (4, 8)]
    for read in reads:
        read()

    def probe(repeat: int = 5) -> float:
        best = float("inf")
        for _ in range(repeat):
            for read in reads:
                sync(device)
                t = time.perf_counter()
                read()
                sync(device)
                best = min(best, time.perf_counter() - t)
        return nbytes / best

    return probe
