"""The quickstart end to end, shortened to seconds: `smoe quickstart --minutes 0.4 --corpus SMALL`."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
from train_helpers import make_corpus

from smoe.quickstart import stdlib_files


def test_stdlib_corpus_is_found_without_site_packages():
    files = stdlib_files()
    assert len(files) > 500
    assert not any("site-packages" in f.parts for f in files)
    assert any(f.name == "json" or f.parent.name == "json" for f in files)


@pytest.mark.timeout(300)
def test_quickstart_runs_end_to_end(tmp_path):
    corpus = make_corpus(tmp_path, n_files=14)
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "smoe.cli", "quickstart", "--minutes", "2", "--max-steps", "40",
           "--corpus", str(corpus), "--out", str(out), "--vocab-size", "512"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=280,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    text = p.stdout + p.stderr
    assert p.returncode == 0, text[-4000:]
    for expected in ("training a 512-id byte-fallback BPE", "validation:", "unigram baseline", "expert load",
                     "max/mean", "samples", "def fibonacci(n):", "next:", "smoe generate", "smoe serve",
                     "loss.png", "quickstart finished"):
        assert expected in text, expected
    m = re.search(r"this model\s+([\d.]+)\s+([\d.]+)", text)
    u = re.search(r"unigram baseline\s+([\d.]+)\s+([\d.]+)", text)
    assert m and u and float(m.group(1)) < math.log(512) - 0.5, "40 steps learn something"
    assert "trained 40 steps" in text
    final = out / "train" / "final"
    from smoe import Transformer, load_tokenizer
    model = Transformer.from_pretrained(final)
    assert model.config.n_experts == 8 and model.config.top_k == 2
    assert load_tokenizer(final).vocab_size == 512
    assert (out / "train" / "loss.png").exists() and (out / "train" / "expert_load.png").exists()
