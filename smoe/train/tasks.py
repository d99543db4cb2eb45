"""A programmatic instruction set with exact answers, to see SFT and DPO work on held-out prompts.

Tasks on short lists of digits or letters written with spaces (so any tokenizer sees one symbol per
token or so): max, min, first, last, reverse, sort, add two digits, and count a symbol. Every answer is exact,
and each task also has a plausible wrong answer (another element, a near sum, a slightly wrong order)
for preference pairs. Prompts are split into train and held-out sets with no prompt in both.

    python -m smoe.train.tasks runs/instruct-data     # sft_train.jsonl sft_val.jsonl dpo_train.jsonl dpo_val.jsonl

The preference pairs are made on prompts the SFT data does not hold (as with real data, where the
preference set is collected separately), and both held-out files share the same held-out prompts.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DIGITS = "0123456789"
LETTERS = "abcdefgh"
TASKS = ("max", "min", "first", "last", "reverse", "sort", "add", "count")


def _wrong_order(items: list[str], right: list[str], rng: random.Random) -> list[str]:
    """A different order of the same items (adjacent swap of the right answer)."""
    for _ in range(20):
        i = rng.randrange(len(right) - 1)
        w = right[:i] + [right[i + 1], right[i]] + right[i + 2:]
        if w != right:
            return w
    return list(reversed(right)) if list(reversed(right)) != right else items


def make_example(task: str, rng: random.Random) -> tuple[str, str, str] | None:
    """(prompt, answer, wrong answer) of one task instance, or None when no wrong answer exists."""
    n = rng.randint(3, 5)
    if task in ("max", "min", "first", "last", "count"):
        items = [rng.choice(DIGITS) for _ in range(n)]
        if task == "count":
            sym = rng.choice(items)
            ans = str(items.count(sym))
            wrong = str(items.count(sym) + rng.choice([-1, 1]) if items.count(sym) > 1 else items.count(sym) + 1)
            return f"count {sym} in {' '.join(items)}", ans, wrong
        right = {"max": max, "min": min, "first": lambda x: x[0], "last": lambda x: x[-1]}[task](items)
        others = [x for x in items if x != right]
        if not others:
            return None
        return f"{task} of {' '.join(items)}", right, rng.choice(others)
    if task in ("reverse", "sort"):
        items = [rng.choice(LETTERS if task == "reverse" else DIGITS) for _ in range(n)]
        right = list(reversed(items)) if task == "reverse" else sorted(items)
        wrong = _wrong_order(items, right, rng)
        if wrong == right:
            return None
        return f"{task} {' '.join(items)}", " ".join(right), " ".join(wrong)
    if task == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"add {a} and {b}", str(a + b), str(a + b + rng.choice([-1, 1]) if a + b > 0 else 1)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def make_tasks(n_train: int, n_val: int, seed: int = 0, tasks: tuple[str, ...] = TASKS
               ) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(train, held-out) lists of (prompt, answer, wrong answer); no prompt is in both, tasks in turn (a task
    with few distinct prompts, such as add, runs out and the others fill in)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[tuple[str, str, str]] = []
    tries = 0
    while len(out) < n_train + n_val:
        tries += 1
        if tries > 100 * (n_train + n_val):
            raise ValueError(f"cannot make {n_train + n_val} distinct prompts from tasks {tasks}")
        ex = make_example(tasks[tries % len(tasks)], rng)
        if ex is None or ex[0] in seen:
            continue
        seen.add(ex[0])
        out.append(ex)
    rng.shuffle(out)
    return out[n_val:], out[:n_val]


def chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def pair(prompt: str, answer: str, wrong: str) -> dict:
    return {"prompt": prompt, "chosen": answer, "rejected": wrong}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_task_files(out: str | Path, n_train: int = 4000, n_val: int = 200, n_pairs: int = 2000, seed: int = 0
                     ) -> dict[str, Path]:
    """Write sft_train/sft_val (chats) and dpo_train/dpo_val (pairs) JSONL files into `out`; the n_pairs
    training pairs are on prompts outside sft_train, the held-out prompts are in neither."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = make_tasks(n_train + n_pairs, n_val, seed)
    sft, pref = train[:n_train], train[n_train:]
    return {"sft_train": write_jsonl(out / "sft_train.jsonl", [chat(p, a) for p, a, _ in sft]),
            "sft_val": write_jsonl(out / "sft_val.jsonl", [chat(p, a) for p, a, _ in val]),
            "dpo_train": write_jsonl(out / "dpo_train.jsonl", [pair(*x) for x in pref]),
            "dpo_val": write_jsonl(out / "dpo_val.jsonl", [pair(*x) for x in val])}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m smoe.train.tasks", description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name, path in write_task_files(args.out, args.train, args.val, args.pairs, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
