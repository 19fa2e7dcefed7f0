"""`arccompress serve --upstream`: the service in front of real vLLM OpenAI servers, through the official openai client.

Two vLLM servers of the tiny decoder on 127.0.0.1 (prompt embeddings on, an API key) and proxies in front of them:
the same greedy text as `Generator`, document affinity that two proxies compute alike, health and failover (an
upstream paused, then one killed in the middle of a run), and the start-up refusals. The servers are shared by the
module; the test that kills one runs last. Runs in CI's vLLM environment (`ARCCOMPRESS_REQUIRE_VLLM=1`: a missing
vLLM fails there instead of skipping). Waits are bounded by events (a metric moving, a server answering), never by
sleeping a guessed time, so a loaded machine makes them slower, not flaky.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

if os.environ.get("ARCCOMPRESS_REQUIRE_VLLM"):
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vllm is not installed here: .ci/run runs these tests in its vLLM environment")

from arccompress import Compressor, ContextStore, ContextText, Generator  # noqa: E402
from arccompress.tiny import build_tiny_pair  # noqa: E402

from .test_serve import (CHAT_TEMPLATE, DOCS, Server, chat_with_documents, doc_id, free_port,  # noqa: E402
                         greedy_cases, wait_healthy)

UPSTREAM_KEY = "upstream-key-456"
TOPICS = [f"Topic {i}: the {w} of the valley is described in this passage, with its history and its people."
          for i, w in enumerate(["river", "bridge", "castle", "forest", "market", "church", "mill", "harbour",
                                 "school", "library", "garden", "tower", "abbey", "vineyard", "quarry", "station"])]


class VLLMServer:
    """vLLM's OpenAI server on the tiny decoder, 127.0.0.1, a free port, its own process group (paused, killed and
    stopped as a whole); `stop()` whatever state it is in."""

    def __init__(self, model: Path, log: Path, *, prompt_embeds: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype", "float32",
               "--enforce-eager", "--kv-cache-memory-bytes", "256M", "--max-model-len", "1024", "--block-size", "32",
               "--host", "127.0.0.1",
               "--port", str(self.port), "--api-key", UPSTREAM_KEY, "--enable-prompt-tokens-details",
               *(["--enable-prompt-embeds"] if prompt_embeds else [])]
        env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 600) -> VLLMServer:
        wait_healthy(self.proc, self.url, timeout, lambda: self.log.read_text()[-3000:])
        return self

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        for sig, wait in ((signal.SIGCONT, 0), (signal.SIGTERM, 30), (signal.SIGKILL, 30)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            if wait:
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.proc.poll()  # reaped, however it ended


def until(condition, what: str, timeout: float = 120.0):
    """Poll `condition()` until it is truthy (returned), failing with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout} s")


def routed(proxy: Server) -> dict[tuple[str, str], float]:
    """(upstream, decision) -> requests the proxy sent there, from its /metrics."""
    text = httpx.get(f"{proxy.url}/metrics", timeout=30).text
    pattern = r'^arccompress_upstream_requests_total\{decision="([^"]+)",upstream="([^"]+)"\} ([0-9.e+-]+)$'
    return {(m.group(2), m.group(1)): float(m.group(3)) for m in re.finditer(pattern, text, re.M)}


def gauge(proxy: Server, name: str, upstream: str) -> float:
    text = httpx.get(f"{proxy.url}/metrics", timeout=30).text
    found = re.search(rf'^{name}\{{upstream="{re.escape(upstream)}"\}} ([0-9.e+-]+)$', text, re.M)
    return float(found.group(1)) if found else float("nan")


def served_by(proxy: Server, send) -> tuple[str, object]:
    """The upstream that served `send()` (sent alone: the proxy's counts move by one request), and its result."""
    before = routed(proxy)
    result = send()
    after = routed(proxy)
    moved = [k for k in after if after[k] != before.get(k, 0.0)]
    assert len(moved) == 1, (before, after)
    return moved[0][0], result


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny pair's decoder with a chat template (what the proxy and the upstreams read), its encoder, a store."""
    encoder, decoder = build_tiny_pair()
    root = tmp_path_factory.mktemp("proxy-models")
    chat = shutil.copytree(decoder, root / "decoder")
    config = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CHAT_TEMPLATE}))
    comp = Compressor.from_pretrained(encoder, device="cpu")
    with ContextStore(root / "store", compressor=comp) as store:
        store.add_many(list(DOCS), comp.compress(list(DOCS.values())))
    return {"encoder": encoder, "decoder": chat, "store": root / "store", "comp": comp, "root": root}


@pytest.fixture(scope="module")
def upstreams(models):
    servers = [VLLMServer(models["decoder"], models["root"] / f"vllm-{k}.log") for k in range(2)]
    try:
        yield [s.wait_ready() for s in servers]
    finally:
        for s in servers:
            s.stop()


@contextlib.contextmanager
def proxy_of(models, upstreams, *extra: str) -> Iterator[Server]:
    """`arccompress serve` in front of `upstreams` (anything with a `.url`), the upstreams' key from the environment;
    stopped whatever happens."""
    srv = Server("--encoder", str(models["encoder"]), "--decoder", str(models["decoder"]), "--store",
                 str(models["store"]), "--served-model-name", "tiny",
                 *[a for s in upstreams for a in ("--upstream", f"{s.url}/v1")], *extra,
                 env={"ARCCOMPRESS_UPSTREAM_API_KEY": UPSTREAM_KEY})
    try:
        yield srv.wait_ready(timeout=300)
    finally:
        srv.stop(timeout=60)


def openai_client(proxy: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def proxy(models, upstreams):
    """The proxy of most tests, probing its upstreams every second."""
    with proxy_of(models, upstreams, "--health-interval", "1") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(proxy):
    return openai_client(proxy)


@pytest.fixture(scope="module")
def reference(models):
    return (Generator.from_pretrained(models["decoder"], compressor=models["comp"]),
            ContextStore(models["store"], compressor=models["comp"]))


def test_the_proxy_gives_the_generators_greedy_text(client, reference):
    gen, store = reference
    cases = greedy_cases(store)
    for wire, parts in cases:
        expected = gen.generate(parts, max_new_tokens=24)
        got = client.completions.create(model="tiny", prompt=wire, max_tokens=24, temperature=0,
                                        extra_body={"return_token_ids": True})
        assert got.choices[0].text == expected
        assert got.choices[0].model_extra["token_ids"] == gen.generate_ids(parts, max_new_tokens=24)[0]
        assert got.usage.prompt_tokens == gen.savings(parts).prompt_length
        streamed = client.completions.create(model="tiny", prompt=wire, max_tokens=24, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    # a stop string: the upstream stops there too, and the text ends before it
    wire, parts = cases[0]
    greedy = gen.generate(parts, max_new_tokens=120)
    assert len(greedy) >= 8, repr(greedy)
    cut = greedy[len(greedy) // 2: len(greedy) // 2 + 2]
    stopped = client.completions.create(model="tiny", prompt=wire, max_tokens=120, temperature=0, stop=[cut])
    assert stopped.choices[0].text == gen.generate(parts, max_new_tokens=120, stop=[cut]) == greedy[:greedy.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"
    # several prompts, and greedy n > 1
    out = client.completions.create(model="tiny", prompt=["Hello", "World"], max_tokens=6, temperature=0, n=2)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert texts == [t for t in gen.generate(["Hello", "World"], max_new_tokens=6) for _ in range(2)]


def test_chat_and_answer_through_the_proxy(client, proxy, reference):
    gen, store = reference
    messages, parts = chat_with_documents(gen.tokenizer, store)
    expected = gen.generate(parts, max_new_tokens=16)
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert got.choices[0].message.content == expected
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected

    body = {"question": "Which river is longest?", "documents": [DOCS["loire"], doc_id("rhone")],
            "examples": [{"documents": [doc_id("blanc")], "question": "How high?", "answer": "4,806 metres"}],
            "max_tokens": 16}
    answer = gen.answer("Which river is longest?", [DOCS["loire"], store["rhone"]],
                        examples=[([store["blanc"]], "How high?", "4,806 metres")], max_new_tokens=16)
    r = httpx.post(f"{proxy.url}/v1/answer", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == answer


def few_shot(first: str, others: list[str], question: str) -> list:
    """A few-shot prompt on the wire: one example (two stored documents), then the question's documents as text."""
    return ["Document: ", doc_id("blanc"), doc_id("paris"), "\nQuestion: How high?\nAnswer: 4,806 metres\n\n",
            "Document: ", {"type": "document", "text": first}, *[{"type": "document", "text": t} for t in others],
            f"\nQuestion: {question}\nAnswer:"]


def test_the_same_leading_documents_land_on_one_upstream_and_two_proxies_agree(client, proxy, models, upstreams):
    with proxy_of(models, upstreams) as second:
        other = openai_client(second)

        def ask(on: openai.OpenAI, prompt: list):
            return lambda: on.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0)

        chosen = {}
        for i, topic in enumerate(TOPICS):
            # the same first document, then other documents and another question each time
            prompts = [few_shot(topic, [DOCS[k] for k in list(DOCS)[j:j + 2]], f"Question {j} on topic {i}?")
                       for j in range(3)]
            where = {served_by(proxy, ask(client, p))[0] for p in prompts}
            assert len(where) == 1, f"topic {i}: one first document, sent to {where}"
            chosen[i] = where.pop()
            assert served_by(second, ask(other, prompts[1]))[0] == chosen[i], f"topic {i}: the proxies disagree"
        assert set(chosen.values()) == {s.url for s in upstreams}  # 16 first documents: both upstreams get some
        # what the requests of one topic share is read from the upstream's prefix cache (vLLM's own count)
        text = httpx.get(f"{proxy.url}/metrics", timeout=30).text
        hits = float(re.search(r"^arccompress_prefix_cache_hit_tokens_total ([0-9.e+-]+)$", text, re.M).group(1))
        assert hits > 0


def test_concurrent_requests_spill_over_and_get_what_they_get_alone(client, proxy):
    """Every request has the same leading documents: its upstream takes them up to its share of the requests in
    flight, the next in the ranking the rest; the answers are those each gets alone."""
    def ask(i: int) -> str:
        prompt = few_shot(TOPICS[0], [TOPICS[1 + i % 4]], f"Concurrent question {i}?")
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0).choices[0].text

    alone = [ask(i) for i in range(12)]
    before = routed(proxy)
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        assert list(pool.map(ask, range(12))) == alone
    after = routed(proxy)
    moved = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    assert sum(moved.values()) == 12 and {d for _, d in moved} <= {"affinity", "spill"}


def test_an_upstream_that_stops_answering_is_taken_out_and_back(client, proxy, upstreams):
    paused = upstreams[1]
    paused.signal(signal.SIGSTOP)
    try:
        until(lambda: gauge(proxy, "arccompress_upstream_up", paused.url) == 0, "the paused upstream taken out")
        for i, topic in enumerate(TOPICS[:6]):  # every request goes to the upstream left, whatever its ranking
            prompt = few_shot(topic, [], f"While paused {i}?")
            where, _ = served_by(proxy, lambda p=prompt: client.completions.create(model="tiny", prompt=p,
                                                                                   max_tokens=2, temperature=0))
            assert where == upstreams[0].url
    finally:
        paused.signal(signal.SIGCONT)
    until(lambda: gauge(proxy, "arccompress_upstream_up", paused.url) == 1, "the upstream back in rotation")


def test_upstreams_that_cannot_serve_are_refused_at_start_up(models, upstreams):
    def serve(*extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "arccompress.cli", "serve", "--port", str(free_port()), "--encoder",
               str(models["encoder"]), "--decoder", str(models["decoder"]), *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ | (env or {}))

    plain = VLLMServer(models["decoder"], models["root"] / "vllm-plain.log", prompt_embeds=False)
    try:
        plain.wait_ready()
        out = serve("--upstream", plain.url, "--upstream-api-key", UPSTREAM_KEY)
    finally:
        plain.stop()
    assert out.returncode == 2, out.stderr[-3000:]
    assert "--enable-prompt-embeds" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    wrong_key = serve("--upstream", upstreams[0].url, env={"ARCCOMPRESS_UPSTREAM_API_KEY": "not-the-key"})
    assert wrong_key.returncode == 2 and "401" in wrong_key.stderr and "Traceback" not in wrong_key.stderr
    nobody = serve("--upstream", f"http://127.0.0.1:{free_port()}", "--upstream-wait", "0")
    assert nobody.returncode == 2 and "no upstream answers" in nobody.stderr and "Traceback" not in nobody.stderr
    engine_flag = serve("--upstream", upstreams[0].url, "--max-model-len", "512")
    assert engine_flag.returncode == 2 and "give these to them" in engine_flag.stderr


def test_the_manifests_vllm_command_line_is_one_vllm_parses():
    """deploy/kubernetes.yaml's vLLM container, read by vLLM's own parser: prompt embeddings on, the model served."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from .test_deploy import vllm_command_line

    argv = vllm_command_line()
    assert argv[:2] == ["vllm", "serve"]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv[2:])
    validate_parsed_serve_args(args)
    assert args.enable_prompt_embeds and args.model_tag == "mistralai/Mistral-7B-v0.3" and args.api_key is None


def test_proxy_benchmark_runs_at_small_scale(tmp_path):
    """benchmarks/bench_proxy.py cannot rot: both parts at toy sizes (its own servers, started and stopped)."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_proxy.py"), "--preset", "cpu", "--scale",
                          "small", "--out", str(tmp_path)], capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "proxy-cpu-small.json").read_text())
    for routing in ("documents", "prompt", "round-robin"):
        assert 0 < result["routing"][routing]["hit_rate"] <= 1 and result["routing"][routing]["requests_per_s"] > 0
    assert sum(result["routing"]["documents"]["decisions"].values()) == result["routing_workload"]["requests"]
    assert result["proxy_over_in_process"] > 0 and "| `documents` |" in (tmp_path / "proxy-cpu-small.md").read_text()


class Relay:
    """A TCP relay to the server at `url` that a test can freeze — right after the first streamed event passes,
    every byte is held where it is — and cut: every connection closed, what it held dropped, nothing accepted
    any more. From the proxy's side: a host that dies at a chosen byte of an answer, not at a lucky moment."""

    def __init__(self, url: str):
        self.target = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.flowing = threading.Event()
        self.flowing.set()
        self.armed = self.cut_off = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze_after_first_event(self) -> None:
        self.armed = True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target)
            except OSError:
                return
            self.sockets += [client, server]
            for source, sink, down in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(source, sink, down), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, down: bool) -> None:
        try:
            while data := source.recv(16384):  # an answer of 800 tokens spans many reads
                self.flowing.wait()
                if self.cut_off:
                    return
                sink.sendall(data)
                if down and self.armed and b"data: {" in data:
                    self.armed = False
                    self.flowing.clear()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.cut_off = True
        self.listener.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.flowing.set()


def test_an_upstream_killed_mid_run(models, upstreams, reference):
    """Last in this module: it kills an upstream (reached through a relay, which holds the bytes from the moment
    its first token is on the way, so that the kill lands in the middle of an answer). The stream it was serving
    ends with an error event, then [DONE]; the requests it held without having answered are served by the other
    upstream, with the text they would have had; none hangs; the dead one is out of rotation."""
    gen, _ = reference
    doomed, survivor = upstreams[1], upstreams[0]
    relay = Relay(doomed.url)
    try:
        with proxy_of(models, [survivor, relay], "--health-interval", "600", "--load-factor", "8") as proxy:
            url = f"{proxy.url}/v1/completions"

            def complete(prompt: list, tokens: int) -> dict:
                r = httpx.post(url, json={"model": "tiny", "prompt": prompt, "max_tokens": tokens, "temperature": 0},
                               timeout=300)
                assert r.status_code == 200, r.text
                return r.json()

            on_doomed = []  # prompts whose ranking puts the doomed upstream first
            for i, topic in enumerate(TOPICS):
                prompt = few_shot(topic, [], f"Which {i}?")
                if served_by(proxy, lambda p=prompt: complete(p, 1))[0] == relay.url:
                    on_doomed.append(prompt)
            assert len(on_doomed) >= 3, "16 first documents: at least 3 rank each upstream first"
            long_prompt, waiting = on_doomed[0], on_doomed[1:3]

            relay.freeze_after_first_event()
            body = {"model": "tiny", "prompt": long_prompt, "max_tokens": 800, "temperature": 0, "stream": True,
                    "return_token_ids": True}  # every token is an event, even one that adds no text yet
            with httpx.stream("POST", url, json=body, timeout=300) as cut:
                lines = cut.iter_lines()
                assert next(line for line in lines if line.startswith("data: {"))  # its first token came
                before = routed(proxy).get((relay.url, "affinity"), 0)
                with concurrent.futures.ThreadPoolExecutor(2) as pool:
                    answers = [pool.submit(complete, p, 8) for p in waiting]
                    until(lambda: routed(proxy).get((relay.url, "affinity"), 0) >= before + 2,
                          "the two requests sent to the doomed upstream")
                    doomed.signal(signal.SIGKILL)
                    relay.cut()
                    rest = list(lines)
                    for future, prompt in zip(answers, waiting):
                        expected = gen.generate([p if isinstance(p, str) else doc_part(p, models) for p in prompt],
                                                max_new_tokens=8)
                        assert future.result(timeout=300)["choices"][0]["text"] == expected
            events = [line for line in rest if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and "error" in json.loads(events[-2][6:]), events[-3:]
            assert routed(proxy).get((survivor.url, "failover"), 0) >= 2
            assert gauge(proxy, "arccompress_upstream_up", relay.url) == 0
            assert served_by(proxy, lambda: complete(waiting[0], 2))[0] == survivor.url
    finally:
        relay.cut()


def doc_part(part: dict, models) -> object:
    """A document part of the wire as the in-process Generator reads it."""
    if "id" in part:
        return ContextStore(models["store"], compressor=models["comp"])[part["id"]]
    return ContextText(part["text"])
