"""Parity with the reference on its golden outputs (tests/golden): decoder inputs, first-step logits, greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch

from arccompress import CompressedContext, Compressor, ContextText, Generator

from .conftest import GOLDEN

CASES = json.loads((GOLDEN / "golden.json").read_text())["generate"] if GOLDEN is not None else []


@pytest.fixture(scope="module")
def generators(golden, llama3_tokenizer):
    """One Generator per (encoder, decoder); two-head encoders are left open for the Generator to pick."""
    out = {}
    for case in golden["generate"]:
        key = (case["encoder"], case["decoder"])
        if key not in out:
            comp = Compressor.from_pretrained(golden["root"] / golden["encoders"][case["encoder"]]["hub_layout"],
                                              tokenizer=llama3_tokenizer, device="cpu")
            out[key] = Generator.from_pretrained(golden["root"] / golden["decoders"][case["decoder"]]["path"],
                                                 compressor=comp)
    return out


def parts_of(case: dict, gen: Generator, precompress: bool) -> list:
    parts = []
    for p in case["parts"]:
        if isinstance(p, str):
            parts.append(p)
        else:
            text = case["contexts"][p["context"]]
            parts.append(gen.compressor.compress(text) if precompress else ContextText(text))
    return parts


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("precompress", [True, False], ids=["CompressedContext", "ContextText"])
def test_decoder_input_logits_and_greedy_tokens(case, precompress, generators, golden):
    gen = generators[case["encoder"], case["decoder"]]
    assert gen.compressor.head == case["decoder_index"]
    assert gen.prompts.text.kind == "sentencepiece"
    parts = parts_of(case, gen, precompress)
    assert gen.segment_ids(parts) == case["expected_segment_ids"]

    inputs = gen.prepare_inputs(parts)
    # the decoder reads the segments' token embeddings with each context's embeddings in place, unchanged
    embed = gen.model.get_input_embeddings()
    expected_rows = []
    contexts = [p if isinstance(p, CompressedContext) else gen.compressor.compress(p.text)
                for p in parts if not isinstance(p, str)]
    for k, seg in enumerate(case["expected_segment_ids"]):
        expected_rows.append(embed(torch.tensor(seg, dtype=torch.long)))
        if k < len(contexts):
            expected_rows.append(contexts[k].embeddings)
    # contexts compressed on the fly share a batch: equal to alone within the batch-invariance bound
    assert torch.allclose(inputs["inputs_embeds"][0], torch.cat(expected_rows), rtol=0, atol=1e-5)
    assert inputs["attention_mask"].all()

    with torch.inference_mode():
        logits = gen.model(**inputs).logits[0, -1]
    top = case["expected_first_logits_top8"]
    assert logits.topk(8).indices.tolist() == top["ids"]
    diff = (logits[top["ids"]] - torch.tensor(top["values"])).abs().max().item()
    assert diff <= golden["tolerances"]["logits_max_abs"], f"logit diff {diff:.3e}"

    assert gen.generate_ids(parts, max_new_tokens=8, do_sample=False)[0] == case["expected_greedy_tokens"]


def test_golden_prompts_batched_give_the_same_tokens(generators, golden):
    by_generator: dict = {}
    for case in golden["generate"]:
        by_generator.setdefault((case["encoder"], case["decoder"]), []).append(case)
    for key, cases in by_generator.items():
        gen = generators[key]
        prompts = [parts_of(c, gen, precompress=True) for c in cases] * 2
        got = gen.generate_ids(prompts, max_new_tokens=8, do_sample=False)
        assert got == [c["expected_greedy_tokens"] for c in cases] * 2
