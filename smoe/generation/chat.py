"""An interactive chat session on a terminal, keeping the conversation."""

from __future__ import annotations

import sys
from typing import TextIO

from smoe.generation.loop import stream
from smoe.generation.sampling import SamplingParams
from smoe.tokenizer import ChatFormatError, Tokenizer


def chat_loop(model, tokenizer: Tokenizer, params: SamplingParams, system: str | None = None,
              stdin: TextIO | None = None, stdout: TextIO | None = None, compile: bool | str = False) -> list[dict]:
    """Read user turns from stdin, stream each reply to stdout; '/reset' clears, EOF or '/exit' ends.
    compile: the decode step's compilation, as for smoe.generation.stream."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout  # looked up now: callers may swap them
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("\n> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return messages
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            messages = messages[:1] if system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids = tokenizer.encode_chat(messages)
        except ChatFormatError as e:
            stdout.write(f"error: {e}\n")
            messages.pop()
            continue
        if len(ids) >= model.config.max_seq_len:
            stdout.write("error: the conversation no longer fits the context; /reset to start over\n")
            messages.pop()
            continue
        reply = ""
        for ev in stream(model, ids, params, tokenizer, compile=compile):
            reply += ev.text
            stdout.write(ev.text)
            stdout.flush()
        stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
