"""Run a suite of benchmarks through lm-eval, offline, one task at a time.

A benchmark whose data is not on this machine (HF datasets cache or --data-dir) is reported as
skipped, with the reason and where to put the data; a benchmark that fails while running is
reported as an error; the rest still run. A progress bar goes across the benchmarks.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from smoe.eval.suite import Benchmark, Built, SuiteOptions


@dataclass
class Row:
    """The outcome of one benchmark."""

    key: str
    name: str
    category: str
    setting: str
    task: str | None
    shots: int | None
    metric: str
    status: str = "ok"  # ok | skipped | error
    reason: str = ""
    value: float | None = None
    stderr: float | None = None
    n: int | None = None
    paper: dict = field(default_factory=dict)
    note: str = ""
    metrics: dict = field(default_factory=dict)  # every metric of the benchmark's top task/group
    subtasks: dict = field(default_factory=dict)  # leaf task -> its value of the metric
    seconds: float = 0.0
    sandbox: dict | None = None


def force_offline() -> None:
    """Nothing downloads: Hugging Face hub and datasets in offline mode, also when already imported."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_ALLOW_CODE_EVAL", "0")
    import datasets.config
    import huggingface_hub.constants
    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def _local_cache_dir(folder: Path) -> Path:
    """A datasets cache folder for one local dataset copy, keyed by its path and its files' sizes and times."""
    import datasets.config
    h = hashlib.sha256(str(folder.resolve()).encode())
    for f in sorted(folder.rglob("*")):
        if f.is_file() and ".cache" not in f.parts:
            st = f.stat()
            h.update(f"{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return Path(datasets.config.HF_DATASETS_CACHE) / "smoe-local" / h.hexdigest()[:16]


@contextlib.contextmanager
def local_datasets(data_dir: str | Path | None):
    """While building tasks: load `org/name` from DATA_DIR/org/name when that copy exists; record
    every dataset asked for (the last one is what was missing when loading fails)."""
    import datasets
    asked: list[str] = []
    original = datasets.load_dataset

    def load(path, *args, **kwargs):
        asked.append(str(path))
        local = Path(data_dir) / str(path) if data_dir is not None else None
        if local is not None and local.is_dir():
            path = str(local)
            # datasets caches a local folder by its name alone: give each version of a copy its own cache
            kwargs.setdefault("cache_dir", str(_local_cache_dir(local)))
        return original(path, *args, **kwargs)

    datasets.load_dataset = load
    try:
        yield asked
    finally:
        datasets.load_dataset = original


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _missing_data_reason(e: BaseException, asked: list[str], data_dir) -> str:
    path = asked[-1] if asked else "its dataset"
    where = Path(data_dir) if data_dir else Path("DATA")
    return (f"dataset {path} is not available offline ({_first_line(e)}); put a copy of the Hugging Face "
            f"dataset repo at {where / path} (e.g. `huggingface-cli download --repo-type dataset {path} "
            f"--local-dir {where / path}` on a machine with internet) and pass --data-dir {where}, or load it "
            f"once into the HF datasets cache (HF_DATASETS_CACHE)")


def _is_data_error(e: BaseException) -> bool:
    names = {type(c).__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectionError", "FileNotFoundError", "DatasetNotFoundError", "OfflineModeIsEnabled",
                         "DataFilesNotFoundError", "EmptyDatasetError", "HfHubHTTPError", "LocalEntryNotFoundError"}) \
        or "offline" in str(e).lower() or "couldn't reach" in str(e).lower()


def _split(key: str) -> tuple[str, str]:
    metric, _, filt = key.partition(",")
    return metric, filt or "none"


def _fill(row: Row, res: dict, top: str, leaves: list[str]) -> None:
    """Row value, stderr, n and per-subtask values from an lm-eval results dict."""
    results = {**res.get("results", {}), **res.get("groups", {})}
    if not row.metric:  # a task outside the suite: its first metric
        first = results.get(top) or results.get(leaves[0], {})
        row.metric = next((k for k in first if k != "alias" and "_stderr" not in k and "," in k), "")
    metric, filt = _split(row.metric)
    stderr_key = f"{metric}_stderr,{filt}"
    n_samples = res.get("n-samples", {})
    counts = {t: int(n_samples[t]["effective"]) for t in leaves if t in n_samples}
    row.n = sum(counts.values()) or None
    for t in leaves:
        if t in results and row.metric in results[t]:
            row.subtasks[t] = results[t][row.metric]
    top_metrics = results.get(top) or (results.get(leaves[0]) if len(leaves) == 1 else {})
    row.metrics = {k: v for k, v in top_metrics.items() if k != "alias"}
    if row.metric in top_metrics:
        row.value = float(top_metrics[row.metric])
        se = top_metrics.get(stderr_key)
        row.stderr = float(se) if isinstance(se, int | float) and math.isfinite(se) else None
    elif row.subtasks:  # a tag or group without an aggregate: size-weighted mean of its tasks
        total = sum(counts.get(t, 0) for t in row.subtasks)
        if total:
            row.value = sum(v * counts.get(t, 0) for t, v in row.subtasks.items()) / total
            ses = [results[t].get(stderr_key) for t in row.subtasks]
            if all(isinstance(s, int | float) and math.isfinite(s) for s in ses):
                row.stderr = math.sqrt(sum((s * counts.get(t, 0)) ** 2 for t, s in zip(row.subtasks, ses))) / total
    if row.value is None:
        row.status, row.reason = "error", f"metric {row.metric} not in the results ({sorted(row.metrics)})"


_TASK_MANAGERS: dict = {}


def task_manager(include_path: str | Path | list | None = None):
    """lm-eval's TaskManager (indexing its ~15k task files takes seconds), one per include_path."""
    from lm_eval.tasks import TaskManager
    paths = include_path if isinstance(include_path, list | tuple) else [include_path] if include_path else []
    key = tuple(str(Path(p).resolve()) for p in paths)
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = TaskManager(include_path=list(key) or None)
    return _TASK_MANAGERS[key]


def _register(tm, spec: str | dict) -> str | dict:
    """An inline group config goes into the task index and is loaded by name (lm-eval would otherwise
    pass the whole group dict on to its tasks as overrides)."""
    if isinstance(spec, dict) and "group" in spec:
        from lm_eval.tasks._index import Entry, Kind
        tm.task_index[spec["group"]] = Entry(name=spec["group"], kind=Kind.GROUP, yaml_path=None, cfg=spec)
        return spec["group"]
    return spec


def run_benchmarks(lm, benchmarks: list[Benchmark], *, limit: int | float | None = None,
                   data_dir: str | Path | None = None, include_path: str | Path | list | None = None,
                   options: SuiteOptions | None = None, bootstrap_iters: int = 1000, seed: int = 1234,
                   progress: bool = True, tm=None) -> list[Row]:
    """Evaluate `lm` (an lm-eval LM) on each benchmark in turn; returns one Row per benchmark.
    tm: an lm-eval TaskManager to use instead of the cached one for include_path."""
    force_offline()
    import lm_eval
    options = options or SuiteOptions()
    for name in ("lm_eval", "lm-eval"):  # keep lm-eval's per-task chatter out of the progress display
        logging.getLogger(name).setLevel(logging.WARNING)
    tm = tm or task_manager(include_path)
    rows: list[Row] = []
    bar = tqdm(benchmarks, desc="benchmarks", unit="task", disable=not progress)
    for b in bar:
        bar.set_postfix_str(b.key)
        row = Row(b.key, b.name, b.category, b.setting, b.task, b.shots, b.metric, paper=dict(b.paper), note=b.note)
        rows.append(row)
        t0 = time.perf_counter()
        if b.unavailable:
            row.status, row.reason = "skipped", b.unavailable
            continue
        # 1. build the task(s): this is where missing data shows
        asked: list[str] = []
        try:
            built = b.build(options, tm) if b.build else Built(b.task)
            with local_datasets(data_dir) as asked:
                loaded = tm.load([_register(tm, built.spec)])
        except Exception as e:
            row.status = "skipped"
            row.reason = (_missing_data_reason(e, asked, data_dir) if _is_data_error(e)
                          else f"cannot build the task: {_first_line(e)}")
            continue
        spec_name = built.spec if isinstance(built.spec, str) else built.spec.get("group") or built.spec["task"]
        top = loaded["groups"].get(spec_name) or loaded["tasks"].get(spec_name)
        objs = [top] if top is not None else list(loaded["tasks"].values())
        leaves = list(loaded["tasks"])
        # 2. evaluate
        try:
            res = lm_eval.simple_evaluate(model=lm, tasks=objs, num_fewshot=b.shots, limit=limit, task_manager=tm,
                                          bootstrap_iters=bootstrap_iters, log_samples=False,
                                          confirm_run_unsafe_code=True, random_seed=seed, numpy_random_seed=seed,
                                          torch_random_seed=seed, fewshot_random_seed=seed)
            _fill(row, res, spec_name, leaves)
        except Exception as e:
            row.status, row.reason = "error", _first_line(e)
        finally:
            row.seconds = time.perf_counter() - t0
            summaries = [s.summary() for s in built.scorers if hasattr(s, "summary")]
            row.sandbox = summaries[0] if summaries else None
    return rows
