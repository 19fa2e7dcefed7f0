"""The service's routes, on one module-level router; each reads the service from the app's state.

    POST /v1/chat/completions   messages whose content may hold document parts, spliced after the chat template
    POST /v1/completions        prompt: a string, strings, or parts (strings, text parts, document parts)
    POST /v1/answer             the paper's few-shot QA format: question, documents, examples
    GET  /v1/models             the served model
    GET  /health                200 once the models are loaded
    GET  /metrics               Prometheus

The three generating endpoints are one table (`ENDPOINTS`): each row says which request it reads, how the service
prepares it, its default `max_tokens`, and what its answers are called and look like; one handler serves them all.
With an API key set, the /v1/ routes need `Authorization: Bearer <key>`, checked before the body is read.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from ..engines.base import Sampling
from .body import read
from .output import AnswerShape, ChatShape, Kind, Shape, respond
from .protocol import (AnswerChunk, AnswerRequest, AnswerResponse, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, CompletionChunk, CompletionRequest, CompletionResponse, ErrorResponse,
                       Health, ModelList, SamplingFields, quote)
from .refusals import RequestError, error_response
from .service import Prepared, Service

Prepare = Callable[[Service, Any, int | None], Awaitable[tuple[list[Prepared], Sampling]]]
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503, 504)}


@dataclass(frozen=True)
class Endpoint:
    """A generating endpoint: the request it reads, how the service prepares it (with the `max_tokens` it gets
    when the request names none; None: what the context leaves), and its answers (whole, and a stream's chunks)."""

    path: str
    request: type[SamplingFields]
    prepare: Prepare
    default_max_tokens: int | None
    kind: Kind
    response: type[BaseModel]
    chunk: type[BaseModel]


ENDPOINTS = (
    Endpoint("/v1/completions", CompletionRequest, Service.prepare_completion, 16,
             Kind("text_completion", "text_completion", "cmpl", Shape()), CompletionResponse, CompletionChunk),
    Endpoint("/v1/chat/completions", ChatCompletionRequest, Service.prepare_chat, None,
             Kind("chat.completion", "chat.completion.chunk", "chatcmpl", ChatShape()), ChatCompletionResponse,
             ChatCompletionChunk),
    Endpoint("/v1/answer", AnswerRequest, Service.prepare_answer, 64,
             Kind("answer", "answer", "answer", AnswerShape()), AnswerResponse, AnswerChunk),
)
ROUTES = (*(e.path for e in ENDPOINTS), "/v1/models", "/health", "/metrics")


def service_of(request: Request) -> Service:
    return request.app.state.service


async def authorize(request: Request) -> None:
    """The API key, when the service has one: 401 without it."""
    key = service_of(request).config.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise RequestError("a valid API key is needed: Authorization: Bearer <key>" if given else
                           "this service needs an API key: Authorization: Bearer <key>", status=401)


def ready(request: Request) -> Service:
    service = service_of(request)
    if not service.ready:
        raise RequestError("the service is starting or stopping", status=503)
    return service


def check_model(service: Service, name: str | None) -> None:
    if name is not None and name != service.model_name:
        raise RequestError(f"the model {quote(name)} does not exist; this service serves {quote(service.model_name)}",
                           param="model", status=404)


def handler(endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    """The route of a generating endpoint: its body read within the limits, off the event loop, then prepared and
    answered."""

    async def generate(http: Request) -> Response:
        service = ready(http)
        request = await read(endpoint.request, await http.body(), service.limits.max_json_values)
        check_model(service, request.model)
        prepared, sampling = await endpoint.prepare(service, request, endpoint.default_max_tokens)
        return await respond(service, endpoint.kind, request, prepared, sampling)

    return generate


router = APIRouter()
for endpoint in ENDPOINTS:
    router.add_api_route(endpoint.path, handler(endpoint), methods=["POST"], dependencies=[Depends(authorize)],
                         responses=ERRORS | {200: {"model": endpoint.response}})


@router.get("/health", responses={200: {"model": Health}, 503: {"model": ErrorResponse}})
async def health(request: Request) -> JSONResponse:
    service = service_of(request)
    if not service.ready:
        return error_response(503, "starting or stopping")
    return JSONResponse({"status": "ok", "model": service.model_name, "backend": service.config.backend})


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    """This service's metrics, or every replica's (`app.state.scrape`, under Ray Serve)."""
    scrape = request.app.state.scrape
    text = await scrape() if scrape is not None else generate_latest(service_of(request).metrics.registry)
    return Response(text, media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", dependencies=[Depends(authorize)], responses={200: {"model": ModelList}} | ERRORS)
async def models(request: Request) -> dict:
    s = ready(request)
    return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": 0, "owned_by": "arccompress",
                                        "max_model_len": s.engine.max_model_len, "arccompress": s.describe()}]}
