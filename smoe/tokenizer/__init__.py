"""Tokenizers: the Mistral tokenizers through mistral-common, HF tokenizer.json, and the chat format.

Every tokenizer offers encode/decode, bos_id/eos_id, vocab_size, the Mixtral Instruct chat format
(`<s>[INST] user [/INST] assistant</s>[INST] ...`) and incremental decoding for streaming.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MISTRAL_NAMES = {"mixtral": "v1", "mixtral-8x7b": "v1", "mistral-v1": "v1", "v1": "v1",
                 "mixtral-8x22b": "v3", "mistral-v3": "v3", "v3": "v3"}


class ChatFormatError(ValueError):
    """A conversation that the chat format cannot render (bad roles or order)."""


def check_messages(messages: list[dict], allow_last_assistant: bool = True) -> None:
    """Validate roles: optional system first, then user/assistant alternating, starting with user."""
    if not messages:
        raise ChatFormatError("chat: the conversation has no messages")
    prev = None
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"chat: message {n} must be an object with 'role' and 'content'")
        role = m["role"]
        if role not in ("system", "user", "assistant"):
            raise ChatFormatError(f"chat: message {n} has unknown role {role!r} (use system, user, assistant)")
        if not isinstance(m["content"], str):
            raise ChatFormatError(f"chat: message {n} content must be a string")
        if role == "system" and n != 0:
            raise ChatFormatError(f"chat: message {n} is a system message; only the first message may be one")
        if role == "user" and prev == "user":
            raise ChatFormatError(f"chat: message {n} is a user message after a user message; roles must alternate")
        if role == "assistant" and prev != "user":
            raise ChatFormatError(f"chat: message {n} is an assistant message after {prev or 'nothing'}; "
                                  f"an assistant message must follow a user message")
        prev = role
    if prev == "system":
        raise ChatFormatError("chat: the conversation has only a system message")
    if prev == "assistant" and not allow_last_assistant:
        raise ChatFormatError("chat: the last message must be a user message to generate a reply")


class Tokenizer:
    """Common interface; subclasses implement encode/decode and hold the special ids."""

    bos_id: int
    eos_id: int
    vocab_size: int
    name: str

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _piece(self, text: str) -> list[int]:
        """Ids of a text fragment inside a chat (no BOS)."""
        return self.encode(text, bos=False)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of a conversation in the Mixtral Instruct format; ends ready for the assistant's reply
        when the last message is a user's, and with EOS after a final assistant message."""
        check_messages(messages)
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        turns = messages[1:] if system is not None else messages
        ids = [self.bos_id]
        for m in turns:
            if m["role"] == "user":
                content = f"{system}\n\n{m['content']}" if system is not None else m["content"]
                system = None
                ids += self._piece(f"[INST] {content} [/INST]")
            else:
                ids += self._piece(" " + m["content"].strip()) + [self.eos_id]
        return ids

    def decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)

    def save(self, path: str | Path) -> None:
        """Write this tokenizer's files into a checkpoint directory."""
        raise NotImplementedError


class MistralTokenizer(Tokenizer):
    """A Mistral tokenizer through mistral-common (SentencePiece v1/v3 or tekken)."""

    def __init__(self, file: str | Path, name: str | None = None):
        from mistral_common.protocol.instruct.validator import ValidationMode
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as MT
        self.file = Path(file)
        # mistral-common validates a conversation by mode: 'test' ends on a user turn (a prompt),
        # 'finetuning' on an assistant turn (a training example); both share one SentencePiece model
        self.mt = MT.from_file(str(file), mode=ValidationMode.test)
        self.mt_finetuning = MT.from_file(str(file), mode=ValidationMode.finetuning)
        self.raw = self.mt.instruct_tokenizer.tokenizer
        self.bos_id, self.eos_id, self.vocab_size = self.raw.bos_id, self.raw.eos_id, self.raw.n_words
        self.name = name or self.file.name

    @classmethod
    def by_version(cls, version: str) -> MistralTokenizer:
        import mistral_common
        data = Path(mistral_common.__file__).parent / "data"
        file = {"v1": data / "tokenizer.model.v1", "v3": data / "mistral_instruct_tokenizer_240323.model.v3"}[version]
        return cls(file, name=f"mistral-{version}")

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self.raw.encode(text, bos=bos, eos=eos)

    def decode(self, ids: list[int]) -> str:
        return self.raw.decode(list(ids))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        check_messages(messages)
        kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        msgs = [kinds[m["role"]](content=m["content"]) for m in messages]
        mt = self.mt_finetuning if messages[-1]["role"] == "assistant" else self.mt
        return mt.encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens

    def save(self, path: str | Path) -> None:
        suffix = "tekken.json" if self.file.suffix == ".json" else "tokenizer.model"
        shutil.copyfile(self.file, Path(path) / suffix)


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json (also what smoe's own BPE training writes).

    Literal special-token text ("<s>" in a file or prompt) is encoded as transformers encodes it with the
    same files: tokenizer_config.json's split_special_tokens (smoe's BPE sets it: text is text, as in
    mistral-common; only bos=/eos= and the chat format give special ids), else as the special ids.
    """

    def __init__(self, file: str | Path):
        from tokenizers import Tokenizer as HFTok
        self.file = Path(file)
        self.tok = HFTok.from_file(str(file))
        special = {"bos_token": "<s>", "eos_token": "</s>"}
        cfg_file = self.file.parent / "tokenizer_config.json"
        if cfg_file.exists():
            cfg = json.loads(cfg_file.read_text())
            # not stored in tokenizer.json: the config carries it and every load applies it
            self.tok.encode_special_tokens = bool(cfg.get("split_special_tokens", False))
            for k in special:
                v = cfg.get(k)
                special[k] = v.get("content") if isinstance(v, dict) else (v or special[k])
        ids = {k: self.tok.token_to_id(v) for k, v in special.items()}
        missing = [special[k] for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"{file}: special tokens {missing} are not in the vocabulary")
        self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
        self.vocab_size = self.tok.get_vocab_size()
        self.name = str(file)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        self.tok.save(str(path / "tokenizer.json"))
        cfg = {"bos_token": self.tok.id_to_token(self.bos_id), "eos_token": self.tok.id_to_token(self.eos_id),
               "split_special_tokens": self.tok.encode_special_tokens}  # read by smoe and transformers
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


class IncrementalDecoder:
    """Turns a stream of ids into text deltas that never split a multi-byte character.

    The concatenated deltas equal decode(all ids): each step decodes a short window of recent ids
    and emits only what is new once it no longer ends in a replacement character.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # ids up to here have been emitted

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        now = self.tokenizer.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        now = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


def load_tokenizer(path_or_name: str | os.PathLike) -> Tokenizer:
    """A checkpoint directory's tokenizer (tokenizer.json, tokenizer.model or tekken.json), a
    tokenizer file, or a Mistral tokenizer by name ('mixtral' = v1, 32000 ids; 'mixtral-8x22b' = v3)."""
    s = str(path_or_name)
    p = Path(s)
    if p.is_dir():
        for name, cls in (("tokenizer.json", HFTokenizer), ("tekken.json", MistralTokenizer),
                          ("tokenizer.model", MistralTokenizer)):
            if (p / name).exists():
                return cls(p / name)
        raise FileNotFoundError(f"{p} has no tokenizer (tokenizer.json, tokenizer.model or tekken.json)")
    if p.is_file():
        return HFTokenizer(p) if p.name.endswith("tokenizer.json") else MistralTokenizer(p)
    if s.lower() in MISTRAL_NAMES:
        return MistralTokenizer.by_version(MISTRAL_NAMES[s.lower()])
    raise FileNotFoundError(f"no tokenizer at {s!r}: not a directory, a file, or a known name "
                            f"({', '.join(sorted(MISTRAL_NAMES))})")
