"""BPE tokenizer training: byte fallback, exact round trips, the Mixtral special ids, loading back."""

from __future__ import annotations

import pytest
from train_helpers import make_corpus

from smoe.tokenizer import HFTokenizer, load_tokenizer
from smoe.tokenizer.bpe import train_bpe

SAMPLES = [
    "def f(x):\n    return x ** 2  # square\n",
    "\tif a:\r\n\t\tpass\r\n",
    "naïve café — “quotes” ✓ 日本語 😀 \x00 \x7f",
    "class A(object):\n        '''doc'''\n\n\n",
    "<s> </s> <unk> <0x41> literal text",
    "",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    corpus = make_corpus(root, n_files=8)
    (corpus / "binary.py").write_bytes(b"\xff\xfe not utf-8")
    train_bpe(sorted(corpus.glob("*.py")), 512, root / "tok", show_progress=False)
    return root / "tok"


def test_layout_and_special_ids(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 512
    assert (tok.tok.id_to_token(0), tok.bos_id, tok.eos_id) == ("<unk>", 1, 2)
    assert [tok.tok.id_to_token(i) for i in (3, 3 + 0x41, 258)] == ["<0x00>", "<0x41>", "<0xFF>"]


@pytest.mark.parametrize("text", [s for s in SAMPLES if "<s>" not in s])
def test_round_trip_is_exact_and_never_unknown(tok_dir, text):
    tok = load_tokenizer(tok_dir)
    ids = tok.encode(text, bos=False)
    assert 0 not in ids  # never <unk>: unseen characters fall back to bytes
    assert tok.decode(ids) == text
    assert tok.encode(text, bos=True, eos=True) == [1, *ids, 2]


def test_rare_characters_use_byte_tokens(tok_dir):
    tok = load_tokenizer(tok_dir)
    ids = tok.encode("😀", bos=False)
    assert ids == [3 + b for b in "😀".encode()]


def test_compresses_code(tok_dir):
    tok = load_tokenizer(tok_dir)
    text = "    def __init__(self, name):\n        self.name = name\n"
    assert len(tok.encode(text, bos=False)) < len(text) / 2


def test_transformers_loads_it_the_same(tok_dir):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    tok = load_tokenizer(tok_dir)
    for text in SAMPLES[:4]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text, bos=False)
        assert hf.decode(tok.encode(text, bos=False)) == text


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least 260"):
        train_bpe([tmp_path / "x.txt"], 100)
    with pytest.raises(ValueError, match="no text files"):
        train_bpe([], 1000)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="learned nothing"):
        train_bpe([tmp_path / "bin.txt"], 1000, show_progress=False)
