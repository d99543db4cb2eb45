"""Pretraining from a prepared data directory: builds the model, batches and validation, then runs the Trainer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from smoe.checkpoint.files import write_json
from smoe.model.transformer import Transformer
from smoe.train.data import PackedBatches, TokenData, eval_windows, unigram_logprobs
from smoe.train.evaluate import LMEval
from smoe.train.losses import LMObjective
from smoe.train.recipes import Recipe
from smoe.train.trainer import Trainer


def build(recipe: Recipe, callbacks: list[Callable] | None = None) -> Trainer:
    """A Trainer for the recipe: model (vocab from the data's tokenizer), packed batches, validation."""
    cfg = recipe.train
    if not cfg.data:
        raise ValueError("no training data: set data=DIR (a directory made by `smoe data prepare`)")
    data = TokenData(cfg.data)
    tok = data.tokenizer()
    model_cfg = recipe.model.replace(vocab_size=data.vocab_size, max_seq_len=max(recipe.model.max_seq_len,
                                                                                  cfg.seq_len))
    torch.manual_seed(cfg.seed)
    with torch.device("meta"):
        model = Transformer(model_cfg)
    model.to_empty(device="cuda" if torch.cuda.is_available() else "cpu")
    model.reset_rope(model.device)
    model.init_weights(seed=cfg.seed)
    batches = PackedBatches(data, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed, segments=cfg.segment_mask)
    evaluate = None
    if data.meta["splits"]["val"]["tokens"] > cfg.seq_len:
        windows, segments = eval_windows(data, "val", cfg.seq_len, cfg.eval_tokens, segments=cfg.segment_mask)
        evaluate = LMEval(windows, batch_size=cfg.batch_size, tokenizer=tok,
                          unigram_logprobs=unigram_logprobs(data, "train"), segments=segments)
    info = {"recipe": recipe.name, "data": str(Path(cfg.data).resolve()), "data_splits": data.meta["splits"],
            "tokenizer": data.meta["tokenizer"]}
    return Trainer(model, cfg, batches, LMObjective(cfg.aux_coef, cfg.z_coef), evaluate, tok, run_info=info,
                   callbacks=callbacks)


def train(recipe: Recipe, resume: bool = False, callbacks: list[Callable] | None = None) -> dict:
    """Train a recipe to the end (or resume its latest checkpoint); returns the trainer's summary."""
    trainer = build(recipe, callbacks)
    run_dir = Path(recipe.train.out_dir)
    if resume:
        where = trainer.resume()
        print(f"resuming from {where} (step {trainer.step})")
    run_dir.mkdir(parents=True, exist_ok=True)
    rd = recipe.to_dict()
    rd["model"] = trainer.model.config.to_dict()
    write_json(run_dir / "recipe.json", json.loads(json.dumps(rd)))
    total, active = trainer.model.config.num_params()
    print(f"recipe {recipe.name}: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active), "
          f"{trainer.model.config.n_experts} experts top-{trainer.model.config.top_k}, run directory {run_dir}")
    return trainer.fit()
