"""Shared fixtures: tiny random models built in temporary folders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from smoe import ModelConfig, Transformer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run with n intra-op threads, restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, n_experts=4, top_k=2, vocab_size=128,
            max_seq_len=256)


@pytest.fixture(autouse=True, scope="session")
def _compiled_steps_in_a_temporary_cache(tmp_path_factory):
    """AOT-compiled decode steps are built into a folder of this test run, not the user's cache."""
    if "SMOE_CACHE" not in os.environ:
        os.environ["SMOE_CACHE"] = str(tmp_path_factory.mktemp("smoe-cache"))
    yield


def tiny_config(**changes) -> ModelConfig:
    """A very small Mixtral-architecture config; keyword arguments change fields."""
    return ModelConfig(**{**TINY, **changes})


def tiny_model(seed: int = 0, **changes) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(**changes)).eval()


def hf_config(cfg: ModelConfig):
    """transformers' MixtralConfig for a smoe config (no EOS, so HF generate never stops early)."""
    from transformers import MixtralConfig
    return MixtralConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                         num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                         sliding_window=cfg.sliding_window, max_position_embeddings=cfg.max_seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                         tie_word_embeddings=cfg.tie_embeddings, eos_token_id=None, bos_token_id=None,
                         pad_token_id=None)


@pytest.fixture
def tiny_hf_dir(tmp_path):
    """Factory: save a random transformers MixtralForCausalLM of a tiny config; returns (dir, hf model)."""
    def make(seed: int = 0, **changes):
        from transformers import MixtralForCausalLM
        torch.manual_seed(seed)
        hf = MixtralForCausalLM(hf_config(tiny_config(**changes))).eval()
        out = tmp_path / f"hf-{seed}-{abs(hash(tuple(sorted(changes.items()))))}"
        hf.save_pretrained(out)
        return out, hf
    return make


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on a shared 2-core machine two OpenMP threads make tiny models slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
