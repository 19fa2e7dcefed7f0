"""ArcResponseSynthesizer: LlamaIndex's RetrieverQueryEngine answering from compressed nodes, on tiny models."""

from __future__ import annotations

import asyncio
import importlib
import sys

import pytest
from llama_index.core import VectorStoreIndex
from llama_index.core.base.response.schema import AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.embeddings import BaseEmbedding
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import NodeWithScore, TextNode

from arccompress.errors import InputError, InputTypeError, MissingDependencyError
from arccompress.integrations.llama_index import ArcResponseSynthesizer
from arccompress.prompts import ContextRef, ContextText
from tests.rag_corpus import PASSAGES, QUESTIONS, STORED, embed, expected_documents, service_documents

pytest_plugins = ["tests.rag_fixtures"]
N = 12  # new tokens: enough to tell answers apart, few enough for a 2-core CI machine


class BagOfWords(BaseEmbedding):
    def _get_query_embedding(self, query: str) -> list[float]:
        return embed(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return embed(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return embed(text)


@pytest.fixture(scope="module")
def retriever():
    nodes = [TextNode(id_=key, text=text) for key, text in PASSAGES.items()]
    return VectorStoreIndex(nodes, embed_model=BagOfWords()).as_retriever(similarity_top_k=4)


def pairs(nodes: list[NodeWithScore]) -> list[tuple[str, str]]:
    return [(n.node.node_id, n.node.get_content()) for n in nodes]


def test_the_query_engine_answers_as_generator_answer_does_and_reads_stored_ids(rag, retriever, compressed):
    gen = rag["gen"]
    engine = RetrieverQueryEngine(retriever, response_synthesizer=ArcResponseSynthesizer(
        engine=gen, store=rag["store"], max_new_tokens=N))
    seen_stored = seen_text = 0
    for question in QUESTIONS:
        compressed.clear()
        response = engine.query(question)
        assert isinstance(response, Response)
        assert pairs(response.source_nodes) == pairs(retriever.retrieve(question))  # source nodes kept
        assert response.metadata == {n.node.node_id: n.node.metadata for n in response.source_nodes}
        assert compressed == [text for key, text in pairs(response.source_nodes) if key not in STORED]
        assert response.response == gen.answer(question, expected_documents(rag, pairs(response.source_nodes)),
                                                max_new_tokens=N)
        seen_stored += sum(key in STORED for key, _ in pairs(response.source_nodes))
        seen_text += sum(key not in STORED for key, _ in pairs(response.source_nodes))
    assert seen_stored and seen_text


def test_a_node_with_a_stored_id_is_read_from_the_store_and_metadata_is_what_an_llm_sees(rag, compressed):
    gen, store = rag["gen"], rag["store"]
    synth = ArcResponseSynthesizer(engine=gen, store=store, max_new_tokens=N)
    nodes = [NodeWithScore(node=TextNode(id_=STORED[4], text="not the stored text"), score=1.0),
             NodeWithScore(node=TextNode(id_="x1", text=PASSAGES["p021"], metadata={"town": "Belcastel", "file": "a"},
                                         excluded_llm_metadata_keys=["file"]), score=0.5)]
    response = synth.synthesize(QUESTIONS[0], nodes)
    seen = nodes[1].node.get_content(metadata_mode="llm")
    assert compressed == [seen] and "town: Belcastel" in seen and "file" not in seen
    assert response.response == gen.answer(QUESTIONS[0], [store[STORED[4]], seen], max_new_tokens=N)
    assert response.source_nodes == nodes


def test_streaming_responses_join_to_the_answer_and_async_queries_agree(rag, retriever):
    gen, store = rag["gen"], rag["store"]
    question = QUESTIONS[1]
    plain = RetrieverQueryEngine(retriever, response_synthesizer=ArcResponseSynthesizer(
        engine=gen, store=store, max_new_tokens=N))
    streaming = RetrieverQueryEngine(retriever, response_synthesizer=ArcResponseSynthesizer(
        engine=gen, store=store, max_new_tokens=N, streaming=True))
    answer = plain.query(question).response
    streamed = streaming.query(question)
    assert isinstance(streamed, StreamingResponse)
    assert "".join(streamed.response_gen) == answer
    assert pairs(streamed.source_nodes) == pairs(retriever.retrieve(question))

    async def run_async():
        got = await plain.aquery(question)
        stream = await streaming.aquery(question)
        assert isinstance(stream, AsyncStreamingResponse) and pairs(stream.source_nodes) == pairs(got.source_nodes)
        return got.response, "".join([piece async for piece in stream.async_response_gen()])

    assert asyncio.run(run_async()) == (answer, answer)


def test_a_template_replaces_the_paper_format(rag):
    gen, store = rag["gen"], rag["store"]
    synth = ArcResponseSynthesizer(engine=gen, store=store, max_new_tokens=N,
                                   prompt="Notes: {documents}\nAsked: {question}\nReply:")
    nodes = [NodeWithScore(node=TextNode(id_=STORED[6], text=PASSAGES[STORED[6]])),
             NodeWithScore(node=TextNode(id_="p007", text=PASSAGES["p007"]))]
    expected = gen.generate(["Notes: ", store[STORED[6]], ContextText(PASSAGES["p007"]),
                             f"\nAsked: {QUESTIONS[0]}\nReply:"], max_new_tokens=N)
    assert synth.synthesize(QUESTIONS[0], nodes).response == expected
    # the base class's text-chunk interface: chunks without ids, compressed
    chunks = [PASSAGES[STORED[6]], PASSAGES["p007"]]
    assert synth.get_response(QUESTIONS[0], chunks) == gen.generate(
        ["Notes: ", *map(ContextText, chunks), f"\nAsked: {QUESTIONS[0]}\nReply:"], max_new_tokens=N)


def test_bad_input_is_a_clear_error_and_leaves_the_synthesizer_usable(rag):
    gen = rag["gen"]
    synth = ArcResponseSynthesizer(engine=gen, store=rag["store"], max_new_tokens=4)
    good = NodeWithScore(node=TextNode(id_="p003", text=PASSAGES["p003"]))
    with pytest.raises(InputError, match=r"node 1 \(id 'p005'\) is empty: it has no text, and the store holds none"):
        synth.synthesize(QUESTIONS[0], [good, NodeWithScore(node=TextNode(id_="p005", text=""))])
    with pytest.raises(InputTypeError, match="node 1: expected a LlamaIndex NodeWithScore, not str"):
        synth.synthesize(QUESTIONS[0], [good, "a passage"])
    with pytest.raises(InputError, match="no documents"):
        synth.synthesize(QUESTIONS[0], [])
    foreign = ArcResponseSynthesizer(engine=gen, store=rag["other_store"])
    with pytest.raises(InputError, match=rf"node 0 \(id '{STORED[1]}', read from the store\): context was made by "
                                         "another encoder"):
        foreign.synthesize(QUESTIONS[0], [NodeWithScore(node=TextNode(id_=STORED[1], text="x")), good])
    with pytest.raises(InputTypeError, match="has no LlamaIndex prompt templates"):
        synth.update_prompts({"text_qa_template": "{context_str} {query_str}"})
    with pytest.raises(InputTypeError, match="engine must be an engine of arccompress"):
        ArcResponseSynthesizer(engine=None)
    assert synth.synthesize(QUESTIONS[0], [good]).response == gen.answer(QUESTIONS[0], PASSAGES["p003"],
                                                                         max_new_tokens=4)


def test_without_llama_index_the_import_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "llama_index" or m.startswith("llama_index.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "arccompress.integrations.llama_index")
    with pytest.raises(MissingDependencyError, match=r"\[llamaindex\] extra: pip install .*\[llamaindex\]'"):
        importlib.import_module("arccompress.integrations.llama_index")


def test_a_running_service_reads_stored_ids_itself(retriever, service):
    synth = ArcResponseSynthesizer(engine=service, store=set(STORED), max_new_tokens=N)
    engine = RetrieverQueryEngine(retriever, response_synthesizer=synth)
    response = engine.query(QUESTIONS[0])
    assert response.response == service.answer(QUESTIONS[0], service_documents(pairs(response.source_nodes)),
                                               max_new_tokens=N)
    nodes = [NodeWithScore(node=TextNode(id_=STORED[2], text="not the stored text")),
             NodeWithScore(node=TextNode(id_="p009", text=PASSAGES["p009"]))]
    expected = service.answer(QUESTIONS[0], [ContextRef(STORED[2]), PASSAGES["p009"]], max_new_tokens=N)
    assert synth.synthesize(QUESTIONS[0], nodes).response == expected
    streaming = ArcResponseSynthesizer(engine=service, store=set(STORED), max_new_tokens=N, streaming=True)
    assert "".join(streaming.synthesize(QUESTIONS[0], nodes).response_gen) == expected


def test_an_index_built_from_documents_finds_stored_contexts_by_text(rag, compressed):
    """`VectorStoreIndex.from_documents` names its nodes with UUIDs, which no store holds: the synthesizer finds
    the precomputed contexts by the nodes' text (issue 25), and compresses only the texts the store lacks."""
    from llama_index.core import Document

    gen, store = rag["gen"], rag["store"]
    keys = STORED[:6] + [k for k in PASSAGES if k not in STORED][:6]
    index = VectorStoreIndex.from_documents([Document(text=PASSAGES[k]) for k in keys], embed_model=BagOfWords())
    engine = RetrieverQueryEngine(index.as_retriever(similarity_top_k=4), response_synthesizer=ArcResponseSynthesizer(
        engine=gen, store=store, max_new_tokens=N))
    for question in QUESTIONS:
        compressed.clear()
        response = engine.query(question)
        texts = [n.node.get_content() for n in response.source_nodes]
        assert all(n.node.node_id not in PASSAGES for n in response.source_nodes)  # UUIDs
        assert compressed == [t for t in texts if t not in {PASSAGES[k] for k in STORED}]
        documents = [store[next(k for k in STORED if PASSAGES[k] == t)] if t in {PASSAGES[k] for k in STORED} else t
                     for t in texts]
        assert response.response == gen.answer(question, documents, max_new_tokens=N)
    assert len(compressed) < 4 * len(QUESTIONS)
