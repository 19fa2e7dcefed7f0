"""ArcChatModel and create_compressed_retrieval_chain: LangChain RAG over compressed documents, on tiny models."""

from __future__ import annotations

import asyncio
import base64
import importlib
import sys

import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.messages.content import create_plaintext_block
from langchain_core.vectorstores import InMemoryVectorStore

from arccompress import fewshot_qa_prompt
from arccompress.errors import InputError, InputTypeError, MissingDependencyError
from arccompress.integrations.langchain import ArcChatModel, create_compressed_retrieval_chain
from arccompress.prompts import ContextRef, ContextText
from tests.rag_corpus import (PASSAGES, QUESTIONS, STORED, ScriptedEngine, embed, expected_documents,
                              service_documents)

pytest_plugins = ["tests.rag_fixtures"]
N = 12  # new tokens: enough to tell answers apart, few enough for a 2-core CI machine


class BagOfWords(Embeddings):
    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [embed(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return embed(text)


@pytest.fixture(scope="module")
def retriever():
    store = InMemoryVectorStore(BagOfWords())
    store.add_documents([Document(page_content=text, id=key) for key, text in PASSAGES.items()])
    return store.as_retriever(search_kwargs={"k": 4})


def pairs(documents: list[Document]) -> list[tuple[str, str]]:
    return [(d.id, d.page_content) for d in documents]


def test_the_chain_answers_as_generator_answer_does_and_reads_stored_ids(rag, retriever, compressed):
    gen = rag["gen"]
    chain = create_compressed_retrieval_chain(retriever, ArcChatModel(engine=gen, store=rag["store"], max_new_tokens=N))
    seen_stored = seen_text = 0
    for question in QUESTIONS:
        compressed.clear()
        out = chain.invoke({"input": question})
        assert set(out) == {"input", "context", "answer"} and out["input"] == question
        assert pairs(out["context"]) == pairs(retriever.invoke(question))
        # the encoder saw exactly the documents the store does not hold
        assert compressed == [d.page_content for d in out["context"] if d.id not in STORED]
        assert out["answer"] == gen.answer(question, expected_documents(rag, pairs(out["context"])), max_new_tokens=N)
        seen_stored += sum(d.id in STORED for d in out["context"])
        seen_text += sum(d.id not in STORED for d in out["context"])
    assert seen_stored and seen_text  # both paths ran


def test_usage_counts_positions_and_stored_documents_come_from_the_store(rag, compressed):
    gen, store = rag["gen"], rag["store"]
    model = ArcChatModel(engine=gen, store=store, max_new_tokens=N)
    docs = [Document(page_content="not the stored text", id=STORED[3]),          # the id wins over the text
            Document(page_content="", metadata={"id": STORED[5]}),               # metadata["id"] is an id too
            Document(page_content=PASSAGES["p011"], id="p011")]                  # not stored: compressed
    message = model.invoke(QUESTIONS[0], documents=docs)
    assert compressed == [PASSAGES["p011"]]
    contexts = [store[STORED[3]], store[STORED[5]], PASSAGES["p011"]]
    assert message.content == gen.answer(QUESTIONS[0], contexts, max_new_tokens=N)
    saved = gen.savings(fewshot_qa_prompt(QUESTIONS[0], [store[STORED[3]], store[STORED[5]], gen.compressor.compress(
        PASSAGES["p011"])]))
    usage = message.usage_metadata
    assert usage["input_tokens"] == saved.prompt_length and 0 < usage["output_tokens"] <= 12
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_token_details"]["positions_saved"] == saved.tokens_saved > 0
    assert message.response_metadata["stored_documents"] == 2 and message.response_metadata["documents"] == 3


def test_documents_as_text_plain_blocks_are_the_same_documents(rag):
    model = ArcChatModel(engine=rag["gen"], store=rag["store"], max_new_tokens=N)
    docs = [Document(page_content=PASSAGES[STORED[0]], id=STORED[0]), Document(page_content=PASSAGES["p013"])]
    expected = model.invoke(QUESTIONS[1], documents=docs).content
    blocks = HumanMessage(content_blocks=[
        {"type": "text", "text": QUESTIONS[1]},
        create_plaintext_block(file_id=STORED[0]),  # a stored context, by id alone
        create_plaintext_block(base64=base64.b64encode(PASSAGES["p013"].encode()).decode()),
    ])
    assert model.invoke([blocks]).content == expected
    # documents= come first, then the blocks
    split = HumanMessage(content_blocks=[{"type": "text", "text": QUESTIONS[1]},
                                         create_plaintext_block(text=PASSAGES["p013"])])
    assert model.invoke([split], documents=docs[:1]).content == expected


def test_streams_join_to_the_answer_and_async_calls_agree(rag, retriever):
    model = ArcChatModel(engine=rag["gen"], store=rag["store"], max_new_tokens=N)
    chain = create_compressed_retrieval_chain(retriever, model)
    question = QUESTIONS[0]
    docs = retriever.invoke(question)
    full = model.invoke(question, documents=docs)
    chunks = list(model.stream(question, documents=docs))
    assert "".join(c.content for c in chunks) == full.content
    assert chunks[-2].response_metadata["prompt_positions"] == full.usage_metadata["input_tokens"]
    answer = chain.invoke({"input": question})["answer"]
    assert answer == full.content
    assert "".join(c["answer"] for c in chain.stream({"input": question}) if "answer" in c) == answer

    async def run_async():
        got = await model.ainvoke(question, documents=docs)
        pieces = [c.content async for c in model.astream(question, documents=docs)]
        out = await chain.ainvoke({"input": question})
        streamed = [c["answer"] async for c in chain.astream({"input": question}) if "answer" in c]
        return got.content, "".join(pieces), out["answer"], "".join(streamed)

    assert asyncio.run(run_async()) == (answer, answer, answer, answer)


def test_documents_travel_as_documents_and_the_answer_is_read_as_the_paper_reads_it():
    engine = ScriptedEngine(["  ", "\n Par", "is is", " big ", " ", "\n", "  "])
    model = ArcChatModel(engine=engine, store={"p000"}, stop=["###"])  # a service's client: the ids it holds
    docs = [Document(page_content="ignored: stored", id="p000"), Document(page_content=f"  {PASSAGES['p001']}\n")]
    assert model.invoke(QUESTIONS[0], documents=docs).content == "Paris is big"
    pieces = [c.content for c in model.stream(QUESTIONS[0], documents=docs)]
    assert [p for p in pieces if p] == ["Par", "is is", " big"]  # whitespace held back, then dropped at the end
    # the exact prompt: the paper's format with a reference and a text, never the documents' text in the prompt
    expected = fewshot_qa_prompt(QUESTIONS[0], [ContextRef("p000"), PASSAGES["p001"]])
    assert engine.prompts == [expected, expected]
    assert engine.sampling(**model._qa.generation).stop == ("###",)
    assert model._qa.sampling().stop == ("###", "\n\n")  # the paper's answer ends at a blank line


def test_a_template_or_a_function_replaces_the_paper_format(rag):
    gen, store = rag["gen"], rag["store"]
    docs = [Document(page_content=PASSAGES["p001"], id="p001"),
            Document(page_content=PASSAGES[STORED[1]], id=STORED[1])]
    contexts = [ContextText(PASSAGES["p001"].strip()), store[STORED[1]]]
    question = QUESTIONS[1]
    expected = gen.generate(["Context: ", *contexts, f"\nQ: {question}\nA:"], max_new_tokens=N)
    template = ArcChatModel(engine=gen, store=store, max_new_tokens=N,
                            prompt="Context: {documents}\nQ: {question}\nA:")
    assert template.invoke(question, documents=docs).content == expected  # the engine's text, as it is

    def prompt(q, documents):
        return ["Context: ", *documents, f"\nQ: {q}\nA:"]

    function = ArcChatModel(engine=gen, store=store, max_new_tokens=N, prompt=prompt)
    assert function.invoke(question, documents=docs).content == expected
    paper = ArcChatModel(engine=gen, store=store, max_new_tokens=N)
    assert paper.invoke(question, documents=docs, prompt=prompt).content == expected  # per call
    retriever = InMemoryVectorStore.from_documents(docs, BagOfWords()).as_retriever(search_kwargs={"k": 2})
    chain = create_compressed_retrieval_chain(retriever, paper, prompt=prompt)
    out = chain.invoke({"input": question})
    assert out["answer"] == gen.generate(["Context: ", *expected_contexts(rag, out["context"]), f"\nQ: {question}\nA:"],
                                         max_new_tokens=N)


def expected_contexts(rag, documents):
    return [ctx if not isinstance(ctx, str) else ContextText(ctx.strip())
            for ctx in expected_documents(rag, pairs(documents))]


def test_generation_settings_reach_the_engine(rag):
    gen = rag["gen"]
    docs = [PASSAGES["p003"]]
    sampled = ArcChatModel(engine=gen, temperature=1.0, seed=5, max_new_tokens=8)
    assert sampled.generation == {"temperature": 1.0, "seed": 5, "max_new_tokens": 8}
    first = sampled.invoke(QUESTIONS[0], documents=docs).content
    assert first == gen.answer(QUESTIONS[0], docs, temperature=1.0, seed=5, max_new_tokens=8)
    assert sampled.invoke(QUESTIONS[0], documents=docs, seed=6).content == \
        gen.answer(QUESTIONS[0], docs, temperature=1.0, seed=6, max_new_tokens=8)  # per-call override
    short = ArcChatModel(engine=gen, max_new_tokens=2).invoke(QUESTIONS[0], documents=docs)
    assert short.usage_metadata["output_tokens"] <= 2
    with pytest.raises(InputError, match="temperature must be >= 0"):
        ArcChatModel(engine=gen, temperature=-1)
    with pytest.raises(InputError, match="n must be 1"):
        ArcChatModel(engine=gen, n=2)


def test_bad_input_is_a_clear_error_and_leaves_the_model_usable(rag, retriever):
    gen = rag["gen"]
    model = ArcChatModel(engine=gen, store=rag["store"], max_new_tokens=4)
    good = [Document(page_content=PASSAGES["p001"], id="p001")]
    with pytest.raises(InputError, match=r"document 1 \(id 'p009'\) is empty: it has no text, and the store holds "
                                         "none of its ids"):
        model.invoke(QUESTIONS[0], documents=good + [Document(page_content="  \n", id="p009")])
    with pytest.raises(InputTypeError, match="document 1: expected a LangChain Document, a str or a "
                                             "CompressedContext, not int"):
        model.invoke(QUESTIONS[0], documents=good + [42])
    with pytest.raises(InputTypeError, match="documents must be a list"):
        model.invoke(QUESTIONS[0], documents=good[0])
    with pytest.raises(InputError, match="no documents"):
        model.invoke(QUESTIONS[0])
    foreign = ArcChatModel(engine=gen, store=rag["other_store"])
    with pytest.raises(InputError, match=rf"document 1 \(id '{STORED[0]}', read from the store\): context was made "
                                         "by another encoder"):
        foreign.invoke(QUESTIONS[0], documents=good + [Document(page_content="x", id=STORED[0])])
    with pytest.raises(InputError, match="message 0 is a system message"):
        model.invoke([SystemMessage("Be brief."), HumanMessage(QUESTIONS[0])], documents=good)
    image = HumanMessage(content_blocks=[{"type": "text", "text": "What is shown?"},
                                         {"type": "image", "url": "https://example.com/a.png"}])
    with pytest.raises(InputTypeError, match="message 0, block 1 is a 'image' block"):
        model.invoke([image], documents=good)
    with pytest.raises(InputError, match="not fetched"):
        model.invoke([HumanMessage(content_blocks=[{"type": "text", "text": "Q?"},
                                                   create_plaintext_block(url="https://example.com/d.txt")])])
    with pytest.raises(InputError, match="the question is empty"):
        model.invoke(" ", documents=good)
    with pytest.raises(InputTypeError, match="engine must be an engine of arccompress"):
        ArcChatModel(engine="mistral")
    with pytest.raises(InputError, match="a prompt template holds"):
        ArcChatModel(engine=gen, prompt="Context: {context}")
    with pytest.raises(InputTypeError, match="not a path: open it, ContextStore"):
        ArcChatModel(engine=gen, store=str(rag["store_path"]))
    chain = create_compressed_retrieval_chain(retriever, model)
    with pytest.raises(InputTypeError, match=r"the chain's input is \{'input': question\}"):
        chain.invoke({"question": QUESTIONS[0]})
    assert model.invoke(QUESTIONS[0], documents=good).content == gen.answer(QUESTIONS[0], [PASSAGES["p001"]],
                                                                            max_new_tokens=4)


def test_without_langchain_the_import_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "langchain_core" or m.startswith("langchain_core.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    monkeypatch.delitem(sys.modules, "arccompress.integrations.langchain")
    with pytest.raises(MissingDependencyError, match=r"\[langchain\] extra: pip install .*\[langchain\]'"):
        importlib.import_module("arccompress.integrations.langchain")


def test_a_running_service_reads_stored_ids_itself(rag, retriever, service):
    model = ArcChatModel(engine=service, store=set(STORED), max_new_tokens=N)  # the ids the service holds
    chain = create_compressed_retrieval_chain(retriever, model)
    question = QUESTIONS[1]
    out = chain.invoke({"input": question})
    assert any(d.id in STORED for d in out["context"]) and any(d.id not in STORED for d in out["context"])
    assert out["answer"] == service.answer(question, service_documents(pairs(out["context"])), max_new_tokens=N)
    # a stored id travels as a reference: the service answers from its stored context, whatever the text says
    docs = [Document(page_content="not the stored text", id=STORED[2]), Document(page_content=PASSAGES["p005"])]
    message = model.invoke(question, documents=docs)
    assert message.content == service.answer(question, [ContextRef(STORED[2]), PASSAGES["p005"]], max_new_tokens=N)
    assert message.usage_metadata["input_tokens"] == rag["gen"].savings(
        fewshot_qa_prompt(question, [rag["store"][STORED[2]], PASSAGES["p005"]])).prompt_length
    assert message.response_metadata["stored_documents"] == 1
    assert "".join(c.content for c in model.stream(question, documents=docs)) == message.content
    with pytest.raises(InputTypeError, match="document 0: a service takes documents' text"):
        model.invoke(question, documents=[rag["store"][STORED[0]]])


def test_a_document_whose_text_is_stored_travels_as_a_reference(rag):
    """A document without an id whose text the store holds: a service's client sends the stored id, not the text
    (the service reads its own store); the same text with other chunking is compressed as text."""
    engine = ScriptedEngine(["Paris"])
    model = ArcChatModel(engine=engine, store=rag["store"])
    text = PASSAGES[STORED[3]]
    model.invoke(QUESTIONS[0], documents=[Document(page_content=f"{text}\n"), Document(page_content=PASSAGES["p001"])])
    assert engine.prompts[-1] == fewshot_qa_prompt(QUESTIONS[0], [ContextRef(STORED[3]), PASSAGES["p001"]])
    ArcChatModel(engine=engine, store=rag["store"], chunk_size=4).invoke(QUESTIONS[0],
                                                                         documents=[Document(page_content=text)])
    assert engine.prompts[-1] == fewshot_qa_prompt(QUESTIONS[0], [ContextText(text, 4)])
