"""A request's life in the service, as ASGI middlewares: counted and timed (`RequestMetrics`), its body read within
the size limit (`BodyLimit`), admitted or shed, cancelled when its client leaves, stopped when it runs out of time
(`RequestLifetime`).

- Load shedding: at most `max_requests` API requests are held at once (compressing, waiting or generating); one
  more is refused at once with 503 and `Retry-After`, in OpenAI's error schema, rather than queued without bound.
  A request counts from the moment its body has arrived (a client that uploads slowly holds no slot).
- Cancellation: once the body is read, the client's connection is watched; when it closes, the request's
  handler is cancelled wherever it is (waiting for a batch, generating, streaming), which cancels its generation
  on the engine within a step, streamed or not.
- Deadline: a request still running `timeout` seconds after its body arrived is cancelled the same way; its client
  gets a 504 in OpenAI's error schema, or, when its stream had started, an error event and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import JSONResponse

from .metrics import Metrics
from .protocol import error_body

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]
RETRY_AFTER_S = 1


class RequestLifetime:
    """ASGI middleware for the API's requests (POST under /v1/); below the body limit, which has read the body."""

    def __init__(self, app: ASGIApp, *, max_requests: int, timeout: float | None, metrics: Metrics):
        self.app, self.max_requests, self.timeout, self.metrics = app, max_requests, timeout, metrics
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_requests:
            self.metrics.shed.inc()
            message = (f"this service holds {self.max_requests} requests already (--max-queued-requests): try again "
                       f"in {RETRY_AFTER_S} s")
            refusal = JSONResponse(error_body(message, kind="service_unavailable", code=503), status_code=503,
                                   headers={"Retry-After": str(RETRY_AFTER_S)})
            return await refusal(scope, receive, send)
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            await self._run(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    async def _run(self, scope: Scope, receive: Callable, send: Callable) -> None:
        gone = asyncio.Event()
        watcher: asyncio.Task | None = None
        body_read = False
        response = {"started": False, "stream": False, "ended": False}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        async def app_receive() -> dict:
            """The body; after it, a disconnect when the client has gone (the watcher alone reads the socket)."""
            nonlocal body_read, watcher
            if not body_read:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    return message
                if not message.get("more_body", False):
                    body_read = True
                    watcher = asyncio.create_task(watch())
                return message
            await gone.wait()
            return {"type": "http.disconnect"}

        async def app_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                response["started"] = True
                headers = dict(message.get("headers", []))
                response["stream"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                response["ended"] = True
            await send(message)

        task = asyncio.create_task(self.app(scope, app_receive, app_send))
        left = asyncio.create_task(gone.wait())
        try:
            done, _ = await asyncio.wait({task, left}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if gone.is_set():
                self.metrics.cancelled.labels("disconnect").inc()
                return
            self.metrics.cancelled.labels("timeout").inc()
            await self._timed_out(scope, receive, send, response)
        finally:
            left.cancel()
            if watcher is not None:
                watcher.cancel()

    async def _timed_out(self, scope: Scope, receive: Callable, send: Callable, response: dict) -> None:
        message = (f"the request ran past this service's time limit of {self.timeout:g} s (--request-timeout) and "
                   "was stopped")
        body = error_body(message, kind="timeout_error", code=504)
        if not response["started"]:
            await JSONResponse(body, status_code=504)(scope, receive, send)
        elif response["stream"] and not response["ended"]:
            events = f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"
            await send({"type": "http.response.body", "body": events.encode(), "more_body": False})


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 before the app reads any of it (by its
    Content-Length, or while it arrives when chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = JSONResponse(error_body(f"the request body is larger than this service's limit of {self.max_bytes} "
                                          "bytes", code=413), status_code=413)
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

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: tuple[str, ...]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        endpoint = scope["path"] if scope["path"] in self.paths else "other"

        async def observe(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            m = self.metrics
            m.requests.labels(endpoint, str(status)).inc()
            if endpoint.startswith("/v1/"):
                m.latency.labels(endpoint).observe(time.perf_counter() - start)
