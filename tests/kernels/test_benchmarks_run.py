"""The benchmark scripts run end to end on tiny sizes and write their JSON (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from smoe.kernels import native

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_moe_layer_benchmark_runs(tmp_path, capsys):
    out = tmp_path / "moe.json"
    res = load("moe_layer").main(["--dim", "32", "--hidden-dim", "48", "--experts", "4", "--tokens", "1", "9",
                                  "--dtypes", "float32", "bfloat16", "--repeat", "1", "--min-seconds", "0",
                                  "--out", str(out)])
    printed = capsys.readouterr().out
    assert "grouped/dense" in printed and "grouped/hf_eager" in printed and "grouped/matmuls" in printed
    data = json.loads(out.read_text())
    assert len(data["cases"]) == 2 * 2 * 2  # tokens x dtypes x modes
    for case in data["cases"]:
        assert {"grouped", "naive", "hf_grouped_mm", "hf_eager", "dense"} <= set(case["seconds"])
        tol = 1e-5 if case["dtype"] == "float32" else 2e-2
        assert max(case["max_abs_diff_vs_naive"].values()) <= tol  # every implementation computed the same MoE
        # every round's times, and grouped's ratios as the medians of the rounds' paired ratios
        rounds = {len(v) for v in case["samples"].values()}
        assert len(rounds) == 1 and set(case["samples"]) == set(case["seconds"])
        assert set(case["ratios"]) == set(case["seconds"]) - {"grouped"}
        t = case["samples"]
        assert case["ratios"]["dense"] == sorted(a / b for a, b in zip(t["grouped"], t["dense"]))[0]  # 1 round
        # the AMX tile unit's rate around each case, where smoe's AMX kernels load
        rates = case["amx_ns_per_product"]
        assert rates is None if not native.amx() else (len(rates) == 2 and min(rates) > 0)
    assert ("AMX ns/product" in printed) == native.amx()
    assert res["shape"]["dim"] == 32


def test_train_step_benchmark_runs(tmp_path, capsys):
    out = tmp_path / "train_step.json"
    load("train_step").main(["--shapes", "tiny", "--batch", "2", "--seq", "16", "--repeat", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "smoe / transformers" in printed and ("AMX tile unit" in printed) == native.amx()
    (row,) = json.loads(out.read_text())
    assert row["smoe_tok_s"] > 0 and row["hf_tok_s"] > 0 and abs(row["first_loss_smoe"] - row["first_loss_hf"]) < 1e-2
    assert (row["amx_ns_per_product"] is None) != native.amx()
    assert row["speedup"] == row["samples_hf"][0] / row["samples_smoe"][0]  # one round: its paired ratio


def test_decode_benchmark_runs(tmp_path, capsys):
    out = tmp_path / "decode.json"
    load("decode").main(["--models", "tiny", "--layers", "1", "--dtypes", "float32", "--batches", "1", "2",
                         "--impls", "smoe", "transformers", "--short", "2", "--long", "4", "--repeat", "1",
                         "--out", str(out)])
    printed = capsys.readouterr().out
    assert "roofline tok/s" in printed and "smoe/hf" in printed
    data = json.loads(out.read_text())
    assert data["bandwidth_bytes_s"] > 0 and len(data["rows"]) == 2
    # probed before, after, and after each round (one round per batch size): the roofline is the best
    assert len(data["bandwidths"]) == 4 and data["bandwidth_bytes_s"] == max(data["bandwidths"])
    row = data["rows"][0]
    assert row["tok_s"]["smoe"] > 0 and row["tok_s"]["transformers"] > 0 and row["roofline_tok_s"] > 0
    assert "full_model_estimate_tok_s" in row  # 1 of the preset's 2 layers


@pytest.mark.timeout(120)
def test_gpu_check_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0


def test_moe_tune_runs_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "tune.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "moe_tune.py"), "--device", "cpu", "--dtype", "float32",
           "--dim", "32", "--hidden-dim", "64", "--tokens", "1", "4", "16", "--max-candidates", "2", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    cases = json.loads(out.read_text())["cases"]
    # every layout that applies at each size: gemv + per-expert blocks, then sorted blocks
    assert [sorted(c["layouts"]) for c in cases] == [["gemv", "per_expert"], ["gemv", "per_expert"], ["sorted"]]
    assert all("error" not in r for c in cases for lay in c["layouts"].values() for r in lay["all"])


def test_benchmarks_have_a_command_line_help():
    for name in ("moe_layer", "decode", "moe_tune", "step_profile"):
        run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--help"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "usage" in run.stdout


def test_linear_benchmark_runs(tmp_path, capsys):
    out = tmp_path / "linear.json"
    load("linear").main(["--rows", "1", "3", "--shapes", "1100x64", "--repeat", "1", "--cache-bytes", "1e5",
                         "--out", str(out)])
    assert "F.linear/smoe" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [r["rows"] for r in data["rows"]] == [1, 3] and max(r["max_abs_diff"] for r in data["rows"]) < 1e-4
    assert all(r["speedup"] > 0 for r in data["rows"])


@pytest.mark.timeout(300)
def test_decode_ab_benchmark_runs(tmp_path, capsys):
    # this checkout against itself (HEAD): two workers, alternating rounds, a worktree made and removed
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    out = tmp_path / "ab.json"
    res = load("decode_ab").main(["--base", "HEAD", "--model", "tiny", "--layers", "1", "--dtype", "float32",
                                  "--compile", "none", "--rounds", "2", "--short", "2", "--long", "4",
                                  "--out", str(out)])
    assert "base/this per round" in capsys.readouterr().out
    assert json.loads(out.read_text())["median_ms"] == res["median_ms"] and len(res["seconds_per_token"]["this"]) == 2
    worktrees = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert "smoe-ab-" not in worktrees


def test_rounds_alternate_their_order_and_ratios_pair_within_rounds():
    from smoe.kernels.timing import paired_ratio, time_interleaved
    calls = []
    samples = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeat=3, warmup=0)
    assert calls == ["a", "b", "b", "a", "a", "b"] and all(len(v) == 3 for v in samples.values())
    # a twice as slow as b in two of three rounds, the machine slowing down from round 2: the paired ratio reads 2,
    # the ratio of the medians 1.1
    a, b = [2.0, 2.2, 4.0], [1.0, 2.0, 2.0]
    assert paired_ratio(a, b) == 2.0 and statistics.median(a) / statistics.median(b) == pytest.approx(1.1)
    assert paired_ratio([3.0, 1.0, 2.0], [1.0, 1.0, 1.0]) == 2.0
    with pytest.raises(ValueError, match="same number of rounds"):
        paired_ratio([1.0], [1.0, 2.0])
