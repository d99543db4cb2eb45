"""GPU kernels of one decode step, by name: how many launches and how much GPU time a token costs.

Profiles a long and a short greedy generation (torch.profiler) and prints the difference per decoded
token, so prefill and set-up cancel out. By default the step is eager: a CUDA-graph replay (--compile aot)
runs the same kernels without the CPU launch cost, and their count is what the small per-layer kernels
add beyond the weight reads; --compile jit profiles the graph of the torch.compile'd step (fused kernels).

    python benchmarks/step_profile.py --model mixtral-8x7b --layers 4 [--compile jit]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decode import model_config, random_model  # noqa: E402

from smoe.generation import generate  # noqa: E402


def kernels(model, prompt: list[int], n: int, compile: bool | str = False) -> dict[str, list[float]]:
    """{kernel name: [launches, GPU microseconds]} of one greedy generation of n tokens."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate(model, prompt, max_tokens=n, ignore_eos=True, compile=compile)
        torch.cuda.synchronize()
    out: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        if us is None:
            us = e.cuda_time_total
        if e.device_type == torch.autograd.DeviceType.CUDA and us > 0:
            out[e.key][0] += e.count
            out[e.key][1] += us
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--short", type=int, default=4)
    p.add_argument("--long", type=int, default=20)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--compile", default="none", choices=["none", "aot", "jit"],
                   help="the decode step: eager (none), the CUDA graph of it (aot) or of the compiled step (jit)")
    p.add_argument("--out", default="runs/benchmarks/step_profile.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step_profile.py profiles CUDA kernels: it needs a GPU")
    cfg = model_config(args.model, args.layers)
    model = random_model(cfg, getattr(torch, args.dtype), "cuda")
    prompt = list(range(3, 19))
    compile_ = {"none": False}.get(args.compile, args.compile)
    generate(model, prompt, max_tokens=args.short, ignore_eos=True, compile=compile_)  # warm-up: builds, compiles
    long_, short = kernels(model, prompt, args.long, compile_), kernels(model, prompt, args.short, compile_)
    steps = args.long - args.short
    rows = []
    for name, (count, us) in long_.items():
        c0, t0 = short.get(name, (0, 0.0))
        if count - c0 > 0:
            rows.append((name, (count - c0) / steps, (us - t0) / steps))
    rows.sort(key=lambda r: -r[2])
    total_n, total_us = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"{args.model}, {cfg.n_layers} layers, {args.dtype}, step {args.compile}: per decoded token "
          f"{total_n:.0f} kernels, {total_us:.0f} us of GPU time ({total_n / cfg.n_layers:.1f} kernels per layer)")
    print(f"{'launches':>9} {'us':>9} {'us/launch':>10}  kernel")
    for name, n, us in rows[:args.top]:
        print(f"{n:>9.1f} {us:>9.1f} {us / n:>10.2f}  {name[:110]}")
    result = {"model": args.model, "layers": cfg.n_layers, "dtype": args.dtype, "compile": args.compile,
              "kernels_per_token": total_n,
              "gpu_us_per_token": total_us, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
