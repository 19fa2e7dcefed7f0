"""How the service refuses and fails: every answer that is not a success is one JSON body in OpenAI's error schema
(`{"error": {"message", "type", "param", "code"}}`), naming the field where there is one, quoting input briefly.

`RequestError` is what the service raises for a request it refuses (with its HTTP status and field);
`add_error_handlers` turns every exception a route can meet into such an answer: a refusal of ours, pydantic's
validation errors worded as the field they name, Starlette's own refusals (an unknown path, a method), an engine's
failure, and anything else (a 500 that says the service keeps serving, its traceback in the log).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import ArcCompressError, ContextNotFoundError, EngineError, InputError, UnavailableError
from ..tokenization import check_text
from .body import BodyError, Invalid
from .protocol import QUOTE_CHARS, error_body, quote

logger = logging.getLogger("arccompress.serve")
KINDS = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error", 503: "service_unavailable",
         504: "timeout_error"}


class RequestError(InputError):
    """A request the service refuses, with the HTTP status and the field to name in OpenAI's error schema."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


def check_text_or_refuse(text: str, where: str) -> str:
    """Text the tokenizers can take (no lone surrogates), else a 400 naming where it is."""
    try:
        return check_text(text, where)
    except InputError as e:
        raise RequestError(str(e), param=where) from None


def error_response(status: int, message: str, *, param: str | None = None, kind: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    kind = kind or KINDS.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(error_body(message, kind=kind, param=param, code=status), status_code=status, headers=headers)


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
            loc.append(str(x) if len(str(x)) <= QUOTE_CHARS else quote(str(x)))  # a client's key, quoted briefly
        previous = x
    param = ".".join(loc) or None
    text = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        text = "unknown field (this API has no such option)"
    return param, f"{param or 'body'}: {text}"


async def invalid_body(request: Request, exc: Invalid) -> JSONResponse:
    param, message = validation_message(exc.errors)
    return error_response(400, message, param=param)


async def unreadable_body(request: Request, exc: BodyError) -> JSONResponse:
    return error_response(exc.status, str(exc), param=exc.param)


async def starlette_refusal(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (an unknown path, a method) in OpenAI's schema."""
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {quote(request.url.path)}"
    elif exc.status_code == 405:
        allowed = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow", "?")
        message = f"{quote(request.url.path)} does not take {request.method} (allowed: {allowed})"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, headers=exc.headers)


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


async def failed(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("internal error on %s", request.url.path)
    return error_response(500, f"internal error ({type(exc).__name__}); the service keeps serving")


def add_error_handlers(app: FastAPI) -> None:
    """Every exception a route can meet, answered in OpenAI's error schema."""
    for kind, handler in ((Invalid, invalid_body), (BodyError, unreadable_body), (HTTPException, starlette_refusal),
                          (ArcCompressError, refused), (Exception, failed)):
        app.add_exception_handler(kind, handler)  # type: ignore[arg-type]
