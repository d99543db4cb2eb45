"""Evaluation: the Mixtral paper's benchmark suite through lm-evaluation-harness, with a code sandbox.

Entry point: `evaluate(model_dir, suite="mixtral", ...)` runs the suite offline and writes a markdown
and JSON report with the paper's figures beside the model's. The lm-eval model is `smoe.eval.lm.SmoeLM`
(registered as `smoe`); the suite table is `smoe.eval.suite`; model-written code runs only in
`smoe.eval.sandbox`.
"""

from __future__ import annotations

from pathlib import Path


def evaluate(model, suite: str | None = "mixtral", categories: list[str] | None = None,
             benchmarks: list[str] | None = None, tasks: list[str] | None = None, num_fewshot: int | None = None,
             include_path: str | Path | None = None, limit: int | float | None = None,
             data_dir: str | Path | None = None, out_dir: str | Path | None = None, options=None,
             model_args: dict | None = None, progress: bool = True, task_manager=None, server: str | None = None):
    """Evaluate a checkpoint directory (or an lm-eval LM) on a suite and/or lm-eval tasks.

    server: the URL of a running `smoe serve`; then `model` is the checkpoint directory whose
    tokenizer it uses, and scoring goes through lm-eval's local-completions.
    Returns (rows, markdown). With out_dir, also writes report.md and report.json there.
    """
    from smoe.eval.report import to_markdown, write_report
    from smoe.eval.runner import force_offline, run_benchmarks
    from smoe.eval.suite import lm_eval_benchmark, select
    force_offline()
    if limit is not None and limit >= 1:
        limit = int(limit)
    rows = select(suite, categories, benchmarks) if suite else []
    rows += [lm_eval_benchmark(t, num_fewshot) for t in tasks or []]
    if not rows:
        raise ValueError("nothing to evaluate: give a suite, benchmarks or lm-eval tasks")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir} is not a directory")
    if server is not None:
        from smoe.eval.remote import ServedLM
        lm = ServedLM(server, tokenizer=model, **(model_args or {}))
        name = lm.pretrained
    elif isinstance(model, str | Path):
        from smoe.eval.lm import SmoeLM
        lm, name = SmoeLM(pretrained=str(model), **(model_args or {})), str(model)
    else:
        lm, name = model, getattr(model, "pretrained", type(model).__name__)
    results = run_benchmarks(lm, rows, limit=limit, data_dir=data_dir, include_path=include_path, options=options,
                             progress=progress, tm=task_manager)
    settings = {"suite": suite, "limit": limit, "data_dir": str(data_dir) if data_dir else None, "server": server,
                **{k: v for k, v in (model_args or {}).items()}}
    if options is not None:
        settings.update(code_samples=options.code_samples, maj_temperature=options.maj_temperature)
    if any(r.sandbox for r in results):
        from smoe.eval.sandbox import isolation_mode
        settings["sandbox"] = isolation_mode()
    if out_dir is not None:
        write_report(results, out_dir, name, settings)
    return results, to_markdown(results, name, settings)


def suite_listing(suite: str = "mixtral") -> str:
    """The suite's table (benchmark, lm-eval task, shots, metric, paper figures) as markdown."""
    from smoe.eval.report import suite_markdown
    return suite_markdown(suite)
