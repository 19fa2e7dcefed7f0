"""`arccompress serve --backend vllm`: vLLM's async engine in the service process, through the official openai client.

Runs in CI's vLLM environment (`ARCCOMPRESS_REQUIRE_VLLM=1`: a missing vLLM fails there instead of skipping).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

if os.environ.get("ARCCOMPRESS_REQUIRE_VLLM"):
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vllm is not installed here: .ci/run runs these tests in its vLLM environment")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from arccompress import Compressor, ContextStore, Generator  # noqa: E402
from arccompress.tiny import build_tiny_decoder, build_tiny_encoder  # noqa: E402

from . import serve_hostile as hostile  # noqa: E402
from .serve_fuzz import fuzz  # noqa: E402
from .test_serve import DOCS, Server, doc_id, doc_text, greedy_cases, metrics  # noqa: E402

HIDDEN = 256  # vLLM's CPU attention needs heads of 64
CONTEXT = 4096
ENGINE = ["--backend", "vllm", "--dtype", "float32", "--enforce-eager", "--kv-cache-gib", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-vllm")
    encoder = build_tiny_encoder(root / "encoder", decoder_hidden_size=HIDDEN, seed=11)
    decoder = build_tiny_decoder(root / "decoder", family="mistral", hidden_size=HIDDEN, seed=12)
    comp = Compressor.from_pretrained(encoder, device="cpu")
    store = ContextStore(root / "store", compressor=comp)
    store.add_many(list(DOCS), comp.compress(list(DOCS.values())))
    store.close()
    return {"encoder": encoder, "decoder": decoder, "store": root / "store", "comp": comp}


@pytest.fixture(scope="module")
def server(models):
    srv = Server("--encoder", str(models["encoder"]), "--decoder", str(models["decoder"]), "--store",
                 str(models["store"]), *ENGINE, "--max-model-len", str(CONTEXT))
    try:
        yield srv.wait_ready(timeout=900)
    finally:
        srv.stop(timeout=60)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_vllm_service_gives_the_generators_greedy_text(client, models):
    comp = models["comp"]
    store = ContextStore(models["store"], compressor=comp)
    gen = Generator.from_pretrained(models["decoder"], compressor=comp)
    for wire, parts in greedy_cases(store):
        expected = gen.generate(parts, max_new_tokens=12)
        got = client.completions.create(model="decoder", prompt=wire, max_tokens=12, temperature=0)
        assert got.choices[0].text == expected
        streamed = client.completions.create(model="decoder", prompt=wire, max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_concurrent_requests_and_the_prefix_cache(client, server):
    examples = [doc_id("blanc"), "\nQuestion: How high?\nAnswer: 4,806 metres\n\n", doc_id("paris"),
                "\nQuestion: Capital?\nAnswer: Paris\n\n"] * 6  # a long shared few-shot prefix

    def ask(i: int) -> str:
        prompt = ["Document: ", *examples, "Document: ", doc_text(list(DOCS)[i % 4]), f"\nQuestion: Q{i}?\nAnswer:"]
        return client.completions.create(model="decoder", prompt=prompt, max_tokens=4, temperature=0).choices[0].text

    alone = [ask(i) for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        assert list(pool.map(ask, range(12))) == alone
    m = metrics(server)
    assert m["arccompress_prefix_cache_hit_tokens_total"] > 0.5 * m["arccompress_prefix_cache_query_tokens_total"]


def test_a_bad_request_leaves_the_engine_serving(client, server):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "decoder", "prompt": "x", "max_tokens": 9000})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    assert client.completions.create(model="decoder", prompt="ok", max_tokens=2, temperature=0).choices


# ----------------------------------------------------------------------------- issue 26's hostile requests, on vLLM


class TestHostileRequests(hostile.HostileRequests):
    model, context, penalties = "decoder", CONTEXT, True


def test_penalties_change_what_vllm_generates(client):
    prompt = ["Document: ", doc_text("loire"), "\nAnswer:"]
    plain = client.completions.create(model="decoder", prompt=prompt, max_tokens=24, temperature=0)
    penalised = client.completions.create(model="decoder", prompt=prompt, max_tokens=24, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0)
    ids = [t for c in penalised.choices for t in (c.model_extra or {}).get("token_ids") or []]
    assert penalised.choices[0].text != plain.choices[0].text or len(set(ids)) == len(ids)


def test_a_request_past_its_time_is_stopped(models):
    srv = Server("--encoder", str(models["encoder"]), "--decoder", str(models["decoder"]), *ENGINE,
                 "--max-model-len", str(CONTEXT), "--request-timeout", "2").wait_ready(timeout=900)
    try:
        hostile.check_timeout(srv.url, "decoder", 2)
    finally:
        assert srv.stop(timeout=60) == 0
    # quiet unless --verbose (issue 29): uvicorn's own lines and ours; vLLM's warnings, its weight-loading bar and the
    # leak reports of its dependencies at exit hidden (its engine processes' one line on Triton, printed before any
    # logging is set up there, remains)
    lines = [line for line in srv.text.splitlines() if line.strip() and "Triton is installed" not in line]
    assert not [line for line in lines if "WARNING" in line or "leaked" in line or "Loading" in line], lines
    assert len(lines) <= 12, lines


def test_the_schema_fuzzer_finds_no_server_error_and_every_answer_conforms(models):
    srv = Server("--encoder", str(models["encoder"]), "--decoder", str(models["decoder"]), *ENGINE,
                 "--max-model-len", "256").wait_ready(timeout=900)
    try:
        fuzz(srv.url, "decoder", examples=25, answering={"POST /v1/completions", "POST /v1/answer"})
    finally:
        assert srv.stop(timeout=60) == 0


def test_service_benchmark_runs_at_small_scale(tmp_path):
    """benchmarks/bench_service.py cannot rot: its four scenarios at toy sizes."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_service.py"), "--preset", "cpu", "--scale",
                          "small", "--out", str(tmp_path)], capture_output=True, text=True, timeout=1500,
                         env=os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "service-cpu-small.json").read_text())
    for key in ("service_ids", "service_text", "vllm_full_text"):
        assert all(run["requests_per_s"] > 0 for run in result[key])
    assert result["vllm_generator"]["requests_per_s"] > 0
    assert 0 < result["prefix_cache_hit_rate"] <= 1
    soak = result["soak"]
    assert soak["requests"] > 0 and soak["failures"] == 0 and soak["samples"] and soak["minutes"]
    assert (tmp_path / result["soak_plot"]).stat().st_size > 0
