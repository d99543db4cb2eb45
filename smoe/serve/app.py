"""The OpenAI-compatible HTTP API over an engine (HTTP only): an EngineProcess (the engine in its own
process, the default of `smoe serve`) or an AsyncEngine (on a thread), which have the same interface.

Routes: POST /v1/completions, POST /v1/chat/completions (both also streaming as SSE ending in
`data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus), and vLLM's /tokenize and
/detokenize. Errors use OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from smoe.engine.async_engine import AsyncEngine, call_all
from smoe.engine.engine import StepOutput
from smoe.generation import SamplingParams
from smoe.serve.metrics import Metrics
from smoe.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse,
)
from smoe.tokenizer import ChatFormatError

log = logging.getLogger("smoe.serve")


@dataclass
class ServerOptions:
    model_name: str
    api_key: str | None = None
    max_queue: int | None = None  # requests waiting for a slot at most; more get 429
    max_n: int = 64  # choices per request at most


@dataclass
class Choice:
    """What one sequence of a request produced so far."""

    prompt_ids: list[int]
    prompt_text: str | None = None  # for echo
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # (token, logprob, top) per generated token
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    started: float | None = None
    last: float | None = None


class _Run:
    """The sequences of one HTTP request in the engine, their outputs in arrival order, and timings."""

    def __init__(self, engine: AsyncEngine, metrics: Metrics, base_id: str, choices: list[Choice],
                 params: list[SamplingParams]):
        self.engine, self.metrics, self.base_id = engine, metrics, base_id
        self.choices, self.params = choices, params
        self.ids = [f"{base_id}-{i}" for i in range(len(choices))]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.t0 = time.monotonic()
        self.done = [False] * len(choices)

    def start(self) -> None:
        def deliver(i: int, out: StepOutput | BaseException) -> None:  # runs on the event loop (see dispatch)
            self.queue.put_nowait((i, out))

        added = 0
        try:
            for i, (c, p) in enumerate(zip(self.choices, self.params)):
                self.engine.add(self.ids[i], c.prompt_ids, p, functools.partial(deliver, i))
                added += 1
        except ValueError as e:  # a request the engine cannot run: nothing of it stays behind
            for rid in self.ids[:added]:
                self.engine.abort(rid)
            self.done = [True] * len(self.ids)
            raise APIError(400, str(e)) from None

    def abort(self) -> None:
        """Cancel the sequences still running (on disconnect, error or shutdown)."""
        for i, rid in enumerate(self.ids):
            if not self.done[i]:
                self.done[i] = True
                self.engine.abort(rid)
                self.choices[i].finish_reason = "abort"
                self.metrics.request_done("abort", len(self.choices[i].prompt_ids), time.monotonic() - self.t0)

    async def events(self) -> AsyncIterator[tuple[int, StepOutput]]:
        """(choice index, output) until every sequence has finished; records them into the choices."""
        while not all(self.done):
            i, out = await self.queue.get()
            if self.done[i]:
                continue
            if isinstance(out, BaseException):
                self.abort()
                if isinstance(out, ValueError):
                    raise APIError(400, str(out))
                raise APIError(500, f"generation failed: {out}", type="server_error")
            now = time.monotonic()
            c = self.choices[i]
            if out.token is not None:
                if c.started is None:
                    c.started = now
                    self.metrics.ttft.observe(now - self.t0)
                else:
                    self.metrics.itl.observe(now - c.last)
                c.last = now
                self.metrics.token()
                c.tokens.append(out.token)
            c.text += out.text
            if out.prompt_logprobs is not None:
                c.prompt_logprobs = out.prompt_logprobs
            if out.logprob is not None:
                c.logprobs.append((out.token, out.logprob, out.top_logprobs))
            if out.finish_reason is not None:
                c.finish_reason = out.finish_reason
                self.done[i] = True
                self.metrics.request_done(out.finish_reason, len(c.prompt_ids), now - self.t0)
            yield i, out

    def usage(self) -> dict:
        prompts = {id(c.prompt_ids): len(c.prompt_ids) for c in self.choices}  # n choices share a prompt
        completion = sum(len(c.tokens) for c in self.choices)
        prompt = sum(prompts.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _SSE(StreamingResponse):
    """A server-sent-event stream that cancels its sequences however the stream ends."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _sse_choice(head: dict):
    """An event maker for {**head, "choices": [choice]} that serializes the fixed head only once."""
    prefix = "data: " + json.dumps(head, ensure_ascii=False)[:-1] + ', "choices": ['
    return lambda choice: prefix + json.dumps(choice, ensure_ascii=False) + "]}\n\n"


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_app(engine: AsyncEngine, options: ServerOptions) -> FastAPI:
    """The FastAPI app serving `engine` under options.model_name."""
    tokenizer = engine.engine.tokenizer
    max_len = engine.engine.model.config.max_seq_len
    metrics = Metrics()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def dispatch(deliveries) -> None:  # engine thread: one wake-up of the event loop per step
            try:
                loop.call_soon_threadsafe(call_all, deliveries)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        engine.dispatch = dispatch
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="smoe", lifespan=lifespan)
    app.state.draining = False
    app.state.engine, app.state.metrics = engine, metrics

    def error_response(e: APIError) -> JSONResponse:
        metrics.error(e.status)
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    # ---- checks shared by the routes ------------------------------------------------------------

    def guard(request: Request) -> None:
        if app.state.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if not engine.alive:
            raise APIError(503, "the engine is not running", type="server_error")
        if options.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if not hmac.compare_digest(auth[7:].strip().encode(), options.api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != options.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {options.model_name!r}",
                           param="model", code="model_not_found")

    async def body(request: Request):
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"could not parse the JSON body of the request: {e}") from None

    def admit(n_seqs: int) -> None:
        q = engine.queue_length()
        if options.max_queue is not None and q + n_seqs > options.max_queue:
            raise APIError(429, f"the server is busy: {q} requests are queued (limit {options.max_queue}); "
                           f"retry later", type="rate_limit_error", code="rate_limit_exceeded")

    def fit(n_prompt: int, max_tokens: int | None, param: str, where: str) -> int:
        """max_tokens checked against the context (None: all that is left)."""
        if max_tokens is None:
            max_tokens = max_len - n_prompt
            if max_tokens < 1:
                raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, your "
                               f"{where} has {n_prompt} tokens, leaving no room for the completion.",
                               param=param, code="context_length_exceeded")
        elif n_prompt + max_tokens > max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens. However, you requested "
                           f"{n_prompt + max_tokens} tokens ({n_prompt} in the {where}, {max_tokens} in the "
                           f"completion). Please reduce the length of the {where} or completion.",
                           param=param, code="context_length_exceeded")
        return max_tokens

    anchor = tokenizer.encode("a", bos=False) if tokenizer is not None else []
    anchor_text = tokenizer.decode(anchor) if tokenizer is not None else ""

    @functools.lru_cache(maxsize=65536)
    def token_text(t: int) -> str:
        """A token's text with its leading space (decoded after an anchor token, which keeps it)."""
        return tokenizer.decode(anchor + [t])[len(anchor_text):]

    def need_tokenizer() -> None:
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer")

    async def sse_body(run: _Run, chunks, head: dict, include_usage: bool):
        """The SSE lines of a streamed response: one event per choice chunk, the usage chunk when asked,
        an error in OpenAI's shape if the run fails, and the closing [DONE]."""
        event = _sse_choice(head)
        try:
            async for choice in chunks:
                yield event(choice)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": run.usage()})
        except APIError as e:
            metrics.error(e.status)
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    async def run_to_end(run: _Run, request: Request) -> bool:
        """Collect every output; False if the client went away first (its sequences are cancelled)."""
        async def consume():
            async for _ in run.events():
                pass

        work = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                run.abort()
        if work.cancelled():
            return False
        work.result()  # re-raise an APIError
        return True

    # ---- completions ----------------------------------------------------------------------------

    def completion_logprobs(c: Choice, echo: bool, offset: int = 0) -> dict:
        toks, lps, tops = [], [], []
        if echo and c.prompt_logprobs is not None:
            toks.append(c.prompt_ids[0])
            lps.append(None)
            tops.append(None)
            for t, (lp, top) in zip(c.prompt_ids[1:], c.prompt_logprobs):
                toks.append(t)
                lps.append(lp)
                tops.append({token_text(i): v for i, v in top})
        for t, lp, top in c.logprobs:
            toks.append(t)
            lps.append(lp)
            tops.append({token_text(i): v for i, v in top})
        strs = [token_text(t) for t in toks]
        offsets, at = [], offset
        for s in strs:
            offsets.append(at)
            at += len(s)
        return {"tokens": strs, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    @app.post("/v1/completions")
    async def completions(request: Request):
        guard(request)
        req: CompletionRequest = parse(CompletionRequest, await body(request))
        req.check(options.max_n)
        check_model(req.model)
        raw = req.prompt
        prompts = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        if any(isinstance(p, list) and not p for p in prompts):
            raise APIError(400, "a token-id prompt must not be empty", param="prompt")
        if any(isinstance(p, str) for p in prompts):
            need_tokenizer()
        ids = [tokenizer.encode(p, bos=True) if isinstance(p, str) else p for p in prompts]
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        for p in ids:
            fit(len(p), max_tokens, "prompt", "prompt")
        admit(len(ids) * req.n)
        echo = req.echo
        if (req.stop or req.echo) and tokenizer is None:
            need_tokenizer()
        choices, params = [], []
        for p_ids, p in zip(ids, prompts):
            text = (p if isinstance(p, str) else tokenizer.decode(p)) if echo else None
            for i in range(req.n):
                sp = req.sampling(max_tokens, req.logprobs, req.logprobs if echo and req.logprobs is not None else None)
                if sp.seed is not None:
                    sp.seed += i
                choices.append(Choice(p_ids, text))
                params.append(sp)
        rid = f"cmpl-{uuid.uuid4().hex}"
        run = _Run(engine, metrics, rid, choices, params)
        run.start()
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": options.model_name}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)


            async def chunks():
                sent_echo = [False] * len(choices)
                offsets = [0] * len(choices)
                async for i, out in run.events():
                    c = choices[i]
                    text = out.text
                    lp = None
                    if echo and not sent_echo[i]:
                        text = c.prompt_text + text
                        sent_echo[i] = True
                    if req.logprobs is not None:
                        part = Choice(c.prompt_ids, prompt_logprobs=out.prompt_logprobs,
                                      logprobs=[(out.token, out.logprob, out.top_logprobs)]
                                      if out.logprob is not None else [])
                        lp = completion_logprobs(part, echo and out.prompt_logprobs is not None, offsets[i])
                        offsets[i] += sum(len(t) for t in lp["tokens"])
                    yield {"index": i, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}

            return _SSE(sse_body(run, chunks(), head, include_usage), run.abort)

        if not await run_to_end(run, request):
            return Response(status_code=499)
        out_choices = []
        for i, c in enumerate(choices):
            text = (c.prompt_text + c.text) if echo else c.text
            lp = completion_logprobs(c, echo) if req.logprobs is not None else None
            out_choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
        return {**head, "choices": out_choices, "usage": run.usage()}

    # ---- chat completions -----------------------------------------------------------------------

    def chat_logprobs(entries: list, top_n: int) -> dict:
        content = []
        for t, lp, top in entries:
            s = token_text(t)
            content.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                            "top_logprobs": [{"token": token_text(i), "logprob": v,
                                              "bytes": list(token_text(i).encode())} for i, v in top[:top_n]]})
        return {"content": content}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        guard(request)
        req: ChatCompletionRequest = parse(ChatCompletionRequest, await body(request))
        req.check(options.max_n)
        check_model(req.model)
        need_tokenizer()
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = tokenizer.encode_chat(messages)
        except ChatFormatError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = fit(len(ids), req.max_completion_tokens or req.max_tokens, "messages", "messages")
        admit(req.n)
        top_n = req.top_logprobs or 0
        choices, params = [], []
        for i in range(req.n):
            sp = req.sampling(max_tokens, top_n if req.logprobs else None)
            if sp.seed is not None:
                sp.seed += i
            choices.append(Choice(ids))
            params.append(sp)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        run = _Run(engine, metrics, rid, choices, params)
        run.start()
        head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": options.model_name}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunk = {**head, "object": "chat.completion.chunk"}

            async def chunks():
                for i in range(len(choices)):
                    yield {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}
                async for i, out in run.events():
                    lp = None
                    if req.logprobs and out.logprob is not None:
                        lp = chat_logprobs([(out.token, out.logprob, out.top_logprobs)], top_n)
                    delta = {"content": out.text} if out.text or out.finish_reason is None else {}
                    yield {"index": i, "delta": delta, "logprobs": lp, "finish_reason": out.finish_reason}

            return _SSE(sse_body(run, chunks(), chunk, include_usage), run.abort)

        if not await run_to_end(run, request):
            return Response(status_code=499)
        out_choices = []
        for i, c in enumerate(choices):
            lp = chat_logprobs(c.logprobs, top_n) if req.logprobs else None
            out_choices.append({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                                "finish_reason": c.finish_reason})
        return {**head, "choices": out_choices, "usage": run.usage()}

    # ---- the rest -------------------------------------------------------------------------------

    def model_card() -> dict:
        return {"id": options.model_name, "object": "model", "created": created, "owned_by": "smoe",
                "max_model_len": max_len}

    @app.get("/v1/models")
    async def models(request: Request):
        guard(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        guard(request)
        check_model(name)
        return model_card()

    @app.get("/health")
    async def health():
        if app.state.draining or not engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine.snapshot(), engine.queue_length()),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(request: Request):
        guard(request)
        req: TokenizeRequest = parse(TokenizeRequest, await body(request))
        need_tokenizer()
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send either 'prompt' or 'messages'")
        if req.messages is not None:
            try:
                ids = tokenizer.encode_chat([{"role": m.role, "content": m.text()} for m in req.messages])
            except ChatFormatError as e:
                raise APIError(400, str(e), param="messages") from None
        else:
            ids = tokenizer.encode(req.prompt, bos=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": max_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        guard(request)
        req: DetokenizeRequest = parse(DetokenizeRequest, await body(request))
        need_tokenizer()
        V = engine.engine.model.config.vocab_size
        if any(not 0 <= t < V for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {V})", param="tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    return app
