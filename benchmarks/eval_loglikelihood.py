"""lm-eval loglikelihood throughput: smoe's lm-eval model (SmoeLM) beside lm-eval's own `hf` model
(HFLM, transformers' MixtralForCausalLM) on the same random checkpoint and the same requests, with
the largest per-request difference of their log-probabilities.

Workload: multiple-choice shaped requests (a context of ~ctx tokens, `choices` continuations each).

    .venv/bin/python benchmarks/eval_loglikelihood.py                     # small preset, CPU, fp32
    .venv/bin/python benchmarks/eval_loglikelihood.py --contexts 8 --repeat 1
    python benchmarks/eval_loglikelihood.py --device cuda --dtype bfloat16 --dim 1024 --layers 8
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "eval"))

from smoe_eval_testkit import CORPUS, make_checkpoint  # noqa: E402


def requests(n_contexts: int, choices: int, ctx_words: int, seed: int = 0):
    from lm_eval.api.instance import Instance
    rng = random.Random(seed)
    words = " ".join(CORPUS).split()
    out = []
    for c in range(n_contexts):
        ctx = " ".join(rng.choice(words) for _ in range(ctx_words))
        for k in range(choices):
            cont = " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
            out.append(Instance("loglikelihood", {}, (ctx + "\nAnswer:", cont), c * choices + k))
    return out


def timed(fn, repeat: int) -> tuple[float, list]:
    best, res = float("inf"), None
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        res = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, default=16)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--ctx-words", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", default="runs/benchmarks/eval_loglikelihood.json")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from lm_eval.models.huggingface import HFLM

    from smoe.eval.lm import SmoeLM
    with tempfile.TemporaryDirectory() as d:
        ckpt = make_checkpoint(Path(d) / "m", max_seq_len=4096, dim=args.dim, n_layers=args.layers,
                               n_heads=8, n_kv_heads=4, hidden_dim=2 * args.dim, n_experts=8, top_k=2)
        reqs = requests(args.contexts, args.choices, args.ctx_words)
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        smoe_lm = SmoeLM(pretrained=str(ckpt), dtype=dt, device=args.device, batch_size=args.batch_size,
                         max_batch_tokens=1 << 20)
        hf_lm = HFLM(pretrained=str(ckpt), dtype=args.dtype, device=args.device, batch_size=args.batch_size)
        n_tokens = sum(len(smoe_lm.tok_encode(c + x)) for c, x in (r.args for r in reqs))
        t_smoe, r_smoe = timed(lambda: smoe_lm.loglikelihood(reqs, disable_tqdm=True), args.repeat)
        t_hf, r_hf = timed(lambda: hf_lm.loglikelihood(reqs, disable_tqdm=True), args.repeat)
    diff = max(abs(a[0] - b[0]) for a, b in zip(r_smoe, r_hf))
    rows = [("smoe (SmoeLM)", t_smoe), ("lm-eval hf (HFLM)", t_hf)]
    print(f"{len(reqs)} loglikelihood requests ({n_tokens} tokens), batch {args.batch_size}, {args.dtype} on "
          f"{args.device}, dim {args.dim} x {args.layers} layers, 8 experts top-2; best of {args.repeat}")
    print("| impl | s | requests/s | tokens/s | vs hf |\n|---|---:|---:|---:|---:|")
    for name, t in rows:
        print(f"| {name} | {t:.3f} | {len(reqs) / t:.1f} | {n_tokens / t:.0f} | {t_hf / t:.2f}x |")
    print(f"max |logprob smoe - hf| over the requests: {diff:.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "requests": len(reqs), "tokens": n_tokens, "smoe_s": t_smoe,
                               "hf_s": t_hf, "speedup_vs_hf": t_hf / t_smoe, "max_abs_diff": diff}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
