"""smoe's tokenizers against mistral-common's own encoding, the chat format and streaming decode."""

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MT

from smoe import load_tokenizer
from smoe.tokenizer import ChatFormatError, HFTokenizer

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines",
    "unicode: naïve café, Привет мир, 日本語のテキスト, عربى",
    "emoji: 😀🎉👩‍👩‍👧 and flags 🇫🇷",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "x = {'a': [1, 2, 3]}  # comment with ünïcödé",
    "",
]

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke 😀"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why?"},
     {"role": "assistant", "content": "Because."}, {"role": "user", "content": "OK"}],
    [{"role": "user", "content": "Write code"}, {"role": "assistant", "content": "print(1)"}],
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("mixtral")


def mc_chat(messages):
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    mode = ValidationMode.finetuning if messages[-1]["role"] == "assistant" else ValidationMode.test
    from pathlib import Path

    import mistral_common
    mt = MT.from_file(str(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"), mode=mode)
    req = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return mt.encode_chat_completion(req).tokens


def test_mixtral_tokenizer_is_the_real_one(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.encode("Hello world") == [1, 22557, 1526]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_mistral_common(tok, text):
    raw = MT.v1().instruct_tokenizer.tokenizer
    assert tok.encode(text) == raw.encode(text, bos=True, eos=False)
    assert tok.encode(text, bos=False, eos=True) == raw.encode(text, bos=False, eos=True)
    assert tok.decode(tok.encode(text)) == raw.decode(raw.encode(text, bos=True, eos=False))


@pytest.mark.parametrize("messages", CHATS)
def test_chat_ids_equal_mistral_common(tok, messages):
    ids = tok.encode_chat(messages)
    assert ids == mc_chat(messages)
    assert ids[0] == tok.bos_id
    if messages[-1]["role"] == "assistant":
        assert ids[-1] == tok.eos_id


def test_chat_text_is_the_instruct_format(tok):
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                           {"role": "user", "content": "Bye"}])
    pieces = [tok.raw.id_to_piece(i) for i in ids]
    assert "".join(pieces).replace("\u2581", " ") == "<s> [INST] Hi [/INST] Yo</s> [INST] Bye [/INST]"


@pytest.mark.parametrize("messages,needle", [
    ([], "no messages"),
    ([{"role": "assistant", "content": "x"}], "must follow a user"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "roles must alternate"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first"),
    ([{"role": "robot", "content": "a"}], "unknown role 'robot'"),
    ([{"role": "user"}], "'role' and 'content'"),
])
def test_bad_role_order_is_a_clear_error(tok, messages, needle):
    with pytest.raises(ChatFormatError, match=needle):
        tok.encode_chat(messages)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decode_equals_full_decode(tok, text):
    ids = tok.encode(text, bos=False)
    dec = tok.decoder()
    pieces = [dec.add(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_checkpoint_dir_and_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.BPE(byte_fallback=False, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders, trainers
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, héllo wörld 😀 " * 20, "def f(x): return x"], trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    t = load_tokenizer(tmp_path)
    assert isinstance(t, HFTokenizer) and (t.bos_id, t.eos_id) == (1, 2)
    ids = t.encode("héllo 😀 world")
    assert ids[0] == 1 and t.decode(ids) == "héllo 😀 world"
    # literal "<s>" text follows tokenizer_config.json's split_special_tokens, as in transformers (default: special)
    assert t.encode("a <s> b", bos=False).count(1) == 1
    (tmp_path / "tokenizer_config.json").write_text('{"split_special_tokens": true}')
    literal = load_tokenizer(tmp_path).encode("a <s> b </s>", bos=False)
    assert not {1, 2} & set(literal) and t.decode(literal) == "a <s> b </s>"
    dec = t.decoder()
    assert "".join(dec.add(i) for i in ids[1:]) + dec.flush() == "héllo 😀 world"
    chat = t.encode_chat([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}])
    assert chat[0] == 1 and chat[-1] == 2
    (tmp_path / "copy").mkdir()
    t.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").encode("hello world") == t.encode("hello world")


def test_sentencepiece_file_in_a_checkpoint(tmp_path, tok):
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.model").exists()
    again = load_tokenizer(tmp_path)
    assert again.encode("Hello 😀") == tok.encode("Hello 😀")
    assert again.encode_chat(CHATS[1]) == tok.encode_chat(CHATS[1])


def test_unknown_tokenizer_is_named():
    with pytest.raises(FileNotFoundError, match="no tokenizer at 'nope'"):
        load_tokenizer("nope")
