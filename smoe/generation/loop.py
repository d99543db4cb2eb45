"""The generation loop: prefill a left-padded batch into a KV cache, then decode token by token."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from smoe.generation.compiled import StepOut, decode_step, static_len
from smoe.generation.sampling import SamplingParams, make_generator, sample
from smoe.model.attention import KVCache
from smoe.tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class Completion:
    """One generated continuation: its ids, its text (with a tokenizer), and why it ended."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS, stop id or string) or "length"


@dataclass
class Event:
    """One step of one sequence in a stream: the token and the text it made visible."""

    index: int
    token: int
    text: str
    finish_reason: str | None


class StopChecker:
    """Text of one sequence as it grows; finds stop strings and holds back text that may start one."""

    def __init__(self, tokenizer: Tokenizer | None, stops: list[str]):
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.stops = stops
        self.text = ""
        self.emitted = 0

    def add(self, token: int, final: bool = False) -> tuple[str, bool]:
        """Feed a token; returns (newly visible text, whether a stop string was hit)."""
        if self.decoder is None:
            return "", False
        self.text += self.decoder.add(token)
        if final:
            self.text += self.decoder.flush()
        for s in self.stops:
            at = self.text.find(s, max(0, self.emitted - len(s)))
            if at != -1:
                self.text = self.text[:at]
                return self._emit(len(self.text)), True
        hold = 0
        if not final:
            for s in self.stops:  # longest suffix of the text that is a prefix of a stop string
                for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                    if self.text.endswith(s[:n]):
                        hold = n
                        break
        return self._emit(len(self.text) - hold), False

    def feed(self, token: int, stop_ids: set[int], last: bool) -> tuple[str, str | None]:
        """One sampled token: (newly visible text, finish reason "stop", "length" or None). `last`: the
        token is the final one max_tokens allows. Shared by smoe.generate and the engine."""
        if token in stop_ids:
            return self.finish(), "stop"
        text, hit = self.add(token, final=last)
        return text, "stop" if hit else ("length" if last else None)

    def finish(self) -> str:
        """The text still held back when the sequence ends on a stop id."""
        if self.decoder is None:
            return ""
        self.text += self.decoder.flush()
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out, self.emitted = self.text[self.emitted:upto], upto
        return out


def _as_ids(prompt, tokenizer: Tokenizer | None) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer")
        return tokenizer.encode(prompt, bos=True)
    ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("a prompt must have at least one token")
    return ids


@torch.inference_mode()
def stream(model, prompts, params: SamplingParams | None = None, tokenizer: Tokenizer | None = None,
           compile: bool | str = False, **overrides) -> Iterator[Event]:
    """Generate for one prompt or a batch (text or ids), yielding an Event per sequence per step.

    compile: compile the decode step: True (or "aot") on the CPU ahead of time with AOTInductor, built
    once per model shape and kept on disk; "jit": by torch.compile; on CUDA either is a CUDA graph (of the
    eager step with True or "aot", of the torch.compile'd step with "jit").
    Eager if compiling fails (see smoe.generation.compiled).
    """
    params = SamplingParams(**overrides) if params is None else dataclasses.replace(params, **overrides)
    single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
    ids = [_as_ids(p, tokenizer) for p in ([prompts] if single else prompts)]
    B, lengths = len(ids), [len(p) for p in ids]
    T = max(lengths)
    cfg = model.config
    if T >= cfg.max_seq_len:
        raise ValueError(f"prompt of {T} tokens does not fit the model's context of {cfg.max_seq_len}")
    max_new = min(params.max_tokens, cfg.max_seq_len - T)
    device = model.device
    stop_ids = set(params.stop_token_ids)
    if tokenizer is not None and not params.ignore_eos:
        stop_ids.add(tokenizer.eos_id)

    tokens = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for b, p in enumerate(ids):  # left padding: every prompt ends in the last column
        tokens[b, T - len(p):] = torch.tensor(p)
        valid[b, T - len(p):] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    tokens, valid, positions = tokens.to(device), valid.to(device), positions.to(device)
    all_valid = bool(valid.all())

    step_fn = decode_step(compile, device, B, model.dtype)
    if getattr(step_fn, "static_cache", False):  # CUDA graphs: a whole-buffer cache shared by similar prompts
        cache = KVCache.for_model(model, B, static_len(T + max_new, cfg.max_seq_len), static=True)
    else:
        cache = KVCache.for_model(model, B, T + max_new)
    if max_new > 1 and hasattr(step_fn, "prepare"):  # build or load a compiled step now, before any output
        step_fn.prepare(model, B, cache, params.moe_top_k)
    gens = [make_generator(None if params.seed is None else params.seed + b) for b in range(B)]
    checkers = [StopChecker(tokenizer, params.stop) for _ in range(B)]
    done = [False] * B
    logits = model(tokens, positions, cache.step(positions, None if all_valid else valid),
                   top_k=params.moe_top_k, last_only=True)[:, -1]
    out = StepOut(logits, None, positions[:, -1:] + 1)
    for step in range(max_new):
        new = sample(out.logits, [params] * B, gens, out.greedy)
        for b, tok in enumerate(new.tolist()):
            if done[b]:
                continue
            text, finish = checkers[b].feed(tok, stop_ids, last=step == max_new - 1)
            done[b] = finish is not None
            yield Event(b, tok, text, finish)
        if all(done):
            return
        out = step_fn(model, new if new.device == device else new.to(device), out.positions, cache,
                      params.moe_top_k)


def generate(model, prompts, params: SamplingParams | None = None, tokenizer: Tokenizer | None = None,
             **overrides) -> Completion | list[Completion]:
    """Generate for one prompt (returns a Completion) or a batch (returns a list of them).
    compile=True decodes through a compiled step (see stream)."""
    single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
    n = 1 if single else len(prompts)
    out = [Completion() for _ in range(n)]
    for ev in stream(model, prompts, params, tokenizer, **overrides):
        c = out[ev.index]
        c.tokens.append(ev.token)
        c.text += ev.text
        c.finish_reason = ev.finish_reason
    return out[0] if single else out
