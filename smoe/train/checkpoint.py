"""Training checkpoints: model, optimizer, schedule, RNG states and data position, written atomically.

A checkpoint is a directory `checkpoints/step_00000100/` holding
  config.json + model.safetensors   the model in the Hugging Face layout (smoe/transformers/serve load it)
  tokenizer files                   when the trainer has a tokenizer
  optimizer.pt                      optimizer.state_dict() (plain tensors and numbers; read weights_only)
  rng.pt                            torch / numpy / python RNG states (plain tensors and numbers)
  trainer_state.json                step, schedule, data position, model config, metrics so far
It is written into a hidden temporary directory, every file fsynced, then renamed into place and the
parent fsynced: a kill at any moment leaves the previous checkpoints intact. The last `keep_last` are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from smoe.checkpoint import save_model
from smoe.model.config import ModelConfig

STATE_FILE = "trainer_state.json"
EXTRA_FILE = "extra.pt"  # tensors the model holds beyond the Mixtral weights (LoRA adapters; read weights_only)
PREFIX = "step_"


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed from (missing, incomplete, or for another model)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """Every RNG the training loop may touch, as plain tensors and numbers."""
    np_state = np.random.get_state(legacy=False)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
             "numpy_pos": int(np_state["state"]["pos"]), "numpy_gauss": [int(np_state["has_gauss"]),
                                                                          float(np_state["gauss"])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
                         "has_gauss": state["numpy_gauss"][0], "gauss": state["numpy_gauss"][1]})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories of an interrupted save are ignored)."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, model, optimizer: torch.optim.Optimizer, state: dict,
                    tokenizer=None, keep_last: int = 3) -> Path:
    """Write checkpoint `step` atomically; delete all but the newest keep_last. Returns its directory."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=ckpt_root))
    try:
        save_model(model, tmp, format="hf")  # each file written and fsynced atomically
        extra = extra_tensors(model)
        if extra:
            torch.save({k: v.detach().clone() for k, v in extra.items()}, tmp / EXTRA_FILE)
        if tokenizer is not None:
            tokenizer.save(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_partial(run_dir: str | Path) -> int:
    """Remove temporary directories left by a save that was killed; returns how many."""
    d = Path(run_dir) / "checkpoints"
    n = 0
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(".") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


def read_state(ckpt: str | Path) -> dict:
    f = Path(ckpt) / STATE_FILE
    if not f.exists():
        raise ResumeError(f"{ckpt} is not a complete training checkpoint (no {STATE_FILE})")
    return json.loads(f.read_text())


def check_model_config(saved: dict, cfg: ModelConfig, where: Path) -> None:
    """Raise ResumeError naming every field where the checkpoint's model differs from this one."""
    mine = cfg.to_dict()
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {mine[k]!r}" for k in mine if saved.get(k) != mine[k]]
    if diff:
        raise ResumeError(f"cannot resume from {where}: it was trained with a different model config ("
                          + "; ".join(diff) + ")")


def extra_tensors(model) -> dict[str, torch.Tensor]:
    """The model's state beyond a plain Transformer's (e.g. LoRA adapters): saved beside the weights."""
    from smoe.model.transformer import Transformer
    with torch.device("meta"):
        plain = set(Transformer(model.config).state_dict())
    return {k: v for k, v in model.state_dict().items() if k not in plain}


def _load_extra(ckpt: Path, model) -> None:
    mine = extra_tensors(model)
    saved = torch.load(ckpt / EXTRA_FILE, map_location=model.device, weights_only=True) \
        if (ckpt / EXTRA_FILE).exists() else {}
    if set(saved) != set(mine):
        raise ResumeError(f"cannot resume from {ckpt}: it holds {len(saved)} extra tensors (LoRA adapters), this "
                          f"model {len(mine)}; e.g. {sorted(set(saved) ^ set(mine))[:3]}")
    with torch.no_grad():
        for k, v in saved.items():
            mine[k].copy_(v)


def load_checkpoint(ckpt: str | Path, model, optimizer: torch.optim.Optimizer) -> dict:
    """Load weights, optimizer and RNG states from a checkpoint into model/optimizer; returns trainer state."""
    from smoe.checkpoint import load_model
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    check_model_config(state["model_config"], model.config, ckpt)
    loaded = load_model(ckpt, dtype=model.dtype, device=model.device)
    with torch.no_grad():
        own = model.state_dict()
        for k, v in loaded.state_dict().items():
            own[k].copy_(v)
    _load_extra(ckpt, model)
    try:
        opt_state = torch.load(ckpt / "optimizer.pt", map_location=model.device, weights_only=True)
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
    except Exception as e:
        raise ResumeError(f"{ckpt}: optimizer or RNG state could not be read: {e}") from None
    try:
        optimizer.load_state_dict(opt_state)
    except ValueError as e:
        raise ResumeError(f"cannot resume from {ckpt}: the optimizer state does not fit this model ({e})") from None
    set_rng_state(rng)
    return state
