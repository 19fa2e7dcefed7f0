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
# \ud800-\udfff: ijson's parser makes a lone high one "?" and fails on a lone low one, so it reads "?" in their place
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
MAX_DEPTH = 64  # objects and arrays inside each other: the requests need 6; Python's own decoder recurses on them


class BodyError(InputError):
    """A body that is not JSON, or holds more values than allowed; `status` 400 or 413; `param` the field it names."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class Invalid(InputError):
    """A body that is JSON but not the request: pydantic's errors, for the app to word."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__("invalid request")
        self.errors = errors


def parse(body: bytes, max_values: int) -> Any:
    """The JSON value of `body`; BodyError once it holds more than `max_values` values (counted as they come),
    nests deeper than MAX_DEPTH, is not UTF-8, or holds a lone surrogate in any string."""
    events = ijson.sendable_list()
    parser = ijson.basic_parse_coro(events, use_float=True)
    builder = ijson.ObjectBuilder()
    count = depth = 0
    escaped = SURROGATE_ESCAPE.search(body) is not None
    read = SURROGATE_ESCAPE.sub(rb"\\u003f", body) if escaped else body  # same length: positions hold
    try:
        for start in range(0, len(read), SLICE):
            parser.send(read[start:start + SLICE])
            for event, value in events:
                if event in SCALARS or event in ("start_map", "start_array"):
                    count += 1
                    if count > max_values:
                        raise BodyError(f"the body holds more than {max_values} JSON values, over this service's "
                                        "limit", status=413)
                    if event[0] == "s" and event != "string":
                        depth += 1
                        if depth > MAX_DEPTH:
                            raise BodyError(f"the body nests objects and arrays more than {MAX_DEPTH} deep")
                elif event in ("end_map", "end_array"):
                    depth -= 1
                builder.event(event, value)
            events.clear()
        parser.close()
        for event, value in events:
            builder.event(event, value)
    except UnicodeDecodeError:
        raise BodyError(f"the body is not UTF-8: {_first_bad_byte(body)}") from None
    except ijson.JSONError as e:
        problem = " ".join(str(e).split())  # the parser's message and the place in the body, on one line
        if "integer overflow" in problem:
            problem = f"an integer beyond 64 bits ({problem})"
        raise BodyError(f"the body is not valid JSON: {problem[:200]}") from None
    if not hasattr(builder, "value"):
        raise BodyError("the body is empty: send a JSON object")
    if escaped:
        # decoded again, its size and depth now known to be bounded, by the standard library: a lone surrogate
        # stays one (ijson's would become "?"), to be refused by where it stands
        value = json.loads(body)
        _refuse_lone_surrogates(value, "")
        return value
    return builder.value


def _first_bad_byte(body: bytes) -> str:
    """Where `body` stops being UTF-8 (ijson's error names a place in one string, not in the body)."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"{e.reason} at byte {e.start:,}"
    return "a string that does not decode"


def _refuse_lone_surrogates(value: Any, where: str) -> None:
    """BodyError naming the first string (by its place in the body) that holds a lone surrogate, which no text
    can hold (UTF-8 cannot encode it): the fields that are text are refused here, all alike."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BodyError(f"{where or 'the body'}: a lone surrogate (\\u{ord(value[e.start]):04x}) at character "
                            f"{e.start:,}: JSON text must encode whole characters", param=where or None) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_lone_surrogates(key, f"{where}.{key!r}" if where else f"key {key!r}")
            _refuse_lone_surrogates(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_lone_surrogates(item, f"{where}[{i}]" if where else f"[{i}]")


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
