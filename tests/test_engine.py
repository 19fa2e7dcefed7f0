"""The engine protocol on the transformers engine: one reading of the input, OpenAI's sampling meanings, stored
contexts by reference, decoder token ids verbatim, and what a completion reports."""

from __future__ import annotations

import json

import pytest
import torch

from arccompress import Compressor, ContextNotFoundError, Generator, InputError
from arccompress.engines.base import Completion, Sampling
from arccompress.engines.text import StopFilter, cut_at_stop
from arccompress.prompts import ContextRef, ContextText, PromptBuilder, TokenIds, fewshot_qa_prompt

DOC = "The Loire is the longest river in France, flowing 1,006 km to the Atlantic."
PROMPTS = [
    ["Document: ", ContextText(DOC), "\nQuestion: How long is the Loire?\nAnswer:"],
    "A plain text prompt without any context",
    ["Two: ", ContextText("first one"), " and ", ContextText(DOC * 2, chunk_size=32), "."],
]


class DictStore:
    """A context store as engines see it (`in`, `get_many`), recording its reads."""

    def __init__(self, contexts: dict):
        self.contexts = contexts
        self.reads: list[list[str]] = []
        self.path = "dict-store"

    def __contains__(self, key: object) -> bool:
        return key in self.contexts

    def get_many(self, keys, *, device="cpu"):
        self.reads.append(list(keys))
        return [self.contexts[k].to(device=device) for k in keys]


@pytest.fixture(scope="module")
def comp(tiny_dir) -> Compressor:
    return Compressor.from_pretrained(tiny_dir / "hub")


@pytest.fixture(scope="module")
def gen(tiny_dir, comp) -> Generator:
    return Generator.from_pretrained(tiny_dir / "llama-decoder", compressor=comp)


def test_one_prompt_gives_one_a_list_gives_a_list_and_n_gives_n(gen):
    one = gen.generate(PROMPTS[0], max_new_tokens=6)
    assert isinstance(one, str)
    many = gen.generate(PROMPTS, max_new_tokens=6)
    assert isinstance(many, list) and len(many) == 3 and many[0] == one
    assert gen.generate([], max_new_tokens=6) == []
    assert gen.generate(["plain one", "plain two"], max_new_tokens=3) == [gen.generate("plain one", max_new_tokens=3),
                                                                           gen.generate("plain two", max_new_tokens=3)]
    three = gen.generate(PROMPTS[0], max_new_tokens=6, n=3)  # greedy n > 1: n equal sequences, as OpenAI's
    assert three == [one] * 3
    sampled = gen.generate(PROMPTS[:2], max_new_tokens=5, n=2, temperature=1.0, seed=3)
    assert [len(s) for s in sampled] == [2, 2] and all(isinstance(t, str) for s in sampled for t in s)
    assert len(gen.generate_ids(PROMPTS[:2], max_new_tokens=4, n=2, temperature=1.0)) == 4
    with pytest.raises(InputError, match="disagree"):
        gen.generate(PROMPTS[0], n=2, num_return_sequences=3)


def test_stop_strings_are_trimmed_like_openai(gen):
    prompt = "Numbers 1 2 3"  # the tiny decoder's 24 greedy tokens hold printable ASCII here
    full = gen.complete([[prompt]], Sampling(max_new_tokens=24))[0]
    text, ids = full.texts[0], full.token_ids[0]
    assert full.finish_reasons == ["length"] and len(ids) == 24
    stop = next(text[k: k + 2] for k in range(3, len(text) - 2)
                if text[k: k + 2].isascii() and text[k: k + 2].isprintable() and text.find(text[k: k + 2]) == k)
    cut = gen.complete([[prompt]], Sampling(max_new_tokens=24, stop=(stop, "never-there")))[0]
    assert cut.texts == [text[: text.index(stop)]]  # before the stop string, as OpenAI's
    assert cut.finish_reasons == ["stop"]
    assert cut.token_ids[0] == ids[: len(cut.token_ids[0])] and len(cut.token_ids[0]) < len(ids)
    assert stop in gen.tokenizer.decode(cut.token_ids[0])  # the ids run to the token completing the stop string
    assert gen.generate(prompt, max_new_tokens=24, stop=stop) == text[: text.index(stop)]
    assert "".join(gen.stream(prompt, max_new_tokens=24, stop=[stop])) == text[: text.index(stop)]
    # transformers' own stop_strings keep transformers' meaning: the text runs through the stop string
    assert stop in gen.generate(prompt, max_new_tokens=24, stop_strings=[stop])


def test_temperature_samples_and_a_seed_reproduces(gen):
    greedy = gen.generate(PROMPTS[0], max_new_tokens=16)
    state = torch.random.get_rng_state()
    a = gen.generate(PROMPTS[0], max_new_tokens=16, temperature=1.0, seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)  # a seed leaves the caller's random state alone
    assert a == gen.generate(PROMPTS[0], max_new_tokens=16, temperature=1.0, seed=11)
    assert a != greedy
    assert gen.generate(PROMPTS[0], max_new_tokens=16, temperature=1.0, seed=12) != a
    # explicit do_sample wins over temperature; top_p passes with sampling
    assert gen.generate(PROMPTS[0], max_new_tokens=16, temperature=1.0, do_sample=False) == greedy
    assert isinstance(gen.generate(PROMPTS[0], max_new_tokens=4, temperature=0.7, top_p=0.9, seed=1), str)
    # sampling means what it means on vLLM and OpenAI's API: no top-k cut (transformers' default is 50) unless asked
    kwargs, _ = gen.generate_kwargs(gen.sampling(temperature=0.7, top_p=0.9))
    assert kwargs["top_k"] == 0 and kwargs["temperature"] == 0.7 and kwargs["top_p"] == 0.9
    assert gen.generate_kwargs(gen.sampling(temperature=0.7, top_k=40))[0]["top_k"] == 40


def test_sampling_reads_keywords_once_and_checks_them():
    s = Sampling.from_kwargs(max_tokens=7, temperature=0.5, stop="x", num_beams=2, top_k=None)
    assert (s.max_new_tokens, s.temperature, s.stop, s.n) == (7, 0.5, ("x",), 1)
    assert s.extra == {"num_beams": 2, "top_k": None}
    assert Sampling.from_kwargs(max_new_tokens=None, stop=None, seed=None) == Sampling()
    for kwargs, message in (({"max_new_tokens": 0}, "max_new_tokens must be a positive int"),
                            ({"max_new_tokens": 3, "max_tokens": 4}, "not both"),
                            ({"temperature": -1}, "temperature must be >= 0"),
                            ({"temperature": float("nan")}, "temperature must be a number"),
                            ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
                            ({"stop": ["ok", ""]}, "stop must be"),
                            ({"seed": 1.5}, "seed must be an int"),
                            ({"n": True}, "n must be a positive int")):
        with pytest.raises(InputError, match=message):
            Sampling.from_kwargs(**kwargs)


def test_stop_rules():
    assert cut_at_stop("abc STOP def stop", ["stop", "STOP"]) == ("abc ", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    f = StopFilter(["END"])
    out = [f.feed(p) for p in ("ab", "cE", "N", "xE", "ND", "more")]
    assert out == ["ab", "c", "", "ENx", "", ""] and f.done and f.flush() == ""
    g = StopFilter(["END"])
    assert g.feed("aE") == "a" and g.flush() == "E"


def test_a_prompt_is_laid_out_once_per_call(gen, monkeypatch):
    calls = {"layout": 0, "compress": 0, "embed": 0}
    layout, compress = PromptBuilder.layout, gen.compressor.compress
    embed = gen.prompts._embed

    def counting_layout(self, *args, **kwargs):
        calls["layout"] += 1
        return layout(self, *args, **kwargs)

    def counting_compress(*args, **kwargs):
        calls["compress"] += 1
        return compress(*args, **kwargs)

    def counting_embed(ids):
        calls["embed"] += 1
        return embed(ids)

    monkeypatch.setattr(PromptBuilder, "layout", counting_layout)
    monkeypatch.setattr(gen.compressor, "compress", counting_compress)
    monkeypatch.setattr(gen.prompts, "_embed", counting_embed)
    done = gen.complete([p if isinstance(p, list) else [p] for p in PROMPTS], Sampling(max_new_tokens=3))
    # one layout, one compression per chunk size (None and 32), one embedding lookup for every text piece
    assert calls == {"layout": 1, "compress": 2, "embed": 1}
    calls.update(layout=0, compress=0, embed=0)
    gen.generate(PROMPTS, max_new_tokens=3)
    assert calls["layout"] == 1 and calls["embed"] == 1
    calls.update(layout=0)
    gen.answer("How long?", [DOC, "another document"], examples=[(DOC, "Where?", "France")], max_new_tokens=3)
    assert calls["layout"] == 1
    saved = [gen.savings(p) for p in PROMPTS]
    assert [c.prompt_positions for c in done] == [s.prompt_length for s in saved]
    assert [c.positions_saved for c in done] == [s.tokens_saved for s in saved]
    assert done[1].positions_saved == 0 and done[0].positions_saved > 0


def test_completion_reports_positions_and_times_the_prefill_when_asked(gen):
    plain = gen.complete([[p] if isinstance(p, str) else p for p in PROMPTS], Sampling(max_new_tokens=4))
    assert all(isinstance(c, Completion) and c.prefill_seconds is None for c in plain)
    timed = gen.complete([PROMPTS[0]], Sampling(max_new_tokens=4), time_prefill=True)[0]
    assert timed.prefill_seconds is not None and 0 < timed.prefill_seconds < 60
    assert timed.token_ids == plain[0].token_ids and timed.texts == plain[0].texts


def test_context_refs_are_read_from_the_store_once_without_the_encoder(tiny_dir, comp, gen, monkeypatch):
    stored = {"doc-1": comp.compress(DOC), "doc-2": comp.compress_ids([5, 6, 7, 8, 9, 10, 11, 12, 13])}
    store = DictStore(stored)
    engine = Generator(gen.model, gen.tokenizer, comp, store=store)
    by_ref = [["Document: ", ContextRef("doc-1"), "\nAnswer:"], [ContextRef("doc-2"), " and ", ContextRef("doc-1")]]
    by_value = [["Document: ", stored["doc-1"], "\nAnswer:"], [stored["doc-2"], " and ", stored["doc-1"]]]
    expected = engine.generate(by_value, max_new_tokens=8)
    monkeypatch.setattr(comp.model, "forward", lambda *a, **k: pytest.fail("the encoder ran for a stored context"))
    assert engine.generate(by_ref, max_new_tokens=8) == expected
    assert store.reads == [["doc-1", "doc-2"]]  # one read for every prompt of the call, each id once
    assert fewshot_qa_prompt("Q?", [ContextRef("doc-1")])[1] == ContextRef("doc-1")
    assert isinstance(engine.answer("How long?", ContextRef("doc-1"), max_new_tokens=4), str)
    s = engine.savings(by_ref[1])
    assert s.context_text_tokens == 9 + stored["doc-1"].num_tokens and not s.estimated  # the tiny pair shares a tokenizer
    with pytest.raises(ContextNotFoundError, match=r"prompt 1, part 2: .*'doc-9'"):
        engine.generate([["a"], ["b", ContextRef("doc-1"), ContextRef("doc-9")]])
    with pytest.raises(InputError, match=r"prompt 0, part 1: ContextRef\(id='doc-1'\).*no store"):
        gen.generate(["x", ContextRef("doc-1")])
    with pytest.raises(TypeError, match="ContextRef"):
        ContextRef(17)


def test_context_refs_through_a_real_store(tiny_dir, comp, gen, tmp_path):
    from arccompress import ContextStore

    store = ContextStore(tmp_path / "s", compressor=comp, codec="float32")
    ctx = comp.compress(DOC)
    store.add("d", ctx)
    store.flush()
    engine = Generator(gen.model, gen.tokenizer, comp, store=store)
    prompt = ["Doc: ", ContextRef("d"), "\nQ:"]
    assert engine.generate_ids(prompt, max_new_tokens=6) == engine.generate_ids(["Doc: ", ctx, "\nQ:"], max_new_tokens=6)
    assert engine.savings(prompt).context_text_tokens == ctx.num_tokens > 0


def test_savings_of_stored_contexts_for_another_tokenizer_are_estimates(comp, llama3_tokenizer):
    builder = PromptBuilder(llama3_tokenizer, comp, torch.zeros(len(llama3_tokenizer), comp.decoder_hidden_size))
    with_text = comp.compress(DOC)
    without = comp.compress_ids([5] * 40)
    s = builder.savings_of(builder.layout([["Doc: ", with_text]])[0])
    assert not s.estimated and s.context_text_tokens == len(llama3_tokenizer(DOC, add_special_tokens=False).input_ids)
    s = builder.savings_of(builder.layout([["Doc: ", without, with_text]])[0])
    assert s.estimated and s.context_text_tokens == 40 + len(llama3_tokenizer(DOC, add_special_tokens=False).input_ids)


def test_token_ids_are_inserted_verbatim(gen, comp):
    bos = gen.tokenizer.bos_token_id
    ctx = comp.compress(DOC)
    doc_ids = gen.tokenizer("Doc: ", add_special_tokens=False).input_ids
    as_text = gen.prompt_embeds(["Doc: ", ctx, " end"])[0]
    as_ids = gen.prompt_embeds([TokenIds([bos, *doc_ids]), ctx, " end"])[0]  # first part: no BOS added
    assert torch.equal(as_text, as_ids)
    assert gen.segment_ids([TokenIds([7, 8]), "ab", TokenIds(torch.tensor([9]))]) == \
        [[7, 8, *gen.tokenizer("ab", add_special_tokens=False).input_ids, 9]]
    assert gen.segment_ids(["x", TokenIds([7])])[0][0] == bos  # not first: BOS as usual
    assert gen.savings([TokenIds([1, 2, 3]), ctx]).text_tokens == 3
    with pytest.raises(InputError, match=r"prompt 1, part 2: token id 100000 is outside"):
        gen.generate([["ok"], ["a", ctx, TokenIds([5, 100000])]])
    with pytest.raises(InputError, match="negative"):
        TokenIds([1, -2])
    with pytest.raises(TypeError, match="index 1 is a str"):
        TokenIds([1, "2"])
    with pytest.raises(InputError, match="prompt 0 is empty"):
        gen.generate([TokenIds([])])


def test_describe_says_what_determines_the_outputs(tiny_dir, comp, gen):
    d = gen.describe()
    assert json.loads(json.dumps(d)) == d
    assert d["backend"] == "transformers" and d["quantization"] is None and d["dtype"] == "float32"
    assert d["encoder_fingerprint"] == comp.fingerprint and d["head"] == 0
    again = Generator.from_pretrained(tiny_dir / "llama-decoder", compressor=comp).describe()
    assert again["decoder_fingerprint"] == d["decoder_fingerprint"]
    multi = Compressor.from_pretrained(tiny_dir / "multi")
    other = Generator.from_pretrained(tiny_dir / "mistral-decoder", compressor=multi).describe()
    assert other["decoder_fingerprint"] != d["decoder_fingerprint"] and other["head"] == 1


def test_8bit_with_bfloat16_is_refused_not_cast(tiny_dir, comp):
    from arccompress.engines.transformers import quantization_config
    from arccompress.engines import VLLMGenerator

    with pytest.raises(InputError, match="8-bit quantization computes in float16"):
        Generator.from_pretrained(tiny_dir / "llama-decoder", compressor=comp, quantization="8bit", dtype="bfloat16")
    with pytest.raises(InputError, match="float16"):
        quantization_config("8bit", torch.bfloat16)
    with pytest.raises(InputError, match="4 bits only"):  # refused before vLLM is imported: no silent 4-bit
        VLLMGenerator.from_pretrained(tiny_dir / "llama-decoder", compressor=comp, quantization="8bit")


def test_old_import_paths_still_work_and_say_where_to_go():
    """The import paths of 0.3 keep working for one release: the same objects, with a DeprecationWarning naming the
    new module (and an attribute that never existed is still an AttributeError)."""
    import importlib
    import sys

    from arccompress.console import progress_bar
    from arccompress.devices import resolve_device
    from arccompress.engines import VLLMClient, VLLMGenerator
    from arccompress.engines.base import Sampling
    from arccompress.engines.text import StopFilter

    for old in ("arccompress.engine", "arccompress.vllm", "arccompress.vllm.generator", "arccompress.runtime",
                "arccompress.generation", "arccompress.client", "arccompress.wire", "arccompress.openai_api"):
        sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=r"arccompress\.vllm moved: import from arccompress\.engines\.vllm"):
        old_vllm = importlib.import_module("arccompress.vllm")
    assert old_vllm.VLLMGenerator is VLLMGenerator and old_vllm.VLLMClient is VLLMClient
    with pytest.warns(DeprecationWarning, match="arccompress.engines.base or arccompress.engines.text"):
        old_engine = importlib.import_module("arccompress.engine")
    assert old_engine.Sampling is Sampling and old_engine.StopFilter is StopFilter
    with pytest.warns(DeprecationWarning):
        old_runtime = importlib.import_module("arccompress.runtime")
    assert old_runtime.resolve_device is resolve_device and old_runtime.progress_bar is progress_bar
    with pytest.warns(DeprecationWarning):
        assert importlib.import_module("arccompress.vllm.generator").engine_memory
    from arccompress.store.codec import parse_codec

    sys.modules.pop("arccompress.codec", None)
    with pytest.warns(DeprecationWarning, match=r"arccompress\.codec moved: import from arccompress\.store\.codec"):
        assert importlib.import_module("arccompress.codec").parse_codec is parse_codec
    with pytest.raises(AttributeError, match="moved to arccompress.engines.transformers"):
        with pytest.warns(DeprecationWarning):
            importlib.import_module("arccompress.generation").no_such_name
