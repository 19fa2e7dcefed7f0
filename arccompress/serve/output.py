"""Answers in OpenAI's shapes, from the engine's deltas: a whole answer, or server-sent events as they come.

Every generating endpoint answers the same way (`respond`): its prompts' sequences gathered from `Service.stream`
into one JSON body, or handed out as events (`data: {...}`, then `data: [DONE]`; an error met after the stream
started travels in it as an event in OpenAI's error schema). What differs between endpoints is a `Shape`: how a
sequence is written in a choice and in a chunk (`text` for completions, a `message`/`delta` for chat, whose stream
opens each sequence with its role alone), and what a whole answer holds (choices; the answer endpoint's own fields).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engines.base import Sampling
from ..engines.text import Delta
from ..errors import ArcCompressError, EngineError
from ..prompts import first_answer
from .protocol import SamplingFields, Usage, error_body
from .service import Prepared, Service

logger = logging.getLogger("arccompress.serve")


class Shape:
    """How an endpoint writes one sequence: `text` in its choices and chunks (completions)."""

    opens_with_role = False  # a stream's first chunk of each sequence holds its role alone (chat)

    def choice(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {"index": index, "finish_reason": finish, "logprobs": None, "text": text}

    def chunk(self, index: int, delta: Delta | None) -> dict[str, Any]:
        return {"index": index, "finish_reason": None if delta is None else delta.finish_reason, "logprobs": None,
                "text": "" if delta is None else delta.text}

    def whole(self, outputs: dict[int, str], finish: dict[int, str | None], ids: dict[int, list[int]] | None
              ) -> dict[str, Any]:
        """A whole answer's fields besides its envelope and usage: its choices (with their token ids, if asked)."""
        return {"choices": [self.choice(k, text, finish.get(k)) | ({} if ids is None else {"token_ids": ids[k]})
                            for k, text in outputs.items()]}


class ChatShape(Shape):
    """A chat completion's: an assistant `message`, and in a stream a `delta` after the role's own chunk."""

    opens_with_role = True

    def choice(self, index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {"index": index, "finish_reason": finish, "logprobs": None,
                "message": {"role": "assistant", "content": text}}

    def chunk(self, index: int, delta: Delta | None) -> dict[str, Any]:
        if delta is None:
            return {"index": index, "finish_reason": None, "logprobs": None,
                    "delta": {"role": "assistant", "content": ""}}
        return {"index": index, "finish_reason": delta.finish_reason, "logprobs": None,
                "delta": {"content": delta.text} if delta.text else {}}


class AnswerShape(Shape):
    """The paper's QA answer: streamed as a completion's text; whole, the answer read from it and the text."""

    def whole(self, outputs: dict[int, str], finish: dict[int, str | None], ids: dict[int, list[int]] | None
              ) -> dict[str, Any]:
        text = outputs.get(0, "")
        return {"answer": first_answer(text), "text": text, "finish_reason": finish.get(0)}


@dataclass(frozen=True)
class Kind:
    """What an endpoint's answers are called: their `object` whole and in a stream, and their ids' prefix."""

    object: str
    chunk_object: str
    id_prefix: str
    shape: Shape


async def respond(service: Service, kind: Kind, request: SamplingFields, prepared: list[Prepared],
                  sampling: Sampling) -> Response:
    """The answer to a generating request: whole, or a stream of events (`stream: true`)."""
    rid = f"{kind.id_prefix}-{uuid.uuid4().hex}"
    started = time.perf_counter()
    if request.stream:
        usage = bool(request.stream_options and request.stream_options.include_usage)
        return StreamingResponse(events(service, kind, rid, prepared, sampling, started, usage,
                                        request.return_token_ids), media_type="text/event-stream")
    texts: dict[int, list[str]] = {}
    ids: dict[int, list[int]] = {}
    finish: dict[int, str | None] = {}
    generated = 0
    async for i, deltas in service.stream(prepared, sampling, rid):
        for d in deltas:
            if generated == 0 and d.token_ids:
                service.metrics.ttft.observe(time.perf_counter() - started)
            k = i * sampling.n + d.index
            texts.setdefault(k, []).append(d.text)
            ids.setdefault(k, []).extend(d.token_ids)
            generated += len(d.token_ids)
            if d.finish_reason is not None:
                finish[k] = d.finish_reason
    outputs = {k: "".join(v) for k, v in sorted(texts.items())}
    body = envelope(service, kind.object, rid) | kind.shape.whole(outputs, finish, ids if request.return_token_ids
                                                                  else None)
    return JSONResponse(body | {"usage": usage_of(prepared, generated).model_dump()})


async def events(service: Service, kind: Kind, rid: str, prepared: list[Prepared], sampling: Sampling,
                 started: float, include_usage: bool, token_ids: bool) -> AsyncIterator[str]:
    """A generating request's server-sent events, as OpenAI's."""
    generated = 0
    opened: set[int] = set()
    try:
        async for i, deltas in service.stream(prepared, sampling, rid):
            choices = []
            for d in deltas:
                k = i * sampling.n + d.index
                if generated == 0 and d.token_ids:
                    service.metrics.ttft.observe(time.perf_counter() - started)
                generated += len(d.token_ids)
                if kind.shape.opens_with_role and k not in opened:  # OpenAI's first chunk: the role alone
                    opened.add(k)
                    yield sse(envelope(service, kind.chunk_object, rid) | {"choices": [kind.shape.chunk(k, None)]})
                if d.text or d.finish_reason is not None or (token_ids and d.token_ids):
                    choices.append(kind.shape.chunk(k, d) | ({"token_ids": d.token_ids} if token_ids else {}))
            if choices:
                yield sse(envelope(service, kind.chunk_object, rid) | {"choices": choices})
        if include_usage:
            yield sse(envelope(service, kind.chunk_object, rid) | {"choices": [],
                                                                    "usage": usage_of(prepared, generated).model_dump()})
    except ArcCompressError as e:
        yield sse(error_body(str(e), kind="server_error" if isinstance(e, EngineError) else "invalid_request_error"))
    except Exception as e:  # the stream has started: the error travels in it
        logger.exception("internal error while streaming %s", rid)
        yield sse(error_body(f"internal error ({type(e).__name__})", kind="server_error"))
    yield "data: [DONE]\n\n"


def envelope(service: Service, obj: str, rid: str) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": service.model_name}


def usage_of(prepared: list[Prepared], generated: int) -> Usage:
    positions = sum(p.positions for p in prepared)
    saved = [p.positions_saved for p in prepared]
    return Usage(prompt_tokens=positions, completion_tokens=generated, total_tokens=positions + generated,
                 documents=sum(p.documents for p in prepared),
                 prompt_positions_saved=None if any(s is None for s in saved) else sum(saved))  # type: ignore[misc]


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
