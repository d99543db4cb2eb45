"""What a training run reports: JSONL and TensorBoard records, console lines, FLOPs and MFU."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from smoe.model.config import ModelConfig


def bar_kwargs() -> dict:
    """tqdm settings: lively on a terminal, a line every few seconds in a log file."""
    return {"mininterval": 0.2 if sys.stderr.isatty() else 10.0, "dynamic_ncols": True}


def measure_peak_flops(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", n: int | None = None,
                       seconds: float = 0.5) -> float:
    """Best FLOP/s of an n x n matmul on this machine now (n: 1024 on CPU, 8192 on GPU): the denominator of MFU."""
    n = n or (8192 if torch.device(device).type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = 0.0
    t_end = time.perf_counter() + seconds
    a @ b
    while time.perf_counter() < t_end or best == 0.0:
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t))
    return best


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 * active non-embedding params + 12 * L * H * hd * T."""
    _, active = cfg.num_params()
    if not cfg.tie_embeddings:
        active -= cfg.vocab_size * cfg.dim  # the input embedding is a lookup, not a matmul
    return 6 * active + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


class RunLog:
    """Append-only metrics.jsonl plus TensorBoard scalars under run_dir/tb."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool = True):
        self.file = run_dir / "metrics.jsonl"
        if resume_step is not None and self.file.exists():
            # a resumed run re-does the steps after its checkpoint: drop their old records
            kept = [ln for ln in self.file.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.file.write_text("".join(k + "\n" for k in kept))
        elif resume_step is None and self.file.exists():
            self.file.unlink()
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: dict) -> None:
        with open(self.file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            kind = record.get("kind", "train")
            for k, v in record.items():
                if k in ("step", "kind") or v is None:
                    continue
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
                elif k.endswith("load") and isinstance(v, list):  # (L, E) fractions per layer
                    for i, row in enumerate(v):
                        self.tb.add_scalars(f"{kind}/{k}_layer{i}", {f"e{e}": x for e, x in enumerate(row)}, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_records(run_dir: str | Path) -> list[dict]:
    """The records of metrics.jsonl (the last one wins for a step logged twice)."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return []
    out: dict[tuple[str, int], dict] = {}
    for ln in f.read_text().splitlines():
        if ln.strip():
            r = json.loads(ln)
            out[(r.get("kind", "train"), r["step"])] = r
    return sorted(out.values(), key=lambda r: (r["step"], r.get("kind", "")))


def fmt_line(r: dict) -> str:
    """One console line for a train record."""
    imb = " ".join(f"{x:.2f}" for x in r.get("imbalance", []))
    s = (f"step {r['step']:>6} | loss {r['loss']:.4f} (ce {r['ce']:.4f} aux {r['aux']:.4f} z {r['z']:.3f}) | "
         f"lr {r['lr']:.2e} | gnorm {r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s | mfu {100 * r['mfu']:.1f}%"
         f" | imbalance/layer {imb}")
    if r.get("dropped_frac") is not None:
        s += f" | dropped {100 * r['dropped_frac']:.2f}%"
    return s
