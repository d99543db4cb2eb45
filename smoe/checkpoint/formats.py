"""Config files of the two layouts: Hugging Face config.json and Mistral params.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from smoe.model.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked; the message names the problem."""


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """torch dtype from a torch.dtype or a name such as 'bf16' or 'bfloat16'."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def detect_format(path: Path) -> str:
    """'hf' if the directory has config.json, 'consolidated' if params.json; else a clear error."""
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is not a directory")
    if (path / "config.json").exists():
        return "hf"
    if (path / "params.json").exists():
        return "consolidated"
    raise CheckpointError(f"{path} holds neither a Hugging Face checkpoint (config.json) nor a Mistral "
                          f"consolidated one (params.json)")


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None


def _build(d: dict, source: Path) -> ModelConfig:
    try:
        return ModelConfig(**d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def read_hf_config(path: Path) -> tuple[ModelConfig, torch.dtype | None]:
    """ModelConfig and stored dtype from a Hugging Face Mixtral config.json."""
    file = path / "config.json"
    c = _read_json(file)
    if c.get("model_type", "mixtral") != "mixtral":
        raise CheckpointError(f"{file}: model_type {c.get('model_type')!r} is not a Mixtral model")
    required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "num_local_experts", "num_experts_per_tok", "vocab_size"]
    missing = [k for k in required if k not in c]
    if missing:
        raise CheckpointError(f"{file} lacks the fields: {', '.join(missing)}")
    rope = c.get("rope_parameters") or {}
    theta = rope.get("rope_theta", c.get("rope_theta", 1e6))
    cfg = _build(dict(
        dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
        n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"], head_dim=c.get("head_dim"),
        hidden_dim=c["intermediate_size"], n_experts=c["num_local_experts"], top_k=c["num_experts_per_tok"],
        vocab_size=c["vocab_size"], norm_eps=c.get("rms_norm_eps", 1e-5), rope_theta=theta,
        max_seq_len=c.get("max_position_embeddings", 32768), sliding_window=c.get("sliding_window"),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    ), file)
    dtype_str = c.get("dtype") or c.get("torch_dtype")
    return cfg, DTYPES.get(dtype_str) if isinstance(dtype_str, str) else None


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype, bos: int = 1, eos: int = 2) -> dict:
    """config.json contents that transformers' MixtralConfig reads (old and new rope keys)."""
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden_dim,
        "num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k, "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "max_position_embeddings": cfg.max_seq_len, "sliding_window": cfg.sliding_window,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_dropout": 0.0,
        "router_jitter_noise": 0.0, "router_aux_loss_coef": 0.02, "output_router_logits": False,
        "initializer_range": 0.02, "bos_token_id": bos, "eos_token_id": eos, "use_cache": True,
        "dtype": dtype_name(dtype), "torch_dtype": dtype_name(dtype),
    }


def read_params(path: Path) -> tuple[ModelConfig, torch.dtype | None]:
    """ModelConfig from a Mistral params.json (with its `moe` block)."""
    file = path / "params.json"
    p = _read_json(file)
    moe = p.get("moe")
    if not isinstance(moe, dict):
        raise CheckpointError(f"{file} has no 'moe' block: it is not a sparse MoE (Mixtral) model")
    missing = [k for k in ["dim", "n_layers", "n_heads", "hidden_dim", "vocab_size"] if k not in p]
    missing += [f"moe.{k}" for k in ["num_experts", "num_experts_per_tok"] if k not in moe]
    if missing:
        raise CheckpointError(f"{file} lacks the fields: {', '.join(missing)}")
    cfg = _build(dict(
        dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p.get("n_kv_heads") or p["n_heads"],
        head_dim=p.get("head_dim"), hidden_dim=p["hidden_dim"], n_experts=moe["num_experts"],
        top_k=moe["num_experts_per_tok"], vocab_size=p["vocab_size"], norm_eps=p.get("norm_eps", 1e-5),
        rope_theta=p.get("rope_theta", 1e6), max_seq_len=p.get("max_seq_len", 32768),
        sliding_window=p.get("sliding_window"), tie_embeddings=bool(p.get("tied_embeddings", False)),
    ), file)
    return cfg, None


def params_dict(cfg: ModelConfig) -> dict:
    """params.json contents in Mistral's layout."""
    d = {"dim": cfg.dim, "n_layers": cfg.n_layers, "head_dim": cfg.head_dim, "hidden_dim": cfg.hidden_dim,
         "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "norm_eps": cfg.norm_eps,
         "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_theta, "max_seq_len": cfg.max_seq_len,
         "moe": {"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k}}
    if cfg.sliding_window is not None:
        d["sliding_window"] = cfg.sliding_window
    if cfg.tie_embeddings:
        d["tied_embeddings"] = True
    return d


def read_config(path: Path) -> tuple[ModelConfig, torch.dtype | None, str]:
    """(config, stored dtype or None, layout) of a checkpoint directory."""
    fmt = detect_format(path)
    cfg, dtype = read_hf_config(path) if fmt == "hf" else read_params(path)
    return cfg, dtype, fmt
