"""The fuzzer against `arccompress serve` (transformers backend): its own OpenAPI schema, valid and invalid requests
from a fixed seed; tests/test_serve_vllm.py runs it against the vLLM backend."""

from __future__ import annotations

import json

import pytest

from arccompress.tiny import build_tiny_decoder, build_tiny_encoder

from .serve_fuzz import fuzz
from .test_serve import Server, with_chat_template

FUZZ_CONTEXT = 256  # a short context bounds what a generated max_tokens can cost


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-fuzz")
    encoder = build_tiny_encoder(root / "encoder", seed=7)
    decoder = with_chat_template(build_tiny_decoder(root / "decoder", family="llama", seed=8))
    config = json.loads((decoder / "config.json").read_text())
    (decoder / "config.json").write_text(json.dumps(config | {"max_position_embeddings": FUZZ_CONTEXT}))
    srv = Server("--encoder", str(encoder), "--decoder", str(decoder), "--served-model-name", "tiny")
    try:
        yield srv.wait_ready()
    finally:
        assert srv.stop() == 0


def test_the_schema_fuzzer_finds_no_server_error_and_every_answer_conforms(server):
    fuzz(server.url, "tiny", examples=40,
         answering={"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/answer"})
