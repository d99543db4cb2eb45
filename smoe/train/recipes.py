"""Named training recipes (model shape + optimizer + schedule + data) and command-line overrides.

A recipe is plain Python: a ModelConfig and a TrainConfig. Overrides are `key=value` strings:
`model.dim=128`, `lr=1e-3` (or `train.lr=1e-3`), `data=runs/data`, `autocast=bf16`, `capacity_factor=none`.
The model's vocab_size always follows the data's tokenizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from smoe.model.config import ModelConfig, get_preset
from smoe.train.trainer import TrainConfig


@dataclass
class Recipe:
    name: str
    description: str
    model: ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "model": self.model.to_dict(),
                "train": dataclasses.asdict(self.train)}


# The quickstart's shape, chosen by measurement on 2 CPU cores (docs/training.md): 8 experts, top-2.
QUICKSTART_MODEL = ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=256, n_experts=8, top_k=2,
                               vocab_size=4096, max_seq_len=256, rope_theta=10000.0)


def _quickstart() -> Recipe:
    return Recipe("quickstart", "the ~10-minute CPU quickstart: 8-expert top-2 SMoE, BPE 4096, seq 256",
                  QUICKSTART_MODEL.replace(),
                  TrainConfig(out_dir="runs/quickstart/train", max_steps=0, max_minutes=8.0, batch_size=16,
                              seq_len=256, lr=3e-3, warmup_steps=30, min_lr_ratio=0.1, weight_decay=0.1,
                              log_every=10, eval_every=100, eval_tokens=32768, save_every=100, keep_last=2))


def _tiny() -> Recipe:
    return Recipe("tiny", "a seconds-long smoke test: 2 layers of dim 64, 8 experts",
                  get_preset("tiny").replace(max_seq_len=512),
                  TrainConfig(out_dir="runs/tiny", max_steps=200, batch_size=8, seq_len=128, lr=3e-3,
                              warmup_steps=20, log_every=10, eval_every=50, eval_tokens=8192, save_every=50))


def _small() -> Recipe:
    return Recipe("small", "the 'small' preset (dim 256, 4 layers, 8 experts): minutes to hours on a CPU",
                  get_preset("small"),
                  TrainConfig(out_dir="runs/small", max_steps=5000, batch_size=16, seq_len=512, lr=1.5e-3,
                              warmup_steps=200, log_every=20, eval_every=500, save_every=500))


def _medium() -> Recipe:
    return Recipe("medium", "the 'medium' preset (dim 512, 8 layers, 8 experts): a GPU, or patience",
                  get_preset("medium"),
                  TrainConfig(out_dir="runs/medium", max_steps=20000, batch_size=32, seq_len=1024, lr=1e-3,
                              warmup_steps=1000, log_every=50, eval_every=1000, save_every=1000,
                              autocast="bf16"))


def _mixtral_8x7b() -> Recipe:
    return Recipe("mixtral-8x7b", "Mixtral 8x7B's shape with common large-scale settings (needs a cluster)",
                  get_preset("mixtral-8x7b").replace(max_seq_len=4096),
                  TrainConfig(out_dir="runs/mixtral-8x7b", max_steps=250000, batch_size=4, grad_accum=64,
                              seq_len=4096, lr=3e-4, warmup_steps=2000, aux_coef=0.04, z_coef=0.001,
                              autocast="bf16", log_every=10, eval_every=1000, save_every=1000))


RECIPES: dict[str, Callable[[], Recipe]] = {"quickstart": _quickstart, "tiny": _tiny, "small": _small,
                                             "medium": _medium, "mixtral-8x7b": _mixtral_8x7b}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return RECIPES[name]()


def _parse(value: str, type_str: str, key: str):
    """A command-line string as the type a dataclass field declares ('int', 'float | None', ...)."""
    options = [t.strip() for t in str(type_str).split("|")]
    if value.lower() in ("none", "null") and "None" in options:
        return None
    for t in options:
        try:
            if t == "bool":
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if t == "int":
                return int(value)
            if t == "float":
                return float(value)
            if t == "str":
                return value
        except ValueError:
            continue
    raise ValueError(f"override {key}={value!r}: expected {type_str}")


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """A copy of the recipe with `section.field=value` overrides applied (section: model or train)."""
    model_changes: dict = {}
    train_changes: dict = {}
    model_fields = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. model.dim=128 or lr=1e-3)")
        key, value = item.split("=", 1)
        section, _, name = key.rpartition(".")
        section = section or ("train" if name in train_fields else "model" if name in model_fields else "")
        fields, changes = {"model": (model_fields, model_changes), "train": (train_fields, train_changes)}.get(
            section, (None, None))
        if fields is None or name not in fields:
            known = ", ".join([f"model.{n}" for n in model_fields] + list(train_fields))
            raise ValueError(f"unknown override {key!r}; known: {known}")
        changes[name] = _parse(value, fields[name], key)
    model = recipe.model.replace(**model_changes)
    train = dataclasses.replace(recipe.train, **train_changes)
    train.validate()
    return Recipe(recipe.name, recipe.description, model, train)
