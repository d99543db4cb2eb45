"""Checkpoints: load and save smoe models in the Hugging Face and Mistral consolidated layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from smoe.checkpoint.files import TensorFiles, write_json, write_safetensors
from smoe.checkpoint.formats import CheckpointError, hf_config_dict, params_dict, parse_dtype, read_config
from smoe.checkpoint.keymap import IGNORED_SUFFIXES, Entry, entries, rope_to_halves, rope_to_pairs
from smoe.kernels.memory import huge_copy, huge_empty
from smoe.model.config import ModelConfig
from smoe.model.transformer import Transformer

__all__ = ["CheckpointError", "load_model", "save_model", "read_config", "convert", "TOKENIZER_FILES"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "tekken.json", "generation_config.json")


def _expected_shape(cfg: ModelConfig, e: Entry, param_shape: tuple[int, ...]) -> tuple[int, ...]:
    if e.expert is not None:
        return param_shape[1:]
    if e.rows != "all":
        return (param_shape[0], 2 * param_shape[1], param_shape[2])
    return param_shape


def _describe(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def load_state(path: Path, cfg: ModelConfig, fmt: str, dtype: torch.dtype, device: torch.device | str,
               param_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """smoe state dict read from the files of a checkpoint, one tensor at a time."""
    files = TensorFiles(path, fmt)
    present = {k for k in files.keys() if not k.endswith(IGNORED_SUFFIXES)}
    fused = fmt == "hf" and "model.layers.0.mlp.experts.gate_up_proj" in present
    table = entries(cfg, fmt, fused=fused)
    if cfg.tie_embeddings:  # some files store the tied output projection anyway
        present.discard("lm_head.weight" if fmt == "hf" else "output.weight")
    expected = {e.key for e in table}
    missing = sorted(expected - present)
    if missing:
        raise CheckpointError(f"{path}: missing tensors: {_describe(missing)}")
    unexpected = sorted(present - expected)
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors (not in a {cfg.n_layers}-layer, {cfg.n_experts}-expert "
                              f"Mixtral): {_describe(unexpected)}")
    for e in table:
        want = _expected_shape(cfg, e, param_shapes[e.name])
        found = files.shape(e.key)
        if tuple(found) != tuple(want):
            raise CheckpointError(f"{path}: tensor {e.key} has shape {tuple(found)}, expected {tuple(want)}")

    state: dict[str, torch.Tensor] = {}
    for e in table:
        if e.expert is not None:  # one slice of a stacked expert weight
            if e.name not in state:
                # on the CPU large tensors go into huge pages (smoe.kernels.memory)
                state[e.name] = huge_empty(param_shapes[e.name], dtype, device)
            state[e.name][e.expert].copy_(files.get(e.key))
            continue
        t = files.get(e.key)
        if e.rows != "all":
            half = t.shape[1] // 2
            t = t[:, :half] if e.rows == "first half" else t[:, half:]
        if e.rope_heads is not None:
            t = rope_to_halves(t, e.rope_heads)
        state[e.name] = huge_copy(t, dtype, device)
    return state


def load_model(path: str | Path, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None) -> Transformer:
    """Load a checkpoint directory into a Transformer, building it on the meta device first."""
    path = Path(path)
    cfg, stored_dtype, fmt = read_config(path)
    dtype = parse_dtype(dtype) or stored_dtype or torch.float32
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = load_state(path, cfg, fmt, dtype, device, shapes)
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.reset_rope(device)
    return model.eval()


def save_model(model: Transformer, path: str | Path, format: str = "hf", max_shard_size: int | str = "5GB") -> None:
    """Write the model's config and weights (per-expert tensor names) in the 'hf' or 'consolidated' layout."""
    if format not in ("hf", "consolidated"):
        raise ValueError(f"unknown checkpoint format {format!r}; use 'hf' or 'consolidated'")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for e in entries(cfg, format):
        t = state[e.name] if e.expert is None else state[e.name][e.expert]
        if e.rope_heads is not None:
            t = rope_to_pairs(t, e.rope_heads)
        tensors[e.key] = t
    if format == "hf":
        write_safetensors(path, tensors, max_shard_size, "model.safetensors")
        write_json(path / "config.json", hf_config_dict(cfg, model.dtype))
    else:
        write_safetensors(path, tensors, max_shard_size, "consolidated.safetensors")
        write_json(path / "params.json", params_dict(cfg))


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of one checkpoint directory into another; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists() and src.resolve() != dst.resolve():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def convert(src: str | Path, dst: str | Path, format: str, dtype: torch.dtype | str | None = None,
            max_shard_size: int | str = "5GB") -> Transformer:
    """Read a checkpoint in either layout and write it in `format`, tokenizer files included."""
    model = load_model(src, dtype=dtype)
    save_model(model, dst, format=format, max_shard_size=max_shard_size)
    copy_tokenizer(Path(src), Path(dst))
    return model


def init_random(config: ModelConfig, out: str | Path, tokenizer: str | Path | None = None, seed: int = 0,
                dtype: torch.dtype | str | None = None) -> Transformer:
    """Create a random-weight model (normal init, seeded) with a tokenizer, saved in the HF layout."""
    from smoe.tokenizer import MISTRAL_NAMES, load_tokenizer
    if tokenizer is None:
        tokenizer = {32000: "mixtral", 32768: "mixtral-8x22b"}.get(config.vocab_size)
        if tokenizer is None:
            raise ValueError(f"no default tokenizer for vocab_size {config.vocab_size}; pass one "
                             f"({', '.join(sorted(MISTRAL_NAMES))} or a tokenizer file)")
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} ids but the model's vocab_size is {config.vocab_size}")
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.reset_rope("cpu")
    model.init_weights(seed=seed)
    model = model.to(parse_dtype(dtype) or torch.float32)
    out = Path(out)
    save_model(model, out, format="hf")
    tok.save(out)
    return model.eval()
