"""How the quickstart's tokenizer and model size were chosen: train several shapes for the same wall-clock
budget, each pinned to its own 2 CPU cores, and compare validation bits per byte (comparable across
tokenizers). Needs 2 free cores per config (run it on a machine with many cores, or pass fewer configs).

    python benchmarks/quickstart_sweep.py --minutes 5.5                  # all configs at once (14 cores)
    python benchmarks/quickstart_sweep.py --minutes 2 --configs bpe4k-d128-L4,bpe4k-d192-L4 --workdir /tmp/sw

Data: the running interpreter's standard library, tokenized once per tokenizer under --workdir.
Bits/byte = validation loss / ln 2 * (validation tokens / validation bytes) of the split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # name: (tokenizer, dim, layers, heads, kv heads, expert hidden, segment mask)
    "bpe4k-d128-L4": ("bpe4096", 128, 4, 4, 2, 256, False),
    "bpe4k-d192-L4": ("bpe4096", 192, 4, 6, 2, 384, False),
    "bpe4k-d256-L4": ("bpe4096", 256, 4, 8, 4, 512, False),
    "bpe8k-d192-L4": ("bpe8192", 192, 4, 6, 2, 384, False),
    "bpe2k-d192-L4": ("bpe2048", 192, 4, 6, 2, 384, False),
    "mixtral32k-d192-L4": ("mixtral", 192, 4, 6, 2, 384, False),
    "bpe4k-d192-L4-segmask": ("bpe4096", 192, 4, 6, 2, 384, True),
}


def prepare_data(workdir: Path, tokenizer: str) -> Path:
    from smoe.quickstart import stdlib_files
    from smoe.tokenizer.bpe import train_bpe
    from smoe.train.data import prepare
    data = workdir / f"data-{tokenizer}"
    if (data / "meta.json").exists():
        return data
    files = stdlib_files()
    tok = tokenizer
    if tokenizer.startswith("bpe"):
        tok = str(workdir / f"tok-{tokenizer}")
        train_bpe(files, int(tokenizer[3:]), tok, max_bytes=8_000_000, show_progress=False)
    prepare(files, tok, data, val_fraction=0.05, seed=0, progress=False)
    return data


def run_one(name: str, data: str, cores: str, minutes: float, out: str) -> None:
    """Train one shape for `minutes` on the given cores; print a RESULT line."""
    os.sched_setaffinity(0, {int(c) for c in cores.split(",")})
    import torch
    torch.set_num_threads(len(cores.split(",")))
    from smoe.model.config import ModelConfig
    from smoe.model.transformer import Transformer
    from smoe.train.data import PackedBatches, TokenData, eval_windows, unigram_logprobs
    from smoe.train.evaluate import LMEval
    from smoe.train.losses import LMObjective
    from smoe.train.trainer import TrainConfig, Trainer
    _, dim, layers, heads, kv, hidden, seg = SHAPES[name]
    td = TokenData(data)
    cfg = ModelConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, hidden_dim=hidden, n_experts=8,
                      top_k=2, vocab_size=td.vocab_size, max_seq_len=256, rope_theta=1e4)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    tc = TrainConfig(out_dir=f"{out}/{name}", max_steps=0, max_minutes=minutes, batch_size=16, seq_len=256, lr=3e-3,
                     warmup_steps=30, log_every=10, eval_every=100, eval_tokens=32768, save_every=10**9,
                     tensorboard=False, plots=False, progress=False, export=False, segment_mask=seg)
    windows, segs = eval_windows(td, "val", 256, 32768, segments=seg)
    ev = LMEval(windows, 16, unigram_logprobs=unigram_logprobs(td), segments=segs)
    res = Trainer(model, tc, PackedBatches(td, "train", 16, 256, seed=0, segments=seg), LMObjective(), ev).fit()
    val = td.meta["splits"]["val"]
    last = res["history"]["last_eval"]
    per_byte = val["tokens"] / val["bytes"] / math.log(2)
    print("RESULT " + json.dumps({"name": name, "steps": res["step"], "tokens": res["tokens_seen"],
                                  "val_loss": last["val_loss"], "bits_per_byte": last["val_loss"] * per_byte,
                                  "unigram_bpb": last["unigram_loss"] * per_byte,
                                  "params": cfg.num_params(), "peak_gflops": res["peak_flops"] / 1e9}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=5.5)
    ap.add_argument("--configs", default=",".join(SHAPES))
    ap.add_argument("--workdir", default="runs/quickstart-sweep")
    ap.add_argument("--out", default="runs/benchmarks/quickstart_sweep.json")
    ap.add_argument("--one", nargs=4, metavar=("NAME", "DATA", "CORES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        run_one(args.one[0], args.one[1], args.one[2], args.minutes, args.one[3])
        return
    names = args.configs.split(",")
    n_cores = len(os.sched_getaffinity(0))
    if 2 * len(names) > n_cores:
        raise SystemExit(f"{len(names)} configs need {2 * len(names)} cores, {n_cores} available: pass fewer")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = {t: prepare_data(workdir, t) for t in sorted({SHAPES[n][0] for n in names})}
    cores = sorted(os.sched_getaffinity(0))
    procs = []
    for i, name in enumerate(names):
        log = open(workdir / f"{name}.log", "w")
        pair = f"{cores[2 * i]},{cores[2 * i + 1]}"
        procs.append((name, subprocess.Popen(
            [sys.executable, __file__, "--minutes", str(args.minutes), "--one", name, str(data[SHAPES[name][0]]), pair,
             str(workdir)], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2"})))
    t0 = time.time()
    results = []
    for name, p in procs:
        p.wait()
        lines = [ln for ln in (workdir / f"{name}.log").read_text().splitlines() if ln.startswith("RESULT ")]
        results.append(json.loads(lines[-1][7:]) if lines else {"name": name, "error": "see " + str(workdir)})
    print(f"\n{len(names)} configs, {args.minutes:g} minutes each on 2 pinned cores ({time.time() - t0:.0f}s)")
    print("| config | steps | tokens | val loss (nats/token) | bits/byte | unigram bits/byte |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error']} |")
            continue
        print(f"| {r['name']} | {r['steps']} | {r['tokens']:,} | {r['val_loss']:.3f} | {r['bits_per_byte']:.3f} | "
              f"{r['unigram_bpb']:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"minutes": args.minutes, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
