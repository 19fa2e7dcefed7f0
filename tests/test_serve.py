"""`arccompress serve` as clients meet it: a real server process on 127.0.0.1, the official openai client.

The transformers backend runs here; the vLLM backend's twin of these tests is tests/test_serve_vllm.py (vLLM env).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from arccompress import Compressor, ContextStore, ContextText, Generator, fewshot_qa_prompt
from arccompress.tiny import build_tiny_decoder, build_tiny_encoder

KEY = "test-key-123"
DOCS = {
    "loire": "The Loire is the longest river in France, flowing 1,006 km from the Massif Central to the Atlantic.",
    "blanc": "Mont Blanc, at 4,806 metres, is the highest mountain in the Alps and in Western Europe.",
    "paris": "Paris is the capital of France; the Seine flows through it from east to west.",
    "rhone": "The Rhone rises in the Swiss Alps, crosses Lake Geneva and reaches the Mediterranean near Marseille.",
}
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def with_chat_template(decoder: Path) -> Path:
    """The tiny decoder's folder, its tokenizer given CHAT_TEMPLATE."""
    config = json.loads((decoder / "tokenizer_config.json").read_text())
    (decoder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CHAT_TEMPLATE}))
    return decoder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, output: Callable[[], str]) -> None:
    """Until the server at `url` answers /health with 200; AssertionError with its `output()` if it exits first or
    is not ready in `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{output()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server was not ready in {timeout} s:\n{output()}")


class Server:
    """`arccompress serve ...` in a subprocess on a free port; `stop()` sends SIGTERM and waits (bounded)."""

    def __init__(self, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"arccompress-serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "arccompress.cli", "serve", "--port", str(self.port),
                                      *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 120) -> Server:
        wait_healthy(self.proc, self.url, timeout, self.output)
        return self

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.text = self.output()  # all it printed, to its exit
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-models")
    encoder = build_tiny_encoder(root / "encoder", seed=7)
    decoder = build_tiny_decoder(root / "decoder", family="llama", seed=8)
    chat = with_chat_template(build_tiny_decoder(root / "chat-decoder", family="llama", seed=8))
    comp = Compressor.from_pretrained(encoder, device="cpu")
    store = ContextStore(root / "store", compressor=comp)
    store.add_many(list(DOCS), comp.compress(list(DOCS.values())))
    store.close()
    return {"encoder": encoder, "decoder": decoder, "chat": chat, "store": root / "store", "comp": comp}


@pytest.fixture(scope="module")
def server(models):
    srv = Server("--encoder", str(models["encoder"]), "--decoder", str(models["chat"]), "--store",
                 str(models["store"]), "--api-key", KEY, "--max-documents", "8", "--max-body-bytes", "200000",
                 "--served-model-name", "tiny", "--batch-window-ms", "20")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(models):
    """The same decoder in process, reading the same contexts: what the service must answer."""
    store = ContextStore(models["store"], compressor=models["comp"])
    gen = Generator.from_pretrained(models["chat"], compressor=models["comp"])
    return gen, store


def doc_text(key: str, chunk_size: int | None = None) -> dict:
    part = {"type": "document", "text": DOCS[key]}
    return part | ({"chunk_size": chunk_size} if chunk_size else {})


def doc_id(key: str) -> dict:
    return {"type": "document", "id": key}


def greedy_cases(store) -> list[tuple[list, list]]:
    """Prompts as the wire carries them (documents as text, as stored ids, chunked, text parts) and the same prompts
    as the in-process Generator reads them: every backend's greedy text must equal the Generator's."""
    return [
        (["Document: ", doc_text("loire"), "\nQuestion: How long is the Loire?\nAnswer:"],
         ["Document: ", ContextText(DOCS["loire"]), "\nQuestion: How long is the Loire?\nAnswer:"]),
        (["Document: ", doc_id("blanc"), "\nQuestion: How high?\nAnswer:"],
         ["Document: ", store["blanc"], "\nQuestion: How high?\nAnswer:"]),
        ([doc_id("paris"), " and ", doc_text("rhone", chunk_size=8), {"type": "text", "text": " rivers?"}],
         [store["paris"], " and ", ContextText(DOCS["rhone"], chunk_size=8), " rivers?"]),
    ]


def test_completions_give_the_generators_greedy_text(client, reference):
    gen, store = reference
    for wire, parts in greedy_cases(store):
        expected = gen.generate(parts, max_new_tokens=12)
        got = client.completions.create(model="tiny", prompt=wire, max_tokens=12, temperature=0)
        assert got.choices[0].text == expected
        assert got.usage.prompt_tokens == gen.savings(parts).prompt_length
        pieces = client.completions.create(model="tiny", prompt=wire, max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in pieces if c.choices) == expected
    # a list of strings is a list of prompts, as in OpenAI's API
    out = client.completions.create(model="tiny", prompt=["Hello", "World"], max_tokens=5, temperature=0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == gen.generate(["Hello", "World"],
                                                                                       max_new_tokens=5)


def chat_with_documents(tok, store) -> tuple[list[dict], list]:
    """Chat messages whose user turn holds a stored document and one given as text, and the same prompt as the
    in-process Generator reads it: the chat template's text as token ids, the documents where they stand."""
    from arccompress.prompts import TokenIds

    messages = [{"role": "system", "content": "Answer from the documents."},
                {"role": "user", "content": [{"type": "text", "text": "Read "}, doc_id("loire"),
                                             {"type": "text", "text": " then "}, doc_text("blanc"),
                                             {"type": "text", "text": ". Which is longer?"}]}]
    rendered = tok.apply_chat_template([{"role": "system", "content": "Answer from the documents."},
                                        {"role": "user", "content": "Read \x00 then \x00. Which is longer?"}],
                                       tokenize=False, add_generation_prompt=True)
    runs = rendered.split("\x00")
    parts = [TokenIds(tok(runs[0], add_special_tokens=False)["input_ids"]), store["loire"],
             TokenIds(tok(runs[1], add_special_tokens=False)["input_ids"]), ContextText(DOCS["blanc"]),
             TokenIds(tok(runs[2], add_special_tokens=False)["input_ids"])]
    return messages, parts


def test_chat_splices_documents_where_they_stand(client, reference, models):
    gen, store = reference
    messages, parts = chat_with_documents(gen.tokenizer, store)
    expected = gen.generate(parts, max_new_tokens=10)
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert got.choices[0].message.content == expected and got.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.prompt_tokens == got.usage.prompt_tokens and got.usage.completion_tokens == 10


def test_answer_is_the_json_twin_of_generator_answer(server, reference):
    gen, store = reference
    body = {"question": "Which river is longest?", "documents": [DOCS["loire"], doc_id("rhone")],
            "examples": [{"documents": [doc_id("blanc")], "question": "How high?", "answer": "4,806 metres"}],
            "max_tokens": 16}
    r = httpx.post(f"{server.url}/v1/answer", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    expected = gen.answer("Which river is longest?", [DOCS["loire"], store["rhone"]],
                          examples=[([store["blanc"]], "How high?", "4,806 metres")], max_new_tokens=16)
    assert r.json()["answer"] == expected
    # streamed, the answer ends where the paper's format ends it: at the first blank line
    with httpx.stream("POST", f"{server.url}/v1/answer", json=body | {"stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as streamed:
        events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    text = "".join(c.get("text") or "" for e in events for c in e["choices"])
    assert "\n\n" not in text and text.strip() == expected
    usage = r.json()["usage"]
    assert usage["documents"] == 3 and usage["prompt_tokens"] == gen.savings(
        fewshot_qa_prompt("Which river is longest?", [DOCS["loire"], store["rhone"]],
                          [([store["blanc"]], "How high?", "4,806 metres")])).prompt_length


def test_sampling_settings_are_honoured(client):
    prompt = ["Tell me about ", doc_text("paris"), ":"]
    a = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=1.0, seed=3, n=3)
    b = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=1.0, seed=3, n=3)
    assert len(a.choices) == 3 and [c.text for c in a.choices] == [c.text for c in b.choices]
    assert all(c.finish_reason == "length" for c in a.choices)
    greedy = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    assert len(greedy) >= 6, repr(greedy)
    cut = greedy[3:5]
    stopped = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stop=[cut])
    assert stopped.choices[0].text == greedy[:greedy.index(cut)] and stopped.choices[0].finish_reason == "stop"


def test_concurrent_clients_get_what_they_get_alone_and_the_encoder_batches(client, server):
    def ask(i: int) -> str:
        key = list(DOCS)[i % 4]
        prompt = ["Doc: ", doc_text(key), f" Q{i % 8}:"] if i % 2 else ["Doc: ", doc_id(key), f" Q{i % 8}:"]
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0).choices[0].text

    alone = [ask(i) for i in range(32)]
    before = metrics(server)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, range(32)))
    assert together == alone
    after = metrics(server)
    assert after["arccompress_compression_cache_hits_total"] > before["arccompress_compression_cache_hits_total"]
    fresh = [f"A text never seen before, number {i}." for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda t: client.completions.create(model="tiny", prompt=[{"type": "document", "text": t}],
                                                          max_tokens=1, temperature=0), fresh))
    end = metrics(server)
    batches = end["arccompress_compress_batch_documents_count"] - after["arccompress_compress_batch_documents_count"]
    documents = end["arccompress_compress_batch_documents_sum"] - after["arccompress_compress_batch_documents_sum"]
    assert documents == 16 and batches < 16  # 16 texts compressed in fewer encoder calls


def metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


@pytest.mark.parametrize("what, request_kwargs, status, needle", [
    ("no key", dict(headers={}), 401, "needs an API key"),
    ("bad key", dict(headers={"Authorization": "Bearer nope"}), 401, "valid API key"),
    ("unknown id", dict(json={"model": "tiny", "prompt": [doc_id("nowhere"), "x"]}), 404, "'nowhere'"),
    ("malformed JSON", dict(content=b'{"model": "tiny", "prompt": ', headers={"Content-Type": "application/json",
                                                                              "Authorization": f"Bearer {KEY}"}),
     400, "not valid JSON"),
    ("huge body", dict(json={"model": "tiny", "prompt": "x" * 300_000}), 413, "200000 bytes"),
    ("too many documents", dict(json={"model": "tiny", "prompt": [doc_id("paris")] * 9}), 400, "9 documents"),
    ("too long", dict(json={"model": "tiny", "prompt": "Hi", "max_tokens": 10_000}), 400, "context length"),
    ("wrong type", dict(json={"model": "tiny", "prompt": "Hi", "max_tokens": "many"}), 400, "max_tokens"),
    ("unknown field", dict(json={"model": "tiny", "prompt": "Hi", "documents": []}), 400, "documents"),
    ("bad part", dict(json={"model": "tiny", "prompt": [{"type": "document"}]}), 400, "either 'text' or 'id'"),
    ("unknown model", dict(json={"model": "gpt-9", "prompt": "Hi"}), 404, "'gpt-9' does not exist"),
    ("a string for a count", dict(json={"model": "tiny", "prompt": "Hi", "max_tokens": "5"}), 400, "max_tokens"),
    ("a bool for n", dict(json={"model": "tiny", "prompt": "Hi", "n": True}), 400, "n"),
    ("seed over 64 bits", dict(json={"model": "tiny", "prompt": "Hi", "seed": 2 ** 70}), 400, "64 bits"),
    ("lone surrogate", dict(content=b'{"model": "tiny", "prompt": "a\\ud800b"}',
                            headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}),
     400, "lone surrogate"),
    ("an empty prompt in a list", dict(json={"model": "tiny", "prompt": [[]]}), 400, "empty"),
    ("answer: an empty document", dict(path="/v1/answer", json={"question": "Where?", "documents": [""]}), 400,
     "documents[0]"),
    ("answer: no question", dict(path="/v1/answer", json={"question": "", "documents": ["A text."]}), 400,
     "question"),
    ("unknown endpoint", dict(path="/v1/nope", json={}), 404, "no such endpoint"),
    ("wrong method", dict(path="/v1/completions", method="GET"), 405, "does not take GET"),
])
def test_bad_requests_get_one_json_error_and_the_server_keeps_serving(server, client, what, request_kwargs, status,
                                                                      needle):
    kwargs = dict(request_kwargs)
    headers = kwargs.pop("headers", {"Authorization": f"Bearer {KEY}"})
    method, path = kwargs.pop("method", "POST"), kwargs.pop("path", "/v1/completions")
    r = httpx.request(method, f"{server.url}{path}", headers=headers, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2, temperature=0).choices[0].text is not None


def test_a_document_sent_as_text_that_the_store_holds_is_read_from_it(client, server, reference):
    """A retriever that returns a precomputed document's text (not its id) gets its stored context: read from the
    store by the text's hash, not compressed again; the answer is the one its id gives."""
    gen, store = reference
    before = metrics(server)
    wire = ["Document: ", {"type": "document", "text": DOCS["paris"] + " "}, "\nQuestion: Where?\nAnswer:"]
    fresh = client.completions.create(model="tiny", prompt=wire, max_tokens=8, temperature=0)  # not stored: compressed
    middle = metrics(server)
    assert middle["arccompress_documents_total"] - before.get("arccompress_documents_total", 0) == 1
    wire[1] = doc_text("paris")  # its text exactly as stored
    got = client.completions.create(model="tiny", prompt=wire, max_tokens=8, temperature=0)
    after = metrics(server)
    wire[1] = doc_id("paris")
    by_id = client.completions.create(model="tiny", prompt=wire, max_tokens=8, temperature=0)
    assert got.choices[0].text == by_id.choices[0].text == gen.generate(
        ["Document: ", store["paris"], "\nQuestion: Where?\nAnswer:"], max_new_tokens=8)
    assert fresh.usage.prompt_tokens == got.usage.prompt_tokens
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    stored_after = float(re.search(r'arccompress_documents_total\{source="store"\} ([0-9.e+]+)', text).group(1))
    assert after["arccompress_documents_total"] - middle["arccompress_documents_total"] == 1
    assert stored_after >= 1 and after.get("arccompress_compress_batch_documents_count", 0) == \
        middle.get("arccompress_compress_batch_documents_count", 0)  # no encoder call for it


def test_a_request_without_the_key_is_refused_before_its_body_is_read(server):
    """401 from the headers alone: a client without the key uploads nothing that the service holds (the body it
    announces is never sent, and the answer comes anyway)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 150000\r\n\r\n")
        head = raw.recv(65536)
        while b"\r\n\r\n" in head and len(head) < 65536 and b"needs an API key" not in head:
            more = raw.recv(65536)  # the body may come in a packet of its own
            if not more:
                break
            head += more
    assert head.startswith(b"HTTP/1.1 401") and b"needs an API key" in head, head[:300]


def test_a_document_shorter_than_its_compressed_form_is_served(client, server):
    """One token of text is two positions compressed (its vector and <Cont>): it saves nothing, and that is no error."""
    out = client.completions.create(model="tiny", prompt=[{"type": "document", "text": "x"}], max_tokens=2)
    assert out.usage.to_dict()["prompt_positions_saved"] <= 0 and out.choices[0].text is not None
    assert metrics(server)["arccompress_positions_saved_total"] >= 0


def test_models_health_and_a_decoder_without_chat_template(server, models):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    listed = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [m["id"] for m in listed["data"]] == ["tiny"] and listed["data"][0]["max_model_len"] > 0
    plain = Server("--encoder", str(models["encoder"]), "--decoder", str(models["decoder"])).wait_ready()
    try:
        c = openai.OpenAI(base_url=f"{plain.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            c.chat.completions.create(model="decoder", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert c.completions.create(model="decoder", prompt="hi", max_tokens=2).choices[0].finish_reason == "length"
    finally:
        assert plain.stop() == 0


def test_a_store_that_is_not_there_is_one_line(models, tmp_path):
    out = subprocess.run([sys.executable, "-m", "arccompress.cli", "serve", "--encoder", str(models["encoder"]),
                          "--decoder", str(models["decoder"]), "--store", str(tmp_path / "no-store")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no context store there" in out.stderr and "Traceback" not in out.stderr


def test_a_port_in_use_is_one_line_before_the_models_load(models):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "arccompress.cli", "serve", "--encoder", "/nowhere/encoder",
                              "--decoder", "/nowhere/decoder", "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in out.stderr and "--port" in out.stderr
    assert "Traceback" not in out.stderr and "nowhere" not in out.stderr  # refused before the models are looked for


def test_sigterm_finishes_requests_in_flight_then_exits(models):
    srv = Server("--encoder", str(models["encoder"]), "--decoder", str(models["decoder"])).wait_ready()
    try:
        body = {"model": "decoder", "prompt": "long", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # the request is in flight
            srv.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)
        assert srv.proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{srv.url}/health", timeout=2)
    finally:
        srv.stop()


def test_ray_serve_replicas_answer_like_one_process_and_one_scrape_counts_them_all(models, client):
    prompts = [["Doc: ", doc_id(key), f" Q{i}:"] for i, key in enumerate(DOCS)] + \
              [["Doc: ", doc_text(key), " Summary:"] for key in DOCS]
    expected = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text
                for p in prompts]
    srv = Server("--ray", "--replicas", "2", "--encoder", str(models["encoder"]), "--decoder", str(models["chat"]),
                 "--store", str(models["store"]), "--served-model-name", "tiny").wait_ready(timeout=480)
    try:
        def scrape() -> tuple[float, set[str]]:
            """(completions answered, by every replica together; the replicas the scrape holds)"""
            text = httpx.get(f"{srv.url}/metrics", timeout=30).text
            done = re.findall(r'^arccompress_requests_total\{endpoint="/v1/completions",replica="[^"]+",'
                              r'status="200"\} ([0-9.e+]+)$', text, re.M)
            replicas = re.findall(r'^arccompress_compression_cache_budget_bytes\{replica="([^"]+)"\}', text, re.M)
            return sum(map(float, done)), set(replicas)

        deadline = time.monotonic() + 300  # both replicas up (the first one answers /health alone)
        while len(scrape()[1]) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        ray_client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda p: ray_client.completions.create(model="tiny", prompt=p, max_tokens=6,
                                                                        temperature=0).choices[0].text, prompts))
        assert got == expected
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # 20 completions in all
            list(pool.map(lambda i: ray_client.completions.create(model="tiny", prompt=f"Count {i}", max_tokens=2),
                          range(20 - len(prompts))))
        deadline = time.monotonic() + 30  # a replica counts a request once its last byte has left
        while scrape()[0] < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        scrapes = [scrape() for _ in range(6)]  # each routed to either replica: every one holds both
        assert [done for done, _ in scrapes] == [20.0] * 6
        assert all(len(replicas) == 2 for _, replicas in scrapes), scrapes
    finally:
        assert srv.stop(timeout=120) == 0


def test_service_client_speaks_the_prompt_language(server, reference):
    from arccompress.engines import ServiceClient, ServiceError
    from arccompress.prompts import ContextRef

    gen, store = reference
    svc = ServiceClient(server.url, api_key=KEY)
    assert svc.model == "tiny" and svc.describe()["encoder_fingerprint"] == gen.compressor.fingerprint
    assert svc.describe()["decoder_fingerprint"] == gen.describe()["decoder_fingerprint"]
    prompts = [["Document: ", ContextRef("loire"), " and ", ContextText(DOCS["paris"]), "\nAnswer:"], "Plain text"]
    local = [["Document: ", store["loire"], " and ", ContextText(DOCS["paris"]), "\nAnswer:"], "Plain text"]
    assert svc.generate(prompts, max_new_tokens=8) == gen.generate(local, max_new_tokens=8)
    assert "".join(svc.stream(prompts[0], max_new_tokens=8)) == gen.generate(local[0], max_new_tokens=8)
    assert svc.answer("Longest river?", [ContextRef("loire"), DOCS["rhone"]], max_new_tokens=12) == \
        gen.answer("Longest river?", [store["loire"], DOCS["rhone"]], max_new_tokens=12)
    done = svc.complete([["Doc ", ContextRef("blanc")]], svc.sampling(max_new_tokens=3), time_prefill=True)[0]
    assert done.prompt_positions == gen.savings(["Doc ", store["blanc"]]).prompt_length
    assert done.prefill_seconds is not None and len(done.token_ids[0]) <= 3
    with pytest.raises(TypeError, match="never tensors"):
        svc.generate(["Doc ", store["blanc"]])
    with pytest.raises(ServiceError, match="'nowhere'"):
        svc.generate(["Doc ", ContextRef("nowhere")])
    with pytest.raises(ServiceError, match="needs an API key"):
        ServiceClient(server.url)


def test_eval_runs_against_a_service(server, reference, models):
    from arccompress import evaluate
    from arccompress.engines import ServiceClient

    gen, store = reference
    rows = [{"question": f"Question {i} about {key}?", "answers": [key],
             **({"passage_ids": [key]} if i % 2 else {"passages": [DOCS[key]]})}
            for i, key in enumerate(list(DOCS) * 2)]
    kwargs = dict(shots=1, modes=["compressed", "closed"], max_new_tokens=6, store=store, show_progress=False)
    local = evaluate(rows, generator=gen, **kwargs)
    remote = evaluate(rows, generator=ServiceClient(server.url, api_key=KEY), **kwargs)
    for mode in ("compressed", "closed"):
        assert [p["prediction"] for p in remote.predictions[mode]] == [p["prediction"] for p in local.predictions[mode]]
        assert remote.scores[mode]["mean_prompt_positions"] == local.scores[mode]["mean_prompt_positions"]
