"""Model configuration: one dataclass, named presets, parameter counts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Hyper-parameters of a Mixtral-architecture sparse MoE transformer."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int | None = None  # None: dim // n_heads
    hidden_dim: int = 14336  # hidden size of one expert's SwiGLU
    n_experts: int = 8
    top_k: int = 2
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_seq_len: int = 32768
    sliding_window: int | None = None  # None: full causal attention
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.dim // max(self.n_heads, 1)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        positive = ["dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                    "n_experts", "top_k", "vocab_size", "max_seq_len"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"config: n_heads ({self.n_heads}) must be a multiple of "
                             f"n_kv_heads ({self.n_kv_heads})")
        if self.top_k > self.n_experts:
            raise ValueError(f"config: top_k ({self.top_k}) must be <= n_experts ({self.n_experts})")
        if self.head_dim % 2:
            raise ValueError(f"config: head_dim ({self.head_dim}) must be even for RoPE")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window <= 0):
            raise ValueError(f"config field 'sliding_window' must be a positive integer or None, "
                             f"got {self.sliding_window!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"config field 'norm_eps' must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"config field 'rope_theta' must be > 0, got {self.rope_theta!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Build from a dict, rejecting unknown keys by name."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> tuple[int, int]:
        """(total, active per token) parameter counts; active counts top_k experts."""
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2  # wq, wo, wk, wv
        expert = 3 * d * self.hidden_dim  # w1, w2, w3
        router = d * self.n_experts
        norms = 2 * d
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        total = self.n_layers * (attn + self.n_experts * expert + router + norms) + embed + d
        active = self.n_layers * (attn + self.top_k * expert + router + norms) + embed + d
        return total, active


PRESETS: dict[str, ModelConfig] = {
    # Mixtral of Experts (Jiang et al., arXiv 2401.04088), Table 1.
    "mixtral-8x7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                                hidden_dim=14336, n_experts=8, top_k=2, vocab_size=32000,
                                rope_theta=1e6, max_seq_len=32768),
    "mixtral-8x22b": ModelConfig(dim=6144, n_layers=56, n_heads=48, n_kv_heads=8, head_dim=128,
                                 hidden_dim=16384, n_experts=8, top_k=2, vocab_size=32768,
                                 rope_theta=1e6, max_seq_len=65536),
    # Small shapes of the same architecture, for trying things and for tests.
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                        n_experts=8, top_k=2, vocab_size=32000, max_seq_len=2048),
    "small": ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=512,
                         n_experts=8, top_k=2, vocab_size=32000, max_seq_len=4096),
    "medium": ModelConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, hidden_dim=1536,
                          n_experts=8, top_k=2, vocab_size=32000, max_seq_len=4096),
}


def get_preset(name: str) -> ModelConfig:
    """Return a copy of the named preset; the error lists the known names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name])


def describe(cfg: ModelConfig) -> str:
    """A human-readable summary: shape, total and active parameters, weight memory per dtype."""
    total, active = cfg.num_params()
    lines = [f"{k:>15}: {v}" for k, v in cfg.to_dict().items()]
    lines.append(f"{'params total':>15}: {total:,} ({total / 1e9:.2f}B)")
    lines.append(f"{'params active':>15}: {active:,} ({active / 1e9:.2f}B per token, top-{cfg.top_k} of "
                 f"{cfg.n_experts} experts)")
    for name, nbytes in (("float32", 4), ("bfloat16", 2), ("float16", 2)):
        lines.append(f"{'memory ' + name:>15}: {total * nbytes / 2**30:.2f} GiB weights, "
                     f"{active * nbytes / 2**30:.2f} GiB read per token")
    return "\n".join(lines)
