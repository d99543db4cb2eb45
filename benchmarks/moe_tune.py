"""Sweep the Triton MoE kernels' tile configurations on a GPU, kernel by kernel, at one MoE shape.

For each token count: the up kernel (gather + w1/w3 + SiLU-and-multiply) and the down kernel (w2 +
router weight) are timed alone with every candidate tiling of each layout that applies (matrix-vector
kernels for a few slots, per-expert blocks up to 16 slots, sorted blocks beyond). Beside them, in the
same run: the touched experts' own matmuls (cuBLAS, rows pre-gathered) and the weight bytes they read,
so each kernel shows as time and as GB/s. Prints the best tiling per layout and size, writes JSON.

    python benchmarks/moe_tune.py --preset mixtral-8x7b --tokens 1 2 4 8 16 64 256 1024 4096 8192

Needs CUDA, or TRITON_INTERPRET=1 with --device cpu and tiny sizes to check that it runs. block_config in
smoe/kernels/triton_moe.py holds the tilings it found on an H200.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton  # noqa: E402
import triton.testing  # noqa: E402

import smoe.kernels.triton_moe as tm  # noqa: E402
from smoe.model.config import get_preset  # noqa: E402

# (BLOCK_N, BLOCK_K, num_warps, num_stages)
GEMV = [(bn, bk, w, st) for bn, bk in ((8, 512), (16, 256), (16, 512), (32, 128), (32, 256), (64, 128))
        for w in (4, 8) for st in (1, 3)]
PER_EXPERT = [(bn, bk, 4, st) for bn, bk in ((16, 256), (32, 128), (32, 256), (64, 64), (64, 128), (128, 64))
              for st in (3, 4, 5)]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
SORTED = [(32, 64, 64, 4, 4), (32, 128, 64, 4, 4), (32, 64, 128, 4, 4), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3),
          (64, 128, 64, 8, 4), (64, 256, 64, 8, 3), (64, 128, 128, 8, 3), (64, 64, 128, 4, 4), (64, 256, 32, 8, 4),
          (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
          (128, 128, 128, 8, 3), (128, 64, 128, 8, 3)]


def bench(fn) -> float:
    """Median milliseconds of fn: Triton's do_bench on a GPU (L2 flushed before each call); one timed
    call on the CPU (the interpreter: a smoke test of this script, not a measurement)."""
    if not torch.cuda.is_available():
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def kernels_for(layout: str, S: int):
    """(name, config) candidates for the up and the down kernel of this layout at S slots."""
    if layout == "gemv":
        return [dict(kind="gemv", tiles=dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st))
                for bn, bk, w, st in GEMV]
    if layout == "per_expert":
        return [dict(kind="dot", BLOCK_M=tm.PER_EXPERT_MAX_SLOTS, GROUP_M=1,
                     tiles=dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)) for bn, bk, w, st in PER_EXPERT]
    return [dict(kind="dot", BLOCK_M=bm, GROUP_M=8, tiles=dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st))
            for bm, bn, bk, w, st in SORTED]


def launchers(c: dict, x, w1, w2, w3, experts, weights):
    """Closures launching only the up kernel and only the down kernel with candidate c (smoe's launch code)."""
    S, H, D = experts.numel(), w1.shape[1], x.shape[1]
    h = torch.randn(S, H, device=x.device, dtype=x.dtype)
    y = x.new_empty(S, D)
    rw = weights.reshape(-1)
    layout = tm.slot_layout(c, experts, w1.shape[0])

    def up():
        tm.launch_up(c, c["tiles"], layout, x, w1, w3, h, experts)

    def down():
        tm.launch_down(c, c["tiles"], layout, h, w2, y, rw, experts)
    return up, down


def touched_matmuls(x, w1, w2, w3, experts):
    """cuBLAS on each touched expert's pre-gathered rows: the vendor cost of the same arithmetic."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()
    rows = x[order // experts.shape[1]]
    work, lo = [], 0
    for e, c in enumerate(counts):
        if c:
            work.append((rows[lo:lo + c].contiguous(), torch.randn(c, w1.shape[1], device=x.device, dtype=x.dtype), e))
            lo += c

    def up():
        for r, _, e in work:
            F.linear(r, w1[e])
            F.linear(r, w3[e])

    def down():
        for _, h, e in work:
            F.linear(h, w2[e])
    return up, down, sum(1 for c in counts if c)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mixtral-8x7b")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 256, 1024, 4096, 8192])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--dim", type=int, help="override the preset's dim (small runs)")
    p.add_argument("--hidden-dim", type=int, help="override the preset's expert hidden size")
    p.add_argument("--max-candidates", type=int, default=None, help="try only the first N tilings per layout")
    p.add_argument("--device", default="cuda", help="cuda; cpu only under TRITON_INTERPRET=1")
    p.add_argument("--out", default="runs/benchmarks/moe_tune.json")
    args = p.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available() or dev == "cpu" and not tm.INTERPRETED:
        raise SystemExit("moe_tune.py needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1)")
    cfg = get_preset(args.preset)
    cfg = cfg.replace(**{k: v for k, v in (("dim", args.dim), ("hidden_dim", args.hidden_dim)) if v})
    D, H, E, K = cfg.dim, cfg.hidden_dim, cfg.n_experts, cfg.top_k
    dt = getattr(torch, args.dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    w1, w3 = (torch.randn(E, H, D, device=dev, dtype=dt, generator=g) * D**-0.5 for _ in range(2))
    w2 = torch.randn(E, D, H, device=dev, dtype=dt, generator=g) * H**-0.5
    gate = torch.randn(E, D, device=dev, dtype=dt, generator=g)
    esize = torch.finfo(dt).bits // 8
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)"
    result = {"device": name, "torch": torch.__version__, "triton": triton.__version__,
              "shape": dict(D=D, H=H, E=E, K=K), "dtype": args.dtype, "cases": []}
    print(f"{result['device']} torch {torch.__version__} triton {triton.__version__}: D={D} H={H} E={E} K={K}",
          flush=True)
    t0 = time.perf_counter()
    for N in args.tokens:
        S = N * K
        x = torch.randn(N, D, device=dev, dtype=dt, generator=g)
        weights, experts = torch.topk(F.linear(x, gate).float(), K, dim=-1)
        weights = torch.softmax(weights, -1).to(dt)
        m_up, m_down, touched = touched_matmuls(x, w1, w2, w3, experts)
        case = {"tokens": N, "slots": S, "touched_experts": touched,
                "matmuls_ms": {"up": bench(m_up), "down": bench(m_down)},
                "weight_bytes": {"up": 2 * touched * H * D * esize, "down": touched * H * D * esize}, "layouts": {}}
        layouts = ["gemv"] if S <= 16 else []
        layouts += ["per_expert"] if S <= tm.PER_EXPERT_MAX_SLOTS else ["sorted"]
        for layout in layouts:
            res = []
            for c in kernels_for(layout, S)[:args.max_candidates]:
                try:
                    up, down = launchers(c, x, w1, w2, w3, experts, weights)
                    res.append({"config": c, "up_ms": bench(up), "down_ms": bench(down)})
                except Exception as err:  # a tiling that does not fit (shared memory, registers)
                    res.append({"config": c, "error": f"{type(err).__name__}: {str(err)[:200]}"})
            ok = [r for r in res if "error" not in r]
            best_up = min(ok, key=lambda r: r["up_ms"])
            best_down = min(ok, key=lambda r: r["down_ms"])
            case["layouts"][layout] = {"all": res, "best_up": best_up, "best_down": best_down}
        result["cases"].append(case)
        mm = case["matmuls_ms"]
        wb = case["weight_bytes"]
        print(f"\ntokens {N} (slots {S}, {touched} experts touched): cuBLAS up {mm['up'] * 1e3:.0f} us "
              f"({wb['up'] / mm['up'] / 1e6:.0f} GB/s), down {mm['down'] * 1e3:.0f} us "
              f"({wb['down'] / mm['down'] / 1e6:.0f} GB/s)   [{time.perf_counter() - t0:.0f}s]", flush=True)
        for layout, r in case["layouts"].items():
            bu, bd = r["best_up"], r["best_down"]
            n_err = sum("error" in a for a in r["all"])
            print(f"  {layout:>10}: up {bu['up_ms'] * 1e3:7.0f} us ({wb['up'] / bu['up_ms'] / 1e6:5.0f} GB/s) "
                  f"{bu['config']}", flush=True)
            print(f"  {'':>10}  down {bd['down_ms'] * 1e3:5.0f} us ({wb['down'] / bd['down_ms'] / 1e6:5.0f} GB/s) "
                  f"{bd['config']}  [{n_err} tilings did not build]", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out} in {time.perf_counter() - t0:.0f}s")
    return result


if __name__ == "__main__":
    main()
