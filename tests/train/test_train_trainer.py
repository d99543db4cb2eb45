"""The trainer: learning, gradient accumulation, optimizer groups, schedule, logging, export, resume errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model
from train_helpers import make_data, tiny_overrides

from smoe.train.checkpoint import ResumeError, checkpoints, latest_checkpoint
from smoe.train.losses import LMObjective
from smoe.train.pretrain import build, train
from smoe.train.recipes import apply_overrides, get_recipe
from smoe.train.trainer import TrainConfig, Trainer, lr_at, make_optimizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("trainer"))


def repeat(batches):
    while True:
        yield from batches


def random_batch(B=4, T=16, V=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, V, (B, T + 1), generator=g)
    return {"tokens": w[:, :-1].clone(), "targets": w[:, 1:].clone()}


def quiet(tmp_path, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp_path / "run"), tensorboard=False, plots=False, progress=False, export=False,
                log_every=1, eval_every=10**6, save_every=10**6, warmup_steps=0)
    return TrainConfig(**{**base, **kw})


def test_loss_goes_down_when_overfitting_one_batch(tmp_path):
    model = tiny_model(0).train()
    batch = random_batch()
    records = []
    cfg = quiet(tmp_path, max_steps=60, lr=1e-2, batch_size=4, seq_len=16, min_lr_ratio=1.0)
    Trainer(model, cfg, repeat([batch]), callbacks=[lambda t, r: records.append(r)]).fit()
    first, last = records[0]["ce"], records[-1]["ce"]
    assert first == pytest.approx(math.log(128), abs=0.3)
    assert last < 0.3 * first, (first, last)
    assert all(0.9 < r["aux"] < 2.0 for r in records)
    assert len(records[-1]["load"]) == 2 and len(records[-1]["load"][0]) == 4


def _grads_after_one_step(tmp_path, batches, grad_accum, batch_size, z_coef):
    model = tiny_model(0).train()
    cfg = quiet(tmp_path / f"acc{grad_accum}", max_steps=1, grad_accum=grad_accum, batch_size=batch_size, seq_len=16)
    trainer = Trainer(model, cfg, iter(batches), objective=LMObjective(aux_coef=0.0, z_coef=z_coef))
    captured = {}
    step = trainer.optimizer.step

    def capture(*a, **k):
        captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
        return step(*a, **k)
    trainer.optimizer.step = capture
    trainer.fit()
    return captured


@pytest.mark.parametrize("masked", [False, True])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, masked):
    """k micro-batches = one batch of k: cross-entropy weighted by scored tokens (exact with unequal masks);
    the router z-loss is a per-token mean too (exact when micro-batches score equally many tokens). The
    load-balancing loss is computed per micro-batch (as in Megatron and transformers), so it is left out."""
    big = random_batch(B=6, seed=1)
    if masked:
        big["targets"][0, :5] = -100
    micro = [{k: v[i:i + 2] for k, v in big.items()} for i in (0, 2, 4)]
    z = 0.0 if masked else 0.01
    g_acc = _grads_after_one_step(tmp_path, micro, grad_accum=3, batch_size=2, z_coef=z)
    g_one = _grads_after_one_step(tmp_path, [big], grad_accum=1, batch_size=6, z_coef=z)
    for name in g_one:
        torch.testing.assert_close(g_acc[name], g_one[name], rtol=1e-5, atol=1e-7, msg=name)


def test_weight_decay_only_on_matrices_and_schedule():
    model = tiny_model(0)
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    norms = {id(m.weight) for m in model.modules() if type(m).__name__ == "RMSNorm"}
    assert norms == {id(p) for p in no_decay["params"]}
    assert any(p.dim() == 3 for p in decay["params"])  # stacked expert matrices are decayed
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(0.1) and lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55) and lr_at(110, cfg, 110) == pytest.approx(0.1)


def test_pretrain_logs_plots_checkpoints_and_exports_for_transformers(data_dir, tmp_path):
    out = tmp_path / "run"
    r = apply_overrides(get_recipe("tiny"), tiny_overrides(
        data_dir, out, "max_steps=8", "log_every=2", "eval_every=4", "save_every=4", "keep_last=1",
        "tensorboard=true", "plots=true", "export=true", "capacity_factor=1.0"))
    summary = train(r)
    assert summary["step"] == 8 and summary["stop_reason"] == "max_steps"
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_recs = [x for x in recs if x["kind"] == "train"]
    evals = [x for x in recs if x["kind"] == "eval"]
    assert [x["step"] for x in train_recs] == [2, 4, 6, 8] and [x["step"] for x in evals] == [0, 4, 8]
    for k in ("loss", "ce", "aux", "z", "lr", "grad_norm", "tokens_per_s", "mfu", "load", "imbalance",
              "dropped", "dropped_frac"):
        assert k in train_recs[-1], k
    assert 0 < train_recs[-1]["mfu"] < 1 and train_recs[-1]["dropped"] >= 0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and "unigram_loss" in evals[-1]
    assert "val_bits_per_byte" in evals[-1]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "expert_load.png").stat().st_size > 1000
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert [p.name for p in checkpoints(out)] == ["step_00000008"]  # keep_last=1

    # the export loads in smoe and in transformers' MixtralForCausalLM with the same logits
    from transformers import MixtralForCausalLM

    from smoe import Transformer, load_tokenizer
    final = out / "final"
    ours = Transformer.from_pretrained(final)
    hf = MixtralForCausalLM.from_pretrained(final).eval()
    tok = load_tokenizer(final)
    ids = torch.tensor([tok.encode("def main():\n    return 0\n")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
    # the checkpoint itself is a loadable model directory with its tokenizer
    assert load_tokenizer(latest_checkpoint(out)).vocab_size == tok.vocab_size


def test_resume_errors_are_clear(data_dir, tmp_path):
    out = tmp_path / "run"
    base = tiny_overrides(data_dir, out, "max_steps=2", "save_every=2", "export=false")
    train(apply_overrides(get_recipe("tiny"), base))
    with pytest.raises(ResumeError, match="already holds checkpoints"):
        train(apply_overrides(get_recipe("tiny"), base))
    with pytest.raises(ResumeError, match=r"different model config \(dim: checkpoint 32, now 48"):
        train(apply_overrides(get_recipe("tiny"), base + ["model.dim=48"]), resume=True)
    with pytest.raises(ResumeError, match="nothing to resume"):
        build(apply_overrides(get_recipe("tiny"), tiny_overrides(data_dir, tmp_path / "empty"))).resume()


def test_bad_overrides_and_settings_are_named():
    with pytest.raises(ValueError, match="unknown override 'model.nope'"):
        apply_overrides(get_recipe("tiny"), ["model.nope=1"])
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(get_recipe("tiny"), ["max_steps=ten"])
    with pytest.raises(ValueError, match="not key=value"):
        apply_overrides(get_recipe("tiny"), ["lr"])
    with pytest.raises(ValueError, match="grad_accum"):
        apply_overrides(get_recipe("tiny"), ["grad_accum=0"])
    with pytest.raises(ValueError, match="unknown recipe 'nope'; known recipes: quickstart"):
        get_recipe("nope")
    r = apply_overrides(get_recipe("small"), ["capacity_factor=none", "autocast=bf16", "model.top_k=1", "lr=2e-3"])
    assert r.train.capacity_factor is None and r.train.autocast == "bf16" and r.model.top_k == 1
    assert r.train.lr == 2e-3
    with pytest.raises(ValueError, match="no training data"):
        build(get_recipe("tiny"))


def test_bf16_autocast_trains(tmp_path):
    model = tiny_model(0).train()
    records = []
    cfg = quiet(tmp_path, max_steps=3, autocast="bf16", batch_size=4, seq_len=16, lr=1e-2)
    Trainer(model, cfg, repeat([random_batch()]), callbacks=[lambda t, r: records.append(r)]).fit()
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] < records[0]["loss"]
    assert model.output.weight.dtype == torch.float32  # float32 master weights


def test_time_budget_sets_the_number_of_steps(tmp_path):
    model = tiny_model(0).train()
    cfg = quiet(tmp_path, max_steps=0, max_minutes=0.1, batch_size=4, seq_len=16, log_every=2)
    trainer = Trainer(model, cfg, repeat([random_batch()]))
    summary = trainer.fit()
    assert summary["step"] >= 1
    if summary["step"] >= 7:  # measured after 2 + 5 steps (a loaded machine may not get there)
        assert trainer.max_steps is not None
    assert summary["elapsed_s"] < 0.1 * 60 + 5.0  # stops at the budget (a step of slack)
    assert summary["stop_reason"] in ("max_steps", "time budget")
    with pytest.raises(ValueError, match="needs max_minutes"):
        TrainConfig(max_steps=0).validate()
