"""Show it works: `smoe sft` then `smoe dpo` on a tiny model and a programmatic instruction set.

SFT must raise held-out exact match well above the base model's; DPO on (correct, wrong) pairs (on prompts
outside the SFT data) must raise held-out reward accuracy and margin over the SFT model without wrecking its
exact match (with the chosen-NLL term, RPO: pure DPO costs this tiny model ~7-10 points, see docs/instruct.md);
`smoe chat` and `smoe serve` must prompt the exported model in the chat format it was trained in. Figures are
printed (pytest -s shows them).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from instruct_helpers import base_model

from smoe.checkpoint import load_model
from smoe.cli import main
from smoe.tokenizer import load_tokenizer
from smoe.train.dpo import read_pairs, reference_logps, tokenize_pairs
from smoe.train.sft import chat_replies, exact_match
from smoe.train.tasks import write_task_files

QUIET = ["tensorboard=false", "plots=false", "progress=false", "warmup_steps=20", "min_lr_ratio=0.1"]


def held_out(files) -> list[tuple[list[dict], str]]:
    rows = [json.loads(line) for line in files["sft_val"].read_text().splitlines()]
    return [(r["messages"][:1], r["messages"][1]["content"]) for r in rows]


def preference(policy, ref_lp: torch.Tensor, examples, beta: float) -> dict:
    """Held-out reward accuracy and margin of `policy` against the reference log-probs, and P(lp_c > lp_r)."""
    lp = reference_logps(policy, examples, batch_size=32)
    margin = beta * ((lp[:, 0] - ref_lp[:, 0]) - (lp[:, 1] - ref_lp[:, 1]))
    return {"reward_accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean()),
            "logp_accuracy": float((lp[:, 0] > lp[:, 1]).float().mean())}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Base model -> smoe sft -> smoe dpo, once; returns paths and the measured figures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the matrices are tiny: one thread is as fast, and robust on a busy machine
    try:
        root = tmp_path_factory.mktemp("instruct")
        files = write_task_files(root / "data", n_train=4000, n_val=160, seed=0)
        base = base_model(root / "base", seed=0)
        t0 = time.perf_counter()
        assert main(["sft", "--model", str(base), "--data", str(files["sft_train"]), "--val-data",
                     str(files["sft_val"]), "--out", str(root / "sft"), "--max-steps", "400", "--lr", "3e-3",
                     "--batch-size", "16", "--seq-len", "128", *QUIET, "eval_every=400", "save_every=400",
                     "log_every=100"]) == 0
        t_sft = time.perf_counter() - t0
        sft = root / "sft" / "final"
        beta = 0.5
        t0 = time.perf_counter()
        assert main(["dpo", "--model", str(sft), "--data", str(files["dpo_train"]), "--val-data",
                     str(files["dpo_val"]), "--out", str(root / "dpo"), "--beta", str(beta), "--lr", "5e-4",
                     "--nll-coef", "1.0", "--max-steps", "150", "--batch-size", "16", "--seq-len", "128", *QUIET,
                     "eval_every=150", "save_every=150", "log_every=50"]) == 0
        t_dpo = time.perf_counter() - t0
        dpo = root / "dpo" / "final"
        tok = load_tokenizer(sft)
        questions = held_out(files)
        models = {name: load_model(d) for name, d in (("base", base), ("sft", sft), ("dpo", dpo))}
        em = {name: exact_match(m, tok, questions, max_new_tokens=16) for name, m in models.items()}
        pairs, _ = tokenize_pairs(tok, read_pairs(files["dpo_val"]), seq_len=128)
        ref_lp = reference_logps(models["sft"], pairs, batch_size=32)
        pref = {name: preference(models[name], ref_lp, pairs, beta) for name in ("sft", "dpo")}
    finally:
        torch.set_num_threads(threads)
    print(f"\nheld-out exact match ({len(questions)} prompts): base {em['base']:.3f} -> SFT {em['sft']:.3f} "
          f"-> DPO {em['dpo']:.3f}   (SFT {t_sft:.0f} s, DPO {t_dpo:.0f} s)")
    for name in ("sft", "dpo"):
        p = pref[name]
        print(f"held-out pairs ({len(pairs)}), {name.upper()} vs the SFT reference: reward accuracy "
              f"{p['reward_accuracy']:.3f}, margin {p['margin']:.3f}, P(logp chosen > logp rejected) "
              f"{p['logp_accuracy']:.3f}")
    return {"root": root, "files": files, "base": base, "sft": sft, "dpo": dpo, "em": em, "pref": pref,
            "questions": questions, "models": models, "tok": tok}


def test_sft_raises_held_out_exact_match_well_above_the_base(pipeline):
    em = pipeline["em"]
    assert em["base"] <= 0.05
    assert em["sft"] >= em["base"] + 0.3, em
    records = [json.loads(x) for x in (pipeline["root"] / "sft" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[-1]["val_loss"] < 0.5 * evals[0]["val_loss"]
    assert all(0.9 < r["aux"] < 1.5 for r in records if r["kind"] == "train")  # router losses stay on


def test_dpo_raises_reward_accuracy_and_margin_without_wrecking_sft(pipeline):
    sft, dpo, em = pipeline["pref"]["sft"], pipeline["pref"]["dpo"], pipeline["em"]
    assert sft["reward_accuracy"] == 0.0 and sft["margin"] == 0.0  # the SFT model is its own reference
    assert dpo["reward_accuracy"] >= 0.7 and dpo["margin"] > 0.2, dpo
    assert dpo["logp_accuracy"] >= sft["logp_accuracy"] - 0.03, (sft, dpo)
    assert em["dpo"] >= em["sft"] - 0.06, em
    records = [json.loads(x) for x in (pipeline["root"] / "dpo" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    for k in ("loss", "dpo", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "aux"):
        assert k in last
    assert [r for r in records if r["kind"] == "eval"][-1]["val_reward_accuracy"] >= 0.7


def test_smoe_chat_prompts_the_model_in_its_trained_format(pipeline, monkeypatch, capsys):
    import io
    questions = pipeline["questions"][:6]
    model, tok = pipeline["models"]["dpo"], pipeline["tok"]
    want = chat_replies(model, tok, [q for q, _ in questions], max_new_tokens=16)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(q[0]["content"] + "\n/reset\n" for q, _ in questions)))
    capsys.readouterr()
    assert main(["chat", str(pipeline["dpo"]), "--max-tokens", "16"]) == 0
    got = [line for line in capsys.readouterr().out.splitlines()]
    assert got == want  # what `smoe chat` replies is what the model says to the format it was trained in
    assert any(g.strip() == a for g, (_, a) in zip(got, questions))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_smoe_serve_chat_completions_use_the_trained_format(pipeline):
    import httpx
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "smoe.cli", "serve", str(pipeline["dpo"]), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "smoe serve did not start"
            time.sleep(0.3)
        questions = pipeline["questions"][:4]
        want = chat_replies(pipeline["models"]["dpo"], pipeline["tok"], [q for q, _ in questions], 16)
        for (q, _), w in zip(questions, want):
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": str(pipeline["dpo"]), "messages": q, "max_tokens": 16, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == w
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_smoe_sft_with_lora_trains_adapters_and_exports_them_merged(pipeline):
    root, files = pipeline["root"], pipeline["files"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["sft", "--model", str(pipeline["base"]), "--data", str(files["sft_train"]), "--val-data",
                     str(files["sft_val"]), "--out", str(root / "lora"), "--lora", "--lora-rank", "4",
                     "--max-steps", "40", "--batch-size", "8", "--seq-len", "128", *QUIET, "eval_every=40",
                     "save_every=20", "log_every=20"]) == 0
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(x) for x in (root / "lora" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert (root / "lora" / "adapters" / "adapter_model.safetensors").exists()
    base, merged = pipeline["models"]["base"].state_dict(), load_model(root / "lora" / "final").state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.split(".")[-2] in ("wq", "wk", "wv", "wo") or k.endswith(("w1", "w2", "w3"))
                           for k in changed), sorted(changed)[:5]
    assert main(["merge-adapters", str(pipeline["base"]), str(root / "lora" / "adapters"), "--out",
                 str(root / "merged")]) == 0
    again = load_model(root / "merged").state_dict()
    assert all(torch.allclose(again[k], merged[k], atol=1e-6) for k in merged)
