"""Serving throughput and latency: a running `smoe serve` at several concurrencies beside transformers'
generate on the same weights (one request at a time, and one static padded batch).

A fixed, seeded request mix (random token-id prompts and output lengths, EOS ignored so every
request produces exactly its length) is sent as streaming completions by a light asyncio client;
per request it records the time to the first token (TTFT) and the gaps between tokens (ITL).
Throughput = output tokens / wall time of the whole run. transformers runs in this process, with the
same number of threads, while no server runs: one request at a time both before and after the smoe
runs, and the faster of the two is the baseline (on a shared machine the load moves between runs;
taking transformers' better run keeps the ratios conservative). Every run starts after a warm-up
(smoe: one burst of as many 8-token requests as its concurrency; transformers: two whole prompts).
The client is a minimal raw-socket HTTP/1.1 one, so that it takes as little as possible of the CPU it
shares with the server.

    .venv/bin/python benchmarks/serve.py                          # small preset, concurrency 1 8 32 64
    .venv/bin/python benchmarks/serve.py --preset tiny --concurrency 1 8 --requests 16 --hf-sequential 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smoe.checkpoint import init_random  # noqa: E402
from smoe.model.config import get_preset  # noqa: E402


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def request_mix(n: int, vocab: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int
                ) -> list[tuple[list[int], int]]:
    """n (prompt ids, output length) pairs, the same for every implementation."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(prompt_range[0], prompt_range[1] + 1, (1,), generator=g))
        m = int(torch.randint(output_range[0], output_range[1] + 1, (1,), generator=g))
        out.append(([1] + torch.randint(3, vocab, (p - 1,), generator=g).tolist(), m))
    return out


def summarize(name: str, n_requests: int, tokens: int, wall: float, ttfts: list[float], itls: list[float]) -> dict:
    return {"name": name, "requests": n_requests, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "itl_p50": percentile(itls, 50), "itl_p99": percentile(itls, 99)}


# ---- smoe serve -----------------------------------------------------------------------------------

def start_server(model_dir: Path, threads: int, log: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "smoe.cli", "serve", str(model_dir), "--port", str(port),
           "--served-model-name", "bench", *extra]
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"smoe serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("smoe serve did not start")


async def stream_events(host: str, port: int, body: bytes) -> list[float]:
    """POST a streaming completion over a raw connection; the arrival time of every SSE event.

    A minimal HTTP/1.1 client (chunked transfer, one connection per request): on a 2-core machine
    the client shares the CPU with the server, so it should cost as little as possible.
    """
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (host.encode(), len(body), body))
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"server answered {status!r}: {await reader.read(2000)!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass  # headers
    times: list[float] = []
    while True:  # chunked body: size line, data, CRLF
        size = int((await reader.readline()).strip() or b"0", 16)
        if size == 0:
            break
        data = await reader.readexactly(size + 2)
        times.extend([time.perf_counter()] * data.count(b"data: {"))
    writer.close()
    return times


async def run_clients(url: str, mix: list[tuple[list[int], int]], concurrency: int) -> dict:
    host, port = url.removeprefix("http://").split(":")
    sem = asyncio.Semaphore(concurrency)
    ttfts, itls, tokens = [], [], 0

    async def one(prompt: list[int], m: int) -> None:
        nonlocal tokens
        body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": m, "temperature": 0,
                           "ignore_eos": True, "stream": True}).encode()
        async with sem:
            t0 = time.perf_counter()
            times = await stream_events(host, int(port), body)
            if len(times) != m:
                raise RuntimeError(f"asked for {m} tokens, got {len(times)} events")
            ttfts.append(times[0] - t0)
            itls.extend(b - a for a, b in zip(times, times[1:]))
            tokens += m

    await asyncio.gather(*(one(p, 8) for p, _ in mix[:concurrency]))  # warm-up: one burst at this concurrency
    ttfts.clear()
    itls.clear()
    tokens = 0
    t0 = time.perf_counter()
    await asyncio.gather(*(one(p, m) for p, m in mix))
    wall = time.perf_counter() - t0
    return summarize(f"smoe serve, concurrency {concurrency}", len(mix), tokens, wall, ttfts, itls)


@torch.inference_mode()
def offline(model_dir: Path, mix: list[tuple[list[int], int]], max_seqs: int, dtype: torch.dtype, device: str,
            kv: str | None) -> dict:
    """The same requests through smoe.LLM in this process (the engine without HTTP), max_seqs at a time."""
    from smoe import LLM, SamplingParams
    llm = LLM(model_dir, dtype=dtype, device=device, max_num_seqs=max_seqs, kv_cache_memory=kv)
    llm.generate([p for p, _ in mix[:max_seqs]], SamplingParams(max_tokens=8), use_tqdm=False)  # the same warm-up
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in mix], [SamplingParams(max_tokens=m, ignore_eos=True) for _, m in mix],
                        use_tqdm=False)
    wall = time.perf_counter() - t0
    assert [len(o.tokens) for o in outs] == [m for _, m in mix]
    del llm
    return summarize(f"smoe LLM offline, {max_seqs} at a time", len(mix), sum(m for _, m in mix), wall, [], [])


# ---- transformers ---------------------------------------------------------------------------------

def hf_model(model_dir: Path, dtype: torch.dtype, device: str):
    from transformers import MixtralForCausalLM
    model = MixtralForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@torch.inference_mode()
def hf_one_at_a_time(model, mix: list[tuple[list[int], int]]) -> dict:
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self):
            pass

    ttfts, itls, tokens = [], [], 0
    dev = model.device
    for prompt, _ in mix[:2]:  # warm-up: two whole prompts
        model.generate(torch.tensor([prompt], device=dev), max_new_tokens=8, do_sample=False)
    t_all = time.perf_counter()
    for prompt, m in mix:
        clock = Clock()
        t0 = time.perf_counter()
        out = model.generate(torch.tensor([prompt], device=dev), max_new_tokens=m, min_new_tokens=m, do_sample=False,
                             streamer=clock)
        assert out.shape[1] == len(prompt) + m
        ttfts.append(clock.times[0] - t0)
        itls.extend(b - a for a, b in zip(clock.times, clock.times[1:]))
        tokens += m
    return summarize("transformers generate, one at a time", len(mix), tokens, time.perf_counter() - t_all, ttfts,
                     itls)


@torch.inference_mode()
def hf_static_batch(model, mix: list[tuple[list[int], int]]) -> dict:
    """All requests as one left-padded batch run to the longest output; useful tokens are counted."""
    T = max(len(p) for p, _ in mix)
    ids = torch.zeros(len(mix), T, dtype=torch.long)
    mask = torch.zeros(len(mix), T, dtype=torch.long)
    for b, (p, _) in enumerate(mix):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    longest = max(m for _, m in mix)
    ids, mask = ids.to(model.device), mask.to(model.device)
    model.generate(ids[:, -8:], attention_mask=mask[:, -8:], max_new_tokens=2, do_sample=False)  # warm-up
    t0 = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return summarize(f"transformers generate, static batch of {len(mix)}", len(mix), sum(m for _, m in mix), wall,
                     [wall] * len(mix), [])


# ---- report ---------------------------------------------------------------------------------------

def table(rows: list[dict], base: float) -> str:
    ms = (lambda x: "-" if x != x else f"{x * 1000:.0f}")  # noqa: E731
    lines = ["| run | requests | output tokens | wall s | tokens/s | vs one-at-a-time | TTFT p50 ms | TTFT p99 ms "
             "| ITL p50 ms | ITL p99 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tok_s']:.1f} | "
                     f"{r['tok_s'] / base:.1f}x | {ms(r['ttft_p50'])} | {ms(r['ttft_p99'])} | {ms(r['itl_p50'])} | "
                     f"{ms(r['itl_p99'])} |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help="model shape (random weights, Mixtral tokenizer)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--requests", type=int, default=128, help="requests in the mix; concurrency c sends "
                   "max(--min-requests, 2c) of them")
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--hf-sequential", type=int, default=16, help="requests transformers runs one at a time")
    p.add_argument("--hf-batch", type=int, default=32, help="requests in transformers' static batch (0: skip)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[16, 256])
    p.add_argument("--output-len", type=int, nargs=2, default=[32, 128])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads of both")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--layers", type=int, default=None, help="change the preset's number of layers")
    p.add_argument("--kv-cache-memory", default=None, help="the server's KV cache size (default: its own)")
    p.add_argument("--server-args", default="", help="extra `smoe serve` arguments")
    p.add_argument("--offline", type=int, nargs="*", default=[32],
                   help="also run the engine without HTTP (smoe.LLM) at these concurrencies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/benchmarks/serve.json")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)
    if args.layers:
        cfg = cfg.replace(n_layers=args.layers)
    dtype = getattr(torch, args.dtype)
    total, active = cfg.num_params()
    mix = request_mix(args.requests, cfg.vocab_size, tuple(args.prompt_len), tuple(args.output_len), args.seed)
    print(f"{args.preset}: {total / 1e6:.0f}M params ({active / 1e6:.0f}M active), {args.dtype} on {args.device}, "
          f"{args.threads} threads; "
          f"prompts {args.prompt_len[0]}-{args.prompt_len[1]} tokens, outputs {args.output_len[0]}-"
          f"{args.output_len[1]} tokens", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        init_random(cfg, model_dir, seed=args.seed)
        hf = hf_model(model_dir, dtype, args.device)
        before = hf_one_at_a_time(hf, mix[: args.hf_sequential])
        print(f"  {before['name']} (before): {before['tok_s']:.1f} tok/s", flush=True)
        del hf
        server_args = ["--device", args.device, "--dtype", args.dtype, *args.server_args.split()]
        if args.kv_cache_memory:
            server_args += ["--kv-cache-memory", args.kv_cache_memory]
        proc, url = start_server(model_dir, args.threads, Path(tmp) / "server.log", server_args)
        try:
            for c in args.concurrency:
                n = min(len(mix), max(args.min_requests, 2 * c))
                row = asyncio.run(run_clients(url, mix[:n], c))
                print(f"  {row['name']}: {row['tok_s']:.1f} tok/s", flush=True)
                rows.append(row)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        for c in args.offline:
            n = min(len(mix), max(args.min_requests, 2 * c))
            row = offline(model_dir, mix[:n], c, dtype, args.device, args.kv_cache_memory)
            print(f"  {row['name']}: {row['tok_s']:.1f} tok/s", flush=True)
            rows.append(row)
        hf = hf_model(model_dir, dtype, args.device)
        after = hf_one_at_a_time(hf, mix[: args.hf_sequential])
        print(f"  {after['name']} (after): {after['tok_s']:.1f} tok/s", flush=True)
        base = max(before, after, key=lambda r: r["tok_s"])
        rows.append(base)
        if args.hf_batch:
            row = hf_static_batch(hf, mix[: args.hf_batch])
            print(f"  {row['name']}: {row['tok_s']:.1f} tok/s", flush=True)
            rows.append(row)
    text = table(rows, base["tok_s"])
    print(text, flush=True)
    result = {"preset": args.preset, "threads": args.threads, "device": args.device, "dtype": args.dtype,
              "cpu": _cpu_name(), "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "config": cfg.to_dict(), "rows": rows,
              "hf_one_at_a_time_tok_s": {"before": before["tok_s"], "after": after["tok_s"]},
              "prompt_len": args.prompt_len, "output_len": args.output_len, "table": text}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
