"""Training data: text files tokenized in parallel into memory-mapped token files, and batches from them.

`prepare(inputs, tokenizer, out)` writes, into `out`:
  train.bin, val.bin           the documents' tokens back to back (<s> text </s> each), uint16 or uint32
  train.idx.npy, val.idx.npy   int64 offsets where each document starts (plus the end), for boundaries
  tokenizer/                   the tokenizer, so the data (and the checkpoints trained on it) carry it
  meta.json                    tokenizer, dtype, counts per split, skipped files; written last
The validation split is held out by document (a seeded choice), so no document is in both splits.

`PackedBatches` cuts a split into windows of seq_len + 1 tokens, in a seeded order per epoch, and
keeps its position (epoch, index) for exact resume.
"""

from __future__ import annotations

import glob
import json
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from smoe.checkpoint.files import atomic_path, write_json
from smoe.train.logs import bar_kwargs

TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
SPLITS = ("train", "val")
META_VERSION = 1


class DataError(ValueError):
    """Bad data input or a data directory that cannot be used; the message names the problem."""


# ----------------------------------------------------------------------------- finding documents

def expand_inputs(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files named by paths, globs (** recursive) and folders (searched for .txt .md .py .jsonl); sorted, unique."""
    found: set[Path] = set()
    for item in inputs:
        s = str(item)
        p = Path(s)
        if p.is_file():
            found.add(p)
        elif p.is_dir():
            found.update(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        elif any(c in s for c in "*?["):
            matches = [Path(m) for m in glob.glob(s, recursive=True)]
            files = [m for m in matches if m.is_file()]
            for m in matches:
                if m.is_dir():
                    files += [f for f in m.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES]
            if not files:
                raise DataError(f"the pattern {s!r} matches no files")
            found.update(files)
        else:
            raise DataError(f"input {s!r} does not exist (not a file, folder or glob pattern)")
    if not found:
        raise DataError(f"no text files ({', '.join(TEXT_SUFFIXES)}) found in {', '.join(map(str, inputs))}")
    return sorted(found)


def _jsonl_texts(text: str) -> tuple[list[tuple[int, str]], int]:
    """(line number, text) of the lines of a .jsonl with a non-empty string "text" field, and bad lines counted."""
    docs, bad = [], 0
    for n, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        t = obj.get("text") if isinstance(obj, dict) else None
        if isinstance(t, str) and t:
            docs.append((n, t))
        else:
            bad += 1
    return docs, bad


def _read_docs(file: Path) -> tuple[str, list[tuple[int, str]], int]:
    """('ok' | 'not_utf8' | 'empty' | 'unreadable', [(line or -1, text)], bad jsonl lines) of one file."""
    try:
        raw = file.read_bytes()
    except OSError:
        return "unreadable", [], 0
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8", [], 0
    if not text.strip():
        return "empty", [], 0
    if file.suffix == ".jsonl":
        docs, bad = _jsonl_texts(text)
        return ("ok" if docs else "empty"), docs, bad
    return "ok", [(-1, text)], 0


# ----------------------------------------------------------------------------- tokenizing in parallel

_TOK = None


def _init_worker(tokenizer_path: str) -> None:
    global _TOK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from smoe.tokenizer import load_tokenizer
    _TOK = load_tokenizer(tokenizer_path)


def _encode_file(job: tuple[str, list[int]]) -> tuple[list[np.ndarray], list[int]]:
    """Token arrays (<s> text </s>) and UTF-8 byte counts of the chosen documents of one file."""
    file, lines = job
    _, docs, _ = _read_docs(Path(file))
    keep = set(lines)
    arrays, nbytes = [], []
    for line, text in docs:
        if line in keep:
            arrays.append(np.asarray(_TOK.encode(text, bos=True, eos=True), dtype=np.int32))
            nbytes.append(len(text.encode("utf-8")))
    return arrays, nbytes


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class PrepareStats:
    files_found: int = 0
    files_used: int = 0
    skipped: dict[str, list[str]] = field(default_factory=lambda: {"not_utf8": [], "empty": [], "unreadable": []})
    jsonl_bad_lines: int = 0


def prepare(inputs: list[str | os.PathLike], tokenizer, out: str | os.PathLike, *, val_fraction: float = 0.05,
            seed: int = 0, workers: int | None = None, progress: bool = True) -> dict:
    """Tokenize text files into `out` (see the module docstring); returns the metadata written to meta.json.

    tokenizer: a smoe Tokenizer, a tokenizer directory/file, or a name such as 'mixtral'.
    Files that are not UTF-8, empty, or unreadable are skipped and counted, never fatal.
    """
    from tqdm import tqdm

    from smoe.tokenizer import Tokenizer, load_tokenizer

    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    tok.save(tok_dir)
    dtype = token_dtype(tok.vocab_size)
    (out / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten at the end

    # pass 1: which files and documents are usable (decoding is cheap next to tokenizing)
    files = expand_inputs(inputs)
    stats = PrepareStats(files_found=len(files))
    docs: list[tuple[str, int]] = []  # (file, jsonl line or -1), in file order
    for f in tqdm(files, desc="scanning", unit="file", disable=not progress, leave=False, **bar_kwargs()):
        status, fdocs, bad = _read_docs(f)
        stats.jsonl_bad_lines += bad
        if status != "ok":
            stats.skipped[status].append(str(f))
            continue
        stats.files_used += 1
        docs += [(str(f), line) for line, _ in fdocs]
    if not docs:
        raise DataError(f"no usable documents in {len(files)} files: {sum(map(len, stats.skipped.values()))} "
                        f"skipped (not UTF-8: {len(stats.skipped['not_utf8'])}, empty: {len(stats.skipped['empty'])})")

    # the validation split: a seeded choice of whole documents (at least one when there are two or more)
    n_val = 0 if val_fraction == 0 or len(docs) < 2 else max(1, round(val_fraction * len(docs)))
    order = np.random.default_rng(seed).permutation(len(docs))
    val_set = {docs[i] for i in order[:n_val]}

    # pass 2: tokenize file by file in worker processes, written in document order
    jobs: dict[str, list[int]] = {}
    for d in docs:
        jobs.setdefault(d[0], []).append(d[1])
    job_list = list(jobs.items())
    total_bytes = sum(Path(f).stat().st_size for f, _ in job_list)
    if workers is None:  # starting worker processes costs seconds: worth it from a few MB of text
        workers = 1 if total_bytes < 4_000_000 else (os.cpu_count() or 1)
    workers = max(1, min(workers, len(job_list)))
    counts = {s: {"documents": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    offsets: dict[str, list[int]] = {s: [0] for s in SPLITS}
    with atomic_path(out / "train.bin") as tmp_train, atomic_path(out / "val.bin") as tmp_val:
        handles = {"train": open(tmp_train, "wb"), "val": open(tmp_val, "wb")}
        try:
            if workers == 1:
                _init_worker(str(tok_dir))
                results = map(_encode_file, job_list)
                pool = None
            else:
                # fork where there is one: workers start at once and, unlike spawn, do not re-run the caller's
                # script (they use no torch, so the parent's threads do not matter)
                ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
                pool = ctx.Pool(workers, initializer=_init_worker, initargs=(str(tok_dir),))
                results = pool.imap(_encode_file, job_list, chunksize=4)
            bar = tqdm(total=total_bytes, desc="tokenizing", unit="B", unit_scale=True, disable=not progress,
                       **bar_kwargs())
            for (file, lines), (arrays, nbytes) in zip(job_list, results):
                for line, ids, nb in zip(lines, arrays, nbytes):
                    split = "val" if (file, line) in val_set else "train"
                    if ids.size and int(ids.max()) >= tok.vocab_size:
                        raise DataError(f"{file}: token id {int(ids.max())} >= vocab size {tok.vocab_size}")
                    handles[split].write(ids.astype(dtype).tobytes())
                    c = counts[split]
                    c["documents"] += 1
                    c["tokens"] += int(ids.size)
                    c["bytes"] += nb
                    offsets[split].append(c["tokens"])
                bar.update(Path(file).stat().st_size)
            bar.close()
            if pool is not None:
                pool.close()
                pool.join()
        finally:
            for h in handles.values():
                h.close()
    for s in SPLITS:
        with atomic_path(out / f"{s}.idx.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.asarray(offsets[s], dtype=np.int64))
    meta = {
        "version": META_VERSION, "tokenizer": tok.name, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
        "eos_id": tok.eos_id, "dtype": dtype.name, "val_fraction": val_fraction, "seed": seed,
        "inputs": [str(i) for i in inputs], "splits": counts,
        "files": {"found": stats.files_found, "used": stats.files_used,
                  **{f"skipped_{k}": len(v) for k, v in stats.skipped.items()},
                  "jsonl_bad_lines": stats.jsonl_bad_lines},
        "skipped": {k: v[:100] for k, v in stats.skipped.items()},
    }
    write_json(out / "meta.json", meta)
    return meta


def summary(meta: dict) -> str:
    """A few human-readable lines about a prepared data directory."""
    f, s = meta["files"], meta["splits"]
    lines = [f"files: {f['found']} found, {f['used']} used, skipped {f['skipped_not_utf8']} not UTF-8, "
             f"{f['skipped_empty']} empty, {f['skipped_unreadable']} unreadable; "
             f"bad jsonl lines: {f['jsonl_bad_lines']}"]
    for name in SPLITS:
        c = s[name]
        bpt = c["bytes"] / max(c["tokens"], 1)
        lines.append(f"{name:>5}: {c['documents']:,} documents, {c['tokens']:,} tokens, {c['bytes']:,} bytes "
                     f"({bpt:.2f} bytes/token)")
    lines.append(f"tokenizer: {meta['tokenizer']} ({meta['vocab_size']} ids, stored as {meta['dtype']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- reading it back

class TokenData:
    """A prepared data directory: memory-mapped token arrays and document offsets per split."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            raise DataError(f"{self.path} is not a prepared data directory (no meta.json; run `smoe data prepare`)")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("version") != META_VERSION:
            raise DataError(f"{meta_file}: unsupported data version {self.meta.get('version')}")
        self.vocab_size = int(self.meta["vocab_size"])
        self.dtype = np.dtype(self.meta["dtype"])

    def tokens(self, split: str) -> np.ndarray:
        """The split's tokens as a read-only memory map (an empty array when the split is empty)."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        file = self.path / f"{split}.bin"
        n = self.meta["splits"][split]["tokens"]
        if n == 0:
            return np.zeros(0, dtype=self.dtype)
        if file.stat().st_size != n * self.dtype.itemsize:
            raise DataError(f"{file} has {file.stat().st_size} bytes, expected {n * self.dtype.itemsize} "
                            f"({n} tokens): the data directory is incomplete or corrupt")
        return np.memmap(file, dtype=self.dtype, mode="r")

    def doc_offsets(self, split: str) -> np.ndarray:
        return np.load(self.path / f"{split}.idx.npy")

    def tokenizer(self):
        from smoe.tokenizer import load_tokenizer
        return load_tokenizer(self.path / "tokenizer")

    def bytes_per_token(self, split: str) -> float:
        c = self.meta["splits"][split]
        return c["bytes"] / max(c["tokens"], 1)


def _segments(offsets: np.ndarray, start: int, length: int) -> np.ndarray:
    """Document id (relative to the window) of each of `length` tokens starting at `start`."""
    ids = np.searchsorted(offsets, np.arange(start, start + length), side="right") - 1
    return ids - ids[0]


class PackedBatches:
    """Batches of `batch_size` windows of seq_len + 1 tokens (inputs and shifted targets) from one split.

    Windows are the split cut every seq_len tokens from an epoch-dependent offset, visited in a seeded
    order; epochs follow one another forever. With segments=True each batch also carries document ids
    so packed documents do not attend to each other. state_dict() / load_state_dict() give exact resume.
    """

    def __init__(self, data: TokenData, split: str, batch_size: int, seq_len: int, seed: int = 0,
                 segments: bool = False):
        self.tokens = data.tokens(split)
        self.offsets = data.doc_offsets(split) if segments else None
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        if len(self.tokens) < seq_len + 1:
            raise DataError(f"the {split} split of {data.path} has {len(self.tokens)} tokens, fewer than one "
                            f"window of seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more data")
        self.epoch, self.index = 0, 0
        self._order: np.ndarray | None = None
        self._offset = 0

    def _epoch_plan(self) -> None:
        rng = np.random.default_rng([self.seed, self.epoch])
        T = self.seq_len
        self._offset = int(rng.integers(0, T)) if self.epoch > 0 else 0
        self._offset = min(self._offset, len(self.tokens) - T - 1)
        n = (len(self.tokens) - 1 - self._offset) // T
        self._order = rng.permutation(n)

    def windows_per_epoch(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def _next_start(self) -> int:
        if self._order is None:
            self._epoch_plan()
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._epoch_plan()
        start = self._offset + int(self._order[self.index]) * self.seq_len
        self.index += 1
        return start

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        import torch
        T = self.seq_len
        starts = [self._next_start() for _ in range(self.batch_size)]
        win = np.stack([np.asarray(self.tokens[s:s + T + 1], dtype=np.int64) for s in starts])
        w = torch.from_numpy(win)
        batch = {"tokens": w[:, :-1], "targets": w[:, 1:]}
        if self.offsets is not None:
            batch["segments"] = torch.from_numpy(np.stack([_segments(self.offsets, s, T) for s in starts]))
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "n_tokens": int(len(self.tokens))}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seq_len", "n_tokens"):
            mine = self.state_dict()[k]
            if state.get(k) != mine:
                raise DataError(f"cannot resume the data position: {k} was {state.get(k)}, now {mine} "
                                f"(different data or seq_len)")
        self.seed = state["seed"]
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = None
        self._epoch_plan()


def eval_windows(data: TokenData, split: str, seq_len: int, max_tokens: int, segments: bool = False
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """(M, seq_len + 1) windows spread evenly over a split, M = min(all windows, max_tokens // seq_len),
    and with segments=True their (M, seq_len) document ids."""
    toks = data.tokens(split)
    n = (len(toks) - 1) // seq_len
    if n < 1:
        raise DataError(f"the {split} split of {data.path} has {len(toks)} tokens, fewer than one window of "
                        f"{seq_len + 1}; use a shorter seq_len or a larger validation fraction")
    m = max(1, min(n, max_tokens // seq_len))
    starts = np.unique(np.linspace(0, n - 1, m).round().astype(np.int64)) * seq_len
    windows = np.stack([np.asarray(toks[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    if not segments:
        return windows, None
    offsets = data.doc_offsets(split)
    return windows, np.stack([_segments(offsets, int(s), seq_len) for s in starts])


def unigram_logprobs(data: TokenData, split: str = "train") -> np.ndarray:
    """log p(token) of an add-one-smoothed unigram model counted on a split: the baseline to beat."""
    counts = np.bincount(np.asarray(data.tokens(split)), minlength=data.vocab_size).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())
