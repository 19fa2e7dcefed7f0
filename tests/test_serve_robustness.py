"""`arccompress serve` (transformers backend) against what one request did to it (issue 26), each case as it was met
(tests/serve_hostile.py, shared with the vLLM backend's tests), plus what only this backend or the library shows:
load shedding, the cache's byte budget, each document tokenized once, stop matching linear in the text."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import httpx
import pytest

from arccompress import Compressor, ContextStore
from arccompress.engines.text import StopFilter, cut_at_stop
from arccompress.serve import ServiceConfig, build_app
from arccompress.tiny import build_tiny_decoder, build_tiny_encoder

from . import serve_hostile as hostile
from .test_serve import DOCS, Server

CONTEXT = 4096  # the tiny decoder's


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-robust")
    encoder = build_tiny_encoder(root / "encoder", seed=7)
    comp = Compressor.from_pretrained(encoder, device="cpu")
    with ContextStore(root / "store", compressor=comp) as store:
        store.add_many(list(DOCS), comp.compress(list(DOCS.values())))
    return {"encoder": encoder, "decoder": build_tiny_decoder(root / "decoder", family="llama", seed=8),
            "store": root / "store"}


@pytest.fixture(scope="module")
def server(models):
    """Default limits (a 16 MiB body), a store, a small cache, few requests at once."""
    srv = Server("--encoder", str(models["encoder"]), "--decoder", str(models["decoder"]), "--store",
                 str(models["store"]), "--served-model-name", "tiny", "--cache-mib", "1", "--max-queued-requests", "3")
    try:
        yield srv.wait_ready()
    finally:
        assert srv.stop() == 0


class TestHostileRequests(hostile.HostileRequests):
    model, context, penalties = "tiny", CONTEXT, False


def test_past_the_queue_requests_get_503_with_retry_after(server):
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 400, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(lambda _: httpx.post(f"{server.url}/v1/completions", json=body, timeout=300),
                                range(9)))
    shed = [r for r in answers if r.status_code == 503]
    assert shed and len([r for r in answers if r.status_code == 200]) >= 3, [r.status_code for r in answers]
    assert all(r.headers["retry-after"] == "1" for r in shed)
    hostile.refused(shed[0], 503, "--max-queued-requests")
    assert hostile.metric(server.url, "arccompress_requests_shed_total") == len(shed)
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_the_compression_cache_keeps_to_its_byte_budget(server):
    for i in range(24):  # 24 contexts of ~2,000 tokens: about three times the 1 MiB budget
        text = f"Document {i}: " + " ".join(f"w{i}x{k}" for k in range(400))
        r = httpx.post(f"{server.url}/v1/completions", timeout=120,
                       json={"model": "tiny", "prompt": [{"type": "document", "text": text}], "max_tokens": 1})
        assert r.status_code == 200, r.text
        held = hostile.metric(server.url, "arccompress_compression_cache_bytes")
        assert 0 < held <= 1 << 20
    assert hostile.metric(server.url, "arccompress_compression_cache_budget_bytes") == 1 << 20
    assert 0 < hostile.metric(server.url, "arccompress_compression_cache_entries") < 24


def test_a_request_past_its_time_is_stopped(models):
    srv = Server("--encoder", str(models["encoder"]), "--decoder", str(models["decoder"]), "--served-model-name",
                 "tiny", "--request-timeout", "2").wait_ready()
    try:
        hostile.check_timeout(srv.url, "tiny", 2)
    finally:
        assert srv.stop() == 0


def test_each_document_is_tokenized_once_and_checked_before_it_is_compressed(models):
    """In process: the encoder's tokenizer sees each new document once (a cached one not again); documents whose
    contexts alone overflow the decoder are refused before any is compressed."""

    async def run() -> None:
        app = build_app(ServiceConfig(encoder=str(models["encoder"]), decoder=str(models["decoder"])))
        async with app.router.lifespan_context(app):
            service = app.state.service
            comp = service.compressor
            seen: list[str] = []
            tokenize = comp.tokenize

            def counting(texts: list[str]) -> list[list[int]]:
                seen.extend(texts)
                return tokenize(texts)

            comp.tokenize = counting
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://service", timeout=120) as client:
                docs = [f"A document never seen, number {i}." for i in range(3)]
                body = {"model": "decoder", "max_tokens": 1,
                        "prompt": ["Read ", *({"type": "document", "text": d} for d in docs), " now"]}
                assert (await client.post("/v1/completions", json=body)).status_code == 200
                assert sorted(seen) == sorted(docs)
                assert (await client.post("/v1/completions", json=body)).status_code == 200
                assert sorted(seen) == sorted(docs)  # cached: not tokenized again
                batches = service.metrics.compress_batches.collect()[0].samples
                big = [{"type": "document", "text": f"{i} " + "word " * 3000} for i in range(9)]
                r = await client.post("/v1/completions", json={"model": "decoder", "prompt": big, "max_tokens": 1})
                hostile.refused(r, 400, "at least", "prompt")
                assert service.metrics.compress_batches.collect()[0].samples == batches  # nothing compressed

    asyncio.run(run())


def test_stop_matching_is_linear_in_the_text():
    """The filter follows a 1,000,000-character stop through 3,000 pieces in bounded time (the quadratic one took
    hours), and agrees with OpenAI's rule (`cut_at_stop`) on every way of cutting a text into pieces."""
    done = threading.Event()

    def follow() -> None:
        f = StopFilter(["ab" * 500_000])
        out = "".join(f.feed("ab") for _ in range(3000))
        assert out == "" and len(f.pending) == 6000
        done.set()

    worker = threading.Thread(target=follow, daemon=True)
    worker.start()
    worker.join(120)
    assert done.is_set()
    text, stops = "xxabcabcabd--abcabd", ["abcabd", "d-", "zz"]
    for size in range(1, len(text) + 1):
        f = StopFilter(stops)
        out = "".join(f.feed(text[k:k + size]) for k in range(0, len(text), size)) + f.flush()
        assert out == cut_at_stop(text, stops)[0] == "xxabc"
