"""Scoring a running `smoe serve` through lm-eval's `local-completions` model (OpenAI /v1/completions
with echo + logprobs for loglikelihoods, plain completions for generation)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from lm_eval.models.openai_completions import LocalCompletionsAPI


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
    """local-completions against a smoe server, tokenizing with the checkpoint's tokenizer and adding BOS
    as the in-process model does. Sampled requests get distinct seeds (seed, seed + 1, ...): lm-eval
    sends one fixed seed with every request, which would make the k samples of maj@k or pass@k equal."""

    def __init__(self, base_url: str, tokenizer: str | Path, model: str | None = None, max_length: int | None = None,
                 **kwargs):
        base = base_url.rstrip("/").removesuffix("/v1/completions").removesuffix("/v1")
        kwargs.setdefault("add_bos_token", True)
        kwargs.setdefault("max_retries", 1)
        if max_length is None:
            from smoe.checkpoint import read_config
            path = Path(tokenizer)
            max_length = read_config(path)[0].max_seq_len if (path / "config.json").exists() or \
                (path / "params.json").exists() else 2048
        super().__init__(base_url=f"{base}/v1/completions", model=model or served_model_name(base),
                         tokenizer_backend="huggingface", tokenizer=str(tokenizer), max_length=max_length, **kwargs)
        self.pretrained = f"{self.model} at {base}"
        self._draws = 0

    def _create_payload(self, messages, generate=False, gen_kwargs=None, seed: int = 1234, eos=None, **kwargs):
        payload = super()._create_payload(messages, generate=generate, gen_kwargs=gen_kwargs, seed=seed, eos=eos,
                                          **kwargs)
        if generate and payload.get("temperature", 0) > 0:
            payload["seed"] = seed + self._draws
            self._draws += 1
        return payload
