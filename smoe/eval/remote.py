"""Scoring a running `smoe serve` through lm-eval's `local-completions` model (OpenAI /v1/completions
with echo + logprobs for loglikelihoods, plain completions for generation)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from lm_eval.models.openai_completions import LocalCompletionsAPI

from smoe.eval.lm import special_token_text
from smoe.tokenizer import Tokenizer, load_tokenizer


def served_model_name(base_url: str, timeout: float = 10.0) -> str:
    """The first model id a server lists at /v1/models."""
    url = base_url.rstrip("/").removesuffix("/v1") + "/v1/models"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = json.load(r)
    except OSError as e:
        raise ValueError(f"no OpenAI-compatible server answers at {url}: {e}") from None
    models = [m["id"] for m in data.get("data", [])]
    if not models:
        raise ValueError(f"{url} lists no models")
    return models[0]


class ServedLM(LocalCompletionsAPI):
    """local-completions against a smoe server, sending token ids made by smoe's own tokenizer with BOS
    exactly as the in-process model (SmoeLM) adds it, so both score the same tokens. Sampled requests
    get distinct seeds (seed, seed + 1, ...): lm-eval sends one fixed seed with every request, which
    would make the k samples of maj@k or pass@k equal.
    loglikelihood_rolling stays lm-eval's TemplateAPI one (windows of max_length - 1, BOS scored)."""

    def __init__(self, base_url: str, tokenizer: str | Path | Tokenizer, model: str | None = None,
                 max_length: int | None = None, **kwargs):
        base = base_url.rstrip("/").removesuffix("/v1/completions").removesuffix("/v1")
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        if max_length is None and not isinstance(tokenizer, Tokenizer):
            from smoe.checkpoint import read_config
            path = Path(tokenizer)
            has_config = (path / "config.json").exists() or (path / "params.json").exists()
            max_length = read_config(path)[0].max_seq_len if has_config else None
        kwargs.setdefault("max_retries", 1)
        kwargs.setdefault("add_bos_token", True)
        super().__init__(base_url=f"{base}/v1/completions", model=model or served_model_name(base),
                         tokenizer_backend="none", max_length=max_length or 2048, **kwargs)
        self.tokenizer_backend, self.tokenizer, self.tokenized_requests = "smoe", tok, True
        self._bos_text = special_token_text(tok, tok.bos_id)
        self.pretrained = f"{self.model} at {base}"
        self._draws = 0

    def tok_encode(self, string, left_truncate_len: int | None = None, add_special_tokens: bool = False,
                   truncation: bool = False, **kwargs):
        """Ids of a string (or of each of a list of strings), BOS as SmoeLM.tok_encode adds it."""
        def one(s: str) -> list[int]:
            own_bos = bool(self._bos_text) and s.startswith(self._bos_text)
            add = bool(add_special_tokens or self.add_bos_token) and not own_bos
            ids = self.tokenizer.encode(s, bos=add)
            return ids[-left_truncate_len:] if left_truncate_len else ids
        return one(string) if isinstance(string, str) else [one(s) for s in string]

    def decode_batch(self, tokens: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(t) for t in tokens]

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def eos_string(self) -> str | None:
        return self._eos_string or special_token_text(self.tokenizer, self.tokenizer.eos_id)

    @property
    def prefix_token_id(self) -> int:
        return self.custom_prefix_token_id if self.custom_prefix_token_id is not None else self.tokenizer.bos_id

    def _create_payload(self, messages, generate=False, gen_kwargs=None, seed: int = 1234, eos=None, **kwargs):
        payload = super()._create_payload(messages, generate=generate, gen_kwargs=gen_kwargs, seed=seed, eos=eos,
                                          **kwargs)
        if generate and payload.get("temperature", 0) > 0:
            payload["seed"] = seed + self._draws
            self._draws += 1
        return payload
