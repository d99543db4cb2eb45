"""Parity with transformers' MixtralForCausalLM, which is the reference implementation."""

import pytest
import torch

from smoe import Transformer, generate
from tests.conftest import hf_config

CONFIGS = [
    dict(),
    dict(n_heads=4, n_kv_heads=4),  # MHA
    dict(n_heads=8, n_kv_heads=1, dim=64),  # MQA, GQA ratio 8
    dict(n_experts=8, top_k=1),
    dict(n_experts=6, top_k=3, hidden_dim=48),
    dict(sliding_window=7),
    dict(sliding_window=5, n_experts=8, top_k=2, n_layers=3),
    dict(head_dim=16, dim=48, n_heads=6, n_kv_heads=2),  # head_dim != dim / n_heads
    dict(tie_embeddings=True),
]


@pytest.mark.parametrize("changes", CONFIGS, ids=[str(c) or "default" for c in CONFIGS])
def test_logits_and_greedy_match_transformers(tiny_hf_dir, changes):
    path, hf = tiny_hf_dir(seed=1, **changes)
    model = Transformer.from_pretrained(path)
    tokens = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        out = model(tokens)
    assert out.shape == ref.shape == (3, 20, 128)
    assert (out - ref).abs().max().item() <= 1e-4

    prompt = tokens[:1, :9]
    ref_ids = hf.generate(prompt, max_new_tokens=32, do_sample=False, attention_mask=torch.ones_like(prompt))
    ours = generate(model, prompt[0].tolist(), max_tokens=32)
    assert ours.tokens == ref_ids[0, 9:].tolist()


@pytest.mark.parametrize("changes", [dict(), dict(sliding_window=6, n_kv_heads=1)])
def test_transformers_loads_what_smoe_saves(tmp_path, changes):
    from transformers import MixtralForCausalLM

    from tests.conftest import tiny_model
    model = tiny_model(seed=3, **changes)
    model.save_pretrained(tmp_path)
    hf = MixtralForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.to_dict()["sliding_window"] == model.config.sliding_window
    tokens = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4


def test_hf_config_of_a_config_roundtrips(tmp_path):
    from smoe.checkpoint import read_config
    from tests.conftest import tiny_config
    cfg = tiny_config(sliding_window=9)
    hf_config(cfg).save_pretrained(tmp_path)
    assert read_config(tmp_path)[0] == cfg
