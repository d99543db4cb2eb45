"""One MoE layer, the same weights and tokens given to every implementation, timed side by side.

Implementations: smoe's `grouped` (and `triton` on CUDA) and `naive` backends (the MoE module,
routing included), transformers' MixtralSparseMoeBlock with its default experts implementation
(`grouped_mm`) and with `eager`, a dense SwiGLU of hidden top_k x H over the same tokens (the
dense-equivalent: the ideal cost of the active parameters), and, forward only, the touched experts'
own matmuls on pre-gathered rows (the floor at decode sizes). Prints a table per dtype and mode and
writes JSON. On CPUs with AMX each row also shows the tile unit's rate before and after its timing (ns per
tile product: where another VM shares the core it varies 3-4x within seconds, and bf16 timings with it;
compare ratios of rows whose rates agree). The implementations run in interleaved rounds, in reversed order every
other round; each ratio is the median over rounds of the two times' ratio within a round, so that the machine's
drift between rounds cancels (the JSON keeps every round's times).

    .venv/bin/python benchmarks/moe_layer.py                       # medium-preset expert shape
    .venv/bin/python benchmarks/moe_layer.py --tokens 1 16 --dtypes float32 --modes fwd --repeat 3
    python benchmarks/moe_layer.py --device cuda --preset mixtral-8x7b --dtypes bfloat16 --modes fwd \
        --tokens 1 16 128 1024 8192 --impls triton grouped torch_grouped_mm dense
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smoe.kernels import BACKENDS  # noqa: E402
from smoe.kernels.grouped import sort_by_expert  # noqa: E402
from smoe.kernels.linear import linear  # noqa: E402
from smoe.kernels.memory import keep_freed_memory  # noqa: E402
from smoe.kernels.timing import amx_ns_per_product, median, paired_ratio, time_interleaved  # noqa: E402
from smoe.model.config import get_preset  # noqa: E402
from smoe.model.transformer import MoE, route  # noqa: E402

ALL_IMPLS = ["grouped", "triton", "naive", "hf_grouped_mm", "hf_eager", "torch_grouped_mm", "dense", "matmuls"]
DEFAULT_IMPLS = ["grouped", "naive", "hf_grouped_mm", "hf_eager", "dense", "matmuls"]


def make_layer(cfg, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Random MoE weights (std 0.02, router a bit larger so routing is not uniform) in every layout."""
    g = torch.Generator(device=device).manual_seed(seed)
    E, H, D, K = cfg.n_experts, cfg.hidden_dim, cfg.dim, cfg.top_k

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    w = {"gate": rnd(E, D, std=0.5 / D**0.5), "w1": rnd(E, H, D), "w2": rnd(E, D, H), "w3": rnd(E, H, D),
         "dense_w1": rnd(K * H, D), "dense_w2": rnd(D, K * H), "dense_w3": rnd(K * H, D)}
    return w


def smoe_module(cfg, w: dict, backend: str) -> MoE:
    """smoe's MoE module (routing included) over the shared weights (each module its own Parameters)."""
    with torch.device("meta"):
        m = MoE(cfg)
    with torch.no_grad():
        m.gate.weight = torch.nn.Parameter(w["gate"])
        m.w1, m.w2, m.w3 = (torch.nn.Parameter(w[k]) for k in ("w1", "w2", "w3"))
    m.backend = backend
    return m


def hf_block(cfg, w: dict, impl: str):
    """transformers' MixtralSparseMoeBlock holding the same weights, with the given experts implementation."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    hc = MixtralConfig(hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_local_experts=cfg.n_experts,
                       num_experts_per_tok=cfg.top_k, router_jitter_noise=0.0)
    hc._experts_implementation = impl
    dev, dt = w["w1"].device, w["w1"].dtype
    block = MixtralSparseMoeBlock(hc).to(device=dev, dtype=dt)
    with torch.no_grad():
        block.gate.weight.copy_(w["gate"])
        block.experts.gate_up_proj.copy_(torch.cat([w["w1"], w["w3"]], dim=1))
        block.experts.down_proj.copy_(w["w2"])
    return block


class Dense(torch.nn.Module):
    """The dense-equivalent SwiGLU: hidden top_k x H, every token through all of it."""

    def __init__(self, w: dict):
        super().__init__()
        self.w1, self.w2, self.w3 = (torch.nn.Parameter(w[k]) for k in ("dense_w1", "dense_w2", "dense_w3"))

    def forward(self, x):
        return linear(F.silu(linear(x, self.w1)) * linear(x, self.w3), self.w2)  # the same matmul paths as smoe


def vendor_grouped_mm():
    """torch's grouped GEMM: F.grouped_mm where public (torch >= 2.12), else torch._grouped_mm, else None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class TorchGroupedMM(torch.nn.Module):
    """The same MoE through torch's grouped_mm (sorted rows, offsets): the vendor grouped-GEMM reference."""

    def __init__(self, cfg, w: dict):
        super().__init__()
        self.top_k = cfg.top_k
        self.gate = torch.nn.Parameter(w["gate"])
        # grouped_mm wants (E, in, out) right-hand sides; transposed views of the stacked weights
        self.w1, self.w2, self.w3 = (torch.nn.Parameter(w[k]) for k in ("w1", "w2", "w3"))

    def forward(self, x):
        B, T, D = x.shape
        x_ND = x.reshape(-1, D)
        weights_NK, experts_NK, _ = route(x_ND, self.gate, self.top_k)
        flat = experts_NK.reshape(-1)
        order = torch.argsort(flat, stable=True)
        offs = torch.bincount(flat, minlength=self.w1.shape[0]).cumsum(0).to(torch.int32)
        token = order // self.top_k
        x_SD = x_ND[token]
        gmm = vendor_grouped_mm()
        h = F.silu(gmm(x_SD, self.w1.transpose(1, 2), offs=offs)) * gmm(x_SD, self.w3.transpose(1, 2), offs=offs)
        y = gmm(h, self.w2.transpose(1, 2), offs=offs) * weights_NK.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x_ND).index_add(0, token, y).view(B, T, D)


class TouchedMatmuls:
    """Forward only: just the three matmuls of every touched expert on its pre-gathered rows."""

    def __init__(self, w: dict, x_ND: torch.Tensor, experts_NK: torch.Tensor):
        token_S, _, counts = sort_by_expert(experts_NK, w["w1"].shape[0])
        x_SD = x_ND[token_S]
        self.work = []
        lo = 0
        for e, c in enumerate(counts):
            if c:
                x_e = x_SD[lo:lo + c].contiguous()
                h_e = torch.randn(c, w["w1"].shape[1], device=x_ND.device, dtype=x_ND.dtype)
                self.work.append((x_e, h_e, w["w1"][e], w["w2"][e], w["w3"][e]))
                lo += c

    def __call__(self):
        for x_e, h_e, w1, w2, w3 in self.work:
            linear(x_e, w1)  # smoe.kernels.linear: the library path smoe's grouped backend takes too
            linear(x_e, w3)
            linear(h_e, w2)


def build_impls(cfg, w: dict, impls: list[str]) -> dict:
    """The modules to time; one that cannot be built here (no transformers, no grouped_mm) is left out."""
    mods = {}
    for name in impls:
        try:
            if name in ("grouped", "naive", "triton"):
                if name in BACKENDS:
                    mods[name] = smoe_module(cfg, w, name)
            elif name == "hf_grouped_mm":
                mods[name] = hf_block(cfg, w, "grouped_mm")
            elif name == "hf_eager":
                mods[name] = hf_block(cfg, w, "eager")
            elif name == "torch_grouped_mm":
                if vendor_grouped_mm() is None:
                    raise RuntimeError("this torch has no grouped_mm")
                mods[name] = TorchGroupedMM(cfg, w)
            elif name == "dense":
                mods[name] = Dense(w)
        except Exception as err:  # report and carry on with the others
            print(f"left out {name}: {type(err).__name__}: {err}", flush=True)
    return mods


def call(name: str, mod, x: torch.Tensor) -> torch.Tensor:
    out = mod(x)
    return out[0] if isinstance(out, tuple) else out


def run_case(cfg, w: dict, mods: dict, n_tokens: int, mode: str, repeat: int, device: str, with_matmuls: bool,
             stat: str = "median", min_seconds: float = 0.5, seed: int = 0) -> dict:
    """Time every implementation on the same n_tokens; returns {impl: median seconds} plus checks."""
    g = torch.Generator().manual_seed(seed + n_tokens)
    dt = w["w1"].dtype
    x = torch.randn(1, n_tokens, cfg.dim, generator=g).to(device=device, dtype=dt)
    grad = torch.randn(1, n_tokens, cfg.dim, generator=g).to(device=device, dtype=dt) * 0.01
    fns = {}
    for name, mod in mods.items():
        params = list(mod.parameters())
        if mode == "fwd":
            def fn(name=name, mod=mod):
                with torch.no_grad():
                    call(name, mod, x)
        else:
            def fn(name=name, mod=mod, params=params):
                for p in params:
                    p.grad = None
                xg = x.detach().requires_grad_()
                call(name, mod, xg).backward(grad)
        fns[name] = fn
    if with_matmuls and mode == "fwd":
        _, experts_NK, _ = route(x.reshape(-1, cfg.dim), w["gate"], cfg.top_k)
        fns["matmuls"] = TouchedMatmuls(w, x.reshape(-1, cfg.dim), experts_NK)
    # agreement with the naive backend (or grouped) on this input: the benchmark times the same math
    ref_name = "naive" if "naive" in mods else next(iter(mods))
    err, failed = {}, {}
    with torch.no_grad():
        ref = call(ref_name, mods[ref_name], x).float()
        for n, m in mods.items():
            try:
                y = call(n, m, x).float()
                if n != "dense":
                    err[n] = float((y - ref).abs().max())
            except Exception as e:  # e.g. a shape a vendor kernel refuses: record it, time the rest
                failed[n] = f"{type(e).__name__}: {e}"[:500]
                fns.pop(n, None)
                print(f"  {n} failed at {n_tokens} tokens: {failed[n]}", flush=True)
    for n in list(fns):  # one warm-up call each; a mode an implementation cannot do is recorded and skipped
        try:
            fns[n]()
        except Exception as e:
            failed[n] = f"{type(e).__name__}: {e}"[:500]
            fns.pop(n)
            print(f"  {n} failed at {n_tokens} tokens ({mode}): {failed[n]}", flush=True)
    min_s = min_seconds if n_tokens <= 64 else 0.0  # more rounds where one round is short
    amx_before = amx_ns_per_product(device)
    samples = time_interleaved(fns, repeat=repeat, warmup=0, device=device, min_seconds=min_s)
    amx_after = amx_ns_per_product(device)
    pick = min if stat == "min" else median
    return {"seconds": {k: pick(v) for k, v in samples.items()}, "min_seconds": {k: min(v) for k, v in samples.items()},
            "samples": samples,
            "max_abs_diff_vs_" + ref_name: err, "failed": failed,
            "rounds": len(next(iter(samples.values()))),
            "amx_ns_per_product": None if amx_before is None else [amx_before, amx_after]}


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def ratios(case: dict, main: str, stat: str = "median") -> dict[str, float]:
    """main's time over each other implementation's: the median of the rounds' paired ratios (the machine's drift
    between rounds cancels in each), or with --stat min the ratio of the fastest rounds."""
    s, t = case["seconds"], case["samples"]
    if main not in t:
        return {}
    if stat == "min":
        return {k: s[main] / s[k] for k in s if k != main}
    return {k: paired_ratio(t[main], t[k]) for k in t if k != main}


def print_table(rows: list[dict], impls: list[str], title: str, main: str) -> str:
    cols = [i for i in impls if any(i in r["seconds"] for r in rows)]
    head = f"{'tokens':>7} " + " ".join(f"{c:>14}" for c in cols)
    refs = [c for c in ("dense", "hf_grouped_mm", "hf_eager", "matmuls", "torch_grouped_mm") if c in cols]
    head += "   " + " ".join(f"{main + '/' + r:>22}" for r in refs)
    amx = any(r.get("amx_ns_per_product") for r in rows)
    lines = [title, head + ("   AMX ns/product before/after" if amx else "") + "   (ms)"]
    for r in rows:
        s = r["seconds"]
        line = f"{r['tokens']:>7} " + " ".join(f"{s[c] * 1e3:>14.3f}" if c in s else f"{'-':>14}" for c in cols)
        line += "   " + " ".join(f"{fmt_ratio(r['ratios'].get(ref)):>22}" for ref in refs)
        if r.get("amx_ns_per_product"):
            line += "   {:>14.1f}/{:.1f}".format(*r["amx_ns_per_product"])
        lines.append(line)
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="medium", help="take dim, hidden_dim, n_experts, top_k from this preset")
    p.add_argument("--dim", type=int)
    p.add_argument("--hidden-dim", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 512, 4096])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--impls", nargs="+", default=None, choices=ALL_IMPLS,
                   help="default: grouped naive hf_grouped_mm hf_eager dense matmuls (+ triton on cuda)")
    p.add_argument("--repeat", type=int, default=5, help="interleaved rounds per case (median reported)")
    p.add_argument("--min-seconds", type=float, default=0.5,
                   help="at 64 tokens or fewer, keep adding rounds (up to 5x --repeat) until this much time passed")
    p.add_argument("--stat", default="median", choices=["median", "min"], help="statistic of the rounds shown")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/benchmarks/moe_layer.json")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc as it is (by default it keeps freed memory, as smoe's trainer makes it)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = not args.default_malloc and keep_freed_memory()
    cfg = get_preset(args.preset)
    changes = {k: v for k, v in (("dim", args.dim), ("hidden_dim", args.hidden_dim), ("n_experts", args.experts),
                                 ("top_k", args.top_k)) if v is not None}
    cfg = cfg.replace(**changes)
    impls = args.impls or (DEFAULT_IMPLS + (["triton", "torch_grouped_mm"] if args.device.startswith("cuda") else []))
    main_impl = "triton" if "triton" in impls and "triton" in BACKENDS and args.device.startswith("cuda") else "grouped"
    shape = {"dim": cfg.dim, "hidden_dim": cfg.hidden_dim, "n_experts": cfg.n_experts, "top_k": cfg.top_k}
    result = {"machine": machine(args.device), "statistic": args.stat, "shape": shape, "freed_memory_kept": kept,
              "command": " ".join(sys.argv), "cases": []}
    print(f"MoE layer: D={cfg.dim} H={cfg.hidden_dim} E={cfg.n_experts} K={cfg.top_k}; {result['machine']}; "
          f"malloc keeps freed memory: {'yes' if kept else 'no'}")
    tables = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        w = make_layer(cfg, dtype, args.device)
        mods = build_impls(cfg, w, impls)
        for mode in args.modes:
            rows = []
            for n in args.tokens:
                r = run_case(cfg, w, mods, n, mode, args.repeat, args.device, "matmuls" in impls, args.stat,
                             args.min_seconds)
                r.update(tokens=n, dtype=dtype_name, mode=mode, ratios=ratios(r, main_impl, args.stat))
                rows.append(r)
                result["cases"].append(r)
            tables.append(print_table(rows, list(mods) + ["matmuls"], f"\n[{dtype_name}, {mode}]", main_impl))
    result["tables"] = tables
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return result


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} torch {torch.__version__}"
    name = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}"


if __name__ == "__main__":
    main()
