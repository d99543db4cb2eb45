"""Shared builders for the training tests: a small real corpus, a BPE tokenizer, prepared data."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])

# tiny model overrides used across the training tests (2 layers, 4 experts, top-2)
TINY_MODEL = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.hidden_dim=64",
              "model.n_experts=4", "model.top_k=2"]


def make_corpus(root: Path, n_files: int = 12) -> Path:
    """A folder of real Python source: the first files of the standard library's json and email packages."""
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    files = sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))
    for f in files[:n_files]:
        shutil.copy(f, corpus / f"{f.parent.name}_{f.name}")
    return corpus


def make_tokenizer(root: Path, corpus: Path, vocab_size: int = 384):
    from smoe.tokenizer.bpe import train_bpe
    return train_bpe(sorted(corpus.glob("*.py")), vocab_size, root / "tok", show_progress=False)


def make_data(root: Path, n_files: int = 12, vocab_size: int = 384) -> Path:
    """Corpus + tokenizer + `prepare` into root/data (one worker, no progress bar); returns the data dir."""
    from smoe.train.data import prepare
    corpus = make_corpus(root, n_files)
    make_tokenizer(root, corpus, vocab_size)
    prepare([corpus], root / "tok", root / "data", val_fraction=0.2, workers=1, progress=False)
    return root / "data"


def tiny_overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data={data}", f"out_dir={out}", *TINY_MODEL, "batch_size=4", "seq_len=32", "warmup_steps=2",
            "eval_tokens=256", "tensorboard=false", "plots=false", "progress=false", *extra]


def one_step_grads(trainer) -> tuple[dict, dict]:
    """Fit a one-step Trainer; (each parameter's gradient just before the optimizer step, the logged record)."""
    records, grads = [], {}
    trainer.callbacks.append(lambda t, r: records.append(r))
    step = trainer.optimizer.step

    def capture(*a, **k):
        grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
        return step(*a, **k)
    trainer.optimizer.step = capture
    trainer.fit()
    return grads, records[0]
