"""Bounded HTTP for the clients of engine servers: every request ends by its deadline, every answer is capped in
size and checked before use, and every failure is one exception naming the URL and what was wrong.

httpx bounds each socket operation, not a request: a server that sends one byte a second never trips a read
timeout, and a 200 MB answer is read whole. Here each exchange runs on a worker thread that hands the answer to
the caller in chunks through a small queue; the caller waits no longer than the deadline (for a stream: no
longer than the gap allowed between two chunks, and the deadline overall), then shuts the connection down and
raises. A body larger than `max_body_bytes` is refused from its Content-Length, or as soon as that many bytes
arrived.

    wire = Wire("http://localhost:8000/v1", timeout=30, server="vLLM server", error=VLLMServerError)
    listing = wire.get_json("/models")
    models = json_field(listing, "data", list, where=wire.url("/models"), error=VLLMServerError)
    reply = wire.post_json("/completions", {"model": "m", "prompt": "Hi"})
    for event in wire.post_events("/completions", {"model": "m", "prompt": "Hi", "stream": True}):
        ...                                    # each server-sent event's data, parsed as JSON, until [DONE]

`error` is the class every failure raises (a WireError subclass, so that each client raises its own).
"""

from __future__ import annotations

import json
import math
import queue
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from ...errors import EngineError, InputError
from ...extras import missing

try:
    import httpx
except ImportError as e:
    raise missing("client", "talking to a server (ServiceClient, VLLMClient)", e) from None

DEFAULT_MAX_BODY_BYTES = 32 << 20
SNIPPET = 120  # characters of a bad answer quoted in an error


def authorization(api_key: str | None) -> dict[str, str]:
    """The header that carries an API key (none without one)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class WireError(EngineError):
    """A server that could not be reached, refused a request, or answered something unusable."""


class Wire:
    """Requests to one server under `base_url`, each bounded by `timeout` seconds overall.

    headers: sent with every request (e.g. {"Authorization": "Bearer KEY"}). server: how messages name the
    server ("vLLM server"). error: the WireError subclass raised for every failure.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 600.0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        headers: Mapping[str, str] | None = None,
        server: str = "server",
        error: type[WireError] = WireError,
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise InputError(f"the server's URL must start with http:// or https://, not {base_url!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise InputError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise InputError(f"max_body_bytes must be a positive int, not {max_body_bytes!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = float(timeout)
        self.max_body_bytes = max_body_bytes
        self.server = server
        self.error = error
        # a connection per request: shutting one down at its deadline can never touch another request's
        self.client = httpx.Client(timeout=httpx.Timeout(self.timeout), headers=dict(headers or {}),
                                   follow_redirects=False, limits=httpx.Limits(max_keepalive_connections=0))

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests

    def get(self, path: str) -> bytes:
        """GET `path`; the body of a successful answer (a health check's, say)."""
        return self._request("GET", self.url(path), None)

    def get_json(self, path: str) -> Any:
        """GET `path`; the answer's JSON (any JSON value: check it with `json_field`)."""
        url = self.url(path)
        return parse_json(self._request("GET", url, None), url, self.error)

    def post_json(self, path: str, body: Any) -> Any:
        """POST `body` as JSON to `path`; the answer's JSON."""
        url = self.url(path)
        return parse_json(self._request("POST", url, body), url, self.error)

    def post_events(self, path: str, body: Any, *, gap: float | None = None) -> Iterator[Any]:
        """POST `body` as JSON and read the answer as server-sent events: each event's data parsed as JSON, until
        `data: [DONE]`. No more than `gap` seconds (default: the timeout) may pass between two chunks, nor the
        timeout in all; a stream that ends without [DONE] is an error (its text would be cut short)."""
        url = self.url(path)
        exchange = self._start("POST", url, body)
        deadline = time.monotonic() + self.timeout
        gap = self.timeout if gap is None else gap
        try:
            status, reason = self._head(exchange, url, deadline)
            if status >= 300:
                self._refused(status, reason, self._body(exchange, url, deadline), url)
            events = EventParser(self.max_body_bytes)
            while True:
                kind, value = exchange.next(min(gap, deadline - time.monotonic()))
                if kind == "timeout":
                    overall = deadline - time.monotonic() <= 0
                    raise self.error(f"{url}: the {self.server}'s stream " + (
                        f"did not finish within the {self.timeout:g} s timeout" if overall else
                        f"sent nothing for {gap:g} s"))
                if kind == "error":
                    raise self._failure(value, url)
                if kind == "end":
                    raise self.error(f"{url}: the {self.server}'s stream ended before its final 'data: [DONE]'")
                try:
                    for data in events.feed(value):
                        if data == "[DONE]":
                            return
                        yield parse_json(data, f"{url}, stream event", self.error)
                except EventStreamError as e:
                    raise self.error(f"{url}: {e}") from None
        finally:
            exchange.abort()

    def _request(self, method: str, url: str, body: Any) -> bytes:
        """The body of a successful answer, read whole within the deadline and the size cap."""
        exchange = self._start(method, url, body)
        deadline = time.monotonic() + self.timeout
        try:
            status, reason = self._head(exchange, url, deadline)
            data = self._body(exchange, url, deadline)
            if status >= 300:
                self._refused(status, reason, data, url)
            return data
        finally:
            exchange.abort()

    # ------------------------------------------------------------------ the parts of an exchange

    def _start(self, method: str, url: str, body: Any) -> Exchange:
        content = None
        headers = {"Accept": "application/json"}
        if body is not None:
            try:
                content = json.dumps(body, allow_nan=False).encode()
            except (TypeError, ValueError) as e:
                raise InputError(f"{url}: the request cannot be sent as JSON ({e})") from None
            headers["Content-Type"] = "application/json"
        request = self.client.build_request(method, url, content=content, headers=headers)
        return Exchange(self.client, request)

    def _head(self, exchange: Exchange, url: str, deadline: float) -> tuple[int, str]:
        kind, value = exchange.next(deadline - time.monotonic())
        if kind == "timeout":
            raise self.error(f"{url}: the {self.server} did not answer within the {self.timeout:g} s timeout")
        if kind == "error":
            raise self._failure(value, url)
        status, reason, length = value
        if length is not None and length > self.max_body_bytes:
            raise self.error(f"{url}: the {self.server}'s answer is {length} bytes, over the "
                             f"{self.max_body_bytes}-byte limit")
        return status, reason

    def _body(self, exchange: Exchange, url: str, deadline: float) -> bytes:
        chunks, size = [], 0
        while True:
            kind, value = exchange.next(deadline - time.monotonic())
            if kind == "end":
                return b"".join(chunks)
            if kind == "timeout":
                raise self.error(f"{url}: the {self.server}'s answer did not arrive within the {self.timeout:g} s "
                                 f"timeout ({size} bytes came)")
            if kind == "error":
                raise self._failure(value, url)
            size += len(value)
            if size > self.max_body_bytes:
                raise self.error(f"{url}: the {self.server}'s answer is over the {self.max_body_bytes}-byte limit")
            chunks.append(value)

    def _refused(self, status: int, reason: str, data: bytes, url: str) -> None:
        raise self.error(f"{url}: the {self.server} answered {status} {reason}".rstrip() + f": {error_message(data)}")

    def _failure(self, e: BaseException, url: str) -> WireError:
        if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
            return self.error(f"no {self.server} answers at {url} ({e or type(e).__name__})")
        if isinstance(e, httpx.TimeoutException):
            return self.error(f"{url}: the {self.server} did not answer within the {self.timeout:g} s timeout")
        return self.error(f"{url}: the exchange with the {self.server} failed ({type(e).__name__}: {e})")


class Exchange:
    """One HTTP exchange on a worker thread. The caller takes ("head", (status, reason, content length)), then
    ("data", bytes)..., then ("end", None) from `next` (or ("error", exception), or ("timeout", None) when nothing
    came in time); `abort` shuts the connection down so that the worker ends at once."""

    def __init__(self, client: Any, request: Any):
        self.client = client
        self.request = request
        self.queue: queue.Queue = queue.Queue(maxsize=64)  # a slow caller holds the worker back, not memory
        self.stopped = threading.Event()
        self.socket: socket.socket | None = None
        threading.Thread(target=self._run, daemon=True, name="arccompress-wire").start()

    def next(self, wait: float) -> tuple[str, Any]:
        try:
            return self.queue.get(timeout=max(wait, 0.0))
        except queue.Empty:
            return "timeout", None

    def abort(self) -> None:
        self.stopped.set()
        sock = self.socket
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a worker blocked in recv; closing is the worker's
            except OSError:
                pass

    def _put(self, item: tuple[str, Any]) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            response = self.client.send(self.request, stream=True)
            try:
                stream = response.extensions.get("network_stream")
                self.socket = stream.get_extra_info("socket") if stream is not None else None
                if self.stopped.is_set():
                    return
                length = response.headers.get("content-length")
                length = int(length) if length is not None and length.isdigit() else None
                if not self._put(("head", (response.status_code, response.reason_phrase, length))):
                    return
                for chunk in response.iter_bytes():
                    if not self._put(("data", chunk)):
                        return
            finally:
                response.close()
            self._put(("end", None))
        except BaseException as e:  # handed to the caller, who raises it as the wire's error
            if not self.stopped.is_set():
                self._put(("error", e))


class EventStreamError(ValueError):
    """A server-sent event stream that breaks the format or the size cap."""


class EventParser:
    """Server-sent events from bytes as they arrive: the data of each event (its `data:` lines joined by
    newlines); comments and other fields are skipped; an event over `max_bytes` is refused."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.buffer = bytearray()
        self.scanned = 0  # bytes of the buffer known to hold no newline
        self.data: list[bytes] = []
        self.size = 0

    def feed(self, chunk: bytes) -> list[str]:
        self.buffer += chunk
        events = []
        while True:
            end = self.buffer.find(b"\n", self.scanned)
            if end < 0:
                self.scanned = len(self.buffer)
                break
            line = bytes(self.buffer[:end]).rstrip(b"\r")
            del self.buffer[: end + 1]
            self.scanned = 0
            if not line:
                if self.data:
                    events.append(self._text(b"\n".join(self.data)))
                    self.data, self.size = [], 0
                continue
            name, _, value = line.partition(b":")
            if name == b"data":
                self.data.append(value[1:] if value.startswith(b" ") else value)
                self.size += len(value)
        if self.size + len(self.buffer) > self.max_bytes:
            raise EventStreamError(f"a stream event is over the {self.max_bytes}-byte limit")
        return events

    @staticmethod
    def _text(data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EventStreamError(f"a stream event is not UTF-8 text ({e})") from None


# ----------------------------------------------------------------------------- checking answers


def parse_json(data: bytes | str, where: str, error: type[WireError] = WireError) -> Any:
    """The JSON value in `data`; `error` naming `where` and quoting the start of `data` when it is not JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise error(f"{where}: the answer is not JSON ({e}); it starts {snippet(data)}") from None


def json_type(value: Any) -> str:
    """How JSON names the type of a parsed value, for messages."""
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (str, "a string"), ((int, float), "a number"), (list, "an array"),
                       (dict, "an object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def json_field(obj: Any, key: str, kind: type | tuple[type, ...], *, where: str, error: type[WireError] = WireError,
               optional: bool = False) -> Any:
    """obj[key], checked: `obj` a JSON object, the field present (or None when `optional` and absent or null),
    its value of `kind` (a boolean never passes for a number)."""
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object, found {json_type(obj)}")
    value = obj.get(key)
    if value is None:
        if optional:
            return None
        raise error(f"{where}: the field {key!r} is missing" + (" (null)" if key in obj else ""))
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(dict.fromkeys(json_type(k()) for k in kinds))
        raise error(f"{where}: the field {key!r} is {json_type(value)}, expected {expected}")
    return value


def int_list(value: Any, where: str, error: type[WireError] = WireError) -> list[int]:
    """`value` checked to be a JSON array of non-negative integers."""
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise error(f"{where}: expected an array of token ids (non-negative integers), found {snippet(value)}")
    return value


def error_message(data: bytes) -> str:
    """The message of an error answer: OpenAI's {"error": {"message"}}, {"message"} or {"detail"}, else its start."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        obj = None
    if isinstance(obj, dict):
        inner = obj.get("error")
        for candidate in ((inner.get("message") if isinstance(inner, dict) else inner), obj.get("message"),
                          obj.get("detail")):
            if isinstance(candidate, str) and candidate:
                return candidate[:2000]
    return snippet(data) if data else "(no message)"


def snippet(value: Any) -> str:
    """The start of a bad answer, for a message."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    return repr(text[:SNIPPET] + ("..." if len(text) > SNIPPET else ""))
