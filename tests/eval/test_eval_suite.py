"""The Mixtral suite: its table against the paper, offline runs with --data-dir copies and skips, the
derived maj@k and pass@k tasks, hostile code contained mid-run, the report and `smoe eval`."""

from __future__ import annotations

import json

import pytest
from smoe_eval_testkit import make_checkpoint, private_datasets_cache, write_hf_repo, write_local_tasks

from smoe.eval.sandbox import Limits
from smoe.eval.suite import BOLD_PAPER, FIGURE_ONLY, LLAMA, MIXTRAL, MIXTRAL_SUITE, SuiteOptions

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    private_datasets_cache(tmp_path_factory.mktemp("hf-datasets-cache"))

# "Mixtral of Experts", Jiang et al., arXiv 2401.04088: Table 2 and Table 5 (BBQ), typed in independently
PAPER = {"mmlu": (69.9, 70.6), "hellaswag": (85.4, 84.4), "winogrande": (80.4, 77.2), "piqa": (82.6, 83.6),
         "arc_easy": (79.9, 83.1), "arc_challenge": (56.5, 59.7), "naturalquestions": (25.4, 30.6),
         "triviaqa": (73.0, 71.5), "humaneval": (29.3, 40.2), "mbpp": (49.8, 60.7), "math": (13.8, 28.4),
         "gsm8k": (69.6, 74.4), "bbq": (51.5, 56.0)}
FIGURE_ONLY_KEYS = {"siqa", "openbookqa", "commonsense_qa", "boolq", "quac", "bbh", "agieval"}
SHOTS = {"hellaswag": 0, "winogrande": 0, "piqa": 0, "siqa": 0, "openbookqa": 0, "arc_easy": 0, "arc_challenge": 0,
         "commonsense_qa": 0, "naturalquestions": 5, "triviaqa": 5, "boolq": 0, "gsm8k": 8, "math": 4, "humaneval": 0,
         "mbpp": 3, "mmlu": 5, "bbh": 3}

HUMANEVAL = [("add", "    return a + b\n"), ("loop", "    while True:\n        pass\n"),
             ("memory", "    x = bytearray(8 * 2**30)\n    return x\n"),
             ("fork", "    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n"
                      "            pass\n"),
             ("escape", "    open(ESCAPE, 'w').write('x')\n    return a + b\n"),
             ("socket", "    import socket\n    socket.create_connection(('1.1.1.1', 80), timeout=1)\n"
                        "    return a + b\n")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    ckpt = make_checkpoint(root / "ckpt", max_seq_len=4096)
    tasks = write_local_tasks(root / "tasks")
    data = root / "data"
    escape = root / "escape.txt"
    write_hf_repo(data, "openai/gsm8k", {"test": [
        {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
        {"question": "What is 1,000 + 1?", "answer": "1000 + 1 = 1001\n#### 1,001"}]}, "main")
    write_hf_repo(data, "openai/openai_humaneval", {"test": [
        {"task_id": f"HumanEval/{i}",
         "prompt": f"ESCAPE = {str(escape)!r}\n\ndef {name}(a, b):\n    \"\"\"Add.\"\"\"\n",
         "canonical_solution": "    return a + b\n", "test": "def check(f):\n    assert f(1, 2) == 3\n",
         "entry_point": name} for i, (name, _) in enumerate(HUMANEVAL)]})
    write_hf_repo(data, "google-research-datasets/mbpp", {"test": [
        {"task_id": 11, "prompt": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
         "test_imports": [], "test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]}]}, "sanitized")
    from lm_eval.tasks import TaskManager

    from smoe.eval.suite import MATH_SUBJECTS, base_config, lm_eval_task_dir
    # only the lm-eval task folders these runs use (indexing all of lm-eval's takes ~20 s)
    tm = TaskManager(include_path=[str(lm_eval_task_dir(d)) for d in ("gsm8k", "minerva_math", "hellaswag")]
                     + [str(tasks)], include_defaults=False)
    for s in MATH_SUBJECTS:
        rows = [{"problem": "What is $1+1$?", "level": "Level 1", "type": s, "solution": "$1+1=\\boxed{2}$."}]
        write_hf_repo(data, "EleutherAI/hendrycks_math", {"train": rows, "test": rows},
                      base_config(tm, f"minerva_math_{s}")["dataset_name"])
    return {"ckpt": ckpt, "tasks": tasks, "data": data, "escape": escape, "tm": tm}


def test_suite_table_matches_the_paper(setup):
    rows = {b.key: b for b in MIXTRAL_SUITE}
    for key, (llama, mixtral) in PAPER.items():
        assert rows[key].paper == {LLAMA: llama, MIXTRAL: mixtral}, key
    for key in FIGURE_ONLY_KEYS:
        assert rows[key].paper == {LLAMA: FIGURE_ONLY, MIXTRAL: FIGURE_ONLY}, key
    for key, shots in SHOTS.items():
        assert rows[key].shots == shots, key
    assert {b.category for b in MIXTRAL_SUITE} == {"commonsense", "world_knowledge", "reading", "math", "code",
                                                   "aggregated", "bias"}
    assert BOLD_PAPER["gender"] == {LLAMA: (0.293, 0.073), MIXTRAL: (0.323, 0.045)}
    # every lm-eval task the table names exists in the installed lm-eval
    from smoe.eval.runner import task_manager
    index = task_manager().task_index
    from smoe.eval.suite import AGIEVAL_EN_MC, MATH_SUBJECTS
    named = [b.task for b in MIXTRAL_SUITE if b.task and not b.build and not b.unavailable]
    named += ["gsm8k_cot", *AGIEVAL_EN_MC, *(f"minerva_math_{s}" for s in MATH_SUBJECTS)]
    assert [t for t in named if t not in index] == []
    assert {b.key for b in MIXTRAL_SUITE if b.unavailable} == {"quac", "bold"}


def canned_lm(ckpt):
    """The real smoe model for scoring, with generations fixed per prompt (so pass@k and maj@k have
    known answers): HumanEval bodies from HUMANEVAL, GSM8K answers 5,5,4,5,7,5,4,5 (majority 5),
    MATH 2,3,2,2 (majority 2), MBPP a correct add."""
    from smoe.eval.lm import SmoeLM

    class Canned(SmoeLM):
        def generate_until(self, requests, disable_tqdm=False):
            gsm = iter(["The answer is 5.", "The answer is 5.", "The answer is 4.", "so 5", "The answer is 7.",
                        "The answer is 5.", "The answer is 4.", "The answer is 5."] * 100)
            math = iter(["2", "3", "2", "2"] * 100)
            out = []
            for r in requests:
                ctx = r.args[0]
                body = next((b for name, b in HUMANEVAL if f"def {name}(a, b):" in ctx[-60:]), None)
                if body is not None:
                    out.append(body)
                elif ctx.endswith("A:"):
                    out.append(next(gsm))
                elif ctx.endswith("Solution:"):
                    out.append(f"Final Answer: The final answer is ${next(math)}$. I hope it is correct.")
                elif ctx.endswith("[BEGIN]\n"):
                    out.append("def add(a, b):\n    return a + b\n")
                else:
                    out.append("")
            return out

    return Canned(pretrained=str(ckpt))


def test_hostile_code_is_contained_and_the_evaluation_continues(setup):
    from smoe.eval import evaluate
    from smoe.eval.sandbox import isolation_mode
    if isolation_mode() != "namespaces" and __import__("os").geteuid() == 0:
        pytest.skip("as root without namespaces the sandbox cannot bound a fork bomb")
    opts = SuiteOptions(sandbox=Limits(wall_s=3, cpu_s=1.5, memory_mb=256, max_procs=6), sandbox_workers=6)
    rows, _ = evaluate(canned_lm(setup["ckpt"]), benchmarks=["humaneval", "gsm8k"], tasks=["local_mc"],
                       data_dir=setup["data"], options=opts, progress=False, task_manager=setup["tm"])
    by = {r.key: r for r in rows}
    he = by["humaneval"]
    assert he.status == "ok" and he.n == 6 and he.value == pytest.approx(1 / 6), repr(he)[:3000]
    outcomes = he.sandbox["outcomes"]
    assert outcomes["passed"] == 1 and sum(outcomes.values()) == 6, outcomes
    assert outcomes.get("timeout", 0) >= 1 and outcomes.get("memory limit", 0) == 1, outcomes
    assert not setup["escape"].exists()
    # gold 5 and 1001; each problem's 8 samples vote 5 (5 of 8 say 5): maj@8 1 and 0, sample accuracy 5/8 and 0
    assert by["gsm8k"].status == "ok" and by["gsm8k"].n == 2 and by["gsm8k"].value == pytest.approx(0.5)
    assert by["gsm8k"].metrics["sample_acc,none"] == pytest.approx(5 / 16)
    assert by["local_mc"].status == "ok" and by["local_mc"].n == 6  # ran after the hostile code
    from test_eval_sandbox import sandbox_processes
    assert sandbox_processes() == []


def test_suite_offline_with_data_dir_skips_what_is_missing(setup, tmp_path):
    from smoe.eval import evaluate
    rows, md = evaluate(canned_lm(setup["ckpt"]), benchmarks=["math", "mbpp", "hellaswag", "quac", "bold"],
                        tasks=["local_mc"], data_dir=setup["data"], limit=2, out_dir=tmp_path / "report",
                        progress=False, task_manager=setup["tm"])
    by = {r.key: r for r in rows}
    for key, n, value in (("math", 7, 1.0), ("mbpp", 1, 1.0), ("local_mc", 2, None)):
        assert by[key].status == "ok" and by[key].n == n, by[key]
        assert value is None or by[key].value == value, by[key]
    assert len(by["math"].subtasks) == 7  # one maj@4 task per MATH subject, aggregated by size
    assert by["math"].metrics["sample_acc,none"] == pytest.approx(0.75)
    assert by["mbpp"].sandbox["outcomes"] == {"passed": 1} and by["mbpp"].metric == "pass@1,none"
    hs = by["hellaswag"]
    assert hs.status == "skipped" and "Rowan/hellaswag" in hs.reason and str(setup["data"]) in hs.reason
    assert by["quac"].status == "skipped" and "no QuAC task" in by["quac"].reason
    assert by["local_mc"].metric == "acc,none"  # a task outside the suite reports its first metric
    md_file, json_file = tmp_path / "report" / "report.md", tmp_path / "report" / "report.json"
    text = md_file.read_text()
    assert text == md
    assert "| Math | MATH | 4-shot, maj@4 | smoe_math_maj4 | 4 | maj@4,none | 100.0 | 7 | 13.8 | 28.4 |" in text
    assert FIGURE_ONLY in text and "Mixtral of Experts" in text and "## Not run" in text
    assert "| gender | 0.293 ± 0.073 | 0.323 ± 0.045 |" in text
    report = json.loads(json_file.read_text())
    assert [r["key"] for r in report["rows"]] == [r.key for r in rows]
    math = next(r for r in report["rows"] if r["key"] == "math")
    assert math["paper"] == {LLAMA: 13.8, MIXTRAL: 28.4} and math["n"] == 7 and report["lm_eval_version"]


def test_smoe_eval_command(setup, tmp_path, capsys):
    from smoe.cli import main
    assert main(["eval", "--list"]) == 0
    assert "| gsm8k | GSM8K | math | 8-shot, maj@8 | smoe_gsm8k_maj8 | 8 | maj@8,none | 69.6 | 74.4 |" in \
        capsys.readouterr().out
    out = tmp_path / "rep"
    from smoe.eval import runner
    runner._TASK_MANAGERS[(str(setup["tasks"].resolve()),)] = setup["tm"]  # the small index, not lm-eval's 15k files
    assert main(["eval", str(setup["ckpt"]), "--benchmarks", "quac", "--tasks", "local_mc,local_gen", "--include-path",
                 str(setup["tasks"]), "--limit", "2", "--out", str(out), "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "| Other lm-eval tasks | local_mc |" in printed and "QuAC" in printed
    assert json.loads((out / "report.json").read_text())["rows"][1]["status"] == "ok"
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "no checkpoint directory" in capsys.readouterr().err
    assert main(["eval", str(setup["ckpt"]), "--benchmarks", "nope"]) == 2
    assert "unknown benchmarks" in capsys.readouterr().err
    assert main(["eval", str(setup["ckpt"]), "--data-dir", str(tmp_path / "nodata")]) == 2
