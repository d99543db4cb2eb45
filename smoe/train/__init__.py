"""Training sparse MoE language models: data, losses, the trainer, checkpoints, recipes, plots, export.

Entry points: `smoe.train.pretrain.train(recipe)` (what `smoe train` runs), `Trainer` for any objective,
`prepare` for data, `get_recipe`/`apply_overrides` for recipes, `export` for the HF layout.
"""

from smoe.train.data import PackedBatches, TokenData, prepare
from smoe.train.export import export, export_model
from smoe.train.losses import LMObjective, cross_entropy, load_balancing_loss, router_z_loss
from smoe.train.recipes import Recipe, apply_overrides, get_recipe
from smoe.train.trainer import TrainConfig, Trainer

__all__ = ["prepare", "TokenData", "PackedBatches", "LMObjective", "cross_entropy", "load_balancing_loss",
           "router_z_loss", "Trainer", "TrainConfig", "Recipe", "get_recipe", "apply_overrides", "export",
           "export_model"]
