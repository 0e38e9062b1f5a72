"""The HTTP face of `slmops serve`: OpenAI's routes on FastAPI, each answer or error in OpenAI's shape.

Bad input is one OpenAI-shaped error with its status (400 malformed or impossible, 401 no key, 404
unknown model, 413 too large, 422 wrong types, 429 queue full) and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from slmops.errors import UsageError
from slmops.options.serve_options import ServeOptions
from slmops.serving.jobs import Job, QueueFull
from slmops.serving.pool import AdapterError, ModelPool, Pool
from slmops.serving.shapes import (ChatRequest, CompletionRequest, LoadAdapter, Sampling, UnloadAdapter,
                                   error_body)
from slmops.serving.telemetry import Telemetry

log = logging.getLogger("slmops.serving.access")
DEFAULT_MAX_TOKENS = 256
DRAIN = 64  # a body up to this many times --max_body_bytes is read before its 413, a larger one is not


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.headers = status, kind, param, headers


def create_app(opts: ServeOptions, pool: Pool | None = None) -> FastAPI:
    """The application; without `pool` the model loads at start-up. /health says ready only after."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal pool
        if pool is None:
            pool = await asyncio.to_thread(open_pool, opts)
        app.state.scheduler = pool.decoder(app.state.telemetry, opts.max_batch_size, opts.max_queue)
        app.state.scheduler.start()
        app.state.pool = pool
        yield
        app.state.scheduler.stop()

    app = FastAPI(title="slmops serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.opts, app.state.telemetry, app.state.pool, app.state.draining = opts, Telemetry(), None, False
    app.include_router(routes)
    app.add_exception_handler(ApiError, _api_error)
    app.middleware("http")(_guard)
    return app


routes = APIRouter()


async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(str(err), err.kind, err.param), err.status, headers=err.headers)


async def _guard(request: Request, call_next: Any) -> Response:
    """Body size and API key before any handler; one access-log line and a count per request."""
    started = time.perf_counter()
    response = _refuse(request, request.app.state.opts) or await call_next(request)
    route = request.url.path
    request.app.state.telemetry.requests.labels(route, str(response.status_code)).inc()
    log.info('%s "%s %s" %d %.0f ms', request.client.host if request.client else "-", request.method, route,
             response.status_code, 1000 * (time.perf_counter() - started))
    return response


@routes.get("/health")
async def health(request: Request) -> Response:
    state = request.app.state
    status = "draining" if state.draining else "ok" if state.pool is not None else "loading"
    return JSONResponse({"status": status}, 200 if status == "ok" else 503)


@routes.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    return Response(generate_latest(request.app.state.telemetry.registry), media_type=CONTENT_TYPE_LATEST)


@routes.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    pool: Pool = request.app.state.pool
    made = int(time.time())
    return {"object": "list", "data": [
        {"id": m, "object": "model", "created": made, "owned_by": "slmops",
         "parent": None if m == pool.base_id else pool.base_id} for m in pool.ids()]}


@routes.post("/v1/load_lora_adapter")
async def load_adapter(request: Request) -> Response:
    body = _parse(LoadAdapter, await _json(request))
    await _adapter_call(request.app.state.pool.load, body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@routes.post("/v1/unload_lora_adapter")
async def unload_adapter(request: Request) -> Response:
    body = _parse(UnloadAdapter, await _json(request))
    await _adapter_call(request.app.state.pool.unload, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@routes.post("/v1/chat/completions")
async def chat(request: Request) -> Response:
    req = _parse(ChatRequest, await _json(request))
    pool: Pool = request.app.state.pool
    if not req.messages:
        raise ApiError(400, "messages is empty; send at least one message", param="messages")
    if not getattr(pool.tokenizer, "chat_template", None):
        raise ApiError(400, f"{req.model} has no chat template; use /v1/completions with a plain prompt")
    text = pool.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages],
                                              add_generation_prompt=True, tokenize=False)
    return await _answer(request, req, pool.tokenizer(text, add_special_tokens=False)["input_ids"], chat=True)


@routes.post("/v1/completions")
async def completions(request: Request) -> Response:
    req = _parse(CompletionRequest, await _json(request))
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
        raise ApiError(400, f"send one prompt per request, got {len(prompts)}", param="prompt")
    return await _answer(request, req, request.app.state.pool.tokenizer(prompts[0])["input_ids"], chat=False)


async def _answer(request: Request, req: Sampling, prompt: list[int], chat: bool) -> Response:
    """Queue the request for the scheduler and answer from its events, whole or streamed."""
    state = request.app.state
    job = _job(req, prompt, state.pool, state.opts)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job.emit = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
    try:
        state.scheduler.submit(job)
    except QueueFull as err:
        raise ApiError(429, f"the server is busy: {err}; retry shortly", "rate_limit_error",
                       headers={"Retry-After": "1"}) from None
    state.telemetry.prompt_tokens.labels(req.model).inc(len(prompt))
    reply = Reply(req, job, chat, state.telemetry)
    if req.stream:
        return StreamingResponse(reply.stream(events), media_type="text/event-stream")
    return JSONResponse(await reply.whole(events, request))


def open_pool(opts: ServeOptions) -> Pool:
    """The base and the --adapters; a model or adapter that cannot be served is a UsageError naming it."""
    from slmops.models.genai import is_genai_folder

    if is_genai_folder(opts.model_name_or_path):
        from slmops.serving.ort_engine import GenaiPool

        if opts.torch_dtype != "auto":
            raise UsageError(f"--torch_dtype {opts.torch_dtype}: {opts.model_name_or_path} is an exported folder whose "
                             f"precision was chosen at export; drop --torch_dtype (or export again with --precision)")

        pool: Pool = GenaiPool(opts.model_name_or_path, opts.served_model_name, opts.max_batch_size)
    else:
        pool = ModelPool(opts.model_name_or_path, opts.served_model_name, opts.trust_remote_code, opts.torch_dtype)
    for name, path in opts.adapters.items():
        pool.load(name, path)
    return pool


class Reply:
    """One request's answer, whole or as server-sent events, from the scheduler's events."""

    def __init__(self, req: Sampling, job: Job, chat: bool, telemetry: Telemetry):
        self.req, self.job, self.chat, self.telemetry = req, job, chat, telemetry
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    async def whole(self, events: asyncio.Queue, request: Request) -> dict[str, Any]:
        pieces = []
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise
                    continue
                if kind == "text":
                    pieces.append(value)
                    continue
                return self._final(kind, value, "".join(pieces))
        finally:
            self.job.cancelled.set()  # ended, timed out or disconnected: the batch slot is freed

    async def stream(self, events: asyncio.Queue) -> AsyncIterator[str]:
        try:
            if self.chat:
                yield _sse(self._chunk({"role": "assistant", "content": ""}, None))
            while True:
                kind, value = await events.get()
                if kind == "text":
                    yield _sse(self._chunk({"content": value} if self.chat else value, None))
                    continue
                if kind == "error":
                    yield _sse(error_body(value, "server_error"))
                    break
                self._count()
                final = self._chunk({} if self.chat else "", _reason(value))
                if self.req.wants_usage():
                    final["usage"] = self._usage()
                yield _sse(final)
                break
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancelled.set()  # a client that goes away frees its batch slot at the next step

    def _final(self, kind: str, value: str, text: str) -> dict[str, Any]:
        if kind == "error":
            raise ApiError(500, value, "server_error")
        if value == "timeout":
            raise ApiError(408, "the request took longer than --request_timeout", "timeout_error")
        self._count()
        choice: dict[str, Any] = {"index": 0, "finish_reason": _reason(value)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.req.model, "choices": [choice], "usage": self._usage()}

    def _chunk(self, delta: Any, reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "finish_reason": reason, **({"delta": delta} if self.chat else
                                                          {"text": delta, "logprobs": None})}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.req.model, "choices": [choice]}

    def _usage(self) -> dict[str, int]:
        prompt, made = len(self.job.prompt), len(self.job.generated)
        return {"prompt_tokens": prompt, "completion_tokens": made, "total_tokens": prompt + made}

    def _count(self) -> None:
        made, job = len(self.job.generated), self.job
        self.telemetry.completion_tokens.labels(self.req.model).inc(made)
        if made > 1 and job.first_token_at is not None:
            per_token = (time.perf_counter() - job.first_token_at) / (made - 1)
            self.telemetry.per_token.labels(self.req.model).observe(per_token)


def _reason(end: str) -> str:
    return "length" if end in ("length", "timeout") else "stop"


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _refuse(request: Request, opts: ServeOptions) -> Response | None:
    """503 while draining; 401 without the API key on /v1 routes (compared in constant time); 413 at once for
    a declared body too large to be worth reading."""
    if request.app.state.draining and request.url.path.startswith("/v1/"):
        return JSONResponse(error_body("the server is shutting down; retry on another instance", "server_error"),
                            503, headers={"Retry-After": "1"})
    if opts.api_key and request.url.path.startswith("/v1/"):
        given = request.headers.get("authorization", "")
        expected = f"Bearer {opts.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return JSONResponse(error_body("missing or wrong API key: send Authorization: Bearer KEY",
                                           "authentication_error", code="invalid_api_key"), 401)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > DRAIN * opts.max_body_bytes:  # not worth reading
        return JSONResponse(error_body(f"the request body is {declared} bytes; the limit is {opts.max_body_bytes} "
                                       f"(--max_body_bytes)"), 413)
    return None


async def _json(request: Request) -> Any:
    """The body as JSON. A body over --max_body_bytes is read to its end (up to DRAIN times the limit) and
    answered 413, so the client, still sending, can read the answer."""
    limit = request.app.state.opts.max_body_bytes
    body, total = bytearray(), 0
    async for chunk in request.stream():
        total += len(chunk)
        if total <= limit:
            body += chunk
        elif total > DRAIN * limit:
            break
    if total > limit:
        raise ApiError(413, f"the request body is over the limit of {limit} bytes (--max_body_bytes)")
    try:
        return json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the body is not valid JSON ({err})") from None


def _parse(kind: type, body: Any) -> Any:
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return kind.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(422, f"{where}: {first['msg']}", param=where or None) from None


def _job(req: Sampling, prompt: list[int], pool: Pool, opts: ServeOptions) -> Job:
    """The request checked against the model and the limits, as the scheduler's job."""
    adapter = pool.adapter_for(req.model)
    if adapter is None:
        raise ApiError(404, f"the model {req.model!r} does not exist; served: {', '.join(pool.ids())}",
                       param="model", kind="not_found_error")
    if req.n != 1:
        raise ApiError(400, "n must be 1: send one request per completion", param="n")
    wanted = req.max_completion_tokens or req.max_tokens or min(DEFAULT_MAX_TOKENS, opts.max_tokens_limit)
    if not 0 < wanted <= opts.max_tokens_limit:
        raise ApiError(400, f"max_tokens must lie in 1..{opts.max_tokens_limit} (--max_tokens_limit), got {wanted}",
                       param="max_tokens")
    if req.temperature < 0 or not 0 < req.top_p <= 1:
        raise ApiError(400, "temperature must be >= 0 and top_p in (0, 1]", param="temperature")
    limit = min(opts.max_prompt_tokens or pool.context, pool.context - wanted)
    if len(prompt) > limit:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens; at most {limit} fit with max_tokens {wanted} "
                            f"(context {pool.context})", param="messages")
    return Job(req.model, adapter, prompt, wanted, req.temperature, req.top_p, req.seed, req.stops(),
               req.ignore_eos, deadline=time.perf_counter() + opts.request_timeout)


async def _adapter_call(fn: Any, *args: Any) -> None:
    try:
        await asyncio.to_thread(fn, *args)
    except AdapterError as err:
        raise ApiError(400, str(err), param="lora_path") from None
    except UsageError as err:
        raise ApiError(400, str(err)) from None
