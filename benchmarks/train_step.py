"""Training-step tokens/s: smoe beside transformers' MixtralForCausalLM on the same config, weights and batch.

One step = forward + cross-entropy + load-balancing loss (router logits out, aux loss on: transformers with
output_router_logits=True, ours with LMObjective) + backward + AdamW step. Both models start from the same
weights (ours saved with save_pretrained and loaded by transformers); their first-step losses are checked
against each other before timing. Steps alternate between the two (smoe.kernels.timing.time_interleaved)
so load from other processes hits both alike; the times are medians, the speed-up the median of the steps'
paired ratios (smoe.kernels.timing.paired_ratio).

    .venv/bin/python benchmarks/train_step.py                       # quickstart and small shapes, CPU
    .venv/bin/python benchmarks/train_step.py --shapes quickstart --batch 8 --seq 256 --repeat 5
    python benchmarks/train_step.py --device cuda --shapes small --autocast bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smoe import Transformer  # noqa: E402
from smoe.kernels.memory import keep_freed_memory  # noqa: E402
from smoe.kernels.timing import amx_ns_per_product, median, paired_ratio, time_interleaved  # noqa: E402
from smoe.model.config import ModelConfig, get_preset  # noqa: E402
from smoe.train.losses import LMObjective  # noqa: E402
from smoe.train.recipes import QUICKSTART_MODEL  # noqa: E402

AUX_COEF = 0.02  # transformers' coefficient; ours is scaled by top_k so both add the same gradient


def shape(name: str) -> ModelConfig:
    return QUICKSTART_MODEL.replace() if name == "quickstart" else get_preset(name)


def build(cfg: ModelConfig, device: str, tmp: Path, experts_impl: str | None):
    """(smoe model, transformers model) with identical weights on `device`."""
    from transformers import MixtralForCausalLM
    torch.manual_seed(0)
    ours = Transformer(cfg)
    ours.save_pretrained(tmp)
    kw = {"experts_implementation": experts_impl} if experts_impl else {}
    hf = MixtralForCausalLM.from_pretrained(tmp, dtype=torch.float32, output_router_logits=True,
                                            router_aux_loss_coef=AUX_COEF, **kw)
    return ours.to(device).train(), hf.to(device).train()


def make_steps(ours, hf, batch: dict, autocast: str | None, device: str):
    top_k = ours.config.top_k
    objective = LMObjective(aux_coef=AUX_COEF * top_k, z_coef=0.0)  # ours scores 1 when balanced, theirs top_k
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, foreach=True)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, foreach=True)
    ctx = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if autocast else (
        lambda: torch.autocast(torch.device(device).type, enabled=False))
    def step_ours():
        with ctx():
            loss, _ = objective(ours, batch)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss

    def step_hf():
        with ctx():
            out = hf(input_ids=batch["tokens"])  # output_router_logits=True: out.aux_loss is computed
            logits = out.logits
            ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                   batch["targets"].reshape(-1))
            loss = ce + AUX_COEF * out.aux_loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return loss
    return step_ours, step_hf


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="quickstart,small", help="comma-separated: quickstart, tiny, small, medium")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", default=None, choices=[None, "bf16"])
    ap.add_argument("--experts-impl", default=None, help="transformers' experts_implementation (default: its own "
                    "choice; 'eager' is the per-expert loop)")
    ap.add_argument("--out", default="runs/benchmarks/train_step.json")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc as it is (by default it keeps freed memory, as smoe's trainer makes it)")
    args = ap.parse_args(argv)
    kept = not args.default_malloc and keep_freed_memory()  # for both models: they share this process
    rows = []
    for name in args.shapes.split(","):
        cfg = shape(name).replace(max_seq_len=max(args.seq, 256))
        with tempfile.TemporaryDirectory() as tmp:
            ours, hf = build(cfg, args.device, Path(tmp), args.experts_impl)
        g = torch.Generator().manual_seed(1)
        w = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(args.device)
        batch = {"tokens": w[:, :-1], "targets": w[:, 1:]}
        step_ours, step_hf = make_steps(ours, hf, batch, args.autocast, args.device)
        l_ours, l_hf = float(step_ours().detach()), float(step_hf().detach())  # first step: same weights, same loss
        assert abs(l_ours - l_hf) < 1e-3 * max(1.0, abs(l_hf)), (name, l_ours, l_hf)
        amx_before = amx_ns_per_product(args.device)
        times = time_interleaved({"smoe": step_ours, "transformers": step_hf}, repeat=args.repeat, warmup=1,
                                 device=args.device)
        amx = None if amx_before is None else [amx_before, amx_ns_per_product(args.device)]
        n_tok = args.batch * args.seq
        t_ours, t_hf = median(times["smoe"]), median(times["transformers"])
        total, active = cfg.num_params()
        rows.append({"shape": name, "params_M": round(total / 1e6, 2), "active_M": round(active / 1e6, 2),
                     "batch": args.batch, "seq": args.seq, "device": args.device, "autocast": args.autocast,
                     "threads": torch.get_num_threads(), "freed_memory_kept": kept,
                     "hf_experts_impl": getattr(hf.config, "_experts_implementation", None),
                     "first_loss_smoe": l_ours, "first_loss_hf": l_hf,
                     "smoe_s": t_ours, "hf_s": t_hf, "smoe_tok_s": n_tok / t_ours, "hf_tok_s": n_tok / t_hf,
                     "speedup": paired_ratio(times["transformers"], times["smoe"]),
                     "samples_smoe": times["smoe"], "samples_hf": times["transformers"],
                     "amx_ns_per_product": amx})
    print(f"\ntraining step (forward + CE + aux loss + backward + AdamW), batch {args.batch} x {args.seq} tokens, "
          f"{args.device}, {torch.get_num_threads()} threads, autocast {args.autocast}, malloc keeps freed memory: "
          f"{'yes' if kept else 'no'}")
    print("| shape | params (active) | transformers experts | transformers tok/s | smoe tok/s | smoe / transformers |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['params_M']}M ({r['active_M']}M) | {r['hf_experts_impl']} | {r['hf_tok_s']:,.0f} | "
              f"{r['smoe_tok_s']:,.0f} | {r['speedup']:.2f}x |")
        if r["amx_ns_per_product"]:  # a shared tile unit slows both models' bf16 products, not alike
            print("  AMX tile unit before/after: {:.1f}/{:.1f} ns per product".format(*r["amx_ns_per_product"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
