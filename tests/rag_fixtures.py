"""Fixtures of the framework adapters' tests: tiny models with a store holding half the corpus (tests/rag_corpus.py),
a spy on the encoder, and one `arccompress serve` for all three frameworks.

A test module loads it with `pytest_plugins = ["tests.rag_fixtures"]` (and never imports it: pytest does), so its
session fixtures — the models, the server — are made once however many of the three test files run.
"""

from __future__ import annotations

import pytest

from arccompress import Compressor, ContextStore, Generator
from arccompress.engines import ServiceClient
from arccompress.tiny import build_tiny_decoder, build_tiny_encoder
from tests.rag_corpus import KEY, PASSAGES, STORED
from tests.test_serve import Server


@pytest.fixture(scope="session")
def rag(tmp_path_factory):
    """Tiny encoder and decoder, a Generator, a store of the STORED passages, and a store of another encoder."""
    root = tmp_path_factory.mktemp("rag")
    encoder = build_tiny_encoder(root / "encoder", seed=7)
    decoder = build_tiny_decoder(root / "decoder", family="llama", seed=8)
    comp = Compressor.from_pretrained(encoder, device="cpu")
    gen = Generator.from_pretrained(decoder, compressor=comp)
    with ContextStore(root / "store", compressor=comp) as store:
        store.add_many(STORED, comp.compress([PASSAGES[k] for k in STORED]))
    other = Compressor.from_pretrained(build_tiny_encoder(root / "other-encoder", seed=9), device="cpu")
    with ContextStore(root / "other-store", compressor=other) as foreign:
        foreign.add_many(STORED[:4], other.compress([PASSAGES[k] for k in STORED[:4]]))
    return {"encoder": encoder, "decoder": decoder, "comp": comp, "gen": gen,
            "store": ContextStore(root / "store", compressor=comp), "other_store": ContextStore(root / "other-store"),
            "store_path": root / "store"}


@pytest.fixture
def compressed(rag, monkeypatch) -> list[str]:
    """The texts the encoder is asked to compress during the test, in order."""
    seen: list[str] = []
    comp = rag["comp"]
    compress = comp.compress

    def spy(texts, **kwargs):
        seen.extend([texts] if isinstance(texts, str) else list(texts))
        return compress(texts, **kwargs)

    monkeypatch.setattr(comp, "compress", spy)
    return seen


@pytest.fixture(scope="session")
def service(rag):
    """`arccompress serve` of the same encoder, decoder and store, and a ServiceClient of it."""
    server = Server("--encoder", str(rag["encoder"]), "--decoder", str(rag["decoder"]), "--store",
                    str(rag["store_path"]), "--api-key", KEY, "--served-model-name", "tiny")
    try:
        server.wait_ready()
        yield ServiceClient(server.url, api_key=KEY)
    finally:
        server.stop()

