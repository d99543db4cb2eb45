"""Exact resume: a run killed with SIGKILL (mid-training, and mid-checkpoint-save) and resumed logs the same
loss at every later step as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import make_data, tiny_overrides

from smoe.train.checkpoint import checkpoints, latest_checkpoint

STEPS = 14

SCRIPT = r'''
import json, os, signal, sys, time
import torch
torch.set_num_threads(1)
from smoe.train.recipes import apply_overrides, get_recipe
from smoe.train.pretrain import train

overrides, mode = json.loads(sys.argv[1]), sys.argv[2]
callbacks = []
if mode == "slow":  # give the test time to kill it mid-run (does not change any number)
    callbacks.append(lambda trainer, record: time.sleep(0.25))
if mode == "kill-in-save":  # die while the second checkpoint is being written
    import smoe.train.checkpoint as c
    real_save = c.torch.save
    def save(obj, f, *a, **k):
        if "step_00000008" in str(f):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)
    c.torch.save = save
train(apply_overrides(get_recipe("tiny"), overrides), resume=mode == "resume", callbacks=callbacks)
'''


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("resume"))


def run(tmp_path: Path, data: Path, out: Path, mode: str, wait: bool = True) -> subprocess.Popen:
    script = tmp_path / "run_train.py"
    script.write_text(SCRIPT)
    overrides = tiny_overrides(data, out, f"max_steps={STEPS}", "log_every=1", "save_every=4", "eval_every=7",
                               "keep_last=2", "export=false")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, str(script), json.dumps(overrides), mode], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out_text, _ = p.communicate(timeout=240)
        assert p.returncode in (0, -signal.SIGKILL), out_text
    return p


def losses(out: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert steps == sorted(set(steps)), "each step logged once after a resume"
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"} | {
        -r["step"]: r["val_loss"] for r in recs if r["kind"] == "eval"}


@pytest.mark.timeout(600)
def test_sigkill_and_resume_gives_identical_losses(data_dir, tmp_path):
    ref_out = tmp_path / "uninterrupted"
    run(tmp_path, data_dir, ref_out, "plain")
    reference = losses(ref_out)
    assert len([k for k in reference if k > 0]) == STEPS

    out = tmp_path / "killed"
    p = run(tmp_path, data_dir, out, "slow", wait=False)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it after step 9 is logged (a checkpoint exists at step 8)
        f = out / "metrics.jsonl"
        if f.exists() and any(json.loads(x).get("step", 0) >= 9 for x in f.read_text().splitlines() if x.strip()):
            break
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    killed_at = max(k for k in losses(out))
    assert 9 <= killed_at < STEPS
    assert latest_checkpoint(out).name == "step_00000008"

    run(tmp_path, data_dir, out, "resume")
    resumed = losses(out)
    assert resumed.keys() == reference.keys()
    for step in sorted(reference):
        assert resumed[step] == pytest.approx(reference[step], rel=0, abs=1e-6), step


@pytest.mark.timeout(600)
def test_kill_during_save_leaves_the_previous_checkpoint_loadable(data_dir, tmp_path):
    from smoe import Transformer
    out = tmp_path / "killed_in_save"
    p = run(tmp_path, data_dir, out, "kill-in-save")
    assert p.returncode == -signal.SIGKILL
    assert [c.name for c in checkpoints(out)] == ["step_00000004"]
    partial = [d for d in (out / "checkpoints").iterdir() if d.name.startswith(".step_00000008")]
    assert partial, "the interrupted save left its temporary directory (ignored, cleaned on resume)"
    Transformer.from_pretrained(latest_checkpoint(out))  # loadable
    run(tmp_path, data_dir, out, "resume")
    assert not [d for d in (out / "checkpoints").iterdir() if d.name.startswith(".")]
    assert latest_checkpoint(out).name == f"step_{STEPS:08d}"
    reference = tmp_path / "ref2"
    run(tmp_path, data_dir, reference, "plain")
    got, want = losses(out), losses(reference)
    assert got.keys() == want.keys()
    assert all(got[s] == pytest.approx(want[s], rel=0, abs=1e-6) for s in want)
