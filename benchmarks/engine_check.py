"""Greedy token identity of the engine against smoe.generate on any device and dtype (a GPU check).

For each dtype: 64 different prompts through LLM.generate as one continuously batched run (chunked
prefill, then also with a KV pool small enough to force preemption, and a sliding-window model)
against smoe.generate one prompt at a time; and 8 prompts alone. Prints how many sequences are
identical and, for those that are not, the logit margin where they first part (a near-tie shows
that batched and one-at-a-time matmuls rounded differently, not a bug). Exit status 1 when float64
is not fully identical or a lone fp32 request differs.

    .venv/bin/python benchmarks/engine_check.py --device cpu --dtypes float32 float64
    python benchmarks/engine_check.py --device cuda --dtypes float32 float64 bfloat16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smoe import LLM, ModelConfig, SamplingParams, Transformer, generate  # noqa: E402

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, n_experts=8, top_k=2, vocab_size=1024,
                  max_seq_len=512)


def prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (int(torch.randint(1, 120, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def margin_at_split(model, prompt: list[int], a: list[int], b: list[int]) -> float:
    """top-1 minus top-2 logit (float64 recompute) where the two continuations first differ."""
    i = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + a[:i]], device=model.device))[0, -1].double()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def check(dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = Transformer(CFG).to(device=device, dtype=dtype).eval()
    window_model = Transformer(CFG.replace(sliding_window=24)).to(device=device, dtype=dtype).eval()
    if dtype == torch.float64:  # the Triton MoE kernel accumulates in float32 only
        model.set_moe_backend("grouped")
        window_model.set_moe_backend("grouped")
    ps = prompts(64, seed + 1)
    params = [SamplingParams(max_tokens=8 + i % 25) for i in range(64)]
    per_token = 2 * CFG.n_layers * CFG.n_kv_heads * CFG.head_dim * model.dtype.itemsize
    runs = {
        "batch of 64": (model, dict(block_size=16, max_num_batched_tokens=256)),
        "batch of 64, preempting": (model, dict(block_size=8, max_num_batched_tokens=64,
                                                kv_cache_memory=48 * 8 * per_token)),
        "batch of 64, sliding window 24": (window_model, dict(block_size=8, max_num_batched_tokens=64)),
    }
    out = {"dtype": str(dtype).removeprefix("torch."), "device": device}
    for name, (m, kw) in runs.items():
        refs = [generate(m, p, sp).tokens for p, sp in zip(ps, params)]
        llm = LLM(m, **kw)
        got = [o.tokens for o in llm.generate(ps, params, use_tqdm=False)]
        diff = [i for i in range(64) if got[i] != refs[i]]
        out[name] = {"identical": 64 - len(diff), "of": 64, "preemptions": llm.engine.scheduler.num_preemptions,
                     "blocks_left": llm.engine.pool.num_used,
                     "margins_where_they_part": [margin_at_split(m, ps[i], got[i], refs[i]) for i in diff]}
    llm = LLM(model, block_size=16)
    alone = sum(llm.generate(p, sp, use_tqdm=False).tokens == generate(model, p, sp).tokens
                for p, sp in zip(ps[:8], params[:8]))
    out["alone"] = {"identical": alone, "of": 8}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    p.add_argument("--out", default="runs/benchmarks/engine_check.json")
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    results, ok = [], True
    for name in args.dtypes:
        r = check(getattr(torch, name), args.device)
        results.append(r)
        for k, v in r.items():
            if isinstance(v, dict):
                print(f"{r['device']} {r['dtype']:>8} {k:>32}: {v['identical']}/{v['of']} identical"
                      + (f", {v['preemptions']} preemptions, {v['blocks_left']} blocks left" if "preemptions" in v
                         else "")
                      + (f", margins where they part: {[f'{x:.2e}' for x in v['margins_where_they_part']]}"
                         if v.get("margins_where_they_part") else ""), flush=True)
                if v.get("blocks_left"):
                    ok = False
        if name == "float64" and any(v["identical"] != v["of"] for v in r.values() if isinstance(v, dict)):
            ok = False
        if name == "float32" and r["alone"]["identical"] != r["alone"]["of"]:
            ok = False
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}; {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
