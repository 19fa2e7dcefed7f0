"""The HTTP face of the service: a FastAPI app speaking OpenAI's API, with documents instead of tensors.

    POST /v1/chat/completions   messages whose content may hold document parts, spliced after the chat template
    POST /v1/completions        prompt: a string, strings, or parts (strings, text parts, document parts)
    POST /v1/answer             the paper's few-shot QA format: question, documents, examples
    GET  /v1/models             the served model
    GET  /health                200 once the models are loaded
    GET  /metrics               Prometheus

`stream: true` answers with server-sent events as OpenAI's do; errors use OpenAI's error schema and name the
field; with an API key set, /v1/ needs `Authorization: Bearer <key>`. `build_app(config)` loads the models when
the app starts (its lifespan): mounted in another app, enter `app.router.lifespan_context(app)` from yours.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ..engines.base import Sampling
from ..errors import ArcCompressError, ContextNotFoundError, EngineError, InputError, UnavailableError
from ..prompts import first_answer
from ..version import __version__
from ..engines.text import Delta
from .config import ServiceConfig
from .documents import RequestError
from .protocol import AnswerRequest, ChatCompletionRequest, CompletionRequest, SamplingFields, Usage, error_body
from .service import Prepared, Service

logger = logging.getLogger("arccompress.serve")
Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


def error_response(status: int, message: str, *, param: str | None = None, kind: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    kind = kind or {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                    503: "service_unavailable"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(error_body(message, kind=kind, param=param, code=status), status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 before the app reads any of it (by its
    Content-Length, or while it arrives when chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"the request body is larger than this service's limit of {self.max_bytes} "
                                      "bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_big(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class RequestMetrics:
    """ASGI middleware: every request counted by endpoint and status, its latency measured to the last byte."""

    def __init__(self, app: ASGIApp, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        endpoint = scope["path"] if scope["path"] in ROUTES else "other"

        async def observe(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            m = self.service.metrics
            m.requests.labels(endpoint, str(status)).inc()
            if endpoint.startswith("/v1/"):
                m.latency.labels(endpoint).observe(time.perf_counter() - start)


ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/answer", "/v1/models", "/health", "/metrics")


def build_app(config: ServiceConfig | None = None, *, service: Service | None = None) -> FastAPI:
    """The service's ASGI app; its lifespan loads the models (`service.start()`) and stops them."""
    if (config is None) == (service is None):
        raise InputError("give build_app a ServiceConfig or a Service")
    service = service or Service(config)  # type: ignore[arg-type]
    api_key = service.config.api_key

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="arccompress", version=__version__, lifespan=lifespan)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=service.limits.max_body_bytes)
    app.add_middleware(RequestMetrics, service=service)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        param, message = validation_message(exc.errors())
        return error_response(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's own refusals (an unknown path, a method, a body it cannot parse) in OpenAI's schema."""
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            allowed = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "?")
            message = f"{request.url.path} does not take {request.method} (allowed: {allowed})"
        elif exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            message = "the body is not valid JSON (not UTF-8, nested too deep, or a number too long)"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(ArcCompressError)
    async def refused(request: Request, exc: ArcCompressError) -> JSONResponse:
        if isinstance(exc, RequestError):
            return error_response(exc.status, str(exc), param=exc.param)
        if isinstance(exc, ContextNotFoundError):
            return error_response(404, str(exc))
        if isinstance(exc, UnavailableError):
            logger.warning("engine unavailable: %s", exc)
            return error_response(503, str(exc), headers={"Retry-After": "1"})
        if isinstance(exc, EngineError):
            logger.error("engine failure: %s", exc)
            return error_response(500, str(exc))
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); the service keeps serving")

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise RequestError("a valid API key is needed: Authorization: Bearer <key>" if given else
                               "this service needs an API key: Authorization: Bearer <key>", status=401)

    def ready() -> Service:
        if not service.ready:
            raise RequestError("the service is starting or stopping", status=503)
        return service

    def check_model(name: str | None) -> None:
        if name is not None and name != service.model_name:
            raise RequestError(f"the model {name!r} does not exist; this service serves {service.model_name!r}",
                               param="model", status=404)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not service.ready:
            return error_response(503, "starting or stopping")
        return JSONResponse({"status": "ok", "model": service.model_name, "backend": service.config.backend})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        s = ready()
        return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": 0,
                                            "owned_by": "arccompress", "max_model_len": s.backend.max_model_len,
                                            "arccompress": s.describe()}]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: CompletionRequest) -> Response:
        s = ready()
        check_model(request.model)
        prepared = await s.prepare_completion(request)
        sampling = s.sampling(request, prepared, default_max_tokens=16, prompt_param="prompt")
        return await respond("text_completion", "cmpl", request, prepared, sampling)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(request: ChatCompletionRequest) -> Response:
        s = ready()
        check_model(request.model)
        prepared = await s.prepare_chat(request)
        sampling = s.sampling(request, prepared, default_max_tokens=None, prompt_param="messages")
        return await respond("chat.completion", "chatcmpl", request, prepared, sampling)

    @app.post("/v1/answer", dependencies=[Depends(authorize)])
    async def answer(request: AnswerRequest) -> Response:
        s = ready()
        check_model(request.model)
        prepared = await s.prepare_answer(request)
        sampling = s.sampling(request, prepared, default_max_tokens=64, prompt_param="documents", answer=True)
        return await respond("answer", "answer", request, prepared, sampling)

    async def respond(kind: str, prefix: str, request: SamplingFields, prepared: list[Prepared],
                      sampling: Sampling) -> Response:
        rid = f"{prefix}-{uuid.uuid4().hex}"
        started = time.perf_counter()
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(events(kind, rid, prepared, sampling, started, include_usage,
                                            request.return_token_ids), media_type="text/event-stream")
        texts: dict[int, list[str]] = {}
        ids: dict[int, list[int]] = {}
        finish: dict[int, str | None] = {}
        generated = 0
        first = True
        async for i, deltas in service.stream(prepared, sampling, rid):
            for d in deltas:
                if first and d.token_ids:
                    service.metrics.ttft.observe(time.perf_counter() - started)
                    first = False
                k = i * sampling.n + d.index
                texts.setdefault(k, []).append(d.text)
                ids.setdefault(k, []).extend(d.token_ids)
                generated += len(d.token_ids)
                if d.finish_reason is not None:
                    finish[k] = d.finish_reason
        body = envelope(kind, rid)
        usage = usage_of(prepared, generated).model_dump()
        outputs = {k: "".join(v) for k, v in sorted(texts.items())}
        if kind == "answer":
            text = outputs.get(0, "")
            return JSONResponse(body | {"answer": first_answer(text), "text": text, "finish_reason": finish.get(0),
                                        "usage": usage})
        choices = [choice(kind, k, text, finish.get(k), ids[k] if request.return_token_ids else None)
                   for k, text in outputs.items()]
        return JSONResponse(body | {"choices": choices, "usage": usage})

    async def events(kind: str, rid: str, prepared: list[Prepared], sampling: Sampling, started: float,
                     include_usage: bool, token_ids: bool) -> AsyncIterator[str]:
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind
        generated, first = 0, True
        opened: set[int] = set()
        try:
            async for i, deltas in service.stream(prepared, sampling, rid):
                choices = []
                for d in deltas:
                    k = i * sampling.n + d.index
                    if first and d.token_ids:
                        service.metrics.ttft.observe(time.perf_counter() - started)
                        first = False
                    generated += len(d.token_ids)
                    if kind == "chat.completion" and k not in opened:  # OpenAI's first chunk: the role alone
                        opened.add(k)
                        yield sse(envelope(chunk_kind, rid) | {"choices": [chunk_choice(kind, k, None, role=True)]})
                    if d.text or d.finish_reason is not None or (token_ids and d.token_ids):
                        choices.append(chunk_choice(kind, k, d, role=False, token_ids=token_ids))
                if choices:
                    yield sse(envelope(chunk_kind, rid) | {"choices": choices})
            if include_usage:
                yield sse(envelope(chunk_kind, rid) | {"choices": [], "usage": usage_of(prepared, generated).model_dump()})
        except ArcCompressError as e:
            yield sse(error_body(str(e), kind="server_error" if isinstance(e, EngineError) else "invalid_request_error"))
        except Exception as e:  # the stream has started: the error travels in it
            logger.exception("internal error while streaming %s", rid)
            yield sse(error_body(f"internal error ({type(e).__name__})", kind="server_error"))
        yield "data: [DONE]\n\n"

    def envelope(kind: str, rid: str) -> dict:
        return {"id": rid, "object": kind, "created": int(time.time()), "model": service.model_name}

    return app


def validation_message(errors: list[dict]) -> tuple[str | None, str]:
    """(the field, one message) for pydantic's errors: the most telling one (a value refused beats a union branch
    of another type), its location written as the field (`messages.0.content.1`), not as pydantic's union labels."""
    if errors and errors[0].get("type") == "json_invalid":
        return None, f"the body is not valid JSON: {errors[0].get('ctx', {}).get('error', errors[0]['msg'])}"
    telling = [e for e in errors if not e["type"].endswith("_type")] or errors
    error = max(telling, key=lambda e: len(e.get("loc", ())))
    loc, previous = [], None
    for x in error.get("loc", ()):
        label = isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool", "list", "dict", "none"))
        # a part's tag ("text", "document") follows its list index or the union's label
        tag = x in ("text", "document") and (isinstance(previous, int) or str(previous).startswith("tagged-union["))
        if not label and not tag and x != "body":
            loc.append(str(x))
        previous = x
    param = ".".join(loc) or None
    text = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        text = "unknown field (this API has no such option)"
    return param, f"{param or 'body'}: {text}"


def choice(kind: str, index: int, text: str, finish: str | None, token_ids: list[int] | None) -> dict:
    out: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
    if kind == "chat.completion":
        out["message"] = {"role": "assistant", "content": text}
    else:
        out["text"] = text
    return out if token_ids is None else out | {"token_ids": token_ids}


def chunk_choice(kind: str, index: int, delta: Delta | None, *, role: bool, token_ids: bool = False) -> dict:
    finish = delta.finish_reason if delta is not None else None
    out: dict[str, Any] = {"index": index, "finish_reason": None if role else finish, "logprobs": None}
    if kind == "chat.completion":
        out["delta"] = {"role": "assistant", "content": ""} if role else ({"content": delta.text} if delta.text else {})
    else:
        out["text"] = delta.text if delta else ""
    return out | {"token_ids": delta.token_ids} if token_ids and delta is not None else out


def usage_of(prepared: list[Prepared], generated: int) -> Usage:
    positions = sum(p.positions for p in prepared)
    saved = [p.positions_saved for p in prepared]
    return Usage(prompt_tokens=positions, completion_tokens=generated, total_tokens=positions + generated,
                 documents=sum(p.documents for p in prepared),
                 prompt_positions_saved=None if any(s is None for s in saved) else sum(saved))  # type: ignore[misc]


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
