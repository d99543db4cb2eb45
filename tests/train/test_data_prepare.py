"""`smoe data prepare`: counts, document boundaries, skipped files, jsonl, disjoint splits, batches and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_helpers import make_corpus, make_tokenizer

from smoe.train.data import DataError, PackedBatches, TokenData, eval_windows, expand_inputs, prepare, token_dtype


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    corpus = make_corpus(root, n_files=10)
    tok = make_tokenizer(root, corpus)
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))  # not UTF-8
    (corpus / "empty.md").write_text("")
    (corpus / "blank.txt").write_text("  \n\n")
    lines = [json.dumps({"text": f"record number {i}: {'x' * i}"}) for i in range(6)]
    lines += ["not json", json.dumps({"no_text": 1}), "", json.dumps({"text": ""})]
    (corpus / "records.jsonl").write_text("\n".join(lines) + "\n")
    (corpus / "notes.rst").write_text("ignored: not a text suffix searched in folders")
    meta = prepare([corpus], root / "tok", root / "data", val_fraction=0.25, seed=3, workers=1, progress=False)
    return root, corpus, tok, meta


def documents(data: TokenData, split: str) -> list[list[int]]:
    toks, off = np.asarray(data.tokens(split)), data.doc_offsets(split)
    return [toks[a:b].tolist() for a, b in zip(off[:-1], off[1:])]


def test_counts_and_skipped_files(setup):
    root, corpus, tok, meta = setup
    f = meta["files"]
    assert f["found"] == 14  # 10 .py + latin1.txt + empty.md + blank.txt + records.jsonl (.rst not searched)
    assert f["skipped_not_utf8"] == 1 and f["skipped_empty"] == 2 and f["used"] == 11
    assert f["jsonl_bad_lines"] == 3  # "not json", no "text", empty text
    assert any(p.endswith("latin1.txt") for p in meta["skipped"]["not_utf8"])
    s = meta["splits"]
    assert s["train"]["documents"] + s["val"]["documents"] == 10 + 6
    data = TokenData(root / "data")
    for split in ("train", "val"):
        assert len(data.tokens(split)) == s[split]["tokens"]
        assert len(data.doc_offsets(split)) == s[split]["documents"] + 1
    total_bytes = sum(len(p.read_bytes()) for p in corpus.glob("*.py"))
    total_bytes += sum(len(f"record number {i}: {'x' * i}") for i in range(6))
    assert s["train"]["bytes"] + s["val"]["bytes"] == total_bytes
    assert (root / "data" / "tokenizer" / "tokenizer.json").exists()
    assert data.tokenizer().vocab_size == tok.vocab_size


def test_document_boundaries_and_contents(setup):
    root, corpus, tok, meta = setup
    data = TokenData(root / "data")
    expected = {tuple(tok.encode(p.read_text(), bos=True, eos=True)) for p in corpus.glob("*.py")}
    expected |= {tuple(tok.encode(f"record number {i}: {'x' * i}", bos=True, eos=True)) for i in range(6)}
    got = [tuple(d) for s in ("train", "val") for d in documents(data, s)]
    assert set(got) == expected and len(got) == len(expected)
    for d in got:
        assert d[0] == tok.bos_id and d[-1] == tok.eos_id


def test_validation_split_is_disjoint_and_seeded(setup, tmp_path):
    root, corpus, tok, meta = setup
    data = TokenData(root / "data")
    train, val = {tuple(d) for d in documents(data, "train")}, {tuple(d) for d in documents(data, "val")}
    assert val and train and not (train & val)
    assert meta["splits"]["val"]["documents"] == round(0.25 * 16)
    meta2 = prepare([corpus], root / "tok", tmp_path / "again", val_fraction=0.25, seed=3, workers=1, progress=False)
    assert meta2["splits"] == meta["splits"]
    meta3 = prepare([corpus], root / "tok", tmp_path / "other", val_fraction=0.25, seed=4, workers=1, progress=False)
    val3 = {tuple(d) for d in documents(TokenData(tmp_path / "other"), "val")}
    assert val3 != val and meta3["splits"]["val"]["documents"] == 4


@pytest.mark.timeout(120)
def test_parallel_workers_give_identical_files(setup, tmp_path):
    root, corpus, tok, meta = setup
    prepare([corpus], root / "tok", tmp_path / "par", val_fraction=0.25, seed=3, workers=2, progress=False)
    for name in ("train.bin", "val.bin", "train.idx.npy", "val.idx.npy"):
        assert (tmp_path / "par" / name).read_bytes() == (root / "data" / name).read_bytes()


def test_globs_files_and_errors(setup, tmp_path):
    root, corpus, tok, meta = setup
    assert len(expand_inputs([str(corpus / "*.py")])) == 10
    assert len(expand_inputs([corpus / "records.jsonl", str(corpus / "json_*.py")])) >= 2
    with pytest.raises(DataError, match="does not exist"):
        expand_inputs([tmp_path / "missing"])
    with pytest.raises(DataError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.nothing")])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="no usable documents"):
        prepare([bad], root / "tok", tmp_path / "out", workers=1, progress=False)
    with pytest.raises(DataError, match="not a prepared data directory"):
        TokenData(tmp_path)
    assert token_dtype(32000) == np.uint16 and token_dtype(70000) == np.uint32


def test_packed_batches_cover_an_epoch_and_resume_exactly(setup):
    root, *_ = setup
    data = TokenData(root / "data")
    toks = np.asarray(data.tokens("train"))
    T = 16
    b = PackedBatches(data, "train", batch_size=3, seq_len=T, seed=1)
    n = b.windows_per_epoch()
    first_epoch = []
    while b.epoch == 0:
        batch = next(b)
        assert torch.equal(batch["tokens"][:, 1:], batch["targets"][:, :-1])
        first_epoch += batch["tokens"].tolist()
    first_epoch = first_epoch[:n]
    starts = sorted(i * T for i in range(n))
    assert sorted(map(tuple, first_epoch)) == sorted(tuple(toks[s:s + T].tolist()) for s in starts)
    # resume: a fresh iterator loaded with the state continues identically
    b2 = PackedBatches(data, "train", batch_size=3, seq_len=T, seed=1)
    for _ in range(5):
        next(b2)
    state = json.loads(json.dumps(b2.state_dict()))
    want = [next(b2)["tokens"] for _ in range(n)]  # crosses into the next epoch
    b3 = PackedBatches(data, "train", batch_size=3, seq_len=T, seed=1)
    b3.load_state_dict(state)
    got = [next(b3)["tokens"] for _ in range(n)]
    assert all(torch.equal(a, g) for a, g in zip(want, got))
    with pytest.raises(DataError, match="seq_len"):
        PackedBatches(data, "train", batch_size=3, seq_len=T + 1).load_state_dict(state)


def test_segments_mark_documents(setup):
    root, *_ = setup
    data = TokenData(root / "data")
    T = 64
    b = PackedBatches(data, "train", batch_size=64, seq_len=T, seed=0, segments=True)
    off = data.doc_offsets("train")
    bos = data.meta["bos_id"]
    crossed = 0
    while b.epoch == 0:  # one epoch: every window
        batch = next(b)
        for tok_row, seg_row in zip(batch["tokens"], batch["segments"]):
            assert seg_row[0] == 0 and (seg_row.diff() >= 0).all()
            new_doc = torch.nonzero(seg_row.diff()).flatten() + 1
            assert all(int(tok_row[i]) == bos for i in new_doc)  # every segment change is at a document's <s>
            crossed += len(new_doc)
    assert crossed >= len(off) - 3  # nearly every boundary falls inside some window
    windows, segs = eval_windows(data, "val", 32, 128, segments=True)
    assert windows.shape[1] == 33 and segs.shape == (windows.shape[0], 32)
    with pytest.raises(DataError, match="fewer than one window"):
        PackedBatches(data, "val", 1, seq_len=10**7)
