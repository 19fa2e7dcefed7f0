"""Generator behaviour on tiny decoders built in fixtures: batching, streaming, quantization, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from arccompress import CompressedContext, Compressor, ContextText, Generator, PromptSavings, fewshot_qa_prompt
from arccompress.prompts import first_answer
from arccompress.tiny import build_tiny_encoder

DOC = "The Loire is the longest river in France, flowing 1,006 km to the Atlantic."
PROMPTS = [
    ["Document: ", ContextText(DOC), "\nQuestion: How long is the Loire?\nAnswer:"],
    "A plain text prompt without any context",
    [ContextText("short"), " then text"],
    ["Two contexts: ", ContextText("first one here"), " and ", ContextText(DOC * 3, chunk_size=32), "."],
]


@pytest.fixture(scope="module")
def gen(tiny_dir) -> Generator:
    comp = Compressor.from_pretrained(tiny_dir / "hub")
    return Generator.from_pretrained(tiny_dir / "llama-decoder", compressor=comp)


def test_parts_and_public_attributes(gen):
    assert gen.model.config.model_type == "llama"
    assert gen.tokenizer.bos_token_id == 1 and gen.compressor.head == 0
    assert gen.prompts.text.kind == "bpe"  # no SentencePiece model: plain BPE
    assert gen.segment_ids(PROMPTS[2]) == [[1], gen.tokenizer(" then text", add_special_tokens=False).input_ids]
    # special-token strings in text stay text
    assert 2 not in gen.segment_ids(["text </s> more"])[0][1:]


def test_prepare_inputs_left_pads(gen):
    inputs = gen.prepare_inputs(PROMPTS)
    emb, mask = inputs["inputs_embeds"], inputs["attention_mask"]
    assert emb.shape[:2] == mask.shape and emb.shape[0] == len(PROMPTS) and emb.shape[2] == 64
    assert emb.dtype == gen.model.dtype and emb.device == gen.device
    assert mask[:, -1].all()  # left padding: every row ends with a real position
    for b in range(len(PROMPTS)):
        real = int(mask[b].sum())
        assert not mask[b, : emb.shape[1] - real].any()
        assert (emb[b, : emb.shape[1] - real] == 0).all()
        alone = gen.prepare_inputs(PROMPTS[b])
        assert alone["inputs_embeds"].shape[1] == real
        assert torch.allclose(alone["inputs_embeds"][0], emb[b, emb.shape[1] - real:], atol=1e-5)


def test_batched_greedy_equals_alone(gen):
    alone = [gen.generate_ids(p, max_new_tokens=12)[0] for p in PROMPTS]
    assert gen.generate_ids(PROMPTS, max_new_tokens=12) == alone
    assert gen.generate_ids(PROMPTS[::-1], max_new_tokens=12) == alone[::-1]


def test_generate_returns_str_or_list(gen):
    one = gen.generate(PROMPTS[0], max_new_tokens=6)
    assert isinstance(one, str)
    many = gen.generate(PROMPTS, max_new_tokens=6)
    assert isinstance(many, list) and len(many) == len(PROMPTS) and many[0] == one
    assert gen.generate([], max_new_tokens=6) == []
    ids = gen.generate_ids(PROMPTS[0], max_new_tokens=6)[0]
    # the decoded ids, less a character cut short at the end (random weights make invalid UTF-8), as vLLM gives
    assert one == gen.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def test_same_as_raw_transformers_generate(gen):
    inputs = gen.prepare_inputs(PROMPTS)
    raw = gen.model.generate(**inputs, max_new_tokens=9, do_sample=False, pad_token_id=0)
    ours = gen.generate_ids(PROMPTS, max_new_tokens=9)
    for r, o in zip(raw.tolist(), ours):
        assert r[: len(o)] == o


def test_generation_kwargs_pass_through(gen):
    torch.manual_seed(0)
    a = gen.generate(PROMPTS[0], max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9)
    torch.manual_seed(0)
    b = gen.generate(PROMPTS[0], max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9)
    assert a == b
    assert len(gen.generate_ids(PROMPTS[1], max_new_tokens=3)[0]) <= 3


def test_stops_at_eos(gen):
    eos = gen.model.generation_config.eos_token_id
    # make EOS the only possible token after the first step: generation must stop there
    bias = torch.full((gen.model.config.vocab_size,), -1e4)
    bias[eos] = 1e4
    old = gen.model.lm_head.bias
    gen.model.lm_head.bias = torch.nn.Parameter(bias)
    try:
        assert gen.generate_ids(PROMPTS[:2], max_new_tokens=5) == [[], []]
    finally:
        gen.model.lm_head.bias = old


def test_stream_yields_the_generated_text(gen):
    pieces = list(gen.stream(PROMPTS[0], max_new_tokens=15))
    assert "".join(pieces) == gen.generate(PROMPTS[0], max_new_tokens=15)
    with pytest.raises(TypeError):
        list(gen.stream(PROMPTS[:2]))


def test_stop_strings(gen):
    full = gen.generate(PROMPTS[1], max_new_tokens=20)
    if len(full) >= 4:
        stop = full[2:4]
        cut = gen.generate(PROMPTS[1], max_new_tokens=20, stop_strings=[stop])
        assert stop in cut and len(cut) <= len(full)


def test_fewshot_prompt_template():
    parts = fewshot_qa_prompt(" Who? ", "doc B", examples=[("doc A", "What?", "That.")])
    assert parts == [
        "Document: ", ContextText("doc A"), "\nQuestion: What?\nAnswer: That.\n\n",
        "Document: ", ContextText("doc B"), "\nQuestion: Who?\nAnswer:",
    ]
    two = fewshot_qa_prompt("Q", ["p1", "p2"])
    assert two == ["Document: ", ContextText("p1"), ContextText("p2"), "\nQuestion: Q\nAnswer:"]
    assert first_answer(" Paris.\n\nQuestion: next") == "Paris."


def test_answer_and_savings(gen):
    answer = gen.answer("How long is the Loire?", DOC, examples=[(DOC, "Where does it flow?", "The Atlantic")],
                        max_new_tokens=10)
    assert isinstance(answer, str) and "\n\n" not in answer
    s = gen.savings(PROMPTS[0])
    assert s.num_contexts == 1
    assert s.context_text_tokens == len(gen.prompts.text.encode(DOC)) == len(DOC.encode())
    assert s.context_embeddings == gen.compressor.compress(DOC).num_embeddings
    assert s.prompt_length == gen.prepare_inputs(PROMPTS[0])["inputs_embeds"].shape[1]
    assert s.full_text_prompt_length > s.prompt_length and s.context_compression_ratio > 5
    ids_only = gen.compressor.compress_ids([5, 6, 7])
    # a context without its text counts its own (encoder) tokens: exact here, the tiny pair shares a tokenizer
    assert gen.savings(["x", ids_only]) == PromptSavings(3, ids_only.num_embeddings, 2, 1, estimated=False)


def test_bad_prompts(gen):
    with pytest.raises(TypeError, match="part 1"):
        gen.generate(["text", 42])
    with pytest.raises(TypeError, match="prompt 1, part 0"):
        gen.generate([["ok"], [3.5]])
    other = CompressedContext(torch.zeros(3, 32), 10, "x", 0, 8)
    with pytest.raises(ValueError, match="hidden size"):
        gen.generate(["a", other])
    wrong_head = CompressedContext(torch.zeros(3, 64), 10, "x", 1, 8)
    with pytest.raises(ValueError, match="head 1"):
        gen.generate(["a", wrong_head])
    foreign = CompressedContext(torch.zeros(3, 64), 10, "x", 0, 8, encoder_fingerprint="feedbeef")
    with pytest.raises(ValueError, match="another encoder"):
        gen.generate(["a", foreign])
    with pytest.raises(ValueError, match="index 0"):
        gen.generate(["a", ContextText("")])
    assert gen.generate(PROMPTS[0], max_new_tokens=3) == gen.generate(PROMPTS[0], max_new_tokens=3)


def test_hidden_size_mismatch(tiny_dir, tmp_path):
    comp = Compressor.from_pretrained(build_tiny_encoder(tmp_path / "enc128", decoder_hidden_size=128))
    with pytest.raises(ValueError, match="hidden size 64.*128"):
        Generator.from_pretrained(tiny_dir / "llama-decoder", compressor=comp)


def test_two_head_encoder_follows_the_decoder_family(tiny_dir):
    comp = Compressor.from_pretrained(tiny_dir / "multi")
    gen = Generator.from_pretrained(tiny_dir / "mistral-decoder", compressor=comp)
    assert comp.head == 1
    assert isinstance(gen.generate(PROMPTS[0], max_new_tokens=4), str)
    llama_head = Compressor.from_pretrained(tiny_dir / "multi", head="llama")
    with pytest.raises(ValueError, match="mistral decoder, whose head is 1"):
        Generator.from_pretrained(tiny_dir / "mistral-decoder", compressor=llama_head)
    open_head = Compressor.from_pretrained(tiny_dir / "multi")
    Generator.from_pretrained(tiny_dir / "llama-decoder", compressor=open_head)
    assert open_head.head == 0


def test_direct_construction_and_missing_tokenizer(tiny_dir, tmp_path):
    comp = Compressor.from_pretrained(tiny_dir / "hub")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "llama-decoder")
    tok = AutoTokenizer.from_pretrained(tiny_dir / "llama-decoder")
    gen = Generator(model, tok, comp)
    assert isinstance(gen.generate(PROMPTS[1], max_new_tokens=2), str)
    with pytest.raises(TypeError, match="tokenizer"):
        Generator(model, None, comp)
    bare = tmp_path / "no-tokenizer"
    model.save_pretrained(bare)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        Generator.from_pretrained(bare, compressor=comp)
    with pytest.raises(ValueError, match="quantization"):
        Generator.from_pretrained(tiny_dir / "llama-decoder", compressor=comp, quantization="3bit")


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_decoders_generate(tiny_dir, quantization):
    pytest.importorskip("bitsandbytes")
    comp = Compressor.from_pretrained(tiny_dir / "hub")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = Generator.from_pretrained(tiny_dir / "llama-decoder", compressor=comp, quantization=quantization)
        expected = "Linear4bit" if quantization == "4bit" else "Linear8bitLt"
        assert type(gen.model.model.layers[0].mlp.up_proj).__name__ == expected
        ids = gen.generate_ids(PROMPTS, max_new_tokens=6)
    assert len(ids) == len(PROMPTS) and all(len(r) <= 6 for r in ids)
    assert sum(map(len, ids)) > 0
