"""Parity with the reference implementation on its golden outputs (tests/golden): token ids and embeddings.

The reference computed in float32: on the test device in float32 the embeddings match to the golden files' own
tolerance; in bfloat16 (ARCCOMPRESS_TEST_DEVICE=cuda) to the conftest's bf16 tolerance of the largest value.
"""

from __future__ import annotations

import os

import pytest
import torch

from arccompress import Compressor

from .conftest import GOLDEN, TEST_DEVICE, TEST_DTYPE, assert_close

CASES = []  # (case, layout): every golden case in the hub layout, and in the research layout where there is one
if GOLDEN is not None:
    import json

    _data = json.loads((GOLDEN / "golden.json").read_text())
    for _c in _data["compress"]:
        for _layout in ("hub", "research"):
            if _layout == "hub" or "research_layout" in _data["encoders"][_c["encoder"]]:
                CASES.append((_c, _layout))


def case_id(c: dict, layout: str) -> str:
    return f"{c['encoder']}-{layout}-head{c['decoder_index']}-chunk{c['chunk_size']}-{c['text_key']}"


@pytest.fixture(scope="module")
def compressors(golden, llama3_tokenizer):
    """(encoder, layout, head) -> Compressor; the research layout for encoders that have one."""
    out = {}
    for name, enc in golden["encoders"].items():
        for head in range(enc["n_decoders"]):
            out[name, "hub", head] = Compressor.from_pretrained(
                golden["root"] / enc["hub_layout"], tokenizer=llama3_tokenizer, head=head, device=TEST_DEVICE,
                dtype=TEST_DTYPE,
            )
            if "research_layout" in enc:
                out[name, "research", head] = Compressor.from_pretrained(
                    golden["root"] / enc["research_layout"], tokenizer=llama3_tokenizer, head=head, device=TEST_DEVICE,
                    dtype=TEST_DTYPE, backbone_params=golden["root"] / enc["research_backbone_params"],
                )
    return out


@pytest.mark.parametrize(("case", "layout"), CASES, ids=[case_id(*c) for c in CASES])
def test_embeddings_match_reference(case, layout, compressors, golden):
    comp = compressors[case["encoder"], layout, case["decoder_index"]]
    assert comp.tokenize([case["text"]])[0] == case["token_ids"]
    ctx = comp.compress(case["text"], chunk_size=case["chunk_size"])
    assert tuple(ctx.embeddings.shape) == tuple(case["shape"])
    assert ctx.num_tokens == case["num_tokens"]
    assert ctx.embeddings.device == TEST_DEVICE and ctx.dtype == TEST_DTYPE
    assert_close(ctx.embeddings, torch.tensor(case["embeddings"]),
                 float32_atol=golden["tolerances"]["embeddings_max_abs"], what="embeddings")


def test_whole_golden_set_in_one_batch_matches(compressors, golden):
    """All golden texts of one encoder head compressed together give the reference's numbers too."""
    for (name, layout, head), comp in compressors.items():
        for chunk in (None, 64):
            cases = [c for c in golden["compress"] if c["encoder"] == name and c["decoder_index"] == head
                     and c["chunk_size"] == chunk]
            if not cases:
                continue
            ctxs = comp.compress([c["text"] for c in cases], chunk_size=chunk, batch_size=3)
            for c, ctx in zip(cases, ctxs):
                assert_close(ctx.embeddings, torch.tensor(c["embeddings"]),
                             float32_atol=golden["tolerances"]["embeddings_max_abs"],
                             what=f"{name} {layout} head {head} {c['text_key']}")


def test_golden_sizes_are_reported(compressors, golden):
    for (name, _, _), comp in compressors.items():
        enc = golden["encoders"][name]
        assert comp.num_heads == enc["n_decoders"]
        assert comp.decoder_hidden_size == enc["decoder_hidden_size"]
        assert comp.pooling_factor == enc["pooling_factor"]


def test_vendored_golden_data_is_the_reference_copy(golden):
    """tests/golden is a byte-for-byte copy of the reference outputs (and the research embedder rebuilt from the
    hub tensors holds the same tensors), checked wherever the original folder is at hand."""
    import hashlib
    from pathlib import Path

    from safetensors.torch import load_file

    from .conftest import REPO, RESEARCH_EMBEDDER

    original = Path(os.environ.get("ARCCOMPRESS_GOLDEN_ORIGINAL", REPO.parent / "shared" / "golden"))
    if not (original / "golden.json").is_file():
        pytest.skip("no original reference outputs beside this clone to compare tests/golden with (set "
                    "ARCCOMPRESS_GOLDEN_ORIGINAL to their folder); the parity tests use tests/golden as it is")
    vendored = REPO / "tests" / "golden"
    for file in sorted(p for p in original.rglob("*") if p.is_file()):
        rel = file.relative_to(original)
        if rel == RESEARCH_EMBEDDER:
            rebuilt, reference = load_file(golden["root"] / rel), load_file(file)
            assert rebuilt.keys() == reference.keys() and all(torch.equal(rebuilt[k], reference[k]) for k in rebuilt)
            continue
        assert hashlib.sha256((vendored / rel).read_bytes()).digest() == hashlib.sha256(file.read_bytes()).digest(), rel
