"""Builders for the instruct (SFT, DPO, LoRA) tests: a character-level tokenizer.json, tiny base models, and the
exact-resume check their runs share."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from smoe import ModelConfig, Transformer
from smoe.tokenizer import HFTokenizer
from smoe.train.trainer import TrainConfig
from tests.conftest import num_threads

SPECIALS = ["<unk>", "<s>", "</s>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def char_tokenizer(out: Path) -> HFTokenizer:
    """A character-level tokenizer.json (ids 0-2 <unk> <s> </s>, then printable ASCII) built with `tokenizers`;
    smoe's HFTokenizer renders the Mixtral chat format through it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}) + "\n")
    return HFTokenizer(out / "tokenizer.json")


def base_model(out: Path, seed: int = 0, **changes) -> Path:
    """A random tiny Mixtral-architecture model (4 experts, top-2) with the character tokenizer, saved at out."""
    tok = char_tokenizer(out)
    cfg = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, n_experts=4, top_k=2,
               vocab_size=tok.vocab_size, max_seq_len=256)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**cfg, **changes}))
    model.init_weights(seed=seed)
    model.save_pretrained(out)
    return out


def one_thread():
    """Run with one intra-op thread: these models are tiny, and on a busy 2-core machine two threads
    spin against other processes (several times slower); restored afterwards."""
    return num_threads(1)


def assert_resumes_exactly(tmp_path: Path, run: Callable[[TrainConfig, bool], dict]) -> None:
    """run(train_config, resume) -> the run's summary: a 4-step run cut after its step-2 checkpoint and resumed ends
    with the weights of an uninterrupted one (within 1e-6), and a fresh run refuses the cut run's directory."""
    from smoe.checkpoint import load_model

    def cfg(out: Path, steps: int) -> TrainConfig:
        return TrainConfig(out_dir=str(out), max_steps=steps, lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, batch_size=2,
                           log_every=1, eval_every=10**6, save_every=2, tensorboard=False, plots=False, progress=False)

    full = run(cfg(tmp_path / "full", 4), False)
    run(cfg(tmp_path / "cut", 2), False)
    resumed = run(cfg(tmp_path / "cut", 4), True)
    a, b = load_model(full["final"]).state_dict(), load_model(resumed["final"]).state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run(cfg(tmp_path / "cut", 4), False)
