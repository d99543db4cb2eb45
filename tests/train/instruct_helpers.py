"""Builders for the instruct (SFT, DPO, LoRA) tests: a character-level tokenizer.json and tiny base models."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from smoe import ModelConfig, Transformer
from smoe.tokenizer import HFTokenizer
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
