"""DPO: loss and gradient against float64, response-only log-probs, masked prompts never contribute, the
reference never changes, precomputed = live reference, pair encoding and counts, exact resume, clear errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import tiny_model
from instruct_helpers import assert_resumes_exactly, base_model, char_tokenizer, one_thread
from train_helpers import one_step_grads

from smoe.train.dpo import (
    DPOConfig,
    DPOObjective,
    PairBatches,
    collate_pairs,
    dpo_loss,
    read_pairs,
    reference_logps,
    run_dpo,
    sequence_logprobs,
    tokenize_pairs,
)
from smoe.train.losses import IGNORE
from smoe.train.sft import SFTDataError
from smoe.train.trainer import TrainConfig, Trainer

# fixed sequence log-probs (chosen, rejected, ref chosen, ref rejected), incl. large and negative margins
FIXED = [(-12.5, -14.0, -13.0, -13.5), (-3.25, -2.0, -3.0, -2.5), (-40.0, -95.0, -41.0, -60.0),
         (-7.0, -7.0, -7.0, -7.0), (-120.0, -20.0, -30.0, -25.0)]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def reference64(beta: float, eps: float, loss_type: str) -> tuple[float, list[list[float]]]:
    """Mean loss and d(mean)/d(pc, pr, rc, rr) per pair, in float64 Python math."""
    P = len(FIXED)
    total, grads = 0.0, []
    for pc, pr, rc, rr in FIXED:
        h = (pc - rc) - (pr - rr)
        if loss_type == "sigmoid":
            def log_sig(x):
                return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))

            def sig(x):
                return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))
            total += -(1 - eps) * log_sig(beta * h) - eps * log_sig(-beta * h)
            dh = -(1 - eps) * beta * sig(-beta * h) + eps * beta * sig(beta * h)
        else:
            total += (h - 1 / (2 * beta)) ** 2
            dh = 2 * (h - 1 / (2 * beta))
        grads.append([dh / P, -dh / P, -dh / P, dh / P])
    return total / P, grads


@pytest.mark.parametrize("beta, eps, loss_type", [(0.1, 0.0, "sigmoid"), (0.5, 0.2, "sigmoid"), (0.1, 0.0, "ipo"),
                                                  (2.0, 0.0, "sigmoid")])
def test_loss_and_gradient_equal_a_float64_reference(beta, eps, loss_type):
    x = torch.tensor(FIXED, dtype=torch.float32, requires_grad=True)  # (P, 4)
    losses, chosen_r, rejected_r = dpo_loss(x[:, 0], x[:, 1], x[:, 2], x[:, 3], beta, eps, loss_type)
    losses.mean().backward()
    want, want_grad = reference64(beta, eps, loss_type)
    assert float(losses.mean().detach()) == pytest.approx(want, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(x.grad.double(), torch.tensor(want_grad, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    f = torch.tensor(FIXED, dtype=torch.float64)
    torch.testing.assert_close(chosen_r.double(), beta * (f[:, 0] - f[:, 2]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rejected_r.double(), beta * (f[:, 1] - f[:, 3]), rtol=1e-6, atol=1e-6)


def test_sequence_logprobs_sum_the_scored_targets_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (3, 7), generator=g)
    targets[:, :3] = IGNORE  # a prompt
    targets[2, 5:] = IGNORE  # padding
    lp = sequence_logprobs(logits, targets)
    ref = torch.log_softmax(logits.double(), -1)
    want = torch.stack([sum(ref[b, t, targets[b, t]] for t in range(7) if targets[b, t] != IGNORE)
                        for b in range(3)])
    torch.testing.assert_close(lp.double(), want, rtol=1e-6, atol=1e-6)
    lp.sum().backward()
    assert logits.grad[targets == IGNORE].abs().max() == 0
    assert (logits.grad[targets != IGNORE].abs().sum(-1) > 0).all()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return char_tokenizer(tmp_path_factory.mktemp("chartok"))


PAIRS = [{"prompt": [{"role": "user", "content": "max of 3 8 1"}], "chosen": "8", "rejected": "3"},
         {"prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "sort 3 1 2"}],
          "chosen": "1 2 3", "rejected": "1 3 2"},
         {"prompt": [{"role": "user", "content": "add 2 and 5"}], "chosen": "7", "rejected": "8"}]


def test_pairs_score_the_response_tokens_and_eos_only(tok):
    examples, stats = tokenize_pairs(tok, PAIRS, seq_len=128)
    assert (stats.pairs, stats.used) == (3, 3)
    for pair, (c_ids, c_tg, r_ids, r_tg) in zip(PAIRS, examples):
        p = tok.encode_chat(pair["prompt"])
        for ids, tg, text in ((c_ids, c_tg, pair["chosen"]), (r_ids, r_tg, pair["rejected"])):
            assert ids.tolist() == tok.encode_chat(pair["prompt"] + [{"role": "assistant", "content": text}])
            scored = [int(t) for t in tg if t != IGNORE]
            assert scored == ids.tolist()[len(p):] and scored[-1] == tok.eos_id
            assert tok.decode(scored).strip() == text
            assert (tg[:len(p) - 1] == IGNORE).all()


def test_a_masked_prompt_token_never_contributes(tok):
    model = tiny_model(0).train()
    examples, _ = tokenize_pairs(tok, PAIRS, seq_len=128)
    batch = collate_pairs(examples, [0, 1, 2])
    batch["ref_logps"] = torch.tensor([-20.0, -21.0, -19.0, -25.0, -23.0, -22.0])
    captured = {}

    def keep(_, __, out):
        out.retain_grad()
        captured["logits"] = out
    h = model.output.register_forward_hook(keep)
    loss, _ = DPOObjective(beta=0.1, aux_coef=0.0, z_coef=0.0)(model, batch)
    h.remove()
    loss.backward()
    scored = batch["targets"] != IGNORE
    g = captured["logits"].grad
    assert g[~scored].abs().max() == 0 and (g[scored].abs().sum(-1) > 0).all()
    noise = torch.randn(g.shape) * 10 * (~scored)[..., None]
    with torch.no_grad():  # both without autograd: the same kernels, so the same bits
        clean, _ = DPOObjective(beta=0.1, aux_coef=0.0, z_coef=0.0)(model, batch)
        h = model.output.register_forward_hook(lambda _, __, out: out + noise)
        noisy, _ = DPOObjective(beta=0.1, aux_coef=0.0, z_coef=0.0)(model, batch)
        h.remove()
    assert float(noisy) == float(clean)
    # the training forward's kernels (router, experts) round differently from inference's: equal to fp32 rounding
    assert abs(float(clean) - float(loss.detach())) <= 1e-6 * abs(float(clean))


def test_the_reference_model_never_changes_and_precomputed_equals_live(tok, tmp_path):
    policy = tiny_model(0).train()
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    pol_before = {k: v.clone() for k, v in policy.state_dict().items()}
    examples, _ = tokenize_pairs(tok, PAIRS, seq_len=128)
    pre = reference_logps(ref, examples, batch_size=2)
    # the precomputed log-probs are what the live reference gives, batch by batch
    live_obj = DPOObjective(beta=0.1, reference=ref)
    b = collate_pairs(examples, [2, 0])
    torch.testing.assert_close(live_obj.reference_logps(policy, b), torch.cat([pre[[2, 0], 0], pre[[2, 0], 1]]),
                               rtol=1e-5, atol=1e-5)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=4, lr=1e-2, warmup_steps=0, batch_size=2, seq_len=128,
                      log_every=1, eval_every=10**6, save_every=10**6, tensorboard=False, plots=False,
                      progress=False, export=False)
    records = []
    trainer = Trainer(policy, cfg, PairBatches(examples, 2, seed=0), live_obj,
                      batch_weight=lambda b: b["tokens"].shape[0] / 2, callbacks=[lambda t, r: records.append(r)])
    assert not {id(p) for p in ref.parameters()} & {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    trainer.fit()
    assert all(torch.equal(ref.state_dict()[k], v) for k, v in ref_before.items())
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert any(not torch.equal(policy.state_dict()[k], v) for k, v in pol_before.items())
    for k in ("dpo", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "aux", "z"):
        assert k in records[-1] and math.isfinite(records[-1][k]), k
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)  # step 1 starts at the reference
    assert records[-1]["reward_margin"] > 0


def _dpo_step(tmp_path, ref, batches) -> tuple[dict, dict]:
    """(gradients before the optimizer step, the logged record) of one DPO step over `batches`."""
    policy = tiny_model(0).train()
    with torch.no_grad():  # move off the reference so the DPO term has a gradient
        policy.layers[0].feed_forward.gate.weight.mul_(1.5)
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=1, grad_accum=len(batches), batch_size=2, seq_len=128,
                      warmup_steps=0, log_every=1, eval_every=10**6, save_every=10**6, tensorboard=False,
                      plots=False, progress=False, export=False)
    return one_step_grads(Trainer(policy, cfg, iter(batches),
                                  DPOObjective(beta=0.1, aux_coef=0.5, z_coef=0.1, reference=ref),
                                  batch_weight=lambda b: b["tokens"].shape[0] / 2))


def test_gradient_accumulation_equals_one_batch_of_pairs(tok, tmp_path):
    """Pairs split into unequal micro-batches give the gradient and logged losses of one batch of all pairs,
    router losses included (the Trainer's pre-pass gives the step's expert load; z weighted by real tokens)."""
    examples, _ = tokenize_pairs(tok, PAIRS, seq_len=128)
    ref = tiny_model(0).eval().requires_grad_(False)
    g_acc, r_acc = _dpo_step(tmp_path / "acc", ref, [collate_pairs(examples, [0]), collate_pairs(examples, [1, 2])])
    g_one, r_one = _dpo_step(tmp_path / "one", ref, [collate_pairs(examples, [0, 1, 2])])
    for n in g_one:
        torch.testing.assert_close(g_acc[n], g_one[n], rtol=1e-5, atol=1e-7, msg=n)
    for k in ("loss", "dpo", "aux", "z"):
        assert r_acc[k] == pytest.approx(r_one[k], rel=1e-5, abs=1e-7), k


def _write_pairs(path, pairs):
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def test_dpo_run_resumes_exactly_with_its_saved_reference(tmp_path):
    model = base_model(tmp_path / "base", dim=32, hidden_dim=64)
    data = _write_pairs(tmp_path / "pairs.jsonl", PAIRS * 4)
    assert_resumes_exactly(tmp_path, lambda t, resume: run_dpo(
        DPOConfig(model=str(model), data=str(data), val_fraction=0.25, seq_len=64, train=t), resume=resume))
    assert (tmp_path / "cut" / "reference_logps.safetensors").exists()


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "hi", "chosen": "a"}', r":2: missing rejected"),
    ('{"prompt": "hi", "chosen": "a", "rejected": 3}', r":2: 'rejected' must be a string"),
    ('{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "chosen": "a", '
     '"rejected": "b"}', r":2: prompt: chat: the last message must be a user message"),
    ('[1, 2]', r":2: expected a JSON object"),
])
def test_bad_pair_data_names_the_line(tmp_path, line, message):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n" + line + "\n")
    with pytest.raises(SFTDataError, match=message):
        read_pairs(f)


def test_bad_dpo_settings_are_refused():
    for kw, msg in (({"beta": 0.0}, "beta"), ({"label_smoothing": 0.5}, "label_smoothing"),
                    ({"loss_type": "hinge"}, "unknown DPO loss"), ({"ref": "none"}, "ref must be"),
                    ({"loss_type": "ipo", "label_smoothing": 0.1}, "not to ipo")):
        with pytest.raises(ValueError, match=msg):
            DPOConfig(**kw).validate()


def test_long_prompts_are_skipped_and_long_responses_cut(tok):
    pairs = [PAIRS[0], {"prompt": "x" * 80, "chosen": "a", "rejected": "b"},
             {"prompt": "q", "chosen": "y" * 60, "rejected": "n"}]
    examples, stats = tokenize_pairs(tok, pairs, seq_len=48)
    assert (stats.used, stats.truncated, stats.skipped_too_long) == (2, 1, 1)
    assert max(len(e[0]) for e in examples) == 48


def test_dpo_with_lora_uses_the_base_weights_as_a_live_reference(tmp_path):
    from smoe.train.dpo import build_dpo
    from smoe.train.lora import LoRAConfig, adapter_state
    model = base_model(tmp_path / "base", dim=32, hidden_dim=64)
    data = _write_pairs(tmp_path / "pairs.jsonl", PAIRS * 4)
    t = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=3, lr=1e-2, warmup_steps=0, batch_size=2, log_every=1,
                    eval_every=10**6, save_every=10**6, tensorboard=False, plots=False, progress=False)
    trainer, _ = build_dpo(DPOConfig(model=str(model), data=str(data), val_fraction=0.25, seq_len=64, ref="live",
                                     lora=LoRAConfig(rank=2), train=t))
    policy = trainer.model
    base_before = {k: v.clone() for k, v in policy.state_dict().items() if k not in adapter_state(policy)}
    batch = next(iter(trainer.batches))
    from smoe.checkpoint import load_model
    start = load_model(model)
    records = []
    trainer.callbacks.append(lambda tr, r: records.append(r))
    trainer.fit()
    # the reference (adapters off) is exactly the starting checkpoint, before and after training
    from smoe.train.dpo import score
    assert "ref_logps" not in batch
    torch.testing.assert_close(trainer.objective.reference_logps(policy, batch), score(start, batch), rtol=0, atol=1e-5)
    assert all(torch.equal(policy.state_dict()[k], v) for k, v in base_before.items())
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5) and records[-1]["reward_margin"] != 0
