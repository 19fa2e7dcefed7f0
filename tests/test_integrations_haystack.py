"""ArcGenerator: a Haystack pipeline (in-memory BM25 retriever -> generator) over compressed documents, tiny models."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys

import pytest
from haystack import Document, Pipeline
from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.utils import Secret

from arccompress import fewshot_qa_prompt
from arccompress.errors import InputError, InputTypeError, MissingDependencyError
from arccompress.integrations.haystack import ArcGenerator
from arccompress.prompts import ContextRef, ContextText
from tests.rag_corpus import KEY, PASSAGES, QUESTIONS, STORED, expected_documents, service_documents

pytest_plugins = ["tests.rag_fixtures"]
N = 12  # new tokens: enough to tell answers apart, few enough for a 2-core CI machine
# Haystack 3 loads pipelines' components and callables only from allowed modules, and its Pipeline runs async too
ALLOWED = {"allowed_modules": ["arccompress.*", "tests.*"]} \
    if "allowed_modules" in inspect.signature(Pipeline.loads).parameters else {}
try:
    from haystack import AsyncPipeline  # Haystack 2
except ImportError:
    AsyncPipeline = Pipeline


@pytest.fixture(scope="module")
def documents():
    store = InMemoryDocumentStore()
    store.write_documents([Document(id=key, content=text) for key, text in PASSAGES.items()])
    return store


def rag_pipeline(documents, generator: ArcGenerator, kind: type = Pipeline) -> Pipeline:
    pipe = kind()
    pipe.add_component("retriever", InMemoryBM25Retriever(documents, top_k=4))
    pipe.add_component("generator", generator)
    pipe.connect("retriever.documents", "generator.documents")
    return pipe


def ask(pipe: Pipeline, question: str) -> tuple[dict, list[Document]]:
    out = pipe.run({"retriever": {"query": question}, "generator": {"question": question}},
                   include_outputs_from={"retriever"})
    return out["generator"], out["retriever"]["documents"]


def pairs(docs: list[Document]) -> list[tuple[str, str]]:
    return [(d.id, d.content) for d in docs]


def test_the_pipeline_answers_as_generator_answer_does_and_reads_stored_ids(rag, documents, compressed):
    gen = rag["gen"]
    pipe = rag_pipeline(documents, ArcGenerator(engine=gen, store=rag["store"], max_new_tokens=N))
    seen_stored = seen_text = 0
    for question in QUESTIONS + ["Which town trades in copper at 9 o'clock?"]:
        compressed.clear()
        out, docs = ask(pipe, question)
        assert compressed == [d.content for d in docs if d.id not in STORED]
        expected = expected_documents(rag, pairs(docs))
        assert out["replies"] == [gen.answer(question, expected, max_new_tokens=N)]
        saved = gen.savings(fewshot_qa_prompt(question, [d if not isinstance(d, str) else gen.compressor.compress(d)
                                                         for d in expected]))
        meta = out["meta"][0]
        assert meta["usage"]["prompt_tokens"] == saved.prompt_length
        assert meta["usage"]["positions_saved"] == saved.tokens_saved > 0
        assert 0 < meta["usage"]["completion_tokens"] <= N and meta["finish_reason"] in ("stop", "length")
        assert meta["documents"] == 4 and meta["stored_documents"] == sum(d.id in STORED for d in docs)
        seen_stored += meta["stored_documents"]
        seen_text += 4 - meta["stored_documents"]
    assert seen_stored and seen_text


def test_streaming_callbacks_and_run_async_give_the_same_reply(rag, documents):
    gen, store = rag["gen"], rag["store"]
    question = QUESTIONS[1]
    docs = [Document(id=STORED[7], content="not the stored text"), Document(id="p019", content=PASSAGES["p019"])]
    generator = ArcGenerator(engine=gen, store=str(rag["store_path"]), max_new_tokens=N)  # a folder: opened
    reply = generator.run(question, docs)["replies"][0]
    assert reply == gen.answer(question, [store[STORED[7]], PASSAGES["p019"]], max_new_tokens=N)
    chunks = []
    streamed = generator.run(question, docs, streaming_callback=chunks.append)
    assert streamed["replies"] == [reply] and "".join(c.content for c in chunks) == reply
    assert chunks[0].component_info.type.endswith("ArcGenerator")
    assert streamed["meta"][0]["usage"]["prompt_tokens"] == generator.run(question, docs)["meta"][0]["usage"][
        "prompt_tokens"]

    async def run_async():
        pieces = []

        async def collect(chunk):
            pieces.append(chunk.content)

        plain = await generator.run_async(question, docs)
        stream = await generator.run_async(question, docs, streaming_callback=collect)
        generator_too = ArcGenerator(engine=gen, store=store, max_new_tokens=N)
        out = await rag_pipeline(documents, generator_too, AsyncPipeline).run_async(
            {"retriever": {"query": question}, "generator": {"question": question}})
        return plain["replies"][0], stream["replies"][0], "".join(pieces), out["generator"]["replies"]

    plain, stream, joined, piped = asyncio.run(run_async())
    assert plain == stream == joined == reply
    assert piped == ask(rag_pipeline(documents, ArcGenerator(engine=gen, store=store, max_new_tokens=N)),
                        question)[0]["replies"]
    overridden = generator.run(question, docs, generation_kwargs={"max_new_tokens": 2})
    assert overridden["meta"][0]["usage"]["completion_tokens"] <= 2


def shout_prompt(question, documents):
    """A prompt function, importable by its path: what to_dict writes."""
    return ["Facts: ", *documents, f"\nQUESTION: {question.upper()}\nANSWER:"]


def test_to_dict_writes_how_to_rebuild_the_engine_and_from_dict_rebuilds_it(rag, documents, tmp_path, monkeypatch):
    gen, store = rag["gen"], rag["store"]
    local = ArcGenerator(encoder=str(rag["encoder"]), decoder=str(rag["decoder"]), encoder_kwargs={"device": "cpu"},
                         store=str(rag["store_path"]), prompt=shout_prompt, max_new_tokens=N, temperature=0.0)
    data = local.to_dict()
    params = data["init_parameters"]
    assert data["type"] == "arccompress.integrations.haystack.ArcGenerator"
    assert params["prompt"] == {"function": "tests.test_integrations_haystack.shout_prompt"}
    assert params["max_new_tokens"] == N and params["store"] == str(rag["store_path"])
    assert params["api_key"] == {"type": "env_var", "env_vars": ["ARCCOMPRESS_API_KEY"], "strict": False}
    pipe = Pipeline.loads(rag_pipeline(documents, local).dumps(), **ALLOWED)
    out, docs = ask(pipe, QUESTIONS[0])  # the engine was built by the pipeline's warm-up
    contexts = [ctx if not isinstance(ctx, str) else ContextText(ctx) for ctx in expected_documents(rag, pairs(docs))]
    assert out["replies"] == [gen.generate(shout_prompt(QUESTIONS[0], contexts), max_new_tokens=N)]
    assert pipe.to_dict()["components"]["generator"] == data  # a loaded component writes what it was made of
    template = ArcGenerator.from_dict(ArcGenerator(encoder="enc", decoder="dec", prompt="{documents} {question}",
                                                   examples=[(["doc"], "q?", "a")]).to_dict())
    assert template.prompt == "{documents} {question}" and template.examples == [[["doc"], "q?", "a"]]
    with pytest.raises(InputError, match="made from an engine object cannot be serialised"):
        ArcGenerator(engine=gen, store=store).to_dict()
    with pytest.raises(InputError, match="generation setting logits_processor=.* is not a JSON value"):
        ArcGenerator(encoder="enc", decoder="dec", logits_processor=[object()]).to_dict()
    with pytest.raises(ValueError, match="Cannot serialize token-based secret"):
        ArcGenerator(service_url="http://127.0.0.1:9", api_key=Secret.from_token("k")).to_dict()


def test_bad_input_is_a_clear_error_and_leaves_the_generator_usable(rag):
    gen = rag["gen"]
    generator = ArcGenerator(engine=gen, store=rag["store"], max_new_tokens=4)
    good = Document(id="p017", content=PASSAGES["p017"])
    with pytest.raises(InputError, match=r"document 1 \(id 'p021'\) is empty: it has no text, and the store holds"):
        generator.run(QUESTIONS[0], [good, Document(id="p021", content=None)])
    with pytest.raises(InputTypeError, match="document 1: expected a Haystack Document, a str or a CompressedContext, "
                                             "not dict"):
        generator.run(QUESTIONS[0], [good, {"content": "text"}])
    with pytest.raises(InputError, match="no documents"):
        generator.run(QUESTIONS[0], [])
    foreign = ArcGenerator(engine=gen, store=rag["other_store"])
    with pytest.raises(InputError, match=rf"document 0 \(id '{STORED[2]}', read from the store\): context was made by "
                                         "another encoder"):
        foreign.run(QUESTIONS[0], [Document(id=STORED[2], content="x")])
    with pytest.raises(InputError, match="give one of engine=, service_url=, or encoder= and decoder=, not engine and "
                                         "service_url"):
        ArcGenerator(engine=gen, service_url="http://127.0.0.1:9")
    with pytest.raises(InputError, match="give one of engine="):
        ArcGenerator()
    with pytest.raises(InputError, match="needs both encoder= and decoder="):
        ArcGenerator(encoder="enc")
    with pytest.raises(InputError, match="backend must be one of transformers, vllm"):
        ArcGenerator(encoder="enc", decoder="dec", backend="tgi")
    with pytest.raises(InputError, match="temperature must be >= 0"):
        ArcGenerator(encoder="enc", decoder="dec", temperature=-1.0)
    with pytest.raises(InputError, match="a prompt template holds"):
        ArcGenerator(encoder="enc", decoder="dec", prompt="{context}")
    assert generator.run(QUESTIONS[0], [good])["replies"] == [gen.answer(QUESTIONS[0], PASSAGES["p017"],
                                                                         max_new_tokens=4)]


def test_without_haystack_the_import_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "haystack" or m.startswith("haystack.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "arccompress.integrations.haystack")
    with pytest.raises(MissingDependencyError, match=r"\[haystack\] extra: pip install .*\[haystack\]'"):
        importlib.import_module("arccompress.integrations.haystack")


def test_a_service_pipeline_serialises_with_its_key_in_the_environment(rag, documents, service, monkeypatch):
    monkeypatch.setenv("RAG_SERVICE_KEY", KEY)
    generator = ArcGenerator(service_url=service.base_url, api_key=Secret.from_env_var("RAG_SERVICE_KEY"),
                             store=str(rag["store_path"]), max_new_tokens=N)  # the store says which ids it holds
    text = rag_pipeline(documents, generator).dumps()
    assert KEY not in text and "RAG_SERVICE_KEY" in text
    pipe = Pipeline.loads(text, **ALLOWED)
    for question in QUESTIONS:
        out, docs = ask(pipe, question)
        assert out["replies"] == [service.answer(question, service_documents(pairs(docs)), max_new_tokens=N)]
    docs = [Document(id=STORED[9], content="not the stored text"), Document(id="p023", content=PASSAGES["p023"])]
    expected = service.answer(QUESTIONS[0], [ContextRef(STORED[9]), PASSAGES["p023"]], max_new_tokens=N)
    out = pipe.get_component("generator").run(QUESTIONS[0], docs)
    assert out["replies"] == [expected] and out["meta"][0]["stored_documents"] == 1
    chunks = []
    assert pipe.get_component("generator").run(QUESTIONS[0], docs, streaming_callback=chunks.append)["replies"] == \
        ["".join(c.content for c in chunks)] == [expected]
