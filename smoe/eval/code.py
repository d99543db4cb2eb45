"""Scoring model-written code: each sample runs in the sandbox against the problem's tests; pass@k."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from smoe.eval.metrics import pass_at_k
from smoe.eval.sandbox import Limits, Result, run_python


def humaneval_program(doc: dict, completion: str) -> str:
    """HumanEval: the prompt (signature + docstring), the completion, the tests, check(entry_point)."""
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def mbpp_program(doc: dict, completion: str) -> str:
    """MBPP: the completion, then the test imports and asserts."""
    imports = "\n".join(doc.get("test_imports") or [])
    tests = "\n".join(doc["test_list"])
    return f"{imports}\n{completion}\n\n{tests}\n"


def _kind(r: Result) -> str:
    if r.passed:
        return "passed"
    if r.status == "timeout":
        return "timeout"
    if r.reason.startswith("memory limit"):
        return "memory limit"
    return r.status


class CodeScorer:
    """lm-eval process_results for code tasks: runs every sample of a problem in the sandbox and
    returns unbiased pass@k for each k not above the number of samples. Keeps a tally of outcomes."""

    def __init__(self, program: Callable[[dict, str], str], ks: tuple[int, ...] = (1,),
                 limits: Limits | None = None, workers: int = 4):
        self.program, self.ks, self.limits, self.workers = program, tuple(ks), limits or Limits(), workers
        self.outcomes: Counter = Counter()
        self.examples: dict[str, str] = {}  # one reason per outcome kind, for the report

    def __deepcopy__(self, memo) -> CodeScorer:
        return self  # lm-eval copies task configs; the tally must stay this one

    def run(self, programs: list[str]) -> list[Result]:
        if len(programs) == 1 or self.workers <= 1:
            return [run_python(p, self.limits) for p in programs]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(programs))) as pool:
            return list(pool.map(lambda p: run_python(p, self.limits), programs))

    def __call__(self, doc: dict, results: list) -> dict[str, float]:
        samples = results[0] if results and isinstance(results[0], list | tuple) else results
        outcomes = self.run([self.program(doc, s) for s in samples])
        for r in outcomes:
            kind = _kind(r)
            self.outcomes[kind] += 1
            self.examples.setdefault(kind, r.reason)
        n, c = len(samples), sum(r.passed for r in outcomes)
        return {f"pass@{k}": pass_at_k(n, c, k) for k in self.ks if k <= n}

    def summary(self) -> dict:
        return {"outcomes": dict(self.outcomes), "examples": dict(self.examples), "limits": vars(self.limits)}
