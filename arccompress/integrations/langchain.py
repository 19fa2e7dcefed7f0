"""LangChain: a chat model that reads its documents compressed, and the retrieval chain built around it.

    from arccompress.integrations.langchain import ArcChatModel, create_compressed_retrieval_chain

    model = ArcChatModel(engine=gen, store=store, max_new_tokens=32)
    model.invoke("Who signed the report?", documents=retriever.invoke("Who signed the report?"))
    chain = create_compressed_retrieval_chain(retriever, model)
    chain.invoke({"input": "Who signed the report?"})   # {"input", "context", "answer"}

The messages are one human message, the question, optionally holding its documents as standard "text-plain"
content blocks (`create_plaintext_block(text=..., file_id=store_id)`): langchain-core's own block for a
plain-text document, whose `file_id` ("a reference to the file in an external file storage system") is what a
store id is. Documents also come as `documents=` (LangChain `Document`s, strs or CompressedContexts), before the
blocks. A document whose `Document.id` or `metadata["id"]` (a block: its `file_id`) is in the store is read from
it, any other is its text compressed (`arccompress.integrations.documents`). Other blocks (images, files) and
earlier turns are refused: put instructions and few-shot examples in `prompt=` / `examples=`.

`usage_metadata` counts decoder positions: input_tokens are the positions the prompt took, and
`input_token_details["positions_saved"]` those its compressed documents saved; a stream ends with a chunk whose
`response_metadata` holds the counts known before it started (a local engine's).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Sequence
from operator import itemgetter
from typing import Any

from ..errors import InputError, InputTypeError
from ..extras import missing
from .documents import DocumentQA, Passage, PromptSpec, Reply, ReplyStream, not_a_document, own_passage

try:
    from langchain_core.callbacks import CallbackManagerForLLMRun
    from langchain_core.documents import Document
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough
    from pydantic import Field, PrivateAttr, model_validator
except ImportError as e:
    raise missing("langchain", "arccompress.integrations.langchain", e) from None

__all__ = ["ArcChatModel", "create_compressed_retrieval_chain"]


class ArcChatModel(BaseChatModel):
    """A LangChain chat model answering a question from compressed documents, with any arccompress engine.

    engine: a `Generator`, `VLLMGenerator`, `VLLMClient` or `ServiceClient`. store: where documents' contexts are
    read by id (default: a local engine's own store; for a service, a container of the ids it holds). prompt:
    None (the paper's few-shot QA format, the answer read up to its first blank line), a template with
    `{question}` and `{documents}`, or a function (question, documents) -> prompt parts. examples: few-shot
    (documents, question, answer) triples for the default prompt. chunk_size: compress documents in chunks of
    that many tokens. Every other keyword is a generation setting for the engine (max_new_tokens, default 64;
    temperature, top_p, stop, seed, do_sample, ...), checked when the model is made; `invoke(..., **settings)`
    overrides them for one call, as do `stop=` and `prompt=`.
    """

    engine: Any
    store: Any = None
    prompt: Any = None
    examples: list = Field(default_factory=list)
    chunk_size: int | None = None
    generation: dict[str, Any] = Field(default_factory=dict)
    _qa: DocumentQA = PrivateAttr()

    @model_validator(mode="before")
    @classmethod
    def _settings_apart(cls, values: Any) -> Any:
        """Keywords that are not fields are generation settings."""
        if not isinstance(values, dict):
            return values
        settings = {k: v for k, v in values.items() if k not in cls.model_fields}
        fields = {k: v for k, v in values.items() if k in cls.model_fields}
        return fields | {"generation": {**fields.get("generation", {}), **settings}}

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        # made here, not in a validator: its errors are arccompress's own, not wrapped in pydantic's
        self._qa = DocumentQA(self.engine, store=self.store, prompt=self.prompt, examples=self.examples,
                              chunk_size=self.chunk_size, **self.generation)

    @property
    def _llm_type(self) -> str:
        return "arccompress"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"engine": type(self.engine).__name__, "chunk_size": self.chunk_size, **self.generation}

    # ------------------------------------------------------------------ generation

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        question, passages, prompt, settings = self._request(messages, stop, kwargs)
        reply = self._qa.answer(question, passages, prompt=prompt, **settings)
        message = AIMessage(content=reply.text, response_metadata=response_metadata(reply),
                            usage_metadata=usage_metadata(reply))
        return ChatResult(generations=[ChatGeneration(message=message,
                                                      generation_info={"finish_reason": reply.finish_reason})])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        question, passages, prompt, settings = self._request(messages, stop, kwargs)
        stream = self._qa.stream(question, passages, prompt=prompt, **settings)
        for piece in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield ChatGenerationChunk(message=AIMessageChunk(content="", response_metadata=response_metadata(stream)))

    # asynchronous calls: BaseChatModel runs `_generate` and steps `_stream` on its executor

    def _request(self, messages: list[BaseMessage], stop: list[str] | None,
                 kwargs: dict[str, Any]) -> tuple[str, list[Passage], PromptSpec, dict[str, Any]]:
        """(question, documents, prompt, generation overrides) of one call."""
        settings = dict(kwargs)
        documents = settings.pop("documents", None)
        prompt = settings.pop("prompt", None)
        if stop is not None:
            settings["stop"] = stop
        passages = [] if documents is None else document_passages(documents)
        question, blocks = read_messages(messages)
        return question, passages + blocks, prompt, settings


def document_passages(documents: Sequence[Any]) -> list[Passage]:
    """`documents=` as passages: LangChain Documents (id: `Document.id`, else `metadata["id"]`), strs, contexts."""
    if isinstance(documents, (str, Document)) or not isinstance(documents, Sequence):
        raise InputTypeError(f"documents must be a list of LangChain Documents (or strs), not "
                             f"{type(documents).__name__}")
    passages = []
    for k, doc in enumerate(documents):
        where = f"document {k}"
        if isinstance(doc, Document):
            ids = tuple(i for i in (doc.id, doc.metadata.get("id")) if isinstance(i, str) and i)
            passages.append(Passage(where, text=doc.page_content, ids=ids))
        else:
            passage = own_passage(doc, where)
            if passage is None:
                raise not_a_document(doc, where, "a LangChain Document")
            passages.append(passage)
    return passages


def read_messages(messages: Sequence[BaseMessage]) -> tuple[str, list[Passage]]:
    """(the question, the documents of its "text-plain" blocks) of a call's messages: one human message."""
    if not messages:
        raise InputError("no messages: ArcChatModel needs the question, as one human message")
    last = len(messages) - 1
    if last > 0:
        raise InputError(f"message 0 is a {messages[0].type} message: ArcChatModel answers one question, one human "
                         "message, from documents (the paper's QA format); put instructions in prompt= (a template "
                         "with {question} and {documents}) and few-shot examples in examples=")
    message = messages[last]
    if not isinstance(message, HumanMessage):
        raise InputError(f"message {last} is a {message.type} message: the question must be a human message")
    texts, passages = [], []
    for b, block in enumerate(message.content_blocks):
        where = f"message {last}, block {b}"
        kind = block.get("type")
        if kind == "text":
            texts.append(block["text"])
        elif kind == "text-plain":
            passages.append(block_passage(block, where))
        else:
            raise InputTypeError(f"{where} is a {kind!r} block: ArcChatModel reads the question's 'text' blocks and "
                                 "documents as 'text-plain' blocks")
    return "".join(texts), passages


def block_passage(block: dict[str, Any], where: str) -> Passage:
    """A "text-plain" block as a passage: its text (or base64 UTF-8) and its `file_id` as a store id."""
    if "url" in block and "text" not in block and "base64" not in block:
        raise InputError(f"{where}: a document given by URL is not fetched: give its text, or its store id as file_id")
    text = block.get("text")
    if text is None and block.get("base64") is not None:
        try:
            text = base64.b64decode(block["base64"], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as e:
            raise InputError(f"{where}: base64 is not base64 of UTF-8 text ({e})") from None
    file_id = block.get("file_id")
    return Passage(where, text=text, ids=(file_id,) if isinstance(file_id, str) and file_id else ())


def usage_metadata(reply: Reply) -> dict[str, Any] | None:
    """LangChain's usage record: decoder positions in, tokens out, positions the documents saved."""
    if reply.prompt_positions is None:
        return None
    usage: dict[str, Any] = {"input_tokens": reply.prompt_positions, "output_tokens": reply.output_tokens,
                             "total_tokens": reply.prompt_positions + reply.output_tokens}
    if reply.positions_saved is not None:
        usage["input_token_details"] = {"positions_saved": reply.positions_saved}
    return usage


def response_metadata(counts: Reply | ReplyStream) -> dict[str, Any]:
    """What a reply's prompt held and cost: documents, those read from the store, positions read and saved."""
    meta = {"model_provider": "arccompress", "documents": counts.documents, "stored_documents": counts.stored,
            "prompt_positions": counts.prompt_positions, "positions_saved": counts.positions_saved}
    if isinstance(counts, Reply):
        meta["finish_reason"] = counts.finish_reason
    return {k: v for k, v in meta.items() if v is not None}


def create_compressed_retrieval_chain(retriever: Runnable, model: ArcChatModel, prompt: PromptSpec = None) -> Runnable:
    """The twin of LangChain's `create_retrieval_chain`: `{"input": question}` -> `{"input", "context", "answer"}`,
    the retrieved documents (`context`) given to the model as documents, compressed or read from its store,
    instead of stuffed into a prompt's text. `prompt`: the model's prompt for this chain (see ArcChatModel).
    `chain.stream(...)` streams the answer."""
    if not isinstance(model, ArcChatModel):
        raise InputTypeError(f"model must be an ArcChatModel, not {type(model).__name__}")
    if not isinstance(retriever, Runnable):
        raise InputTypeError(f"retriever must be a LangChain retriever (a Runnable), not {type(retriever).__name__}")
    settings = {} if prompt is None else {"prompt": prompt}

    def question(inputs: Any) -> str:
        if not isinstance(inputs, dict) or not isinstance(inputs.get("input"), str):
            given = f"keys {sorted(map(str, inputs))}" if isinstance(inputs, dict) else type(inputs).__name__
            raise InputTypeError(f"the chain's input is {{'input': question}}, a str question, not {given}")
        return inputs["input"]

    def answer(inputs: dict[str, Any]) -> Runnable:  # a Runnable returned here is run, and streamed, on `inputs`
        return itemgetter("input") | model.bind(documents=inputs["context"], **settings) | StrOutputParser()

    retrieve = (RunnableLambda(question) | retriever).with_config(run_name="retrieve_documents")
    return (RunnablePassthrough.assign(context=retrieve).assign(answer=RunnableLambda(answer))
            .with_config(run_name="compressed_retrieval_chain"))
