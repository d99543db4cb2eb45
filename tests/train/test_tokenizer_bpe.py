"""BPE tokenizer training: byte fallback, exact round trips, the Mixtral special ids, loading back, and
literal special-token text ("<s>" in a source file) encoded as text, never as the special ids."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize("text", SAMPLES)
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
    # from the directory (tokenizer_config.json says split_special_tokens), literal "<s>" is text there too
    from transformers import AutoTokenizer
    auto = AutoTokenizer.from_pretrained(tok_dir)
    for text in SAMPLES:
        assert auto.encode(text, add_special_tokens=False) == tok.encode(text, bos=False), text
        assert auto.decode(tok.encode(text, bos=False)) == text


LITERAL = "x = '<s>' </s>"


def test_literal_special_tokens_are_text(tok_dir, tmp_path):
    """"<s>", "</s>" and "<unk>" written in text become ordinary pieces (as mistral-common's Mixtral tokenizer
    does); BOS and EOS come only from bos=/eos=, also after saving and loading the tokenizer again."""
    tok = load_tokenizer(tok_dir)
    for text in (LITERAL, "<s>", "</s><s><unk>", "a<s>b\n</s>\n"):
        ids = tok.encode(text, bos=False)
        assert not {0, 1, 2} & set(ids), (text, ids)
        assert tok.decode(ids) == text
        assert tok.encode(text, bos=True, eos=True) == [1, *ids, 2]
    assert tok.encode(LITERAL, bos=False) == tok.encode("x = '", bos=False) + tok.encode("<s>", bos=False) + \
        tok.encode("' ", bos=False) + tok.encode("</s>", bos=False)
    tok.save(tmp_path)  # as checkpoints and exports do: the setting travels in tokenizer_config.json
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["split_special_tokens"] is True
    again = load_tokenizer(tmp_path)
    assert again.encode(LITERAL) == tok.encode(LITERAL) and again.decode(again.encode(LITERAL)) == "x = '<s>' </s>"
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path).encode(LITERAL, add_special_tokens=False) == \
        tok.encode(LITERAL, bos=False)
    assert train_bpe([tok_dir.parent / "corpus" / "json___init__.py"], 300, show_progress=False).encode(
        "<s>", bos=False) != [1]  # trained in memory (no out directory): the same
    chat = tok.encode_chat([{"role": "user", "content": "say </s>"}, {"role": "assistant", "content": "<s>"}])
    assert chat[0] == 1 and chat[-1] == 2 and not {0, 1, 2} & set(chat[1:-1])
    dec = tok.decoder()
    assert "".join(dec.add(i) for i in tok.encode(LITERAL, bos=False)) + dec.flush() == LITERAL


def test_mistral_common_treats_literal_special_tokens_as_text():
    """The reference behaviour: the real Mixtral tokenizer (mistral-common) encodes "<s>" in text as text."""
    tok = load_tokenizer("mixtral")
    ids = tok.encode(LITERAL, bos=False)
    assert tok.bos_id not in ids and tok.eos_id not in ids and tok.decode(ids) == LITERAL


def test_prepare_puts_no_special_ids_inside_documents(tok_dir, tmp_path):
    """A source file that contains "<s>" and "</s>" is one document: BOS first, EOS last, none in between."""
    from smoe.train.data import TokenData, prepare
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"m{i}.py").write_text(f"BOS = '<s>'\nEOS = '</s>'  # {i}\nUNK = \"<unk>\"\n")
    prepare([corpus], tok_dir, tmp_path / "data", val_fraction=0.25, workers=1, progress=False)
    data = TokenData(tmp_path / "data")
    tok = data.tokenizer()
    docs = 0
    for split in ("train", "val"):
        toks, off = data.tokens(split), data.doc_offsets(split)
        for a, b in zip(off[:-1], off[1:]):
            doc = [int(t) for t in toks[a:b]]
            assert doc[0] == 1 and doc[-1] == 2 and not {0, 1, 2} & set(doc[1:-1]), doc
            assert tok.decode(doc).startswith("BOS = '<s>'\nEOS = '</s>'")
            docs += 1
    assert docs == 4


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least 260"):
        train_bpe([tmp_path / "x.txt"], 100)
    with pytest.raises(ValueError, match="no text files"):
        train_bpe([], 1000)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="learned nothing"):
        train_bpe([tmp_path / "bin.txt"], 1000, show_progress=False)
