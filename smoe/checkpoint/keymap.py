"""Tensor names of the two on-disk layouts, written once as tables and used in both directions.

smoe's own names follow mistral-inference; expert weights are stacked per layer (w1, w3: (E, H, D),
w2: (E, D, H)) while both file layouts keep one tensor per expert ({e}). {i} is the layer index.
"""

from __future__ import annotations

from dataclasses import dataclass

from smoe.model.config import ModelConfig

# (smoe name, Hugging Face name, Mistral consolidated name)
KEY_TABLE: list[tuple[str, str, str]] = [
    ("tok_embeddings.weight", "model.embed_tokens.weight", "tok_embeddings.weight"),
    ("norm.weight", "model.norm.weight", "norm.weight"),
    ("output.weight", "lm_head.weight", "output.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight",
     "layers.{i}.attention_norm.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.wq.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attention.wk.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attention.wv.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.wo.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("layers.{i}.feed_forward.gate.weight", "model.layers.{i}.block_sparse_moe.gate.weight",
     "layers.{i}.feed_forward.gate.weight"),
    ("layers.{i}.feed_forward.w1", "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
     "layers.{i}.feed_forward.experts.{e}.w1.weight"),
    ("layers.{i}.feed_forward.w2", "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
     "layers.{i}.feed_forward.experts.{e}.w2.weight"),
    ("layers.{i}.feed_forward.w3", "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
     "layers.{i}.feed_forward.experts.{e}.w3.weight"),
]

# The layout newer transformers keeps in memory (read only): router under mlp.gate, experts fused
# as gate_up_proj (E, 2H, D) = [w1; w3] and down_proj (E, D, H) = w2.
HF_FUSED_TABLE: list[tuple[str, str, str]] = [
    # (smoe name, fused name, which rows of dim 1: "all", "first half", "second half")
    ("layers.{i}.feed_forward.gate.weight", "model.layers.{i}.mlp.gate.weight", "all"),
    ("layers.{i}.feed_forward.w1", "model.layers.{i}.mlp.experts.gate_up_proj", "first half"),
    ("layers.{i}.feed_forward.w3", "model.layers.{i}.mlp.experts.gate_up_proj", "second half"),
    ("layers.{i}.feed_forward.w2", "model.layers.{i}.mlp.experts.down_proj", "all"),
]

# Mistral's consolidated files rotate interleaved pairs; smoe (like transformers) rotates halves.
ROPE_HEADS = {"layers.{i}.attention.wq.weight": "n_heads", "layers.{i}.attention.wk.weight": "n_kv_heads"}

# Buffers some older files carry that are recomputed, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

FORMAT_COLUMN = {"hf": 1, "consolidated": 2}


@dataclass(frozen=True)
class Entry:
    """One file tensor and where it lives in smoe's state dict."""

    name: str  # smoe parameter name
    key: str  # tensor name in the file
    expert: int | None = None  # slice of a stacked expert parameter, if any
    rows: str = "all"  # part of a fused file tensor (dim 1)
    rope_heads: int | None = None  # heads to permute between rope layouts, if any


def entries(cfg: ModelConfig, fmt: str, fused: bool = False) -> list[Entry]:
    """Every file tensor of a model with this config, in the given layout ('hf' or 'consolidated')."""
    col = FORMAT_COLUMN[fmt]
    fused_names = {row[0]: row for row in HF_FUSED_TABLE} if fused else {}
    out: list[Entry] = []
    for row in KEY_TABLE:
        template = row[0]
        if template == "output.weight" and cfg.tie_embeddings:
            continue
        layers = range(cfg.n_layers) if "{i}" in template else [None]
        for i in layers:
            name = template.format(i=i)
            heads = getattr(cfg, ROPE_HEADS[template]) if fmt == "consolidated" and template in ROPE_HEADS else None
            if template in fused_names:
                _, key, rows = fused_names[template]
                out.append(Entry(name, key.format(i=i), rows=rows))
            elif "{e}" in row[col]:
                out += [Entry(name, row[col].format(i=i, e=e), expert=e) for e in range(cfg.n_experts)]
            else:
                out.append(Entry(name, row[col].format(i=i), rope_heads=heads))
    return out


def rope_to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:  # noqa: F821
    """Interleaved-pair rows (Mistral) to rotate-half rows (HF) of a q/k projection (out, in)."""
    out, inp = w.shape
    return w.view(heads, out // heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def rope_to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:  # noqa: F821
    """Inverse of rope_to_halves."""
    out, inp = w.shape
    return w.view(heads, 2, out // heads // 2, inp).transpose(1, 2).reshape(out, inp)
