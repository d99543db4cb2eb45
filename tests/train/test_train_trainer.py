"""The trainer: learning, gradient accumulation, optimizer groups, schedule, logging, export, resume errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model
from train_helpers import make_data, one_step_grads, tiny_overrides

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


class Counted:
    """Batches in turn, counting how many were drawn (a data position to check)."""

    def __init__(self, batches):
        self.batches, self.drawn = batches, 0

    def __next__(self):
        self.drawn += 1
        return self.batches[(self.drawn - 1) % len(self.batches)]


def _one_step(tmp_path, batches, grad_accum, batch_size, aux_coef=0.5, z_coef=0.1, aux_scope="step"):
    """(gradients before the optimizer step, the logged record) of one optimizer step."""
    model = tiny_model(0).train()
    cfg = quiet(tmp_path / f"acc{grad_accum}{aux_scope}", max_steps=1, grad_accum=grad_accum, batch_size=batch_size,
                seq_len=16, aux_scope=aux_scope)
    return one_step_grads(Trainer(model, cfg, iter(batches), objective=LMObjective(aux_coef=aux_coef, z_coef=z_coef)))


def padded_batch(B=6, T=16, seed=1):
    """A batch with right padding (valid False, targets IGNORE) and unequal scored targets per row."""
    b = random_batch(B, T, seed=seed)
    lengths = torch.tensor([16, 9, 13, 5, 16, 11][:B])
    valid = torch.arange(T)[None] < lengths[:, None]
    b["targets"][~valid] = -100
    b["targets"][0, :5] = -100  # a prompt-like span: routed but not scored
    b["valid"] = valid
    return b


@pytest.mark.parametrize("padded", [False, True])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, padded):
    """k micro-batches = one batch of k for the full loss (CE + aux + z, large coefficients so the router terms
    count): CE weighted by scored targets, z-loss by routed tokens, the load-balancing loss with the whole
    step's expert load from the no-grad pre-pass (aux_scope='step'). Logged loss, aux, z and load are equal."""
    big = padded_batch() if padded else random_batch(B=6, seed=1)
    micro = [{k: v[i:j] for k, v in big.items()} for i, j in ((0, 1), (1, 4), (4, 6))]  # unequal sizes too
    g_acc, r_acc = _one_step(tmp_path, micro, grad_accum=3, batch_size=2)
    g_one, r_one = _one_step(tmp_path, [big], grad_accum=1, batch_size=6)
    for name in g_one:
        torch.testing.assert_close(g_acc[name], g_one[name], rtol=1e-5, atol=1e-7, msg=name)
    for k in ("loss", "ce", "aux", "z"):
        assert r_acc[k] == pytest.approx(r_one[k], rel=1e-6, abs=1e-7), k
    torch.testing.assert_close(torch.tensor(r_acc["load"]), torch.tensor(r_one["load"]), rtol=0, atol=1e-5)
    # the one-batch record is the plain objective on the whole batch
    loss, m = LMObjective(aux_coef=0.5, z_coef=0.1)(tiny_model(0).train(), big)
    assert r_one["aux"] == pytest.approx(float(m["aux"]), rel=1e-6)
    assert r_one["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)


def test_aux_scope_micro_is_the_per_micro_batch_variant(tmp_path):
    """aux_scope='micro' (Megatron-LM, transformers) balances each micro-batch on its own: its aux loss is the
    routed-token-weighted mean of the micro-batches' own aux losses, not the step's, and gradients differ."""
    big = padded_batch()
    micro = [{k: v[i:i + 2] for k, v in big.items()} for i in (0, 2, 4)]
    g_micro, r_micro = _one_step(tmp_path, micro, grad_accum=3, batch_size=2, aux_scope="micro")
    g_one, r_one = _one_step(tmp_path, [big], grad_accum=1, batch_size=6)
    model = tiny_model(0).train()
    n = [int(b["valid"].sum()) for b in micro]
    own = [float(LMObjective()(model, b)[1]["aux"]) for b in micro]
    assert r_micro["aux"] == pytest.approx(sum(a * k for a, k in zip(own, n)) / sum(n), rel=1e-6)
    assert abs(r_micro["aux"] - r_one["aux"]) > 1e-3
    gate = "layers.0.feed_forward.gate.weight"
    assert not torch.allclose(g_micro[gate], g_one[gate], rtol=1e-3, atol=1e-6)
    for k in ("ce", "z"):  # the other terms are exact either way
        assert r_micro[k] == pytest.approx(r_one[k], rel=1e-6), k
    with pytest.raises(ValueError, match="aux_scope.*'step'.*'micro'.*got 'steps'"):
        TrainConfig(aux_scope="steps").validate()
    assert apply_overrides(get_recipe("tiny"), ["aux_scope=micro"]).train.aux_scope == "micro"


def test_the_pre_pass_draws_no_batches_and_no_random_numbers(tmp_path):
    """The expert-load pre-pass reuses the step's micro-batches: the data position and the RNG states after a
    step are those of aux_scope='micro' (no pre-pass), so checkpoints and resume are unaffected."""
    big = padded_batch()
    micro = [{k: v[i:i + 2] for k, v in big.items()} for i in (0, 2, 4)]
    after = {}
    for scope in ("step", "micro"):
        torch.manual_seed(123)
        batches = Counted(micro)
        trainer = Trainer(tiny_model(0).train(), quiet(tmp_path / scope, grad_accum=3, batch_size=2, seq_len=16,
                                                       aux_scope=scope, capacity_factor=1.0), batches)
        trainer.train_step()
        after[scope] = (batches.drawn, torch.get_rng_state())
        torch.manual_seed(7)
        state = torch.get_rng_state()
        load = trainer.step_load(micro)
        assert torch.equal(torch.get_rng_state(), state) and batches.drawn == 3
        assert load.shape == (2, 4) and torch.allclose(load.sum(-1), torch.ones(2))
    assert after["step"][0] == after["micro"][0] == 3 and torch.equal(after["step"][1], after["micro"][1])


def test_weight_decay_only_on_matrices_and_schedule():
    model = tiny_model(0)
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    norms = {id(m.weight) for m in model.modules() if type(m).__name__ == "RMSNorm"}
    assert norms == {id(p) for p in no_decay["params"]}
    assert any(p.dim() == 3 for p in decay["params"])  # stacked expert matrices are decayed
    assert decay["fused"] and no_decay["fused"]  # torch's one-pass kernel for CPU float parameters
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
