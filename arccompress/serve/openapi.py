"""The service's OpenAPI schema, as clients and fuzzers read it: what FastAPI cannot see for itself.

The routes read their bodies themselves (`body`), so their request models are declared here; a generating route
answers JSON or, with `stream: true`, server-sent events, whose every event is declared too (OpenAPI before 3.2: the
media type's schema is one event; its `data` is a JSON chunk, an error, or `[DONE]`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .protocol import ErrorResponse

REF = "#/components/schemas/{model}"


def event_stream(chunk: type[BaseModel]) -> dict[str, Any]:
    """The schema of one server-sent event of a stream of `chunk`s."""
    json_data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {
        "anyOf": [{"$ref": REF.format(model=chunk.__name__)}, {"$ref": REF.format(model=ErrorResponse.__name__)}]}}
    return {"type": "object", "required": ["data"],
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data]}, "event": {"type": "string"}}}


def declare(app: FastAPI, bodies: dict[str, type[BaseModel]], streams: dict[str, type[BaseModel]]) -> None:
    """Write each POST route's request model (by path) into the app's OpenAPI schema, as a body parameter would,
    and the events of its stream (`streams`: the chunk model by path)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        models = [*bodies.values(), *streams.values()]
        refs, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        for path, model in bodies.items():
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": refs[(model, "validation")]}}}
        for path, chunk in streams.items():
            answer = schema["paths"][path]["post"]["responses"]["200"]["content"]
            answer["text/event-stream"] = {"schema": event_stream(chunk)}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
