"""Decode ms per token of this checkout against another git revision, interleaved: which change is faster.

A change of a few percent is below the run-to-run noise of decode.py here (the machine's memory
bandwidth moves by 10-30% within minutes). This runs the same greedy decode in two worker processes,
one importing smoe from this checkout and one from a git worktree of `--base`, and times them in
alternating rounds (the idle one waits), so both see the same stretch of the machine. Per round:
(t(generate n_long) - t(generate n_short)) / (n_long - n_short), as in decode.py. Prints the medians
and the per-round ratio base/this (above 1: this checkout is faster) and writes JSON.

    .venv/bin/python benchmarks/decode_ab.py --base HEAD~1                          # small, bf16, AOT step
    .venv/bin/python benchmarks/decode_ab.py --base main --model large --dtype float32 --rounds 6 --long 40
    .venv/bin/python benchmarks/decode_ab.py --base HEAD~1 --model large --batch 8 --compile none --long 40
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One side: build the model once, then time a decode for every line read from stdin."""
    sys.path.insert(0, args.root)  # smoe from root, ahead of the editable install and this script's folder
    sys.path.insert(1, str(Path(args.root) / "benchmarks"))
    import torch
    from decode import model_config, random_model

    from smoe.generation import generate
    if args.threads:
        torch.set_num_threads(args.threads)
    model = random_model(model_config(args.model, args.layers), getattr(torch, args.dtype), "cpu")
    prompt = [list(range(1 + b, 9 + b)) for b in range(args.batch)] if args.batch > 1 else list(range(1, 9))
    compile_ = {"none": False, "aot": True, "jit": "jit"}[args.compile]

    def run(n: int) -> float:
        t = time.perf_counter()
        generate(model, prompt, max_tokens=n, ignore_eos=True, compile=compile_)
        return time.perf_counter() - t

    run(args.short)  # builds or loads a compiled step
    print("ready", flush=True)
    for _ in sys.stdin:
        print((run(args.long) - run(args.short)) / (args.long - args.short), flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision to compare against (a worktree of it is made)")
    p.add_argument("--model", default="small", help="preset name or 'large' (as decode.py)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--compile", default="aot", choices=["none", "aot", "jit"], help="the decode step (default: AOT)")
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together (ms per step of the batch)")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--short", type=int, default=8)
    p.add_argument("--long", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/benchmarks/decode_ab.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: the root to import smoe from
    args = p.parse_args(argv)
    if args.worker:
        args.root = args.worker
        worker(args)
        return {}
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base], capture_output=True,
                         text=True)
    if rev.returncode != 0:
        raise SystemExit(f"--base {args.base!r} is not a revision of {ROOT}: {rev.stderr.strip()}")
    tmp = Path(tempfile.mkdtemp(prefix="smoe-ab-"))
    base_root = tmp / "base"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_root), args.base],
                   check=True)
    sides = {"base": str(base_root), "this": str(ROOT)}
    flags = [f"--{k}={v}" for k, v in (("model", args.model), ("dtype", args.dtype), ("compile", args.compile),
                                        ("short", args.short), ("long", args.long), ("threads", args.threads),
                                        ("batch", args.batch))]
    flags += [f"--layers={args.layers}"] if args.layers else []
    procs = {}
    try:
        for name, root in sides.items():  # the worker puts root first on sys.path (worker())
            procs[name] = subprocess.Popen([sys.executable, __file__, "--base", args.base, "--worker", root, *flags],
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for line in procs[name].stdout:
                if line.strip() == "ready":
                    break
            else:
                raise SystemExit(f"the {name} worker ({root}) stopped before it was ready")
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(args.rounds):
            for name in (("base", "this") if r % 2 == 0 else ("this", "base")):
                procs[name].stdin.write("go\n")
                procs[name].stdin.flush()
                seconds[name].append(float(procs[name].stdout.readline()))
            print(f"  round {r + 1}/{args.rounds}: base {seconds['base'][-1] * 1e3:.3f} ms, "
                  f"this {seconds['this'][-1] * 1e3:.3f} ms", flush=True)
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_root)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = [b / t for b, t in zip(seconds["base"], seconds["this"])]
    result = {"base": args.base, "base_commit": rev.stdout.strip(), "model": args.model, "dtype": args.dtype,
              "compile": args.compile, "threads": args.threads, "batch": args.batch, "seconds_per_token": seconds,
              "median_ms": {k: statistics.median(v) * 1e3 for k, v in seconds.items()},
              "ratio_base_over_this": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}
    m = result["median_ms"]
    print(f"{args.model} {args.dtype} batch {args.batch} compile={args.compile}, {args.rounds} rounds: "
          f"base ({args.base}) "
          f"{m['base']:.3f} ms, this {m['this']:.3f} ms per token; base/this per round: median "
          f"{statistics.median(ratios):.3f}, range {min(ratios):.2f}-{max(ratios):.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
