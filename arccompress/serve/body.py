"""Request bodies: JSON read within a budget of values, validated into the request models, declared in OpenAPI.

Parsing a JSON body and validating it are C work that holds the interpreter for as long as they run: 16 MB of
tiny values would hold it for seconds, and the event loop (`/health` included) with it. Here a body is parsed in
a worker thread by ijson's C parser, a slice at a time, and refused as soon as it holds more values than the
service's limit; only a body within the limit is validated by pydantic, so no step holds the interpreter long.
The routes read their bodies this way rather than through FastAPI's parameters (`openapi` declares the request
models in the schema as FastAPI would have).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, TypeVar

import ijson
from pydantic import BaseModel, ValidationError

from ..errors import InputError

Model = TypeVar("Model", bound=BaseModel)
SLICE = 1 << 16  # bytes the parser takes in one call
SCALARS = ("null", "boolean", "integer", "double", "number", "string")
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800-\udfff: ijson's parser would make a lone one "?"


class BodyError(InputError):
    """A body that is not JSON, or holds more values than allowed; `status` 400 or 413."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Invalid(InputError):
    """A body that is JSON but not the request: pydantic's errors, for the app to word."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__("invalid request")
        self.errors = errors


def parse(body: bytes, max_values: int) -> Any:
    """The JSON value of `body`; BodyError once it holds more than `max_values` values (counted as they come)."""
    events = ijson.sendable_list()
    parser = ijson.basic_parse_coro(events, use_float=True)
    builder = ijson.ObjectBuilder()
    count = 0
    try:
        for start in range(0, len(body), SLICE):
            parser.send(body[start:start + SLICE])
            for event, value in events:
                if event in SCALARS or event in ("start_map", "start_array"):
                    count += 1
                    if count > max_values:
                        raise BodyError(f"the body holds more than {max_values} JSON values, over this service's "
                                        "limit", status=413)
                builder.event(event, value)
            events.clear()
        parser.close()
        for event, value in events:
            builder.event(event, value)
    except ijson.JSONError as e:
        problem = " ".join(str(e).split())  # the parser's message and the place in the body, on one line
        if "integer overflow" in problem:
            problem = f"an integer beyond 64 bits ({problem})"
        raise BodyError(f"the body is not valid JSON: {problem[:200]}") from None
    if not hasattr(builder, "value"):
        raise BodyError("the body is empty: send a JSON object")
    if SURROGATE_ESCAPE.search(body):
        # decoded again, its size now known to be bounded, by the standard library: a lone surrogate stays one,
        # for the text checks to refuse by position, instead of becoming "?"
        return json.loads(body)
    return builder.value


def validate(model: type[Model], body: bytes, max_values: int) -> Model:
    """`body` as a `model` request (in the calling thread): BodyError, or Invalid with pydantic's errors."""
    value = parse(body, max_values)
    if not isinstance(value, dict):
        raise BodyError(f"the body must be a JSON object, not {type(value).__name__}")
    try:
        return model.model_validate(value)
    except ValidationError as e:
        raise Invalid(e.errors(include_url=False, include_input=False)) from None


async def read(model: type[Model], body: bytes, max_values: int) -> Model:
    """`validate` in a worker thread: the event loop keeps serving while a body is read."""
    return await asyncio.to_thread(validate, model, body, max_values)
