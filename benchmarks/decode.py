"""Greedy decode tokens/s: smoe (eager and compiled) beside transformers' generate on the same
weights, against the memory roofline measured in the same run.

Decode time per token = (t(generate n_long) - t(generate n_short)) / (n_long - n_short), which
cancels prefill and setup for every implementation alike; median of `--repeat` rounds, each of which
times every implementation in turn. Roofline at batch 1: the bytes of weights one token must read (its
top-k experts, attention, router and norms of every layer, one embedding row, the output projection) /
the streaming-read bandwidth measured here, at the same thread count (torch's default, all cores, unless
--threads), before, after and between every round; the best probe counts, and each batch-1 round is also
reported against the probe right after it (a shared machine's bandwidth moves by 2x within minutes here).
On the CPU both models' weights and the bandwidth probe's buffer are in huge pages (smoe.kernels.memory),
as load_model places weights (one Zen 4 core read 24-27 GB/s from 4 KiB pages and 32-34 GB/s from 2 MiB
ones), and the probe also reads as several streams where smoe's kernels load (smoe.kernels.timing).

    .venv/bin/python benchmarks/decode.py                        # small (30M) and large (~0.8B) models
    .venv/bin/python benchmarks/decode.py --models small --dtypes float32 --batches 1 --repeat 2
    python benchmarks/decode.py --device cuda --models mixtral-8x7b --layers 8 --dtypes bfloat16 \
        --batches 1 --impls smoe
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smoe import Transformer  # noqa: E402
from smoe.generation import generate  # noqa: E402
from smoe.kernels import native  # noqa: E402
from smoe.kernels.memory import to_huge_pages  # noqa: E402
from smoe.kernels.timing import bandwidth_probe, median, sync  # noqa: E402
from smoe.model.config import ModelConfig, get_preset  # noqa: E402

# (b) weights far beyond the caches: ~0.8B parameters, 0.92 GB (fp32) of active weights per token
LARGE = ModelConfig(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, hidden_dim=3584, n_experts=8, top_k=2,
                    vocab_size=32000, max_seq_len=4096)


def model_config(name: str, layers: int | None) -> ModelConfig:
    cfg = LARGE.replace() if name == "large" else get_preset(name)
    return cfg.replace(n_layers=layers) if layers else cfg


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Weight bytes one decoded token reads: active parameters less the embedding table plus one row."""
    _, active = cfg.num_params()
    return (active - cfg.vocab_size * cfg.dim + cfg.dim) * torch.finfo(dtype).bits // 8


def random_model(cfg: ModelConfig, dtype: torch.dtype, device: str, seed: int = 0) -> Transformer:
    """Random weights built on the meta device and filled in place (no full fp32 copy on the target)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to(dtype).to_empty(device=device)  # allocated once, in the target dtype
    model.reset_rope(device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    if torch.device(device).type == "cpu":
        to_huge_pages(model)  # as load_model places weights
    return model.eval()


def hf_from(model: Transformer, dtype: torch.dtype, tmp: str):
    """transformers' MixtralForCausalLM with the same weights, via an HF checkpoint written by smoe."""
    from transformers import MixtralForCausalLM
    model.save_pretrained(tmp)
    hf = MixtralForCausalLM.from_pretrained(tmp, dtype=dtype).to(model.device).eval()
    if model.device.type == "cpu":
        to_huge_pages(hf)  # the same memory placement as smoe's weights, so only the code differs
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def decode_seconds(runs: dict, n_short: int, n_long: int, repeat: int, device,
                   after_round=lambda: None) -> dict[str, list[float]]:
    """Per-token decode times of each implementation from paired short/long generations, in rounds that
    take every implementation in turn (so load from other processes hits them alike); after_round()
    runs after each round (the bandwidth probe)."""
    for run in runs.values():
        run(n_short)
    per_token: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            t_long = timed(lambda run=run: run(n_long), device)
            t_short = timed(lambda run=run: run(n_short), device)
            per_token[name].append(max(t_long - t_short, 1e-9) / (n_long - n_short))
        after_round()
    return per_token


def bench_model(name: str, cfg: ModelConfig, dtype: torch.dtype, batches: list[int], impls: list[str],
                args, probe, bandwidths: list[float]) -> list[dict]:
    device = args.device
    t0 = time.perf_counter()
    model = random_model(cfg, dtype, device)
    print(f"  built {name} {str(dtype)[6:]} in {time.perf_counter() - t0:.0f}s", flush=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(max(batches))]
    rows = []

    def probe_round():
        bandwidths.append(probe(2))

    tmp = tempfile.TemporaryDirectory()
    hf = hf_from(model, dtype, tmp.name) if "transformers" in impls else None
    for B in batches:
        batch = prompts[:B] if B > 1 else prompts[0]
        row = {"model": name, "dtype": str(dtype)[6:], "batch": B, "tok_s": {}, "samples_s": {}}
        runs = {}
        for impl in impls:
            if impl == "transformers":
                ids = torch.tensor(prompts[:B], device=device)

                def run(n, ids=ids):
                    with torch.inference_mode():
                        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False)
            else:
                compile_ = {"smoe": False, "smoe-jit": "jit", "smoe-aot": "aot"}[impl.removesuffix("-nonative")]
                off = native.disabled if impl.endswith("-nonative") else contextlib.nullcontext

                def run(n, compile_=compile_, batch=batch, off=off):
                    with off():
                        generate(model, batch, max_tokens=n, ignore_eos=True, compile=compile_)
            if impl.startswith(("smoe-jit", "smoe-aot")):  # the first step builds (or loads) the compiled step
                row.setdefault("compile_s", {})[impl] = timed(lambda run=run: run(2), device)
            runs[impl] = run
        first_probe = len(bandwidths)
        for impl, samples in decode_seconds(runs, args.short, args.long, args.repeat, device, probe_round).items():
            row["tok_s"][impl] = B / median(samples)
            row["samples_s"][impl] = samples
            print(f"  {name} {row['dtype']} batch {B} {impl}: {row['tok_s'][impl]:.1f} tok/s", flush=True)
        row["round_bandwidths"] = bandwidths[first_probe:]  # the probe after each round, in round order
        rows.append(row)
    tmp.cleanup()
    return rows


def print_table(rows: list[dict], impls: list[str], bandwidths: list[float]) -> str:
    smoe_impls = [i for i in impls if i.startswith("smoe")]
    head = f"{'model':>8} {'dtype':>8} {'B':>3} " + " ".join(f"{i + ' tok/s':>19}" for i in impls)
    head += f" {'roofline tok/s':>15} " + " ".join(f"{i + ' %roof':>17}" for i in smoe_impls)
    if "transformers" in impls:
        head += " " + " ".join(f"{i + '/hf':>17}" for i in smoe_impls) + f" {'hf %roof':>9}"
    lines = [head]
    for r in rows:
        ts = r["tok_s"]
        line = f"{r['model']:>8} {r['dtype']:>8} {r['batch']:>3} " + " ".join(f"{ts.get(i, 0):>19.1f}" for i in impls)
        if r["batch"] == 1:
            roof = r["roofline_tok_s"]
            line += f" {roof:>15.1f} " + " ".join(f"{100 * ts[i] / roof:>16.0f}%" for i in smoe_impls)
        else:
            line += f" {'-':>15} " + " ".join(f"{'-':>17}" for _ in smoe_impls)
        if "transformers" in impls:
            line += " " + " ".join(f"{ts[i] / ts['transformers']:>17.2f}" for i in smoe_impls)
            line += f" {100 * ts['transformers'] / r['roofline_tok_s']:>8.0f}%" if r["batch"] == 1 else f" {'-':>9}"
        lines.append(line)
    lines.append(f"read bandwidth {max(bandwidths) / 1e9:.1f} GB/s (best of {len(bandwidths)} probes before, after "
                 f"and between rounds; lowest {min(bandwidths) / 1e9:.1f})")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["small", "large"],
                   help="preset names or 'large' (dim 1024, 8 layers, H 3584: ~0.8B parameters)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (scaled-down runs)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--impls", nargs="+", default=["smoe", "smoe-jit", "smoe-aot", "transformers"],
                   choices=["smoe", "smoe-jit", "smoe-aot", "transformers", "smoe-nonative", "smoe-jit-nonative",
                            "smoe-aot-nonative"],
                   help="smoe: eager; smoe-jit: compile='jit' (torch.compile; on CUDA captured as a CUDA graph); "
                        "smoe-aot: compile=True (AOTInductor on the CPU; on CUDA the CUDA graph of the eager step); "
                        "-nonative: the same without smoe's CPU kernels (as SMOE_NATIVE=0)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--short", type=int, default=8, help="tokens of the short generation")
    p.add_argument("--long", type=int, default=40, help="tokens of the long generation")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--peak-bandwidth", type=float, default=None,
                   help="spec-sheet memory bandwidth in GB/s, to also report the fraction of it (GPU HBM)")
    p.add_argument("--out", default="runs/benchmarks/decode.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    bw_mb = 4096 if device.startswith("cuda") else 512
    # the bandwidth is probed before, after, and between every round of the models (a shared machine's
    # memory system gives two cores anywhere from ~28 to ~59 GB/s here): the best of them is the roofline
    probe = bandwidth_probe(bw_mb * 2**20, device=device)
    bandwidths = [probe()]
    print(f"read bandwidth {bandwidths[0] / 1e9:.1f} GB/s; threads {torch.get_num_threads()}", flush=True)
    rows = []
    for name in args.models:
        cfg = model_config(name, args.layers)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for r in bench_model(name, cfg, dtype, args.batches, args.impls, args, probe, bandwidths):
                r["bytes_per_token"] = bytes_per_token(cfg, dtype)
                r["config"] = cfg.to_dict()
                rows.append(r)
    bandwidths.append(probe())
    bw = max(bandwidths)
    for r in rows:
        r["roofline_tok_s"] = bw / r["bytes_per_token"]
    table = print_table(rows, args.impls, bandwidths)
    for r in rows:
        if r["batch"] != 1:
            continue
        full = model_config(r["model"], None)
        notes = []
        if args.layers and args.layers != full.n_layers:  # a scaled-down stack: extrapolate by roofline fraction
            r["full_model_estimate_tok_s"] = {i: t / r["roofline_tok_s"] * bw / bytes_per_token(full, getattr(
                torch, r["dtype"])) for i, t in r["tok_s"].items()}
            notes.append(f"{args.layers} of {full.n_layers} layers; at the same roofline fraction the full model "
                         f"would do " + ", ".join(f"{i} {t:.1f}" for i, t in r["full_model_estimate_tok_s"].items())
                         + " tok/s")
        if r["round_bandwidths"]:  # each round against the probe right after it: the same stretch of the machine
            paired = {i: [r["bytes_per_token"] / t / bw_r for t, bw_r in zip(ts, r["round_bandwidths"])]
                      for i, ts in r["samples_s"].items()}
            r["paired_roofline_fraction"] = {i: median(v) for i, v in paired.items()}
            notes.append("each round against the probe after it (median, range): " + ", ".join(
                f"{i} {100 * median(v):.0f}% ({100 * min(v):.0f}-{100 * max(v):.0f}%)" for i, v in paired.items()))
        if args.peak_bandwidth:
            peak = args.peak_bandwidth * 1e9 / r["bytes_per_token"]
            r["peak_roofline_tok_s"] = peak
            notes.append(f"spec peak {args.peak_bandwidth:.0f} GB/s: roofline {peak:.1f} tok/s, "
                         + ", ".join(f"{i} {100 * t / peak:.0f}%" for i, t in r["tok_s"].items()))
        for n in notes:
            line = f"{r['model']} {r['dtype']} batch 1: {n}"
            table += "\n" + line
            print(line)
    result = {"bandwidth_bytes_s": bw, "bandwidths": bandwidths, "threads": torch.get_num_threads(),
              "device": device, "command": " ".join(sys.argv), "rows": rows, "table": table,
              "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
