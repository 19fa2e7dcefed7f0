"""LlamaIndex: a response synthesizer that gives the retrieved nodes to the decoder as compressed documents.

    from llama_index.core.query_engine import RetrieverQueryEngine
    from arccompress.integrations.llama_index import ArcResponseSynthesizer

    synth = ArcResponseSynthesizer(engine=gen, store=store, max_new_tokens=32)
    engine = RetrieverQueryEngine(index.as_retriever(similarity_top_k=5), response_synthesizer=synth)
    response = engine.query("Who signed the report?")      # response.source_nodes: the retrieved nodes

Each node is one document: read from the store when its `node_id` is there (the encoder is not called for it),
else its content compressed — the content LlamaIndex gives an LLM (`MetadataMode.LLM`: its text, with the
metadata the node lets an LLM see). `streaming=True` gives a `StreamingResponse` (an `AsyncStreamingResponse`
from `aquery`/`asynthesize`); `source_nodes` are kept, and the response's `metadata` maps each node's id to its
metadata, as LlamaIndex's own synthesizers do. The documents, the prompt and the generation settings are read as
in `arccompress.integrations.documents`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import InputTypeError
from ..extras import missing
from .documents import DocumentQA, Passage, PromptSpec

try:
    from llama_index.core.base.response.schema import (RESPONSE_TYPE, AsyncStreamingResponse, Response,
                                                       StreamingResponse)
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.callbacks.schema import CBEventType, EventPayload
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.events.synthesis import SynthesizeEndEvent, SynthesizeStartEvent
    from llama_index.core.prompts.mixin import PromptDictType, PromptMixinType
    from llama_index.core.response_synthesizers import BaseSynthesizer
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
    from llama_index.core.settings import Settings
    from llama_index.core.types import RESPONSE_TEXT_TYPE
except ImportError as e:
    raise missing("llamaindex", "arccompress.integrations.llama_index", e) from None

__all__ = ["ArcResponseSynthesizer"]

dispatcher = get_dispatcher(__name__)


@dataclass
class _Synthesis:
    """One synthesis under way: the query, its nodes as passages, and the response once made."""

    query: str
    passages: list[Passage]
    response: Any = None


class ArcResponseSynthesizer(BaseSynthesizer):
    """A LlamaIndex response synthesizer answering from compressed nodes, with any arccompress engine.

    engine: a `Generator`, `VLLMGenerator`, `VLLMClient` or `ServiceClient`. store: where nodes' contexts are read
    by node_id (default: a local engine's own store; for a service, a container of the ids it holds). prompt:
    None (the paper's few-shot QA format, the answer read up to its first blank line), a template with
    `{question}` and `{documents}`, or a function (question, documents) -> prompt parts. examples: few-shot
    (documents, question, answer) triples for the default prompt. chunk_size: compress nodes in chunks of that
    many tokens. streaming: answer with streaming responses. Every other keyword is a generation setting for the
    engine (max_new_tokens, default 64; temperature, top_p, stop, seed, ...); `synthesize(..., **settings)`
    overrides them for one call.
    """

    def __init__(self, engine: Any, *, store: Any = None, prompt: PromptSpec = None,
                 examples: Sequence[tuple[Any, str, str]] = (), chunk_size: int | None = None, streaming: bool = False,
                 callback_manager: CallbackManager | None = None, **generation: Any):
        # BaseSynthesizer.__init__ sets up an LLM (Settings.llm: OpenAI unless configured) and its prompt helper:
        # here the engine is the model and the documents are never packed into a text window, so it is not called
        self._qa = DocumentQA(engine, store=store, prompt=prompt, examples=examples, chunk_size=chunk_size,
                              **generation)
        self._callback_manager = callback_manager or Settings.callback_manager
        self._streaming = streaming

    @property
    def callback_manager(self) -> CallbackManager:
        return self._callback_manager

    @callback_manager.setter
    def callback_manager(self, callback_manager: CallbackManager) -> None:
        self._callback_manager = callback_manager

    def _get_prompts(self) -> PromptDictType:
        return {}  # the prompt is arccompress's (prompt=), not a LlamaIndex template

    def _get_prompt_modules(self) -> PromptMixinType:
        return {}

    def _update_prompts(self, prompts_dict: PromptDictType) -> None:
        if prompts_dict:
            raise InputTypeError("ArcResponseSynthesizer has no LlamaIndex prompt templates: set its prompt= (a "
                                 "template with {question} and {documents}, or a function)")

    # ------------------------------------------------------------------ synthesis

    @contextmanager
    def _synthesis(self, query: QueryBundle | str, nodes: list[NodeWithScore]) -> Iterator[_Synthesis]:
        """LlamaIndex's events around one synthesis: the caller sets `.response` inside."""
        query_str = query.query_str if isinstance(query, QueryBundle) else query
        dispatcher.event(SynthesizeStartEvent(query=query))
        with self._callback_manager.event(CBEventType.SYNTHESIZE, payload={EventPayload.QUERY_STR: query_str}) as event:
            done = _Synthesis(query_str, node_passages(nodes))
            yield done
            event.on_end(payload={EventPayload.RESPONSE: done.response})
        dispatcher.event(SynthesizeEndEvent(query=query, response=done.response))

    def synthesize(self, query: QueryBundle | str, nodes: list[NodeWithScore],
                   additional_source_nodes: Sequence[NodeWithScore] | None = None,
                   **response_kwargs: Any) -> RESPONSE_TYPE:
        """The answer to the query from the nodes, each given to the decoder as a compressed document."""
        with self._synthesis(query, nodes) as s:
            if self._streaming:
                stream = self._qa.stream(s.query, s.passages, **response_kwargs)
                s.response = StreamingResponse(iter(stream), **sources(nodes, additional_source_nodes))
            else:
                reply = self._qa.answer(s.query, s.passages, **response_kwargs)
                s.response = Response(reply.text, **sources(nodes, additional_source_nodes))
        return s.response

    async def asynthesize(self, query: QueryBundle | str, nodes: list[NodeWithScore],
                          additional_source_nodes: Sequence[NodeWithScore] | None = None,
                          **response_kwargs: Any) -> RESPONSE_TYPE:
        """`synthesize` with the engine's work on a worker thread (a stream: each piece awaited there)."""
        with self._synthesis(query, nodes) as s:
            if self._streaming:
                pieces = self._qa.astream(s.query, s.passages, **response_kwargs)
                s.response = AsyncStreamingResponse(pieces, **sources(nodes, additional_source_nodes))
            else:
                reply = await self._qa.aanswer(s.query, s.passages, **response_kwargs)
                s.response = Response(reply.text, **sources(nodes, additional_source_nodes))
        return s.response

    # BaseSynthesizer's text-chunk interface: chunks without ids, each compressed

    def get_response(self, query_str: str, text_chunks: Sequence[str], **response_kwargs: Any) -> RESPONSE_TEXT_TYPE:
        passages = [Passage(f"text chunk {k}", text=t) for k, t in enumerate(text_chunks)]
        if self._streaming:
            return iter(self._qa.stream(query_str, passages, **response_kwargs))
        return self._qa.answer(query_str, passages, **response_kwargs).text

    async def aget_response(self, query_str: str, text_chunks: Sequence[str],
                            **response_kwargs: Any) -> RESPONSE_TEXT_TYPE:
        passages = [Passage(f"text chunk {k}", text=t) for k, t in enumerate(text_chunks)]
        if self._streaming:
            return self._qa.astream(query_str, passages, **response_kwargs)
        return (await self._qa.aanswer(query_str, passages, **response_kwargs)).text


def node_passages(nodes: Sequence[Any]) -> list[Passage]:
    """Retrieved nodes as passages: the content an LLM is given, and the node's id."""
    if not isinstance(nodes, Sequence):
        raise InputTypeError(f"nodes must be a list of NodeWithScore, not {type(nodes).__name__}")
    passages = []
    for k, item in enumerate(nodes):
        if not isinstance(item, NodeWithScore):
            raise InputTypeError(f"node {k}: expected a LlamaIndex NodeWithScore, not {type(item).__name__}")
        text = item.node.get_content(metadata_mode=MetadataMode.LLM)
        passages.append(Passage(f"node {k}", text=text, ids=(item.node.node_id,)))
    return passages


def sources(nodes: list[NodeWithScore], more: Sequence[NodeWithScore] | None) -> dict[str, Any]:
    """A response's source_nodes and metadata, as LlamaIndex's own synthesizers give them."""
    return {"source_nodes": [*nodes, *(more or [])], "metadata": {n.node.node_id: n.node.metadata for n in nodes}}
