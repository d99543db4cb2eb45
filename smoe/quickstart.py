"""The quickstart: create a small random-weight Mixtral-architecture model and generate from it.

(Training from scratch replaces the random weights once the trainer lands.)
"""

from __future__ import annotations

from pathlib import Path

from smoe.checkpoint import init_random
from smoe.generation import generate
from smoe.model.config import describe, get_preset
from smoe.tokenizer import load_tokenizer


def quickstart(out: str | Path = "runs/quickstart") -> None:
    cfg = get_preset("small")
    print(describe(cfg))
    model = init_random(cfg, out, seed=0)
    tok = load_tokenizer(out)
    for prompt in ["def fibonacci(n):", "import os\n"]:
        c = generate(model, prompt, tokenizer=tok, max_tokens=24, temperature=0.8, top_p=0.95, seed=0)
        print(f"--- {prompt!r} ->\n{prompt}{c.text}")
    print(f"\nmodel saved to {out}. Next: smoe generate {out} --prompt 'def '   |   smoe chat {out}")
