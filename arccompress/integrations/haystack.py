"""Haystack: a generator component that reads the retrieved documents compressed.

    from haystack import Pipeline
    from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
    from arccompress.integrations.haystack import ArcGenerator

    pipe = Pipeline()
    pipe.add_component("retriever", InMemoryBM25Retriever(document_store, top_k=5))
    pipe.add_component("generator", ArcGenerator(service_url="http://localhost:8000", store="wiki-store"))
    pipe.connect("retriever.documents", "generator.documents")
    pipe.run({"retriever": {"query": q}, "generator": {"question": q}})   # {"generator": {"replies", "meta"}}

Inputs `question` and `documents` (Haystack `Document`s: one whose `id` is in the store is read from it, any
other is its `content` compressed); outputs `replies` (one answer) and `meta` (its finish reason, and `usage`:
decoder positions read, tokens generated, positions the compressed documents saved).

Serialisation. An engine object is not serialisable, so the component is made from how to build its engine,
and that is what `to_dict` writes, like Haystack's own generators:

- a running `arccompress serve`: `service_url=`, `model=` (default: its only model) and `api_key=`, a Haystack
  `Secret` (default: the environment variable ARCCOMPRESS_API_KEY, if set; a token Secret is refused by
  `to_dict`, as Haystack does);
- a local engine: `encoder=` and `decoder=` (hub ids or folders), `backend=` "transformers" (`Generator`) or
  "vllm" (`VLLMGenerator`), and the keywords of their `from_pretrained` (`encoder_kwargs=`, `decoder_kwargs=`:
  device, dtype, quantization, ...), loaded by `warm_up()` (a pipeline calls it; `run` does if needed);
- `store=`: a ContextStore's folder, opened by `warm_up()` (with a service, it says which ids the service holds).

`engine=` takes an engine object instead (and `store=` a ContextStore or a container of ids), for use in Python;
such a component's `to_dict` raises, saying how to make it serialisable. `prompt=` is a template or an importable
function (written by its import path); generation settings (max_new_tokens, temperature, ...) are keywords and
must be JSON values to be serialised; `run(..., generation_kwargs=)` overrides them for one call. Loading a
serialised pipeline on Haystack 3 needs the module allowed: `Pipeline.loads(text,
allowed_modules=["arccompress.*"])`.
"""

# no `from __future__ import annotations`: Haystack 2 reads run()'s annotations as they are, strings included
import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..compressor import Compressor
from ..engines.base import Engine, LocalEngine, Sampling
from ..engines.remote.service import ServiceClient
from ..engines.transformers import Generator
from ..engines.vllm import VLLMGenerator
from ..errors import InputError, InputTypeError
from ..extras import missing
from ..store import ContextStore
from .documents import (DocumentQA, Passage, PromptSpec, Reply, ReplyStream, aiterate, check_prompt, not_a_document,
                        own_passage)

try:
    from haystack import Document, component, default_from_dict, default_to_dict
    from haystack.dataclasses import ComponentInfo, StreamingChunk, select_streaming_callback
    from haystack.utils import Secret, deserialize_callable, deserialize_secrets_inplace, serialize_callable
except ImportError as e:
    raise missing("haystack", "arccompress.integrations.haystack", e) from None

__all__ = ["ArcGenerator"]

BACKENDS = ("transformers", "vllm")
DEFAULT_API_KEY = Secret.from_env_var("ARCCOMPRESS_API_KEY", strict=False)


@component
class ArcGenerator:
    """A Haystack generator answering a question from compressed documents (see the module's docstring).

    Give one of: `engine` (an engine object), `service_url` (a running `arccompress serve`), or `encoder` and
    `decoder` (a local engine, loaded by warm_up). prompt: None (the paper's few-shot QA format, the answer read
    up to its first blank line), a template with `{question}` and `{documents}`, or a function (question,
    documents) -> prompt parts. examples: few-shot (documents, question, answer) triples for the default prompt.
    chunk_size: compress documents in chunks of that many tokens. streaming_callback: called with each piece
    of the answer as a `StreamingChunk`. Every other keyword is a generation setting for the engine
    (max_new_tokens, default 64; temperature, top_p, stop, seed, ...).
    """

    def __init__(self, engine: Engine | None = None, *, service_url: str | None = None,
                 api_key: Secret | None = DEFAULT_API_KEY, model: str | None = None, encoder: str | None = None,
                 decoder: str | None = None, backend: str = "transformers",
                 encoder_kwargs: dict[str, Any] | None = None, decoder_kwargs: dict[str, Any] | None = None,
                 store: Any = None, prompt: PromptSpec = None,
                 examples: Sequence[Any] = (), chunk_size: int | None = None,
                 streaming_callback: Callable[[StreamingChunk], Any] | None = None, **generation: Any):
        given = [name for name, value in (("engine", engine), ("service_url", service_url)) if value is not None]
        if encoder is not None or decoder is not None:
            if encoder is None or decoder is None:
                raise InputError("a local engine needs both encoder= and decoder=")
            given.append("encoder and decoder")
        if len(given) != 1:
            raise InputError("give one of engine=, service_url=, or encoder= and decoder=" +
                             (f", not {' and '.join(given)}" if given else ""))
        if engine is not None and not isinstance(engine, Engine):
            raise InputTypeError(f"engine must be an engine of arccompress, not {type(engine).__name__}")
        if backend not in BACKENDS:
            raise InputError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        if api_key is not None and not isinstance(api_key, Secret):
            raise InputTypeError("api_key must be a Haystack Secret, e.g. Secret.from_env_var('ARCCOMPRESS_API_KEY')")
        if engine is None and store is not None and not isinstance(store, (str, Path)):
            raise InputTypeError(f"store must be a ContextStore's folder (a str), not {type(store).__name__}: objects "
                                 "go with engine=")
        self.engine = engine
        self.service_url = service_url
        self.api_key = api_key
        self.model = model
        self.encoder = encoder
        self.decoder = decoder
        self.backend = backend
        self.encoder_kwargs = dict(encoder_kwargs or {})
        self.decoder_kwargs = dict(decoder_kwargs or {})
        self.store = store
        self.prompt = prompt
        self.examples = list(examples)
        self.chunk_size = chunk_size
        self.streaming_callback = streaming_callback
        self.generation = generation
        # what can be checked without an engine is checked now, the rest by the engine at warm_up
        check_prompt(prompt)
        Sampling.from_kwargs(**generation)
        self._qa: DocumentQA | None = None if engine is None else self._document_qa(engine)

    def _document_qa(self, engine: Engine) -> DocumentQA:
        """The adapter over `engine`, with the store opened: a folder with the local engine's compressor (the store
        must hold its contexts), or, for a service, just to know its ids."""
        store = self.store
        if isinstance(store, (str, Path)):
            store = ContextStore(store, compressor=engine.compressor) if isinstance(engine, LocalEngine) \
                else ContextStore(store)
        return DocumentQA(engine, store=store, prompt=self.prompt, examples=self.examples, chunk_size=self.chunk_size,
                          **self.generation)

    def warm_up(self) -> None:
        """Connect to the service or load the local engine, and open the store (once)."""
        if self._qa is not None:
            return
        if self.service_url is not None:
            key = self.api_key.resolve_value() if self.api_key is not None else None
            engine: Engine = ServiceClient(self.service_url, api_key=key, model=self.model)
        else:
            compressor = Compressor.from_pretrained(self.encoder, **self.encoder_kwargs)
            if self.backend == "vllm":
                engine = VLLMGenerator.from_pretrained(self.decoder, compressor=compressor, **self.decoder_kwargs)
            else:
                engine = Generator.from_pretrained(self.decoder, compressor=compressor, **self.decoder_kwargs)
        self._qa = self._document_qa(engine)

    # ------------------------------------------------------------------ running

    @component.output_types(replies=list[str], meta=list[dict[str, Any]])
    def run(self, question: str, documents: list[Document],
            streaming_callback: Callable[[StreamingChunk], Any] | None = None,
            generation_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """The answer to `question` from `documents`, each given to the decoder as a compressed document.

        streaming_callback: called with each piece (overrides the one given at creation). generation_kwargs:
        generation settings for this call, over those given at creation.
        """
        self.warm_up()
        passages = document_passages(documents)
        callback = select_streaming_callback(self.streaming_callback, streaming_callback, requires_async=False)
        if callback is None:
            return outputs(self._qa.answer(question, passages, **(generation_kwargs or {})))
        stream = self._qa.stream(question, passages, **(generation_kwargs or {}))
        info = ComponentInfo.from_component(self)
        pieces = []
        for piece in stream:
            pieces.append(piece)
            callback(StreamingChunk(content=piece, component_info=info))
        return outputs(stream, "".join(pieces))

    @component.output_types(replies=list[str], meta=list[dict[str, Any]])
    async def run_async(self, question: str, documents: list[Document],
                        streaming_callback: Callable[[StreamingChunk], Any] | None = None,
                        generation_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        """`run` with the engine's work on a worker thread; an async streaming callback is awaited."""
        self.warm_up()
        passages = document_passages(documents)
        callback = select_streaming_callback(self.streaming_callback, streaming_callback, requires_async=True)
        if callback is None:
            return outputs(await self._qa.aanswer(question, passages, **(generation_kwargs or {})))
        stream = self._qa.stream(question, passages, **(generation_kwargs or {}))
        info = ComponentInfo.from_component(self)
        pieces = []
        async for piece in aiterate(iter(stream)):
            pieces.append(piece)
            done = callback(StreamingChunk(content=piece, component_info=info))
            if inspect.isawaitable(done):
                await done
        return outputs(stream, "".join(pieces))

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """How to rebuild this component: its engine's recipe, store folder, prompt and settings."""
        if self.engine is not None:
            raise InputError("an ArcGenerator made from an engine object cannot be serialised: make it with "
                             "service_url= (and api_key=) or encoder= and decoder=, which to_dict writes")
        for name, value in self.generation.items():
            try:
                json.dumps(value)
            except TypeError:
                raise InputError(f"generation setting {name}={value!r} is not a JSON value: it cannot be "
                                 "serialised") from None
        prompt = {"function": serialize_callable(self.prompt)} if callable(self.prompt) else self.prompt
        return default_to_dict(
            self, service_url=self.service_url, api_key=None if self.api_key is None else self.api_key.to_dict(),
            model=self.model, encoder=self.encoder, decoder=self.decoder, backend=self.backend,
            encoder_kwargs=self.encoder_kwargs, decoder_kwargs=self.decoder_kwargs,
            store=None if self.store is None else str(self.store), prompt=prompt,
            examples=[list(e) if isinstance(e, tuple) else e for e in self.examples], chunk_size=self.chunk_size,
            streaming_callback=None if self.streaming_callback is None else serialize_callable(self.streaming_callback),
            **self.generation)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArcGenerator":
        """The component `to_dict` described (its engine is built by warm_up)."""
        params = data.get("init_parameters", {})
        deserialize_secrets_inplace(params, keys=["api_key"])
        if isinstance(params.get("prompt"), dict):
            params["prompt"] = deserialize_callable(params["prompt"]["function"])
        if params.get("streaming_callback"):
            params["streaming_callback"] = deserialize_callable(params["streaming_callback"])
        return default_from_dict(cls, data)


def document_passages(documents: Sequence[Any]) -> list[Passage]:
    """Haystack Documents (id: `Document.id`, text: `content`), strs or contexts, as passages."""
    if isinstance(documents, (str, Document)) or not isinstance(documents, Sequence):
        raise InputTypeError(f"documents must be a list of Haystack Documents, not {type(documents).__name__}")
    passages = []
    for k, doc in enumerate(documents):
        where = f"document {k}"
        passage = Passage(where, text=doc.content, ids=(doc.id,)) if isinstance(doc, Document) \
            else own_passage(doc, where)
        if passage is None:
            raise not_a_document(doc, where, "a Haystack Document")
        passages.append(passage)
    return passages


def outputs(reply: Reply | ReplyStream, text: str | None = None) -> dict[str, Any]:
    """The component's outputs: the answer, and what it cost (a stream: the counts known before it started)."""
    if isinstance(reply, Reply):
        meta = {"finish_reason": reply.finish_reason, "usage": reply.usage()}
        text = reply.text
    else:
        usage = {"prompt_tokens": reply.prompt_positions, "positions_saved": reply.positions_saved}
        meta = {"usage": {k: v for k, v in usage.items() if v is not None}}
    meta |= {"documents": reply.documents, "stored_documents": reply.stored}
    return {"replies": [text], "meta": [meta]}
