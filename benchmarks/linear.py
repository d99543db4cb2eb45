"""x @ w.T without autograd on the CPU: the library's own path beside the ones smoe.kernels.linear picks.

For each shape (rows M of x, weight out x in as nn.Linear stores it) the same product is timed as
F.linear (x @ w.T), as (w @ x.T).T (reads w row by row), as the same with every row twice ("pair"),
through oneDNN's linear, in bf16 through smoe's AVX512-BF16 kernel (smoe.kernels.native) where it
loads, and as smoe.kernels.linear.linear (the choice smoe makes). Weights are cycled over enough copies to exceed
the caches, as in a decode or serving step where every weight comes from memory. Prints a table
(microseconds per product, medians, and smoe's speed-up over F.linear, the median of paired ratios) and writes JSON.

    .venv/bin/python benchmarks/linear.py                 # the small preset's shapes, 1 thread
    .venv/bin/python benchmarks/linear.py --rows 1 8 32 --shapes 32000x256 --repeat 5
    .venv/bin/python benchmarks/linear.py --dtype bfloat16 --rows 1 2 4 8 16 32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smoe.kernels import linear as L  # noqa: E402
from smoe.kernels import native  # noqa: E402
from smoe.kernels.timing import median, paired_ratio, time_interleaved  # noqa: E402


def candidates(x: torch.Tensor, ws: list[torch.Tensor]) -> dict:
    """One call of each path; each call takes the next weight copy."""
    i = [0]

    def nxt() -> torch.Tensor:
        i[0] = (i[0] + 1) % len(ws)
        return ws[i[0]]

    fns = {"F.linear": lambda: F.linear(x, nxt()),
           "(w@x.T).T": lambda: torch.mm(nxt(), x.t()).t().contiguous(),
           "pair": lambda: torch.mm(nxt(), torch.cat([x, x]).t())[:, : x.shape[0]].t().contiguous(),
           "smoe": lambda: L.linear(x, nxt())}
    if L.ONEDNN and x.dtype == torch.float32:  # smoe takes it for fp32 only (bf16 fails without AVX512-BF16)
        fns["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(x, nxt(), None, "none", [], "")
    if x.dtype == torch.bfloat16:
        fns["as fp32"] = lambda: F.linear(x.float(), nxt().float()).bfloat16()
    if native.available():
        fns["native"] = lambda: native.gemv(x, nxt())

        def without_native():
            with native.disabled():
                return L.linear(x, nxt())
        fns["smoe-nonative"] = without_native
    return fns


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 512])
    p.add_argument("--shapes", nargs="+", default=["512x256", "256x512", "32000x256"],
                   help="weight shapes OUTxIN (default: the small preset's expert w1, w2 and output projection)")
    p.add_argument("--cache-bytes", type=float, default=64e6, help="weight copies cycled: at least this many bytes")
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default="runs/benchmarks/linear.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    rows, lines = [], []
    for shape in args.shapes:
        O, I = (int(v) for v in shape.split("x"))
        size = torch.finfo(dtype).bits // 8
        ws = [torch.randn(O, I).to(dtype) for _ in range(max(1, int(args.cache_bytes // (O * I * size))))]
        for M in args.rows:
            x = torch.randn(M, I).to(dtype)
            ref = F.linear(x, ws[0])
            err = (L.linear(x, ws[0]) - ref).abs().max().item()  # bf16: both round one fp32 sum
            fns = candidates(x, ws)
            n = max(1, len(ws) // 4)  # a sample = n calls, so one sample is not a single cached weight
            samples = time_interleaved({k: (lambda f=f, n=n: [f() for _ in range(n)]) for k, f in fns.items()},
                                       repeat=args.repeat)
            us = {k: median(v) / n * 1e6 for k, v in samples.items()}
            speedup = paired_ratio(samples["F.linear"], samples["smoe"])
            rows.append({"out": O, "in": I, "rows": M, "us": us, "speedup": speedup, "max_abs_diff": err})
            lines.append(f"{shape:>10} {M:>5} " + " ".join(f"{us[k]:>12.1f}" for k in fns) + f" {speedup:>10.2f}x")
    head = f"{'weight':>10} {'rows':>5} " + " ".join(f"{k:>12}" for k in candidates(torch.zeros(1, 1, dtype=dtype),
                                                                                     [torch.zeros(1, 1, dtype=dtype)]))
    text = "\n".join([head + f" {'F.linear/smoe':>11}  (us per product)"] + lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "dtype": args.dtype, "onednn": L.ONEDNN, "rows": rows,
                               "table": text}, indent=1))
    print(f"wrote {out}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
