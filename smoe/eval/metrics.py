"""Scores over several samples per problem: unbiased pass@k (code) and maj@k (math), and the answer
extraction of GSM8K and MATH they vote over."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

INVALID = "[invalid]"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples passes) from n samples with c passing
    (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent valid answer; ties go to the one seen first. None when none is valid."""
    valid = [a for a in answers if a is not None and a != INVALID]
    if not valid:
        return None
    return Counter(valid).most_common(1)[0][0]  # Counter keeps first-seen order among equal counts


def maj_at_k(samples: Sequence[str], gold, extract: Callable[[str], str | None],
             equal: Callable[[str, object], bool]) -> dict[str, float]:
    """maj@k of one problem (is the majority answer of the k samples right?) and the mean
    single-sample accuracy, over the k samples given."""
    answers = [extract(s) for s in samples]
    vote = majority_vote(answers)
    right = [a is not None and a != INVALID and equal(a, gold) for a in answers]
    return {f"maj@{len(samples)}": float(vote is not None and equal(vote, gold)),
            "sample_acc": float(np.mean(right)) if right else 0.0}


# ----------------------------------------------------------------- GSM8K
_GSM_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+)")
_GSM_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def gsm8k_number(s: str) -> str:
    """Canonical form of a GSM8K number: no $ or thousands commas, no trailing dot or .0."""
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        x = float(s)
    except ValueError:
        return s
    return str(int(x)) if x == int(x) else repr(x)


def gsm8k_extract(text: str) -> str:
    """The answer of a chain of thought: 'The answer is N' (lm-eval's strict match), else the last
    number in the text (its flexible extract)."""
    m = _GSM_STRICT.search(text)
    if m:
        return gsm8k_number(m.group(1))
    nums = [a or b for a, b in _GSM_NUMBER.findall(text)]
    nums = [n for n in nums if any(ch.isdigit() for ch in n)]
    return gsm8k_number(nums[-1]) if nums else INVALID


def gsm8k_gold(doc: dict) -> str:
    return gsm8k_number(doc["answer"].split("####")[-1])


def gsm8k_equal(answer: str, gold: str) -> bool:
    return answer == gold


# ----------------------------------------------------------------- MATH (Minerva prompt and answer format)
def _minerva():
    from lm_eval.tasks.minerva_math import utils  # needs lm-eval[math] (sympy, math_verify, antlr4 4.11)
    return utils


def math_extract(text: str) -> str:
    """'Final Answer: The final answer is X. I hope it is correct.' -> normalised X (Minerva)."""
    u = _minerva()
    raw = u.get_unnormalized_answer(text)
    return INVALID if raw == "[invalidanswer]" else u.normalize_final_answer(raw)


def math_gold(doc: dict) -> str:
    return doc["answer"]


def math_equal(answer: str, gold: str) -> bool:
    return bool(_minerva().is_equiv(answer, gold))
