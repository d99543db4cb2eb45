"""The training commands end to end: tokenizer train -> data prepare -> train -> resume -> export."""

from __future__ import annotations

import json

import pytest
from train_helpers import TINY_MODEL, make_corpus

from smoe.cli import main


@pytest.mark.timeout(300)
def test_tokenizer_data_train_resume_export(tmp_path, capsys):
    corpus = make_corpus(tmp_path, n_files=8)
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "400", "--out", str(tmp_path / "tok")]) == 0
    assert "400 ids" in capsys.readouterr().out
    assert main(["data", "prepare", str(corpus / "*.py"), "--tokenizer", str(tmp_path / "tok"), "--out",
                 str(tmp_path / "data"), "--val-fraction", "0.25", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "files: 8 found, 8 used" in out and "val: 2 documents" in out
    run = tmp_path / "run"
    args = ["train", "--recipe", "tiny", "--data", str(tmp_path / "data"), "--out", str(run), *TINY_MODEL,
            "batch_size=2", "seq_len=32", "max_steps=4", "save_every=2", "eval_every=2", "eval_tokens=128",
            "tensorboard=false", "plots=false", "progress=false"]
    assert main(args) == 0
    assert "stopped at step 4 (max_steps)" in capsys.readouterr().out
    assert main(args) == 2  # refuses to overwrite a run
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(args + ["max_steps=6", "--resume"]) == 0  # an explicit max_steps extends a finished run
    assert "stopped at step 6" in capsys.readouterr().out
    recipe = json.loads((run / "recipe.json").read_text())
    assert recipe["model"]["vocab_size"] == 400 and recipe["model"]["dim"] == 32
    assert main(["export", str(run), "--out", str(tmp_path / "exported"), "--dtype", "bf16"]) == 0
    from smoe import Transformer, load_tokenizer
    model = Transformer.from_pretrained(tmp_path / "exported")
    assert str(model.dtype) == "torch.bfloat16" and load_tokenizer(tmp_path / "exported").vocab_size == 400
    assert main(["train", "--recipe", "nope"]) == 2
    assert "unknown recipe" in capsys.readouterr().err
    assert main(["train", "--list"]) == 0 and "quickstart" in capsys.readouterr().out
