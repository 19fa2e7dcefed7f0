"""VLLMClient and the bounded HTTP under it (arccompress.engines.remote.http) against a local fake server that answers garbage,
the wrong schema, errors, dribbles or floods: each is one VLLMServerError naming the URL and the problem, in
bounded time, and the client stays usable. No vLLM needed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from arccompress import Compressor, ContextText
from arccompress.engines import VLLMClient, VLLMServerError
from arccompress.engines.remote.http import EventParser, EventStreamError, Wire, WireError, authorization, json_field
from arccompress.engines.remote.vllm_server import check_shape
from arccompress.errors import InputError

MODELS = {"object": "list", "data": [{"id": "tiny", "object": "model", "max_model_len": 512}]}


def completion(n: int = 1, text: str = "Paris.") -> dict:
    return {"choices": [{"index": k, "text": text, "finish_reason": "stop", "token_ids": [80, 97, 2]} for k in range(n)]}


def stream_events(*events: object, done: bool = True) -> bytes:
    body = b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)
    return body + (b"data: [DONE]\n\n" if done else b"")


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: dict = {}
        self.requests: list = []
        self.reset()

    def reset(self) -> None:
        self.routes = {"/v1/models": ok(MODELS), "/v1/completions": ok(completion())}
        self.requests = []


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # quiet
        pass

    def handle_any(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.requests.append((self.path, body))
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        try:
            route(self, body)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the client hung up: what the tests want of it

    do_GET = do_POST = handle_any


def ok(payload: object, status: int = 200):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()

    def route(h: Handler, body: object) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return route


def sse(data: bytes):
    def route(h: Handler, body: object) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.end_headers()
        h.wfile.write(data)
        h.wfile.flush()

    return route


def dribble(first: bytes = b"", *, length: int | None = 1000, event_stream: bool = False, seconds: int = 30):
    """Headers, `first`, then one byte a second for up to `seconds`."""
    def route(h: Handler, body: object) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream" if event_stream else "application/json")
        if length is not None:
            h.send_header("Content-Length", str(length))
        h.end_headers()
        h.wfile.write(first)
        h.wfile.flush()
        for _ in range(seconds):
            time.sleep(1)
            h.wfile.write(b" ")
            h.wfile.flush()

    return route


def silent(seconds: int = 30):
    def route(h: Handler, body: object) -> None:
        time.sleep(seconds)

    return route


def flood(total: int, *, declare: bool):
    """A body of `total` bytes, declared in Content-Length or sent without it (read until the connection closes)."""
    def route(h: Handler, body: object) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        if declare:
            h.send_header("Content-Length", str(total))
        h.end_headers()
        block = b"x" * (1 << 20)
        for _ in range(total // len(block)):
            h.wfile.write(block)

    return route


@pytest.fixture(scope="module")
def server():
    srv = FakeServer()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def url(server):
    """The fake server's base URL, its routes reset to a well-behaved vLLM server's."""
    server.reset()
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture(scope="module")
def comp(tiny_dir) -> Compressor:
    return Compressor.from_pretrained(tiny_dir / "hub")


@pytest.fixture(scope="module")
def shared_client(server, comp, tiny_dir) -> VLLMClient:
    server.reset()
    return VLLMClient(f"http://127.0.0.1:{server.server_address[1]}/v1", compressor=comp,
                      decoder=tiny_dir / "llama-decoder", timeout=2)


@pytest.fixture
def client(shared_client, url) -> VLLMClient:
    shared_client.max_concurrency = 32
    return shared_client


PROMPT = ["Document: ", ContextText("The Loire is long."), "\nAnswer:"]


def test_a_well_behaved_server_is_read_as_vllm_answers(client, server, url):
    assert client.model == "tiny" and client.max_model_len == 512
    assert client.generate(PROMPT, max_new_tokens=4, stop="x", seed=3, top_k=5) == "Paris."
    assert client.generate_ids(PROMPT, max_new_tokens=4) == [[80, 97]]  # EOS (2) dropped
    path, body = server.requests[-1]
    assert path == "/v1/completions" and body["model"] == "tiny" and body["return_token_ids"] is True
    assert body["max_tokens"] == 4 and isinstance(body["prompt_embeds"], str) and "prompt" not in body
    server.requests.clear()
    client.generate(PROMPT, max_new_tokens=4, stop="x", seed=3, top_k=5)
    assert {k: server.requests[0][1][k] for k in ("stop", "seed", "top_k", "temperature")} == \
        {"stop": ["x"], "seed": 3, "top_k": 5, "temperature": 0.0}
    server.routes["/v1/completions"] = ok(completion(n=2))
    assert client.generate(PROMPT, n=2, temperature=1.0) == ["Paris.", "Paris."]
    assert server.requests[-1][1]["n"] == 2
    server.routes["/v1/completions"] = ok(completion(n=1))
    assert client.generate(PROMPT, n=3) == ["Paris."] * 3  # greedy: one sequence asked for (vLLM refuses n > 1)
    assert server.requests[-1][1]["n"] == 1
    server.routes["/v1/completions"] = sse(stream_events(
        {"choices": [{"index": 0, "text": "Par", "token_ids": [80]}]}, {"choices": []},
        {"choices": [{"index": 0, "text": "is.", "token_ids": [97, 2], "finish_reason": "stop"}]}))
    assert list(client.stream(PROMPT, max_new_tokens=4)) == ["Par", "is."]
    timed = client.complete([PROMPT], client.sampling(max_new_tokens=4), time_prefill=True)[0]
    assert timed.texts == ["Paris."] and timed.token_ids == [[80, 97]] and timed.finish_reasons == ["stop"]
    assert timed.prefill_seconds is not None and timed.prefill_seconds < 2
    assert server.requests[-1][1]["stream"] is True
    d = client.describe()
    assert d["backend"] == "vllm-server" and d["model"] == "tiny" and d["server"] == url


@pytest.mark.parametrize("payload, message", [
    (b"<html>not json</html>", r"not JSON .*it starts '<html>not json"),
    ([1, 2], "expected a JSON object, found an array"),
    ({"data": "tiny"}, "the field 'data' is a string, expected an array"),
    ({"data": [{"name": "tiny"}]}, r"data\[0\]: the field 'id' is missing"),
    ({"data": [{"id": 5}]}, r"data\[0\]: the field 'id' is a number, expected a string"),
    ({"data": [{"id": "tiny", "max_model_len": "long"}]}, "'max_model_len' is a string"),
    ({"data": []}, "lists no model"),
])
def test_a_bad_model_list_is_named(server, url, comp, tiny_dir, payload, message):
    server.routes["/v1/models"] = ok(payload)
    with pytest.raises(VLLMServerError, match=message) as e:
        VLLMClient(url, compressor=comp, decoder=tiny_dir / "llama-decoder", timeout=2)
    assert f"{url}/models" in str(e.value)


@pytest.mark.parametrize("route, message", [
    (ok(b"{not json"), "not JSON"),
    (ok(b"\xff\xfe garbage"), "not JSON"),
    (ok({"choices": []}), r"choices are \[\], not the 1 sequences"),
    (ok({"result": "Paris"}), "the field 'choices' is missing"),
    (ok({"choices": [None]}), r"choices\[0\]: expected a JSON object, found null"),
    (ok({"choices": [{"index": 0, "text": 5, "token_ids": []}]}), "the field 'text' is a number, expected a string"),
    (ok({"choices": [{"index": 0, "text": "a"}]}), "the field 'token_ids' is missing"),
    (ok({"choices": [{"index": 0, "text": "a", "token_ids": ["x"]}]}), "expected an array of token ids"),
    (ok({"choices": [{"index": 4, "text": "a", "token_ids": [1]}]}), "index 4 is not one of the 1 sequences"),
    (ok({"choices": [{"index": True, "text": "a", "token_ids": [1]}]}), "'index' is a boolean, expected a number"),
    (ok({"error": {"message": "the engine died", "type": "InternalServerError"}}, 500),
     "answered 500 Internal Server Error: the engine died"),
    (ok(b"<html>Bad Gateway</html>", 502), "answered 502 Bad Gateway: '<html>Bad Gateway</html>'"),
    (ok({"object": "error", "message": "prompt_embeds has hidden_size 32"}, 400), "answered 400 Bad Request: .*hidden_size"),
])
def test_a_bad_completion_is_named_and_the_client_stays_usable(client, server, url, route, message):
    server.routes["/v1/completions"] = route
    with pytest.raises(VLLMServerError, match=message) as e:
        client.generate(PROMPT, max_new_tokens=4)
    assert f"{url}/completions" in str(e.value)
    server.reset()
    assert client.generate(PROMPT, max_new_tokens=4) == "Paris."


@pytest.mark.parametrize("route, message", [
    (dribble(b'{"choices": '), "did not arrive within the 2 s timeout"),  # one byte a second, forever
    (dribble(b'{"choices": ', length=None), "did not arrive within the 2 s timeout"),
    (silent(), "did not answer within the 2 s timeout"),
    (flood(200_000_000, declare=True), "200000000 bytes, over the 33554432-byte limit"),
    (flood(200_000_000, declare=False), "over the 33554432-byte limit"),
])
def test_a_slow_or_huge_answer_ends_in_bounded_time(client, server, route, message):
    server.routes["/v1/completions"] = route
    start = time.monotonic()
    with pytest.raises(VLLMServerError, match=message):
        client.generate(PROMPT, max_new_tokens=4)
    assert time.monotonic() - start < 4  # timeout=2: the deadline of the whole request


@pytest.mark.parametrize("route, message", [
    (sse(b"data: {garbage\n\n"), "stream event: the answer is not JSON"),
    (sse(stream_events({"choices": [{"index": 0, "text": 7}]})), "'text' is a number"),
    (sse(stream_events({"choices": [{"index": 0, "text": "a"}]}, done=False)), r"ended before its final 'data: \[DONE\]'"),
    (dribble(b'data: {"choices": [{"index": 0, "text": "a"}]}\n\n', length=None, event_stream=True),
     "did not finish within the 2 s timeout"),
    (sse(b"data: " + b"x" * (33 << 20)), "stream event is over the 33554432-byte limit"),
    (ok({"error": {"message": "no"}}, 503), "answered 503 Service Unavailable: no"),
])
def test_a_bad_stream_is_named_in_bounded_time(client, server, url, route, message):
    server.routes["/v1/completions"] = route
    for call in (lambda: list(client.stream(PROMPT, max_new_tokens=4)),
                 lambda: client.complete([PROMPT], client.sampling(max_new_tokens=4), time_prefill=True)):
        start = time.monotonic()
        with pytest.raises(VLLMServerError, match=message) as e:
            call()
        assert time.monotonic() - start < 4 and f"{url}/completions" in str(e.value)


def test_a_stream_gap_is_bounded_apart_from_the_deadline(server, url):
    server.routes["/v1/completions"] = dribble(b"data: {}\n\n", length=None, event_stream=True)
    wire = Wire(url, timeout=30, error=VLLMServerError)
    start = time.monotonic()
    events = wire.post_events("/completions", {"stream": True}, gap=0.5)
    assert next(events) == {}
    with pytest.raises(VLLMServerError, match="sent nothing for 0.5 s"):
        next(events)  # the dribbled spaces are a second apart
    assert time.monotonic() - start < 3


def test_no_server_and_bad_settings(comp, tiny_dir, url, server):
    start = time.monotonic()
    with pytest.raises(VLLMServerError, match=r"no vLLM server answers at http://127.0.0.1:9/v1/models"):
        VLLMClient("http://127.0.0.1:9/v1", compressor=comp, decoder=tiny_dir / "llama-decoder", timeout=2)
    assert time.monotonic() - start < 4
    with pytest.raises(ValueError, match="http:// or https://"):
        VLLMClient("127.0.0.1:8000", compressor=comp, decoder=tiny_dir / "llama-decoder")
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        VLLMClient(url, compressor=comp, decoder=tiny_dir / "llama-decoder", timeout=0)
    with pytest.raises(ValueError, match="does not serve 'other'"):
        VLLMClient(url, compressor=comp, decoder=tiny_dir / "llama-decoder", model="other")
    server.routes["/v1/models"] = ok({"data": [{"id": "a"}, {"id": "b"}]})
    with pytest.raises(ValueError, match=r"serves \['a', 'b'\]: choose one with model="):
        VLLMClient(url, compressor=comp, decoder=tiny_dir / "llama-decoder")


def test_many_prompts_stop_at_the_first_failure(client, server):
    calls = []

    def failing(h: Handler, body: object) -> None:
        calls.append(1)
        ok({"error": {"message": "down"}}, 500)(h, body)

    server.routes["/v1/completions"] = failing
    client.max_concurrency = 2
    with pytest.raises(VLLMServerError, match="down"):
        client.generate([PROMPT] * 40, max_new_tokens=2)
    assert len(calls) < 40  # the prompts not yet sent are not sent


def test_event_parser_and_field_checks():
    p = EventParser(100)
    assert p.feed(b"data: a\r\n") == [] and p.feed(b": comment\nevent: x\ndata: b\n\ndata: c") == ["a\nb"]
    assert p.feed(b"\n\n") == ["c"]
    with pytest.raises(EventStreamError, match="over the 100-byte limit"):
        EventParser(100).feed(b"data: " + b"x" * 200)
    with pytest.raises(WireError, match="here: the field 'n' is a boolean, expected a number"):
        json_field({"n": True}, "n", int, where="here")
    assert json_field({"n": None}, "n", int, where="here", optional=True) is None


def test_cli_ask_against_a_garbage_server_is_one_line(server, url, tiny_dir):
    server.routes["/v1/completions"] = ok(b"garbage")
    out = subprocess.run([sys.executable, "-m", "arccompress.cli", "ask", "--encoder", str(tiny_dir / "hub"),
                          "--decoder", str(tiny_dir / "llama-decoder"), "--server", url, "--text", "a document",
                          "--question", "q?", "--max-new-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and f"{url}/completions: the answer is not JSON" in out.stderr


def test_prompt_embeddings_of_a_wrong_shape_are_refused_before_sending():
    """One check for the vLLM client and the fleet: (positions, hidden), at least one position; the place named."""
    check_shape(torch.zeros(3, 8), 8, "prompt 0")
    for shape in [(3, 7), (0, 8), (8,), (1, 3, 8)]:
        with pytest.raises(InputError, match=r"^prompt 2: prompt embeddings must be \(positions, 8\), not "
                                             + re.escape(str(list(shape)))):
            check_shape(torch.zeros(shape), 8, "prompt 2")
    assert authorization("k") == {"Authorization": "Bearer k"} and authorization(None) == authorization("") == {}
