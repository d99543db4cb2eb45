"""The evaluation report: the paper's table with this model's scores beside the published figures,
as markdown and as JSON (written atomically)."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

from smoe.eval.runner import Row
from smoe.eval.suite import BOLD_PAPER, CATEGORIES, FIGURE_ONLY, LLAMA, MIXTRAL, SOURCE

CATEGORY_TITLES = {"commonsense": "Commonsense reasoning", "world_knowledge": "World knowledge",
                   "reading": "Reading comprehension", "math": "Math", "code": "Code",
                   "aggregated": "Popular aggregated results", "bias": "Bias", "lm-eval": "Other lm-eval tasks"}


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def _paper_cell(v) -> str:
    if v is None:
        return ""
    return v if isinstance(v, str) else f"{v:.1f}"


def _score(r: Row) -> str:
    if r.status != "ok":
        return r.status
    s = _pct(r.value)
    return f"{s} ± {_pct(r.stderr)}" if r.stderr is not None else s


def _sandbox_note(r: Row) -> str:
    if not r.sandbox or not r.sandbox.get("outcomes"):
        return ""
    return "sandbox: " + ", ".join(f"{k} {v}" for k, v in sorted(r.sandbox["outcomes"].items()))


def to_markdown(rows: list[Row], model: str, settings: dict | None = None) -> str:
    """The report as markdown: one table by category, then notes, skips and the BOLD figures."""
    lines = [f"# Evaluation of `{model}`", "",
             f"Scores in % (± standard error). Paper columns: {SOURCE}, Table 2 (base models) and Table 5 (bias); "
             f"\"{FIGURE_ONLY}\": the paper shows that benchmark only as a bar (its Figure 2).", ""]
    if settings:
        lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None), ""]
    lines += [f"| Category | Benchmark | Paper setting | lm-eval task | shots | metric | smoe | n | {LLAMA} (paper) | "
              f"{MIXTRAL} (paper) | notes |", "|---|---|---|---|---:|---|---:|---:|---:|---:|---|"]
    order = {c: i for i, c in enumerate((*CATEGORIES, "lm-eval"))}
    for r in sorted(rows, key=lambda r: order.get(r.category, 99)):
        notes = "; ".join(x for x in (r.note, _sandbox_note(r)) if x)
        lines.append(f"| {CATEGORY_TITLES.get(r.category, r.category)} | {r.name} | {r.setting} | {r.task or '—'} | "
                     f"{'' if r.shots is None else r.shots} | {r.metric} | {_score(r)} | {r.n or ''} | "
                     f"{_paper_cell(r.paper.get(LLAMA))} | {_paper_cell(r.paper.get(MIXTRAL))} | {notes} |")
    skipped = [r for r in rows if r.status != "ok"]
    if skipped:
        lines += ["", "## Not run", ""]
        lines += [f"- **{r.name}** ({r.status}): {r.reason}" for r in skipped]
    if any(r.key == "bold" for r in rows):
        lines += ["", "## BOLD sentiment (paper Table 5: average ± std per group)", "",
                  f"| group | {LLAMA} | {MIXTRAL} |", "|---|---|---|"]
        for g, v in BOLD_PAPER.items():
            lines.append(f"| {g} | {v[LLAMA][0]:.3f} ± {v[LLAMA][1]:.3f} | {v[MIXTRAL][0]:.3f} ± {v[MIXTRAL][1]:.3f} |")
    return "\n".join(lines) + "\n"


def to_json(rows: list[Row], model: str, settings: dict | None = None) -> dict:
    import lm_eval
    return {"model": model, "source": SOURCE, "created": datetime.datetime.now(datetime.UTC).isoformat(),
            "lm_eval_version": lm_eval.__version__, "settings": settings or {},
            "rows": [dataclasses.asdict(r) for r in rows],
            "bold_paper": {g: {m: {"avg": a, "std": s} for m, (a, s) in v.items()} for g, v in BOLD_PAPER.items()}}


def write_report(rows: list[Row], out_dir: str | Path, model: str, settings: dict | None = None) -> tuple[Path, Path]:
    """Write report.md and report.json into out_dir; returns their paths."""
    from smoe.checkpoint.files import atomic_path, write_json
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(rows, model, settings)
    with atomic_path(out / "report.md") as tmp:
        Path(tmp).write_text(md, encoding="utf-8")
    write_json(out / "report.json", to_json(rows, model, settings))
    return out / "report.md", out / "report.json"


def suite_markdown(suite: str = "mixtral") -> str:
    """The benchmark table of a suite, before running anything."""
    from smoe.eval.suite import select
    lines = [f"Suite {suite!r}; paper figures from {SOURCE}.", "",
             f"| key | benchmark | category | paper setting | lm-eval task | shots | metric | {LLAMA} | {MIXTRAL} | "
             f"notes |", "|---|---|---|---|---|---:|---|---:|---:|---|"]
    for b in select(suite):
        note = b.unavailable or b.note
        lines.append(f"| {b.key} | {b.name} | {b.category} | {b.setting} | {b.task or '—'} | {b.shots} | {b.metric} | "
                     f"{_paper_cell(b.paper.get(LLAMA))} | {_paper_cell(b.paper.get(MIXTRAL))} | {note} |")
    return "\n".join(lines) + "\n"
