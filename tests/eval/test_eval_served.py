"""The same evaluation against a running `smoe serve` through lm-eval's local-completions: scores equal
those of the in-process model."""

from __future__ import annotations

import pytest
from smoe_eval_testkit import SmoeServer, make_checkpoint, private_datasets_cache, write_local_tasks

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def datasets_cache(tmp_path_factory):
    private_datasets_cache(tmp_path_factory.mktemp("hf-datasets-cache"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    ckpt = make_checkpoint(root / "ckpt")
    server = SmoeServer(ckpt, root / "serve.log")
    yield ckpt, write_local_tasks(root / "tasks"), server
    server.stop()


def test_served_scores_equal_in_process(served, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from smoe.eval.lm import SmoeLM
    from smoe.eval.remote import ServedLM
    ckpt, tasks, server = served
    tm = TaskManager(include_path=str(tasks), include_defaults=False)
    kw = dict(tasks=["local_mc", "local_gen"], task_manager=tm, log_samples=True, bootstrap_iters=0)
    remote = lm_eval.simple_evaluate(model=ServedLM(server.url, tokenizer=ckpt), **kw)
    local = lm_eval.simple_evaluate(model=SmoeLM(pretrained=str(ckpt)), **kw)
    for task in ("local_mc", "local_gen"):
        for a, b in zip(remote["samples"][task], local["samples"][task], strict=True):
            for ra, rb in zip(a["resps"], b["resps"], strict=True):
                if task == "local_mc":
                    assert ra[0][0] == pytest.approx(rb[0][0], abs=1e-4) and ra[0][1] == rb[0][1]
                else:
                    assert ra == rb
        for k, v in local["results"][task].items():
            if isinstance(v, float):
                assert remote["results"][task][k] == pytest.approx(v, abs=1e-6), (task, k)
    # `smoe eval --server`: the same rows as in process
    from smoe.cli import main
    from smoe.eval import runner
    runner._TASK_MANAGERS[(str(tasks.resolve()),)] = tm
    args = ["eval", str(ckpt), "--tasks", "local_mc", "--include-path", str(tasks)]
    assert main([*args, "--server", server.url, "--out", str(tmp_path / "remote")]) == 0
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    import json
    rows = [json.loads((tmp_path / d / "report.json").read_text())["rows"][0] for d in ("remote", "local")]
    assert rows[0]["status"] == rows[1]["status"] == "ok" and rows[0]["value"] == pytest.approx(rows[1]["value"])


def test_sampled_requests_get_distinct_seeds(served):
    from smoe.eval.remote import ServedLM
    ckpt, _, server = served
    lm = ServedLM(server.url, tokenizer=ckpt)
    seeds = [lm._create_payload([[1, 2]], generate=True, gen_kwargs={"temperature": 0.7, "until": ["\n"]})["seed"]
             for _ in range(3)]
    assert seeds == [1234, 1235, 1236]
    assert lm._create_payload([[1, 2]], generate=True, gen_kwargs={"temperature": 0.0})["seed"] == 1234
    assert lm.model == "tiny-eval"
