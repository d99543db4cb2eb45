"""The smoe command end to end on a tiny random model."""

import io
import json
import sys

from smoe.cli import main


def test_info_init_generate_chat_convert(tmp_path, capsys, monkeypatch):
    assert main(["info", "--preset", "mixtral-8x7b"]) == 0
    assert "46.70B" in capsys.readouterr().out
    out = tmp_path / "m"
    assert main(["init", str(out), "--preset", "tiny", "--seed", "1"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= {p.name for p in out.iterdir()}
    assert main(["info", str(out)]) == 0
    assert "vocab_size: 32000" in capsys.readouterr().out

    assert main(["generate", str(out), "--prompt", "def f(x):", "--max-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("def f(x):")

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/reset\nAgain\n/exit\n"))
    assert main(["chat", str(out), "--max-tokens", "4"]) == 0

    assert main(["convert", str(out), str(tmp_path / "c"), "--format", "consolidated", "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "c" / "params.json").read_text())["moe"]["num_experts"] == 8
    assert (tmp_path / "c" / "tokenizer.model").exists()
    assert main(["generate", str(tmp_path / "c"), "--prompt", "x", "--max-tokens", "3"]) == 0


def test_bad_preset_is_a_clear_error(tmp_path, capsys):
    assert main(["init", str(tmp_path / "x"), "--preset", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err


def test_generate_compile_flag_picks_the_step(tmp_path, monkeypatch):
    import smoe.generation
    out = tmp_path / "m"
    assert main(["init", str(out), "--preset", "tiny", "--seed", "1"]) == 0
    seen = []
    monkeypatch.setattr(smoe.generation, "stream", lambda *a, compile, **k: seen.append(compile) or iter(()))
    for flags in ([], ["--compile"], ["--compile", "jit"], ["--compile", "aot"], ["--aot"]):
        assert main(["generate", str(out), "--prompt", "x", *flags]) == 0
    assert seen == [False, True, "jit", True, "aot"]
    import smoe.generation.chat
    monkeypatch.setattr(smoe.generation.chat, "stream", lambda *a, compile, **k: seen.append(compile) or iter(()))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/exit\n"))
    assert main(["chat", str(out), "--compile", "jit"]) == 0
    assert seen[-1] == "jit"
