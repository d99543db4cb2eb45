"""LoRA: low-rank adapters on the attention projections and on the stacked experts, saved on their own
and merged into the weights for export.

A dense projection W (O, I) gets W + s * B A with A (r, I), B (O, r), s = alpha / r (Hu et al. 2021);
A is uniform(+-1/sqrt(I)) and B is zero, so training starts from the base model exactly.
A stacked expert weight, w1/w3 (E, H, D) or w2 (E, D, H), gets one low-rank pair per expert:
A (E, r, I), B (E, O, r), delta = s * bmm(B, A) (E, O, I).

The experts' delta is merged per forward (smoe.model.transformer.MoE.adapter): the MoE compute still
goes through the smoe.kernels backend seam unchanged, so every backend (naive, grouped, triton) trains
with LoRA, and autograd carries the backend's weight gradient (E, O, I) into dA, dB. The cost is one
(E, O, r) x (E, r, I) batched matmul per weight per forward and a transient weight-sized tensor, small
next to the token matmuls once N * K / E exceeds r. The attention projections use the unmerged form
x W^T + s * (x A^T) B^T (no weight-sized tensor at all).

Parameter names keep the base model's (`layers.0.attention.wq.weight`), so checkpoints of the base
weights are written and read as usual; the adapters are `...wq.lora_A`, `...wq.lora_B` and
`...feed_forward.adapter.w1_A`, `...w1_B`. Saved adapters: adapter_model.safetensors + adapter_config.json,
in smoe's (Hugging Face rotary) layout of wq/wk.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from smoe.checkpoint.files import write_json, write_safetensors

ATTENTION_TARGETS = ("wq", "wk", "wv", "wo")
EXPERT_TARGETS = ("w1", "w2", "w3")
TARGETS = ATTENTION_TARGETS + EXPERT_TARGETS
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoRAError(ValueError):
    """A LoRA setting or adapter file that cannot be used; the message names the problem."""


@dataclass
class LoRAConfig:
    """Rank, scale (alpha / rank) and which weights get adapters (attention wq wk wv wo, experts w1 w2 w3)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = field(default_factory=lambda: TARGETS)

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        if self.rank < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise LoRAError(f"LoRA alpha must be > 0, got {self.alpha}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise LoRAError(f"unknown LoRA targets {unknown or '(none)'}; choose among {', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _init_A(shape: tuple[int, ...], fan_in: int, gen: torch.Generator, like: torch.Tensor) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)), the nn.Linear / PEFT default
    a = (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
    return nn.Parameter(a.to(device=like.device, dtype=like.dtype))


class LoRALinear(nn.Module):
    """A bias-free projection x W^T plus s * (x A^T) B^T; `weight` is the frozen base weight."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, gen: torch.Generator):
        super().__init__()
        out_f, in_f = base.weight.shape
        self.weight = base.weight
        self.lora_A = _init_A((rank, in_f), in_f, gen, base.weight)  # (r, I)
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=base.weight.device, dtype=base.weight.dtype))
        self.scale = scale
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.enabled:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale
        return y

    def delta(self) -> torch.Tensor:
        """s * B A (O, I), computed in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale


class ExpertLoRA(nn.Module):
    """Per-expert low-rank deltas of stacked expert weights: w + s * bmm(B (E, O, r), A (E, r, I))."""

    def __init__(self, moe: nn.Module, targets: tuple[str, ...], rank: int, scale: float, gen: torch.Generator):
        super().__init__()
        self.targets, self.scale, self.enabled = targets, scale, True
        for name in targets:
            w = getattr(moe, name)  # (E, O, I)
            E, O, I = w.shape
            self.register_parameter(f"{name}_A", _init_A((E, rank, I), I, gen, w))
            self.register_parameter(f"{name}_B", nn.Parameter(torch.zeros(E, O, rank, device=w.device, dtype=w.dtype)))

    def delta(self, name: str) -> torch.Tensor:
        """s * bmm(B, A) (E, O, I) of one target, in the parameters' dtype."""
        return torch.bmm(getattr(self, f"{name}_B"), getattr(self, f"{name}_A")) * self.scale

    def forward(self, w1_EHD: torch.Tensor, w2_EDH: torch.Tensor, w3_EHD: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.enabled:
            return w1_EHD, w2_EDH, w3_EHD
        ws = {"w1": w1_EHD, "w2": w2_EDH, "w3": w3_EHD}
        for name in self.targets:
            ws[name] = ws[name] + self.delta(name).to(ws[name].dtype)
        return ws["w1"], ws["w2"], ws["w3"]


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRALinear, ExpertLoRA)) for m in model.modules())


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> list[nn.Parameter]:
    """Freeze every base parameter and add adapters to cfg.targets in every layer; returns the adapters."""
    if has_lora(model):
        raise LoRAError("this model already has LoRA adapters (merge or remove them first)")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    attn_targets = [t for t in cfg.targets if t in ATTENTION_TARGETS]
    expert_targets = tuple(t for t in cfg.targets if t in EXPERT_TARGETS)
    for layer in model.layers:
        for name in attn_targets:
            setattr(layer.attention, name, LoRALinear(getattr(layer.attention, name), cfg.rank, cfg.scale, gen))
        if expert_targets:
            layer.feed_forward.adapter = ExpertLoRA(layer.feed_forward, expert_targets, cfg.rank, cfg.scale, gen)
    model.lora_config = cfg
    return lora_parameters(model)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, p in adapter_state(model, params=True).items()]


def adapter_state(model: nn.Module, params: bool = False) -> dict[str, torch.Tensor]:
    """The adapters by name (`layers.0.attention.wq.lora_A`, ...): detached tensors, or the parameters."""
    out = {}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("lora_A", "lora_B") or (".adapter." in name and leaf.endswith(("_A", "_B"))):
            out[name] = p if params else p.detach()
    return out


@contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model (adapters off): e.g. the DPO reference model without a second copy."""
    mods = [m for m in model.modules() if isinstance(m, (LoRALinear, ExpertLoRA))]
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += s B A) and remove the adapters; in place."""
    for layer in model.layers:
        for name in ATTENTION_TARGETS:
            m = getattr(layer.attention, name)
            if isinstance(m, LoRALinear):
                w = m.weight
                w.copy_((w.float() + m.delta()).to(w.dtype))
                lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
                lin.weight = w
                setattr(layer.attention, name, lin)
        moe = layer.feed_forward
        if isinstance(moe.adapter, ExpertLoRA):
            for name in moe.adapter.targets:
                w = getattr(moe, name)
                w.copy_((w.float() + moe.adapter.delta(name).float()).to(w.dtype))
            moe.adapter = None
    if hasattr(model, "lora_config"):
        del model.lora_config
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def save_adapters(model: nn.Module, out: str | Path) -> Path:
    """Write the adapters alone: adapter_model.safetensors + adapter_config.json (rank, alpha, targets, model)."""
    cfg: LoRAConfig | None = getattr(model, "lora_config", None)
    if cfg is None or not has_lora(model):
        raise LoRAError("this model has no LoRA adapters to save")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out, adapter_state(model), "100GB", ADAPTER_FILE)
    write_json(out / ADAPTER_CONFIG, {"format": "smoe-lora", **asdict(cfg), "targets": list(cfg.targets),
                                      "model_config": model.config.to_dict()})
    return out


def read_adapter_config(path: str | Path) -> tuple[LoRAConfig, dict]:
    """(LoRAConfig, the base model's config dict) of an adapter directory."""
    f = Path(path) / ADAPTER_CONFIG
    if not f.exists():
        raise LoRAError(f"{path} holds no LoRA adapters ({ADAPTER_CONFIG} missing)")
    try:
        meta = json.loads(f.read_text())
        return LoRAConfig(meta["rank"], meta["alpha"], tuple(meta["targets"])), meta["model_config"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LoRAError(f"{f} is not a valid adapter config: {e}") from None


def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Add the adapters saved in `path` to a base model (they must have been trained on this model's shape)."""
    from safetensors import safe_open

    cfg, model_cfg = read_adapter_config(path)
    mine = model.config.to_dict()
    diff = [k for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "n_experts")
            if model_cfg.get(k) != mine[k]]
    if diff:
        raise LoRAError(f"{path}: adapters were trained on another model shape ({', '.join(diff)} differ)")
    apply_lora(model, cfg)
    own = adapter_state(model, params=True)
    file = Path(path) / ADAPTER_FILE
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            if keys != set(own):
                missing, extra = sorted(set(own) - keys), sorted(keys - set(own))
                raise LoRAError(f"{file}: adapter tensors do not match the config (missing {missing[:3]}, "
                                f"unexpected {extra[:3]})")
            with torch.no_grad():
                for k, p in own.items():
                    t = f.get_tensor(k)
                    if t.shape != p.shape:
                        raise LoRAError(f"{file}: {k} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
                    p.copy_(t)
    except LoRAError:
        raise
    except Exception as e:
        raise LoRAError(f"{file} could not be read: {e}") from None
    return model


def merge_adapters(base: str | Path, adapters: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Load a base checkpoint, add saved adapters, merge them and export (HF layout + the base's tokenizer)."""
    from smoe.checkpoint import load_model
    from smoe.tokenizer import load_tokenizer
    from smoe.train.export import export_model
    model = load_model(base, dtype=torch.float32)
    load_adapters(model, adapters)
    merge_lora(model)
    try:
        tok = load_tokenizer(base)
    except FileNotFoundError:
        tok = None
    return export_model(model, out, tok, dtype)
