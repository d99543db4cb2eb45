import pytest

from smoe import ModelConfig, get_preset
from smoe.model.config import PRESETS, describe


@pytest.mark.parametrize("name,total,active", [
    ("mixtral-8x7b", 46.70e9, 12.88e9),  # published: 46.7B / 12.9B
    ("mixtral-8x22b", 140.63e9, 39.16e9),  # published: 141B / 39B
])
def test_preset_parameter_counts(name, total, active):
    t, a = get_preset(name).num_params()
    assert round(t / 1e9, 2) == round(total / 1e9, 2)
    assert round(a / 1e9, 2) == round(active / 1e9, 2)


def test_mixtral_8x7b_shape_matches_the_paper():
    c = get_preset("mixtral-8x7b")
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim) == (4096, 32, 32, 8, 128, 14336)
    assert (c.vocab_size, c.n_experts, c.top_k, c.rope_theta, c.max_seq_len) == (32000, 8, 2, 1e6, 32768)


def test_num_params_matches_the_module():
    from smoe import Transformer
    for name in ("tiny", "small"):
        cfg = get_preset(name)
        model = Transformer(cfg)
        total, active = cfg.num_params()
        assert total == sum(p.numel() for p in model.parameters())
        per_expert = 3 * cfg.dim * cfg.hidden_dim
        assert total - active == cfg.n_layers * (cfg.n_experts - cfg.top_k) * per_expert


def test_tied_embeddings_count_once():
    cfg = get_preset("tiny").replace(tie_embeddings=True)
    untied = get_preset("tiny")
    assert untied.num_params()[0] - cfg.num_params()[0] == cfg.vocab_size * cfg.dim


@pytest.mark.parametrize("changes,needle", [
    (dict(n_heads=6, n_kv_heads=4), "multiple of"),
    (dict(top_k=9), "top_k"),
    (dict(dim=0), "'dim'"),
    (dict(sliding_window=-3), "sliding_window"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_bad_config_names_the_field(changes, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig(**{**get_preset("tiny").to_dict(), **changes})


def test_unknown_preset_and_fields():
    with pytest.raises(ValueError, match="known presets"):
        get_preset("mixtral-9x9b")
    with pytest.raises(ValueError, match="unknown config fields: bogus"):
        ModelConfig.from_dict({**PRESETS["tiny"].to_dict(), "bogus": 1})


def test_describe_reports_active_and_memory():
    text = describe(get_preset("mixtral-8x7b"))
    assert "46.70B" in text and "12.88B" in text and "bfloat16" in text
