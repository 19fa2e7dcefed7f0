"""What the three framework adapters do the same way: a question and its documents, answered by an engine.

An adapter turns each of its framework's documents into a `Passage` (its text, the ids it may be stored under,
and how errors name it); `DocumentQA` turns passages into prompt parts and the question and parts into a prompt,
and asks the engine:

    qa = DocumentQA(engine, store=store, max_new_tokens=32)
    reply = qa.answer("Who signed?", [Passage("document 0", text="...", ids=("doc-17",))])
    reply.text, reply.prompt_positions, reply.positions_saved

Documents. A passage whose id is in `store` is read from it (the encoder is not called for it), and so is one
whose text the store holds (compressed with the same chunk size, under whatever id: `ContextStore.find_texts`,
so that a retriever's documents find their precomputed contexts without anyone threading ids); any other is its
text compressed. They travel as documents, never as prompt text. With a local engine (`Generator`,
`VLLMGenerator`, `VLLMClient`) stored contexts are read here, one `store.get_many` per call, and texts are
compressed here, one batched call (`resolve_documents`, as every engine's prompts do), so the engine receives
contexts (and their counts are known before a stream starts); `store` defaults to the engine's own. With a service
(`ServiceClient`) a stored id travels as `ContextRef(id)` and a text as `ContextText`: the service reads its own
store and compresses, and `store=` only says which ids the service holds (any container of ids: a set, or the
store's folder opened as a ContextStore).

Prompt. By default the paper's few-shot QA format (`fewshot_qa_prompt`), read as the paper's evaluation reads
it: generation stops at the first blank line and the answer is stripped, so it equals `engine.answer(question,
documents)`. `prompt=` replaces it: a template holding `{question}` and one `{documents}` (where the documents
stand, back to back), or a function (question, documents) -> prompt parts; the engine's text is then returned
as it is.

Generation settings (max_new_tokens, default 64; temperature, top_p, stop, seed, and the engine's own options)
are keyword arguments, read once by the engine when the adapter is made, and may be overridden per call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any, Union

from ..context import CompressedContext
from ..engines.base import ANSWER_MAX_NEW_TOKENS, Engine, LocalEngine, Sampling
from ..errors import InputError, InputTypeError
from ..prompts import (ANSWER_END, ContextRef, ContextText, Document, Part, Prompt, fewshot_qa_prompt, normalize_one,
                       resolve_documents)
from ..tokenization import check_text

PromptFunction = Callable[[str, list[Document]], Prompt]
PromptSpec = Union[str, PromptFunction, None]


@dataclass(frozen=True)
class Passage:
    """One document as an adapter read it: how errors name it ("document 3"), its text, the ids it may be
    stored under (first match wins), or a context the caller already made."""

    where: str
    text: str | None = None
    ids: tuple[str, ...] = ()
    context: CompressedContext | None = None


def own_passage(obj: Any, where: str) -> Passage | None:
    """The passage of a document every adapter accepts, a str or a CompressedContext; None for anything else."""
    if isinstance(obj, str):
        return Passage(where, text=obj)
    if isinstance(obj, CompressedContext):
        return Passage(where, context=obj)
    return None


def not_a_document(obj: Any, where: str, expected: str) -> InputTypeError:
    return InputTypeError(f"{where}: expected {expected}, a str or a CompressedContext, not {type(obj).__name__}")


@dataclass(frozen=True)
class Reply:
    """An answer and what its prompt cost: decoder positions read, positions the compressed documents saved
    (None where the engine does not say), generated tokens, and how many documents came from the store."""

    text: str
    prompt_positions: int | None
    positions_saved: int | None
    output_tokens: int
    finish_reason: str
    documents: int
    stored: int

    def usage(self) -> dict[str, int]:
        """OpenAI-style counts, for frameworks' metadata (only those known)."""
        counts = {"prompt_tokens": self.prompt_positions, "completion_tokens": self.output_tokens,
                  "positions_saved": self.positions_saved}
        if self.prompt_positions is not None:
            counts["total_tokens"] = self.prompt_positions + self.output_tokens
        return {k: v for k, v in counts.items() if v is not None}


@dataclass
class ReplyStream:
    """An answer's text piece by piece (iterate it), with what is known before it starts: positions read and
    saved with a local engine (None with a service), documents and stored documents."""

    pieces: Iterator[str]
    prompt_positions: int | None
    positions_saved: int | None
    documents: int
    stored: int

    def __iter__(self) -> Iterator[str]:
        return self.pieces


class DocumentQA:
    """Answers a question from documents with any engine of this package (see the module's docstring)."""

    def __init__(self, engine: Engine, *, store: Any = None, prompt: PromptSpec = None,
                 examples: Sequence[tuple[Any, str, str]] = (), chunk_size: int | None = None, **generation: Any):
        if not isinstance(engine, Engine):
            raise InputTypeError(f"engine must be an engine of arccompress (Generator, VLLMGenerator, VLLMClient, "
                                 f"ServiceClient), not {type(engine).__name__}")
        self.engine = engine
        self.local = isinstance(engine, LocalEngine)
        self.store = store if store is not None or not self.local else engine.store
        if self.store is not None:
            if isinstance(self.store, (str, bytes, PathLike)):
                raise InputTypeError(f"store must be a ContextStore or a container of stored ids, not a path: open "
                                     f"it, ContextStore({str(self.store)!r})")
            if not hasattr(self.store, "__contains__"):
                raise InputTypeError(f"store must be a ContextStore or a container of stored ids, not "
                                     f"{type(self.store).__name__}")
            if self.local and not hasattr(self.store, "get_many"):
                raise InputTypeError(f"with a local engine, store must be a ContextStore (it is read with get_many), "
                                     f"not {type(self.store).__name__}")
        self.prompt = check_prompt(prompt)
        if examples and self.prompt is not None:
            raise InputError("examples= go with the default prompt (the paper's few-shot format): write your own "
                             "examples into your prompt")
        self.examples = list(examples)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise InputError(f"chunk_size must be a positive int or None, not {chunk_size!r}")
        self.chunk_size = chunk_size
        self.generation = dict(generation)
        self.sampling()  # the settings are checked now, by the engine that will read them

    def sampling(self, prompt: PromptSpec = None, **overrides: Any) -> Sampling:
        """The engine's reading of the settings, call-time overrides on top; the paper's format adds its stop."""
        settings = {"max_new_tokens": ANSWER_MAX_NEW_TOKENS, **self.generation, **overrides}
        if self.paper_format(prompt):
            stop = settings.get("stop") or ()
            settings["stop"] = [*([stop] if isinstance(stop, str) else stop), ANSWER_END]
        sampling = self.engine.sampling(**settings)
        if sampling.n != 1:
            raise InputError(f"an answer is one sequence: n must be 1, not {sampling.n}")
        return sampling

    def paper_format(self, prompt: PromptSpec = None) -> bool:
        """Whether a call with this `prompt` (None: the one given at creation) uses the paper's QA format."""
        return prompt is None and self.prompt is None

    # ------------------------------------------------------------------ documents and prompt

    def documents(self, passages: Sequence[Passage]) -> tuple[list[Document], int]:
        """(the passages as prompt parts, in order; how many were read from the store)."""
        parts: list[Document | None] = [None] * len(passages)
        stored: list[tuple[int, str]] = []
        texts: list[tuple[int, str, str]] = []  # (place, text as given, text to compress)
        held = self._held([i for p in passages if p.context is None for i in p.ids])
        for k, p in enumerate(passages):
            if p.context is not None:
                if not self.local:
                    raise InputTypeError(f"{p.where}: a service takes documents' text or the ids of stored contexts, "
                                         "never tensors: give the document's text, or its id in the service's store")
                self.engine.prompts.check_context(p.context, p.where)
                parts[k] = p.context
                continue
            key = next((i for i in p.ids if i in held), None)
            if key is not None:
                stored.append((k, key))
                continue
            text = check_text(p.text, f"{p.where}'s text").strip() if p.text is not None else ""
            if not text:
                named = f" (id {p.ids[0]!r})" if p.ids else ""
                held = "no store is given" if self.store is None else "the store holds none of its ids" if p.ids \
                    else "it has no id"
                raise InputError(f"{p.where}{named} is empty: it has no text, and {held}")
            texts.append((k, p.text, text))
        if texts and hasattr(self.store, "find_texts"):  # texts stored already, whatever their ids here
            found = self.store.find_texts([raw for _, raw, _ in texts], chunk_size=self.chunk_size)
            again = [i for i, (_, raw, text) in enumerate(texts) if found[i] is None and text != raw]
            if again:  # the text as it would be compressed here (stripped)
                for i, key in zip(again, self.store.find_texts([texts[i][2] for i in again],
                                                                chunk_size=self.chunk_size)):
                    found[i] = key
            stored += [(k, key) for (k, _, _), key in zip(texts, found) if key is not None]
            texts = [t for t, key in zip(texts, found) if key is None]
        for k, key in stored:
            parts[k] = ContextRef(key)
        for k, _, text in texts:
            parts[k] = ContextText(text, self.chunk_size)
        if self.local:  # read and compressed here, one get_many and one compress call (a service does both itself)
            parts = resolve_documents([parts], self.engine.compressor, self.store)[0]
            for k, key in stored:
                self.engine.prompts.check_context(parts[k], f"{passages[k].where} (id {key!r}, read from the store)")
        return parts, len(stored)  # type: ignore[return-value]  # every place is filled

    def _held(self, ids: list[str]) -> set[str]:
        """Which of these ids the store holds: one lookup for all where the store can (ContextStore.missing)."""
        if self.store is None or not ids:
            return set()
        if hasattr(self.store, "missing"):
            return set(ids) - set(self.store.missing(ids))
        return {i for i in ids if i in self.store}

    def prompt_parts(self, question: str, documents: list[Document], spec: PromptSpec) -> list[Part]:
        """The prompt: the paper's few-shot format (spec None), a template or a function."""
        if spec is None:
            return normalize_one(fewshot_qa_prompt(question, documents, self.examples), "the prompt")
        if isinstance(spec, str):
            head, tail = spec.split("{documents}")
            return normalize_one([head.replace("{question}", question), *documents,
                                  tail.replace("{question}", question)], "the prompt")
        return normalize_one(spec(question, list(documents)), "the prompt")

    def request(self, question: str, passages: Sequence[Passage], prompt: PromptSpec,
                overrides: Mapping[str, Any]) -> tuple[list[Part], Sampling, int]:
        """(the prompt, the sampling, how many documents came from the store) of one call: everything that can be
        checked is checked before the encoder or the store is asked for anything."""
        check_text(question, "the question")
        if not question.strip():
            raise InputError("the question is empty")
        spec = check_prompt(prompt) if prompt is not None else self.prompt
        if spec is None and not passages:
            raise InputError("no documents: the paper's QA format answers from at least one document")
        sampling = self.sampling(prompt, **overrides)
        documents, stored = self.documents(passages)
        return self.prompt_parts(question, documents, spec), sampling, stored

    # ------------------------------------------------------------------ answers

    def answer(self, question: str, passages: Sequence[Passage], *, prompt: PromptSpec = None,
               **overrides: Any) -> Reply:
        """The engine's answer to the question from the passages."""
        parts, sampling, stored = self.request(question, passages, prompt, overrides)
        done = self.engine.complete([parts], sampling)[0]
        text = done.texts[0].strip() if self.paper_format(prompt) else done.texts[0]
        return Reply(text=text, prompt_positions=done.prompt_positions, positions_saved=done.positions_saved,
                     output_tokens=len(done.token_ids[0]), finish_reason=done.finish_reasons[0],
                     documents=len(passages), stored=stored)

    def stream(self, question: str, passages: Sequence[Passage], *, prompt: PromptSpec = None,
               **overrides: Any) -> ReplyStream:
        """The answer piece by piece; joined, it is `answer(...)`'s text."""
        parts, sampling, stored = self.request(question, passages, prompt, overrides)
        positions = saved = None
        if self.local:
            counted = self.engine.prompt_savings([parts])[0]
            positions, saved = counted.prompt_length, counted.tokens_saved
        pieces = self.engine.stream_completion(parts, sampling)
        if self.paper_format(prompt):
            pieces = stripped(pieces)
        return ReplyStream(pieces, positions, saved, len(passages), stored)

    async def aanswer(self, question: str, passages: Sequence[Passage], *, prompt: PromptSpec = None,
                      **overrides: Any) -> Reply:
        """`answer` on a worker thread: the event loop keeps running while the engine works."""
        return await asyncio.to_thread(self.answer, question, passages, prompt=prompt, **overrides)

    async def astream(self, question: str, passages: Sequence[Passage], *, prompt: PromptSpec = None,
                      **overrides: Any) -> AsyncIterator[str]:
        """`stream` with each piece awaited on a worker thread."""
        stream = await asyncio.to_thread(self.stream, question, passages, prompt=prompt, **overrides)
        async for piece in aiterate(stream.pieces):
            yield piece


def check_prompt(prompt: PromptSpec) -> PromptSpec:
    """A prompt template (one "{documents}", at least one "{question}") or a function, as given."""
    if prompt is None or callable(prompt):
        return prompt
    if not isinstance(prompt, str):
        raise InputTypeError(f"prompt must be a template str or a function (question, documents) -> prompt parts, "
                             f"not {type(prompt).__name__}")
    if prompt.count("{documents}") != 1 or "{question}" not in prompt:
        raise InputError(f"a prompt template holds {{question}} and one {{documents}} (where the compressed documents "
                         f"stand), e.g. 'Context: {{documents}}\\nQuestion: {{question}}\\nAnswer:', not {prompt!r}")
    return prompt


def stripped(pieces: Iterator[str]) -> Iterator[str]:
    """The pieces of a text without its leading and trailing whitespace: whitespace is held back until more text
    follows it. Closing this stream closes the engine's."""
    started, held = False, ""
    try:
        for piece in pieces:
            if not started:
                piece = piece.lstrip()
                started = bool(piece)
            text = held + piece
            body = text.rstrip()
            held = text[len(body):]
            if body:
                yield body
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()


async def aiterate(pieces: Iterator[str]) -> AsyncIterator[str]:
    """A blocking iterator, each step awaited on a worker thread; closed if the consumer stops early."""
    done = object()
    try:
        while (piece := await asyncio.to_thread(next, pieces, done)) is not done:
            yield piece  # type: ignore[misc]
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
