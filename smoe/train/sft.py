"""Supervised fine-tuning on chat data: the pretraining Trainer with assistant-only targets and packed chats.

Data: JSONL, one conversation a line: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}.
Each conversation is rendered with the tokenizer's own chat format (`encode_chat`: the Mixtral [INST] format
for Mistral and smoe tokenizers) so that `smoe chat` and `smoe serve` prompt the fine-tuned model exactly as
it was trained. Only assistant tokens are targets, each assistant turn ending with EOS; system and user tokens
and the format's markers are context only.

Packing, not padding: conversations are packed first-fit into rows of seq_len tokens, each keeping its own
segment id, and smoe.model.attention.SelfAttention's `segments` mask stops packed conversations from
attending to each other (RoPE is relative, so a conversation scores the same anywhere in a row). Chat data
varies a lot in length: padding would spend most of the compute on pad tokens, packing wastes only the
row tails. Conversations longer than seq_len are truncated (or skipped, `truncation="skip"`) and counted.

    smoe sft --model BASE --data chats.jsonl --out runs/sft [--lora] ...
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from smoe.checkpoint.files import write_json
from smoe.tokenizer import ChatFormatError, Tokenizer, check_messages
from smoe.train.losses import IGNORE, LMObjective
from smoe.train.trainer import TrainConfig, Trainer


class SFTDataError(ValueError):
    """Chat data that cannot be used; the message names the file, line and problem."""


# ----------------------------------------------------------------------------- reading and rendering

def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) of every non-empty line of a JSONL file; a bad line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise SFTDataError(f"{path} does not exist or is not a file")
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SFTDataError(f"{path} is not UTF-8 text: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SFTDataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise SFTDataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        out.append((n, obj))
    if not out:
        raise SFTDataError(f"{path} holds no examples")
    return out


def read_chats(path: str | Path) -> list[list[dict]]:
    """The conversations of a chat JSONL file, each validated (roles, order, string contents)."""
    chats = []
    for n, obj in read_jsonl(path):
        msgs = obj.get("messages")
        if not isinstance(msgs, list):
            raise SFTDataError(f"{path}:{n}: expected {{\"messages\": [...]}}, got keys {sorted(obj)}")
        try:
            check_messages(msgs)
        except ChatFormatError as e:
            raise SFTDataError(f"{path}:{n}: {e}") from None
        chats.append(msgs)
    return chats


def _find(ids: list[int], piece: list[int], start: int) -> int:
    """First index >= start where `piece` occurs in ids, or -1."""
    n = len(piece)
    for i in range(start, len(ids) - n + 1):
        if ids[i] == piece[0] and ids[i:i + n] == piece:
            return i
    return -1


def encode_conversation(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Ids of a conversation in the tokenizer's chat format and a mask: True on assistant tokens (with EOS).

    Each assistant turn's tokens are what the format appends when that reply follows its prompt
    (encode_chat(messages[:i+1]) minus encode_chat(messages[:i])), located in the full rendering in order,
    so the mask is right for any format, including ones that move the system prompt.
    """
    ids = tok.encode_chat(messages)
    mask = [False] * len(ids)
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tok.encode_chat(messages[:i])
        full = tok.encode_chat(messages[:i + 1])
        if full[:len(prompt)] != prompt:
            raise ChatFormatError(f"the chat format does not extend the prompt of assistant turn {i}")
        reply = full[len(prompt):]
        if not reply or reply[-1] != tok.eos_id:
            raise ChatFormatError(f"the chat format does not end assistant turn {i} with EOS")
        at = cursor if ids[cursor:cursor + len(reply)] == reply else _find(ids, reply, cursor)
        if at < 0:
            raise ChatFormatError(f"assistant turn {i} is not found in the rendered conversation")
        mask[at:at + len(reply)] = [True] * len(reply)
        cursor = at + len(reply)
    return ids, mask


@dataclass
class SFTStats:
    """What became of the conversations read."""

    conversations: int = 0
    used: int = 0
    truncated: int = 0  # longer than seq_len: cut to seq_len (truncation="truncate")
    skipped_too_long: int = 0  # longer than seq_len and skipped, or no assistant token left after the cut
    skipped_no_assistant: int = 0  # no assistant message to learn from
    tokens: int = 0
    target_tokens: int = 0

    def line(self) -> str:
        return (f"{self.used}/{self.conversations} conversations used ({self.truncated} truncated, "
                f"{self.skipped_too_long} too long skipped, {self.skipped_no_assistant} without an assistant "
                f"turn skipped), {self.tokens} tokens of which {self.target_tokens} assistant targets")


def tokenize_chats(tok: Tokenizer, chats: list[list[dict]], seq_len: int, truncation: str = "truncate",
                   progress: bool = False) -> tuple[list[tuple[np.ndarray, np.ndarray]], SFTStats]:
    """[(ids, targets)] per usable conversation (targets[t] = ids[t+1] on assistant tokens, else IGNORE)."""
    if truncation not in ("truncate", "skip"):
        raise ValueError(f"truncation must be 'truncate' or 'skip', got {truncation!r}")
    from tqdm import tqdm

    from smoe.train.logs import bar_kwargs
    stats = SFTStats(conversations=len(chats))
    out = []
    for msgs in tqdm(chats, desc="tokenizing chats", unit="conv", disable=not progress, **bar_kwargs()):
        if not any(m["role"] == "assistant" for m in msgs):
            stats.skipped_no_assistant += 1
            continue
        ids, mask = encode_conversation(tok, msgs)
        if len(ids) > seq_len:
            if truncation == "skip":
                stats.skipped_too_long += 1
                continue
            ids, mask = ids[:seq_len], mask[:seq_len]
            if not any(mask[1:]):
                stats.skipped_too_long += 1
                continue
            stats.truncated += 1
        ids_a = np.asarray(ids, dtype=np.int64)
        targets = np.full(len(ids), IGNORE, dtype=np.int64)
        m = np.asarray(mask[1:], dtype=bool)
        targets[:-1][m] = ids_a[1:][m]
        out.append((ids_a, targets))
        stats.used += 1
        stats.tokens += len(ids)
        stats.target_tokens += int(m.sum())
    return out, stats


# ----------------------------------------------------------------------------- packing and batches

def pack(lengths: list[int], seq_len: int, order: list[int]) -> list[list[int]]:
    """Rows of example indices, filled best-fit in the given order; each row holds at most seq_len tokens."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row) sorted
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            left, r = free.pop(j)
            rows[r].append(i)
            if left - n > 0:
                bisect.insort(free, (left - n, r))
        else:
            rows.append([i])
            if seq_len - n > 0:
                bisect.insort(free, (seq_len - n, len(rows) - 1))
    return rows


def collate_rows(examples: list[tuple[np.ndarray, np.ndarray]], rows: list[list[int]], seq_len: int,
                 pad_id: int = 0) -> dict[str, torch.Tensor]:
    """tokens, targets, segments (B, seq_len) and valid (False: padding) of packed rows."""
    B = len(rows)
    tokens = np.full((B, seq_len), pad_id, dtype=np.int64)
    targets = np.full((B, seq_len), IGNORE, dtype=np.int64)
    segments = np.full((B, seq_len), -1, dtype=np.int64)
    for b, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row):
            ids, tg = examples[i]
            tokens[b, at:at + len(ids)] = ids
            targets[b, at:at + len(ids)] = tg
            segments[b, at:at + len(ids)] = s
            at += len(ids)
    seg = torch.from_numpy(segments)
    return {"tokens": torch.from_numpy(tokens), "targets": torch.from_numpy(targets), "segments": seg,
            "valid": seg >= 0}


class PackedChats:
    """Endless batches of packed conversations: each epoch shuffles (seeded), packs and shuffles the rows.

    state_dict() / load_state_dict() give the exact data position for resume.
    """

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]], batch_size: int, seq_len: int,
                 seed: int = 0, pad_id: int = 0):
        if not examples:
            raise SFTDataError("no usable conversations to train on")
        longest = max(len(e[0]) for e in examples)
        if longest > seq_len:
            raise SFTDataError(f"a conversation of {longest} tokens does not fit seq_len {seq_len}")
        self.examples, self.batch_size, self.seq_len, self.seed, self.pad_id = (examples, batch_size, seq_len,
                                                                                 seed, pad_id)
        self.lengths = [len(e[0]) for e in examples]
        self.epoch, self.index = 0, 0
        self._rows: list[list[int]] | None = None

    def _plan(self) -> None:
        rng = random.Random(f"{self.seed}-{self.epoch}")
        order = list(range(len(self.examples)))
        rng.shuffle(order)
        rows = pack(self.lengths, self.seq_len, order)
        rng.shuffle(rows)
        self._rows = rows

    def rows_per_epoch(self) -> int:
        if self._rows is None:
            self._plan()
        return len(self._rows)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        picked = []
        for _ in range(self.batch_size):
            if self._rows is None:
                self._plan()
            if self.index >= len(self._rows):
                self.epoch, self.index = self.epoch + 1, 0
                self._plan()
            picked.append(self._rows[self.index])
            self.index += 1
        return collate_rows(self.examples, picked, self.seq_len, self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "n_examples": len(self.examples), "n_tokens": int(sum(self.lengths))}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seq_len", "n_examples", "n_tokens"):
            if state.get(k) != self.state_dict()[k]:
                raise SFTDataError(f"cannot resume the data position: {k} was {state.get(k)}, now "
                                   f"{self.state_dict()[k]} (different data or seq_len)")
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
        self._plan()


# ----------------------------------------------------------------------------- evaluation

class SFTEval:
    """Held-out loss on assistant tokens (the same objective, packed the same way), and optionally the
    exact-match rate of greedy replies to held-out prompts."""

    def __init__(self, examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, batch_size: int = 16,
                 exact_match: list[tuple[list[dict], str]] | None = None, tokenizer: Tokenizer | None = None,
                 max_new_tokens: int = 64):
        rows = pack([len(e[0]) for e in examples], seq_len, list(range(len(examples))))
        self.batches = [collate_rows(examples, rows[i:i + batch_size], seq_len)
                        for i in range(0, len(rows), batch_size)]
        self.objective = LMObjective(0.0, 0.0)
        self.exact_match, self.tokenizer, self.max_new_tokens = exact_match or [], tokenizer, max_new_tokens

    @torch.no_grad()
    def __call__(self, model) -> dict:
        total, n = 0.0, 0
        for b in self.batches:
            b = {k: v.to(model.device) for k, v in b.items()}
            k = int((b["targets"] != IGNORE).sum())
            _, metrics = self.objective(model, b)
            total += float(metrics["ce"]) * k
            n += k
        out = {"val_loss": total / max(n, 1), "val_target_tokens": n}
        if self.exact_match:
            out["val_exact_match"] = exact_match(model, self.tokenizer, self.exact_match, self.max_new_tokens)
            from tqdm import tqdm
            tqdm.write(f"held-out exact match {out['val_exact_match']:.3f} ({len(self.exact_match)} prompts)")
        return out


def before_after(run_dir: str | Path, keys: list[str]) -> str:
    """'key first -> last' for held-out metrics of a run's first and last evaluation (metrics.jsonl)."""
    from smoe.train.logs import read_records
    evals = [r for r in read_records(run_dir) if r.get("kind") == "eval"]
    if not evals:
        return ""
    first, last = evals[0], evals[-1]
    parts = [f"{k.removeprefix('val_')} {first[k]:.4g} -> {last[k]:.4g}" for k in keys if k in first and k in last]
    return f"held-out, step {first['step']} -> {last['step']}: " + ", ".join(parts)


def normalize_answer(text: str) -> str:
    return " ".join(text.split())


@torch.no_grad()
def chat_replies(model, tok: Tokenizer, prompts: list[list[dict]], max_new_tokens: int = 64,
                 batch_size: int = 32) -> list[str]:
    """Greedy replies (smoe.generation) to conversations ending with a user turn, in the chat format."""
    from smoe.generation import SamplingParams, generate
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [tok.encode_chat(p) for p in prompts[i:i + batch_size]]
        out += [c.text for c in generate(model, ids, params, tok)]
    model.train(was_training)
    return out


def exact_match(model, tok: Tokenizer, examples: list[tuple[list[dict], str]], max_new_tokens: int = 64) -> float:
    """Fraction of prompts whose greedy reply equals the reference answer (whitespace-normalized)."""
    replies = chat_replies(model, tok, [p for p, _ in examples], max_new_tokens)
    return sum(normalize_answer(r) == normalize_answer(a) for r, (_, a) in zip(replies, examples)) / len(examples)


def final_turn_examples(chats: list[list[dict]]) -> list[tuple[list[dict], str]]:
    """(prompt, reference reply) from conversations that end with an assistant message."""
    return [(c[:-1], c[-1]["content"]) for c in chats if c[-1]["role"] == "assistant"]


# ----------------------------------------------------------------------------- the run

@dataclass
class SFTConfig:
    """What to fine-tune on what: model and data paths, held-out split, truncation, LoRA, and the TrainConfig."""

    model: str = ""
    data: str = ""
    val_data: str | None = None  # default: hold out val_fraction of `data` by conversation
    val_fraction: float = 0.05
    truncation: str = "truncate"  # or "skip"
    seq_len: int | None = None  # tokens per packed row, sets train.seq_len (None: the model's context, <= 2048)
    epochs: float = 3.0  # sets max_steps when train.max_steps is 0 and no time budget is given
    exact_match: int = 0  # held-out prompts scored by greedy exact match at each evaluation (0: none)
    max_new_tokens: int = 64
    dtype: str | None = None  # the model's training dtype (default float32; bf16 weights train poorly)
    tokenizer: str | None = None  # default: the model directory's
    lora: object | None = None  # a smoe.train.lora.LoRAConfig: LoRA instead of full fine-tuning
    train: TrainConfig = field(default_factory=lambda: dataclasses.replace(SFT_TRAIN))


# Fine-tuning defaults (the router's aux and z losses stay on, as in pretraining); lr: 1e-4 full, 1e-3 LoRA
SFT_LORA_LR = 1e-3  # the default learning rate with LoRA
SFT_TRAIN = TrainConfig(out_dir="runs/sft", lr=1e-4, warmup_steps=20, max_steps=0, eval_every=100, save_every=200,
                        aux_coef=0.01, z_coef=0.001, weight_decay=0.0)


def finetune_config(defaults: TrainConfig, sets: list[str] | None = None, **fields) -> TrainConfig:
    """`defaults` with the given fields (None: keep the default), then `key=value` strings for any TrainConfig
    field (lr=3e-4, grad_accum=4, autocast=bf16, ...). The model's shape is the checkpoint's: no model.* keys."""
    from smoe.model.config import ModelConfig
    from smoe.train.recipes import Recipe, apply_overrides
    t = dataclasses.replace(defaults, **{k: v for k, v in fields.items() if v is not None})
    by_epochs = t.max_steps == 0 and not t.max_minutes  # max_steps comes from the epochs once the data is read
    t = dataclasses.replace(t, max_steps=t.max_steps or 1)  # (validate the rest meanwhile)
    if sets:
        dummy = ModelConfig()
        r = apply_overrides(Recipe("finetune", "", dummy, t), sets)
        if r.model != dummy:
            raise ValueError(f"{', '.join(sets)}: fine-tuning keeps the checkpoint's model; only training settings "
                             f"can be set")
        t = r.train
        by_epochs &= not any(s.split("=", 1)[0].rpartition(".")[2] in ("max_steps", "max_minutes") for s in sets)
    t.validate()
    return dataclasses.replace(t, max_steps=0) if by_epochs else t


def split_heldout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded choice of round(fraction * n) items held out (at least 1 when fraction > 0)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    n_val = max(1, round(fraction * len(items))) if fraction > 0 and len(items) > 1 else 0
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    val = set(idx[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


def load_for_training(path: str, dtype: str | None, tokenizer: str | None):
    """(model on the best device, tokenizer) of a checkpoint to fine-tune."""
    from smoe.checkpoint import load_model
    from smoe.tokenizer import load_tokenizer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(path, dtype=dtype or torch.float32, device=device)
    tok = load_tokenizer(tokenizer or path)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model only {model.config.vocab_size}")
    return model, tok


def with_seq_len(t: TrainConfig, seq_len: int | None, context: int) -> TrainConfig:
    """t with seq_len set (None: the model's context, at most 2048), checked against the model's context."""
    seq_len = seq_len or min(context, 2048)
    if seq_len > context:
        raise ValueError(f"seq_len {seq_len} is longer than the model's context {context}")
    return dataclasses.replace(t, seq_len=seq_len)


def steps_for_epochs(cfg: TrainConfig, epochs: float, rows: int) -> TrainConfig:
    """cfg with max_steps set from epochs over `rows` packed rows, unless max_steps or a time budget is set."""
    if cfg.max_steps or cfg.max_minutes:
        return cfg
    per_step = cfg.batch_size * cfg.grad_accum
    return dataclasses.replace(cfg, max_steps=max(1, math.ceil(epochs * rows / per_step)))


def finish(trainer: Trainer, tok: Tokenizer, run_dir: Path, export: bool) -> str | None:
    """After fit: save LoRA adapters on their own, merge them and export the model with its tokenizer."""
    from smoe.train.export import export_model
    from smoe.train.lora import has_lora, merge_lora, save_adapters
    model = trainer.model
    if has_lora(model):
        save_adapters(model, run_dir / "adapters")
        if not export:
            return None
        model = merge_lora(copy.deepcopy(model))
    return str(export_model(model, run_dir / "final", tok)) if export else None


def build_sft(cfg: SFTConfig, callbacks: list[Callable] | None = None) -> tuple[Trainer, dict]:
    """The Trainer for an SFT run (model, packed chats, held-out evaluation) and a summary of the data."""
    from smoe.train.lora import apply_lora
    t = cfg.train
    if not cfg.model or not cfg.data:
        raise ValueError("sft needs a model (--model) and chat data (--data)")
    model, tok = load_for_training(cfg.model, cfg.dtype, cfg.tokenizer)
    t = with_seq_len(t, cfg.seq_len, model.config.max_seq_len)
    chats = read_chats(cfg.data)
    if cfg.val_data:
        train_chats, val_chats = chats, read_chats(cfg.val_data)
    else:
        train_chats, val_chats = split_heldout(chats, cfg.val_fraction, t.seed)
    train_ex, stats = tokenize_chats(tok, train_chats, t.seq_len, cfg.truncation, progress=t.progress)
    val_ex, val_stats = tokenize_chats(tok, val_chats, t.seq_len, cfg.truncation) if val_chats else ([], None)
    batches = PackedChats(train_ex, t.batch_size, t.seq_len, seed=t.seed, pad_id=tok.eos_id)
    t = steps_for_epochs(t, cfg.epochs, batches.rows_per_epoch())
    evaluate = None
    if val_ex:
        em = final_turn_examples(val_chats)[:cfg.exact_match] if cfg.exact_match else None
        evaluate = SFTEval(val_ex, t.seq_len, t.batch_size, em, tok, cfg.max_new_tokens)
    if cfg.lora is not None:
        apply_lora(model, cfg.lora, seed=t.seed)
    info = {"kind": "sft", "base_model": str(Path(cfg.model).resolve()), "data": str(Path(cfg.data).resolve()),
            "train_data": dataclasses.asdict(stats), "val_data": dataclasses.asdict(val_stats) if val_stats else None,
            "rows_per_epoch": batches.rows_per_epoch(),
            "lora": dataclasses.asdict(cfg.lora) if cfg.lora is not None else None}
    trainer = Trainer(model, dataclasses.replace(t, export=False), batches, LMObjective(t.aux_coef, t.z_coef),
                      evaluate, tok, run_info=info, callbacks=callbacks)
    return trainer, {"train": stats, "val": val_stats, "export": t.export}


def run_sft(cfg: SFTConfig, resume: bool = False, callbacks: list[Callable] | None = None) -> dict:
    """Fine-tune (or resume) to the end; save adapters (LoRA) and export the model with its tokenizer."""
    trainer, data = build_sft(cfg, callbacks)
    run_dir = Path(trainer.cfg.out_dir)
    print(f"train data: {data['train'].line()}")
    if data["val"] is not None:
        print(f"held-out data: {data['val'].line()}")
    if resume:
        print(f"resuming from {trainer.resume()} (step {trainer.step})")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "sft_config.json", json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
    n_train = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in trainer.model.parameters())
    print(f"fine-tuning {n_train / 1e6:.3f}M of {n_all / 1e6:.3f}M parameters "
          f"({'LoRA' if cfg.lora is not None else 'full'}) for {trainer.max_steps} steps; run directory {run_dir}")
    summary = trainer.fit()
    summary["final"] = finish(trainer, trainer.tokenizer, run_dir, data["export"])
    print(before_after(run_dir, ["val_loss", "val_exact_match"]))
    if summary["final"]:
        print(f"fine-tuned model (HF layout + tokenizer): {summary['final']}")
    return summary
