"""Round trips through both layouts, the fused layout, sharding, lazy loading and every error case."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from smoe import Transformer
from smoe.checkpoint import CheckpointError, convert, load_model, read_config
from smoe.cli import main
from tests.conftest import tiny_model


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_consolidated_round_trip(tmp_path):
    model = tiny_model(seed=1, sliding_window=8)
    model.save_pretrained(tmp_path / "c", format="consolidated")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["consolidated.safetensors", "params.json"]
    params = json.loads((tmp_path / "c" / "params.json").read_text())
    assert params["moe"] == {"num_experts": 4, "num_experts_per_tok": 2} and params["sliding_window"] == 8
    keys = load_file(tmp_path / "c" / "consolidated.safetensors").keys()
    assert "layers.1.feed_forward.experts.3.w2.weight" in keys and "layers.0.attention.wq.weight" in keys
    back = Transformer.from_pretrained(tmp_path / "c")
    assert back.config == model.config and same_weights(model, back)


def test_consolidated_uses_mistral_rope_layout(tmp_path):
    # Mistral's wq rotates interleaved pairs: the HF file's q rows are a permutation of it
    model = tiny_model(seed=2)
    convert_dir = tmp_path / "c"
    model.save_pretrained(convert_dir, format="consolidated")
    model.save_pretrained(tmp_path / "h", format="hf")
    wq_c = load_file(convert_dir / "consolidated.safetensors")["layers.0.attention.wq.weight"]
    wq_h = load_file(tmp_path / "h" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    hd = model.config.head_dim
    # head 0: HF row i (first half) pairs with row i + hd/2; Mistral keeps them adjacent (2i, 2i+1)
    assert torch.equal(wq_c[0], wq_h[0]) and torch.equal(wq_c[1], wq_h[hd // 2])
    assert not torch.equal(wq_c, wq_h)


def test_hf_to_consolidated_to_hf_keeps_logits(tmp_path, tiny_hf_dir):
    path, hf = tiny_hf_dir(seed=3)
    convert(path, tmp_path / "c", format="consolidated")
    convert(tmp_path / "c", tmp_path / "h", format="hf")
    tokens = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = hf(tokens).logits
        assert (Transformer.from_pretrained(tmp_path / "c")(tokens) - ref).abs().max() <= 1e-4
        assert (Transformer.from_pretrained(tmp_path / "h")(tokens) - ref).abs().max() <= 1e-4


def test_sharded_round_trip(tmp_path):
    model = tiny_model(seed=4)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        assert sum(t.numel() * t.element_size() for t in load_file(tmp_path / shard).values()) <= 20_000 or \
            len(load_file(tmp_path / shard)) == 1
    assert same_weights(model, Transformer.from_pretrained(tmp_path))
    # saving again unsharded removes the stale shards and index
    model.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_reads_the_fused_in_memory_layout(tmp_path, tiny_hf_dir):
    path, hf = tiny_hf_dir(seed=5)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    assert any("gate_up_proj" in k for k in load_file(tmp_path / "model.safetensors"))
    tokens = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert (Transformer.from_pretrained(tmp_path)(tokens) - hf(tokens).logits).abs().max() <= 1e-4


def test_dtype_on_load_and_convert(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "a")
    assert Transformer.from_pretrained(tmp_path / "a", dtype="bf16").dtype == torch.bfloat16
    convert(tmp_path / "a", tmp_path / "b", format="hf", dtype="bf16")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"
    assert Transformer.from_pretrained(tmp_path / "b").dtype == torch.bfloat16


def test_loading_reads_lazily_without_a_second_copy(tmp_path, monkeypatch):
    # the model is built on the meta device; every parameter is allocated once, at load
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert not any(p.is_meta for p in loaded.parameters()) and not loaded.inv_freq.is_meta
    assert torch.equal(loaded.inv_freq, model.inv_freq)


def test_pickle_weights_are_read_weights_only(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert same_weights(model, Transformer.from_pretrained(tmp_path))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights only"):
        Transformer.from_pretrained(tmp_path)


# ---- errors that name the problem ----

@pytest.fixture
def saved(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    return tmp_path


def edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_is_named(saved):
    edit_tensors(saved, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.block_sparse_moe\.experts\.2\.w3"):
        load_model(saved)


def test_unexpected_tensor_is_named(saved):
    edit_tensors(saved, lambda t: t.update({"model.layers.2.self_attn.q_proj.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*model\.layers\.2\.self_attn\.q_proj"):
        load_model(saved)


def test_shape_mismatch_names_tensor_expected_and_found(saved):
    edit_tensors(saved, lambda t: t.update({"model.norm.weight": torch.ones(31)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \(31,\), expected \(32,\)"):
        load_model(saved)


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*(truncated|corrupt)"):
        load_model(saved)


def test_corrupt_header(saved):
    (saved / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(saved)


def test_config_out_of_range(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["num_experts_per_tok"] = 9
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: config: top_k \(9\) must be <= n_experts \(4\)"):
        read_config(saved)


def test_not_a_mixtral_and_neither_layout(tmp_path, saved):
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not a Mixtral"):
        load_model(saved)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a Hugging Face checkpoint .* nor a Mistral"):
        load_model(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_missing_shard_named_by_index(tmp_path):
    tiny_model().save_pretrained(tmp_path, max_shard_size="20KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard files that are missing: {victim.name}"):
        load_model(tmp_path)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["convert", str(tmp_path / "x"), str(tmp_path / "y"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "neither" in err and "Traceback" not in err
