"""OpenAI request bodies (strictly typed, unknown fields ignored) and the OpenAI error shape."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from smoe.generation import SamplingParams
from smoe.generation.sampling import MAX_LOGPROBS


class APIError(Exception):
    """An error answered as {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_UNION_HINTS = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "stop must be a string or a list of strings",
    "content": "content must be a string or a list of text parts",
}


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a decoded JSON body; a clear 400 naming the first bad field otherwise."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"]]
        field = next((x for x in loc if not x.isdigit()), "")
        if err["type"] == "missing":
            raise APIError(400, f"missing required field {'.'.join(loc)!r}", param=".".join(loc)) from None
        hint = next((_UNION_HINTS[x] for x in reversed(loc) if x in _UNION_HINTS), None)
        if hint is not None:
            raise APIError(400, f"invalid {field!r}: {hint}", param=field) from None
        raise APIError(400, f"invalid {'.'.join(loc)!r}: {err['msg']}", param=field) from None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by completions and chat completions (plus smoe/vLLM extensions)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = None  # 0 or -1: off
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    moe_top_k: int | None = Field(default=None, description="experts per token for this request")

    def check_common(self, max_n: int) -> None:
        if not 1 <= self.n <= max_n:
            raise APIError(400, f"n must be in [1, {max_n}], got {self.n}", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported (only 0)", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise APIError(400, f"temperature must be in [0, 2], got {self.temperature}", param="temperature")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise APIError(400, f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k is not None and self.top_k < -1:
            raise APIError(400, f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k}", param="top_k")
        if self.moe_top_k is not None and self.moe_top_k < 1:
            raise APIError(400, f"moe_top_k must be >= 1, got {self.moe_top_k}", param="moe_top_k")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise APIError(400, f"seed must be in [0, 2**63), got {self.seed}", param="seed")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 16 or any(not s for s in stops):
            raise APIError(400, "stop must hold at most 16 non-empty strings", param="stop")

    def sampling(self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
        """SamplingParams of one choice (the caller varies the seed per choice)."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else float(self.temperature),
            top_k=max(self.top_k or 0, 0), top_p=1.0 if self.top_p is None else float(self.top_p), seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos, moe_top_k=self.moe_top_k,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check(self, max_n: int) -> None:
        self.check_common(max_n)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", param="logprobs")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {self.max_tokens}", param="max_tokens")
        if isinstance(self.prompt, list) and not self.prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check(self, max_n: int) -> None:
        self.check_common(max_n)
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                               param="top_logprobs")
            if not self.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.tools:
            raise APIError(400, "tools are not supported", param="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
        for name in ("max_tokens", "max_completion_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise APIError(400, f"{name} must be >= 1, got {v}", param=name)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    tokens: list[int]
