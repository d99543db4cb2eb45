"""Export a trained model to the Hugging Face layout (smoe, transformers and the server load it)."""

from __future__ import annotations

from pathlib import Path

import torch

from smoe.checkpoint import CheckpointError, load_model
from smoe.checkpoint.formats import parse_dtype


def export_model(model, out: str | Path, tokenizer=None, dtype: torch.dtype | str | None = None) -> Path:
    """Write model (optionally cast to dtype) with save_pretrained, and its tokenizer alongside."""
    out = Path(out)
    dtype = parse_dtype(dtype)
    m = model if dtype is None or dtype == model.dtype else _cast_copy(model, dtype)
    m.save_pretrained(out, format="hf")
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def _cast_copy(model, dtype: torch.dtype):
    import copy
    return copy.deepcopy(model).to(dtype)


def export(src: str | Path, out: str | Path, dtype: torch.dtype | str | None = None) -> Path:
    """Export a run directory (its latest checkpoint) or one checkpoint directory to `out` in the HF layout."""
    from smoe.tokenizer import load_tokenizer
    from smoe.train.checkpoint import latest_checkpoint
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    ckpt = src if (src / "config.json").exists() else latest_checkpoint(src)
    if ckpt is None:
        raise CheckpointError(f"{src} is neither a checkpoint directory (config.json) nor a run with checkpoints")
    model = load_model(ckpt)
    try:
        tok = load_tokenizer(ckpt)
    except FileNotFoundError:
        tok = None
    return export_model(model, out, tok, dtype)
