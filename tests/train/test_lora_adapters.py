"""LoRA: exact start, the per-expert low-rank form against a float64 loop, every MoE backend, only adapters
train, adapters saved alone and merged on export, exact resume of adapters, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from instruct_helpers import one_thread

from smoe.checkpoint import load_model
from smoe.train import lora
from smoe.train.lora import ExpertLoRA, LoRAConfig, LoRAError, LoRALinear, adapter_state, apply_lora
from smoe.train.trainer import TrainConfig, Trainer


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def randomize_adapters(model, seed: int = 1, std: float = 0.05) -> None:
    """Give every adapter (B included) random values, so the adapters change the model's output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state(model, params=True).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def tokens(B=2, T=12, V=128, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_adapters_start_as_the_base_model_and_cover_the_targets():
    base = tiny_model(0)
    model = copy.deepcopy(base)
    params = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))  # B = 0: the same function, bit for bit
    layer = model.layers[0]
    assert all(isinstance(getattr(layer.attention, n), LoRALinear) for n in ("wq", "wk", "wv", "wo"))
    assert isinstance(layer.feed_forward.adapter, ExpertLoRA)
    E, H, D = layer.feed_forward.w1.shape
    r = 4
    shapes = {k.split("layers.0.", 1)[1]: tuple(v.shape) for k, v in adapter_state(model).items()
              if k.startswith("layers.0.")}
    assert shapes["attention.wq.lora_A"] == (r, D)
    assert shapes["attention.wq.lora_B"] == (layer.attention.wq.weight.shape[0], r)
    assert shapes["feed_forward.adapter.w1_A"] == (E, r, D) and shapes["feed_forward.adapter.w1_B"] == (E, H, r)
    assert shapes["feed_forward.adapter.w2_A"] == (E, r, H) and shapes["feed_forward.adapter.w2_B"] == (E, D, r)
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n not in adapter_state(model))
    # the base weights keep their names, so training checkpoints and export read them as usual
    assert set(base.state_dict()) <= set(model.state_dict())


def test_expert_delta_equals_a_float64_loop_and_attention_the_unmerged_form():
    model = tiny_model(0)
    apply_lora(model, LoRAConfig(rank=3, alpha=6, targets=("wq", "w1", "w2", "w3")))
    randomize_adapters(model)
    ad = model.layers[1].feed_forward.adapter
    for name in ("w1", "w2", "w3"):
        A, B = getattr(ad, f"{name}_A").double(), getattr(ad, f"{name}_B").double()
        ref = torch.stack([B[e] @ A[e] for e in range(A.shape[0])]) * (6 / 3)
        torch.testing.assert_close(ad.delta(name).double(), ref, rtol=1e-5, atol=1e-7)
    wq = model.layers[0].attention.wq
    x = torch.randn(5, wq.weight.shape[1])
    ref = x.double() @ (wq.weight.double() + 2.0 * wq.lora_B.double() @ wq.lora_A.double()).t()
    torch.testing.assert_close(wq(x).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["naive", "grouped"])
def test_lora_model_equals_its_merged_weights_on_every_backend(backend):
    model = tiny_model(0)
    apply_lora(model, LoRAConfig(rank=4, alpha=16))
    randomize_adapters(model)
    model.set_moe_backend(backend)
    x = tokens()
    with torch.no_grad():
        out = model(x)
        merged = lora.merge_lora(copy.deepcopy(model))
        assert not any(isinstance(m, (LoRALinear, ExpertLoRA)) for m in merged.modules())
        torch.testing.assert_close(merged(x), out, rtol=1e-4, atol=1e-5)
        base = tiny_model(0)
        base.set_moe_backend(backend)
        with lora.lora_disabled(model):
            torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    # gradients reach the expert adapters through the backend's hand-written backward
    model.train()
    model(x).float().square().mean().backward()
    for k, p in adapter_state(model, params=True).items():
        if k.endswith(("_A", "lora_A")):
            continue  # B is zero-initialised in real use; here all are random, so every grad is non-zero
        assert p.grad is not None and p.grad.abs().sum() > 0, k


def _train(model, tmp_path, steps, **kw):
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=steps, lr=1e-2, weight_decay=0.1, warmup_steps=0,
                      min_lr_ratio=1.0, batch_size=2, seq_len=12, log_every=1, eval_every=10**6,
                      save_every=kw.pop("save_every", 10**6),
                      tensorboard=False, plots=False, progress=False, export=False, **kw)
    batches = iter([{"tokens": tokens(seed=i), "targets": tokens(seed=100 + i)} for i in range(100)])
    return Trainer(model, cfg, batches)


def test_training_with_lora_touches_only_the_adapters(tmp_path):
    model = tiny_model(0).train()
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    adapters = adapter_state(model, params=True)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer = _train(model, tmp_path, 5)
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in adapters.values()}  # weight decay never sees a base weight
    trainer.fit()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(adapters), sorted(changed ^ set(adapters))[:5]


def test_adapters_saved_alone_reload_and_merge_on_export(tmp_path):
    from smoe.tokenizer import load_tokenizer
    base_dir = tmp_path / "base"
    base = tiny_model(0, vocab_size=32000)
    base.save_pretrained(base_dir)
    load_tokenizer("mixtral").save(base_dir)
    model = load_model(base_dir)
    apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=("wv", "wo", "w2")))
    randomize_adapters(model)
    lora.save_adapters(model, tmp_path / "adapters")
    names = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert names == ["adapter_config.json", "adapter_model.safetensors"]
    x = tokens(V=32000)
    with torch.no_grad():
        want = model(x)
        again = lora.load_adapters(load_model(base_dir), tmp_path / "adapters")
        torch.testing.assert_close(again(x), want, rtol=0, atol=0)
        out = lora.merge_adapters(base_dir, tmp_path / "adapters", tmp_path / "merged")
        merged = load_model(out)
        torch.testing.assert_close(merged(x), want, rtol=1e-4, atol=1e-5)
    assert (out / "tokenizer.model").exists()  # the base's tokenizer travels with the merged model


def test_adapter_errors_are_clear(tmp_path):
    model = tiny_model(0)
    with pytest.raises(LoRAError, match="no LoRA adapters"):
        lora.save_adapters(model, tmp_path / "a")
    with pytest.raises(LoRAError, match="unknown LoRA targets"):
        LoRAConfig(targets="wq,gate")
    with pytest.raises(LoRAError, match="rank"):
        LoRAConfig(rank=0)
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(LoRAError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(rank=2))
    lora.save_adapters(model, tmp_path / "a")
    with pytest.raises(LoRAError, match="another model shape"):
        lora.load_adapters(tiny_model(0, dim=64, n_heads=4, hidden_dim=96), tmp_path / "a")
    with pytest.raises(LoRAError, match="holds no LoRA adapters"):
        lora.load_adapters(tiny_model(0), tmp_path)


def test_lora_checkpoints_resume_the_adapters_exactly(tmp_path):
    """A run saved at step 3 and resumed to step 6 ends with the adapters of an uninterrupted 6-step run."""
    def run(out, steps, resume=False):
        model = tiny_model(0).train()
        apply_lora(model, LoRAConfig(rank=4, alpha=8))
        trainer = _train(model, out, steps, save_every=3)
        if resume:
            trainer.resume()
            for _ in range(trainer.step):  # the stand-in data iterator has no position: skip what was seen
                next(trainer.batches)
        trainer.fit()
        return adapter_state(model)

    full = run(tmp_path / "full", 6)
    run(tmp_path / "cut", 3)
    assert (tmp_path / "cut" / "checkpoints" / "step_00000003" / "extra.pt").exists()
    resumed = run(tmp_path / "cut", 6, resume=True)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6)
    # resuming a LoRA checkpoint into a model without adapters is refused with a reason
    plain = _train(tiny_model(0).train(), tmp_path / "cut", 6)
    with pytest.raises(ValueError, match="extra tensors"):
        plain.resume()
