"""pass@k against exact enumeration, majority voting, answer extraction, and sandbox-scored code."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest

from smoe.eval.code import CodeScorer, humaneval_program, mbpp_program
from smoe.eval.metrics import (
    INVALID,
    gsm8k_extract,
    gsm8k_gold,
    maj_at_k,
    majority_vote,
    math_equal,
    math_extract,
    pass_at_k,
)
from smoe.eval.sandbox import Limits


def pass_at_k_enumerated(n: int, c: int, k: int) -> Fraction:
    """Exact: the fraction of k-subsets of the n samples that contain a passing one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_pass_at_k_is_the_unbiased_estimator(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(pass_at_k_enumerated(n, c, k)), abs=1e-12)
    assert pass_at_k(200, 13, 1) == pytest.approx(13 / 200)
    with pytest.raises(ValueError, match="at least 3 samples"):
        pass_at_k(2, 1, 3)


def test_majority_vote_and_maj_at_k():
    assert majority_vote(["3", "5", "5", "3", "7"]) == "3"  # tie: first seen wins
    assert majority_vote([INVALID, None, "2", INVALID]) == "2"  # invalid extractions never win
    assert majority_vote([INVALID, None]) is None
    samples = ["The answer is 5.", "so 4. The answer is 4.", "The answer is 5", "I think 5", "The answer is 1,000."]
    out = maj_at_k(samples, "5", gsm8k_extract, lambda a, g: a == g)
    assert out == {"maj@5": 1.0, "sample_acc": 0.6}
    assert maj_at_k(["The answer is 4."] * 3 + ["The answer is 5."] * 2, "5", gsm8k_extract,
                    lambda a, g: a == g)["maj@5"] == 0.0


def test_gsm8k_extraction():
    assert gsm8k_extract("5 + 3 = 8. The answer is 8.") == "8"
    assert gsm8k_extract("The answer is $1,234.") == "1234"
    assert gsm8k_extract("we get 12 apples and then 15.0") == "15"
    assert gsm8k_extract("no numbers here") == INVALID
    assert gsm8k_gold({"answer": "3 * 4 = 12\n#### 1,200"}) == "1200"


def test_math_extraction_uses_minerva_normalisation():
    text = "So $x = \\frac{1}{2}$.\nFinal Answer: The final answer is $\\frac{1}{2}$. I hope it is correct."
    assert math_extract(text) == "\\frac{1}{2}"
    assert math_equal(math_extract(text), "\\frac{1}{2}")
    assert math_equal("0.5", "\\frac{1}{2}") and not math_equal("2", "3")
    assert math_extract("no final answer") == INVALID


def test_code_scorer_runs_samples_in_the_sandbox():
    doc = {"prompt": "def add(a, b):\n    \"\"\"Add.\"\"\"\n", "test": "def check(f):\n    assert f(2, 3) == 5\n",
           "entry_point": "add"}
    good, bad, loop = "    return a + b\n", "    return a - b\n", "    while True:\n        pass\n"
    assert humaneval_program(doc, good).endswith("check(add)\n")
    scorer = CodeScorer(humaneval_program, ks=(1, 2), limits=Limits(wall_s=5, cpu_s=1), workers=2)
    out = scorer(doc, [[good, bad, loop, good]])
    assert out == {"pass@1": pytest.approx(0.5), "pass@2": pytest.approx(pass_at_k(4, 2, 2))}
    assert scorer.summary()["outcomes"] == {"passed": 2, "failed": 1, "timeout": 1}
    mbpp = {"test_list": ["assert sq(3) == 9"], "test_imports": ["import math"]}
    assert CodeScorer(mbpp_program)(mbpp, ["def sq(x):\n    return int(math.pow(x, 2))"]) == {"pass@1": 1.0}
