"""Train a byte-fallback BPE tokenizer (the Mistral/Llama design) with the `tokenizers` library.

The result is a tokenizer.json loaded back by smoe.tokenizer.HFTokenizer:
  ids 0, 1, 2 = <unk>, <s>, </s> (the Mixtral ids), 3..258 = the 256 byte tokens <0x00>..<0xFF>, then
  the learned pieces. Text is split GPT-4 style (letters, 1-3 digits, punctuation runs, whitespace runs,
  so indentation and newlines become their own pieces); a character outside the learned alphabet is
  encoded as its UTF-8 bytes, so any text round-trips exactly and <unk> is never produced. A literal
  "<s>", "</s>" or "<unk>" in text is text (tokenizer_config.json's split_special_tokens, which smoe's
  HFTokenizer and transformers both follow): only bos=/eos= give the special ids.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from smoe.tokenizer import HFTokenizer

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
MIN_VOCAB = len(SPECIALS) + len(BYTE_TOKENS) + 1


def _texts(files: list[Path], max_bytes: int | None, seed: int) -> tuple[Iterator[str], int]:
    """UTF-8 texts of (a seeded sample of at most max_bytes of) the files; files that do not decode are skipped."""
    files = sorted(files)
    if max_bytes is not None:
        random.Random(seed).shuffle(files)
        picked, total = [], 0
        for f in files:
            if total >= max_bytes:
                break
            picked.append(f)
            total += f.stat().st_size
        files = picked

    def gen() -> Iterator[str]:
        for f in files:
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text:
                yield text
    return gen(), len(files)


def train_bpe(files: Iterable[str | Path], vocab_size: int, out: str | Path | None = None, *,
              min_frequency: int = 2, limit_alphabet: int = 256, max_bytes: int | None = None, seed: int = 0,
              show_progress: bool = True) -> HFTokenizer:
    """Train a byte-fallback BPE of at most vocab_size ids on text files; save it to `out` when given.

    Files that are not UTF-8 are skipped. max_bytes trains on a seeded random sample of the files.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB} (3 special + 256 byte tokens + 1), got {vocab_size}")
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("no text files to train the tokenizer on")
    texts, n_files = _texts(files, max_bytes, seed)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(BYTE_TOKENS), min_frequency=min_frequency,
                                  special_tokens=SPECIALS, limit_alphabet=limit_alphabet,
                                  show_progress=show_progress)
    tok.train_from_iterator(texts, trainer, length=n_files)

    # Put the 256 byte tokens right after the specials (byte fallback looks them up by name).
    spec = json.loads(tok.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    pieces = [p for p, _ in learned if p not in SPECIALS and p not in BYTE_TOKENS]
    if len(pieces) <= 0:
        raise ValueError("the tokenizer learned nothing: the files hold no UTF-8 text")
    spec["model"]["vocab"] = {p: i for i, p in enumerate(SPECIALS + BYTE_TOKENS + pieces)}
    spec["model"]["byte_fallback"] = True
    spec["model"]["fuse_unk"] = True
    final = Tokenizer.from_str(json.dumps(spec))
    final.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    if out is None:  # a tokenizer in memory: written to a temporary directory and read back
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            return _save(final, Path(tmp))
    return _save(final, Path(out))


def _save(tok, out: Path) -> HFTokenizer:
    """Write tokenizer.json and tokenizer_config.json (special tokens; literal "<s>" text is text) into out."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "split_special_tokens": True,
         "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    return HFTokenizer(out / "tokenizer.json")
