"""The service itself, in Python terms: requests become prompts of compressed documents, prompts become tokens.

`Service` loads the encoder, the store and a backend once; for each request it checks the limits, resolves the
documents (compressed together with other requests' texts, cached, or read from the store), lays the prompt out
exactly as `Generator` would (text runs tokenized on their own, BOS once, contexts in place; for chat, the
decoder's chat template with the documents spliced where they stand), checks the length against the engine, and
streams the backend's output. The HTTP layer (`app.py`) only translates.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Union

import torch

from ..compressor import Compressor
from ..errors import InputError, NotFoundError
from ..prompts import ANSWER_END, TokenIds, fewshot_qa_prompt
from ..tokenization import check_text
from ..store import ContextStore
from ..engines.base import Sampling
from ..engines.base import AsyncEngine, Observer
from ..engines.remote.fleet import AsyncVLLMFleet
from ..engines.text import Delta
from ..engines.transformers_async import AsyncGenerator
from ..engines.vllm_async import AsyncVLLMGenerator
from .config import ServiceConfig
from .documents import DocumentResolver, RequestError, TextDocument
from .metrics import Metrics
from .protocol import AnswerRequest, ChatCompletionRequest, CompletionRequest, DocumentPart, SamplingFields, TextPart

Slot = Union[str, TextDocument, "StoredId", TokenIds]  # a prompt part before its documents are resolved


@dataclass(frozen=True)
class StoredId:
    id: str


@dataclass
class Prepared:
    """One prompt ready for the decoder: its input rows and what its documents saved."""

    embeds: torch.Tensor  # (T, H)
    documents: int
    positions_saved: int | None

    @property
    def positions(self) -> int:
        return int(self.embeds.shape[0])


class Service:
    """What `arccompress serve` runs: `await start()`, then `prepare_*` and `stream` per request, `await stop()`."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.limits = config.limits
        self.metrics = Metrics()
        self.compressor: Compressor | None = None
        self.store: ContextStore | None = None
        self.backend: AsyncEngine | None = None
        self.resolver: DocumentResolver | None = None
        self.ready = False

    @property
    def model_name(self) -> str:
        return self.config.model_name

    def describe(self) -> dict[str, Any]:
        """What determines this service's outputs (its backend's identity and its store's), for clients' records."""
        store = None if self.store is None else {"store_id": self.store.manifest["store_id"],
                                                  "codec": self.store.manifest["codec"]}
        return self.backend.describe() | {"store": store}

    async def start(self) -> None:
        """Load the encoder, the store and the backend (minutes for real models: threads keep the loop free)."""
        c = self.config
        if c.store is not None and not ContextStore.exists(c.store):
            raise NotFoundError(f"no context store at {c.store} (make one with `arccompress compress`)")
        self.compressor = await asyncio.to_thread(Compressor.from_pretrained, c.encoder, **c.encoder_options)
        if c.store is not None:
            self.store = await asyncio.to_thread(ContextStore, c.store, compressor=self.compressor)
        observer = Observer(tokens=self.metrics.generated_tokens.inc, prefix_cache=self.metrics.prefix_cache,
                            routed=self.metrics.routed, failed=self.metrics.upstream_failed)
        if c.backend == "upstream":
            self.backend = await AsyncVLLMFleet.connect(c.upstreams, c.decoder, self.compressor,
                                                        api_key=c.upstream_api_key, observer=observer,
                                                        **c.engine_options)
            self.metrics.watch_upstreams(self.backend.upstreams)
        elif c.backend == "vllm":
            self.backend = await asyncio.to_thread(AsyncVLLMGenerator.load, c.decoder, self.compressor,
                                                   options=c.engine_options, verbose=c.verbose, observer=observer)
        else:
            self.backend = await asyncio.to_thread(AsyncGenerator.load, c.decoder, self.compressor,
                                                   options=c.engine_options, max_batch=c.max_batch, observer=observer)
        self.resolver = DocumentResolver(self.compressor, self.store, limits=self.limits, metrics=self.metrics,
                                         window=c.batch_window, batch_tokens=c.batch_tokens, cache_size=c.cache_size)
        self.metrics.queue_depth.labels("documents").set_function(lambda: self.resolver.waiting)
        self.metrics.queue_depth.labels("generation").set_function(lambda: self.backend.waiting)
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self.resolver is not None:
            await self.resolver.close()
        if self.backend is not None:
            await self.backend.close()

    # ------------------------------------------------------------------ requests -> prompts

    async def prepare_completion(self, request: CompletionRequest) -> list[Prepared]:
        try:
            prompts = request.prompts()
        except ValueError as e:
            raise RequestError(str(e), param="prompt") from None
        if not prompts:
            raise RequestError("prompt is empty", param="prompt")
        if len(prompts) > self.limits.max_prompts:
            raise RequestError(f"{len(prompts)} prompts in one request, over this service's limit of "
                               f"{self.limits.max_prompts}", param="prompt")
        slots = [[self._slot(part, f"prompt[{i}][{j}]" if len(prompts) > 1 else f"prompt[{j}]")
                  for j, part in enumerate(parts)] for i, parts in enumerate(prompts)]
        return await self._prepare(slots, "prompt")

    async def prepare_chat(self, request: ChatCompletionRequest) -> list[Prepared]:
        tokenizer = self.backend.prompts.text.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError(f"the decoder {self.model_name!r} has no chat template: send the prompt to "
                               "/v1/completions (or the question and documents to /v1/answer)", param="messages")
        marker = f"<arccompress-document-{secrets.token_hex(8)}-"
        documents: list[Slot] = []
        messages = []
        for i, message in enumerate(request.messages):
            if isinstance(message.content, str):
                content = self._text(message.content, f"messages[{i}].content")
            else:
                pieces = []
                for j, part in enumerate(message.content):
                    if isinstance(part, TextPart):
                        pieces.append(self._text(part.text, f"messages[{i}].content[{j}]"))
                    else:
                        pieces.append(f"{marker}{len(documents)}>")
                        documents.append(self._slot(part, f"messages[{i}].content[{j}]"))
                content = "".join(pieces)
            messages.append({"role": "system" if message.role == "developer" else message.role, "content": content})
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja's TemplateError, or the template's own raise_exception
            raise RequestError(f"the decoder's chat template refused these messages: {e}", param="messages") from None
        runs = re.split(re.escape(marker) + r"(\d+)>", rendered)
        slots: list[Slot] = []
        seen = []
        for k, run in enumerate(runs):
            if k % 2:
                seen.append(int(run))
                slots.append(documents[int(run)])
            elif run:
                # the template's text, its special tokens parsed as the template means them; no BOS added after
                slots.append(TokenIds(tokenizer(run, add_special_tokens=False)["input_ids"]))
        if sorted(seen) != list(range(len(documents))):
            raise RequestError("the decoder's chat template dropped or repeated a message holding a document",
                               param="messages")
        if not slots or not isinstance(slots[0], TokenIds):
            slots.insert(0, TokenIds([]))  # the template decides about BOS, even when it starts with a document
        return await self._prepare([slots], "messages")

    async def prepare_answer(self, request: AnswerRequest) -> list[Prepared]:
        def docs(items: Sequence[str | DocumentPart], where: str) -> list[Slot]:
            return [self.resolver.check_text(d, None, f"{where}[{j}]") if isinstance(d, str)
                    else self._slot(d, f"{where}[{j}]") for j, d in enumerate(items)]

        question = docs(request.documents, "documents")
        examples = [docs(e.documents, f"examples[{i}].documents") for i, e in enumerate(request.examples)]
        self._check_count(question + [s for e in examples for s in e], "documents")
        contexts = await self._resolve([question] + examples)
        parts = fewshot_qa_prompt(request.question, contexts[0],
                                  [(ctx, e.question, e.answer) for ctx, e in zip(contexts[1:], request.examples)])
        return await asyncio.to_thread(self._lay_out, [parts])

    def _slot(self, part: str | TextPart | DocumentPart, where: str) -> Slot:
        if isinstance(part, (str, TextPart)):
            return self._text(part if isinstance(part, str) else part.text, where)
        if part.id is not None:
            return StoredId(part.id)
        return self.resolver.check_text(part.text, part.chunk_size, where)

    @staticmethod
    def _text(text: str, where: str) -> str:
        """Text the tokenizer can take (no lone surrogates), else a 400 naming where it is."""
        try:
            return check_text(text, where)
        except InputError as e:
            raise RequestError(str(e), param=where) from None

    def _check_count(self, slots: list[Slot], param: str) -> None:
        n = sum(isinstance(s, (TextDocument, StoredId)) for s in slots)
        if n > self.limits.max_documents:
            raise RequestError(f"{n} documents in one request, over this service's limit of "
                               f"{self.limits.max_documents}", param=param)

    async def _resolve(self, groups: list[list[Slot]]) -> list[list[Any]]:
        """Each group's slots with documents replaced by their contexts (all documents of the request at once)."""
        flat = [(g, k, s) for g, group in enumerate(groups) for k, s in enumerate(group)]
        wanted = [(g, k, s) for g, k, s in flat if isinstance(s, (TextDocument, StoredId))]
        self.resolver.check_ids([(s.id, f"document {s.id!r}") for _, _, s in wanted if isinstance(s, StoredId)])
        contexts = await self.resolver.resolve([s.id if isinstance(s, StoredId) else s for _, _, s in wanted])
        out = [list(group) for group in groups]
        for (g, k, _), ctx in zip(wanted, contexts):
            out[g][k] = ctx
        return out

    async def _prepare(self, slots: list[list[Slot]], param: str) -> list[Prepared]:
        self._check_count([s for group in slots for s in group], param)
        return await asyncio.to_thread(self._lay_out, await self._resolve(slots))

    def _lay_out(self, prompts: list[list[Any]]) -> list[Prepared]:
        """Decoder rows of prompts whose documents are contexts: the PromptBuilder every engine uses."""
        builder = self.backend.prompts
        try:
            layouts = builder.layout(prompts)
            rows = builder.embeds(layouts)
        except InputError as e:
            raise RequestError(str(e)) from None
        out = []
        for pieces, row in zip(layouts, rows):
            savings = builder.savings_of(pieces)
            out.append(Prepared(row, savings.num_contexts, savings.tokens_saved))
        return out

    # ------------------------------------------------------------------ prompts -> tokens

    def sampling(self, fields: SamplingFields, prepared: list[Prepared], *, default_max_tokens: int | None,
                 prompt_param: str, answer: bool = False) -> Sampling:
        """The request's generation settings, checked against the limits and the engine's context length; without
        max_tokens, `default_max_tokens` (None: what the context length leaves). `answer`: the paper's QA format,
        whose answer ends at the first blank line (a stop, so a stream ends there too)."""
        limit = self.backend.max_model_len
        stops = fields.stops
        if len(stops) > self.limits.max_stop:
            raise RequestError(f"{len(stops)} stop strings, over this service's limit of {self.limits.max_stop}",
                               param="stop")
        if any(not s for s in stops):
            raise RequestError("a stop string is empty", param="stop")
        if fields.n > self.limits.max_n:
            raise RequestError(f"n = {fields.n}, over this service's limit of {self.limits.max_n}", param="n")
        longest = max(p.positions for p in prepared)
        max_tokens = fields.new_tokens or default_max_tokens or max(limit - longest, 1)
        if longest + max_tokens > limit:
            param = "max_tokens" if fields.new_tokens else prompt_param
            raise RequestError(f"the prompt takes {longest} positions and max_tokens is {max_tokens}: together over "
                               f"the model's context length of {limit}", param=param)
        return Sampling(max_new_tokens=max_tokens, temperature=fields.temperature, top_p=fields.top_p,
                        stop=(*stops, *([ANSWER_END] if answer else [])), seed=fields.seed, n=fields.n)

    async def stream(self, prepared: list[Prepared], sampling: Sampling, request_id: str
                     ) -> AsyncIterator[tuple[int, list[Delta]]]:
        """(prompt index, deltas) of every prompt's sequences, interleaved as the backend produces them. Greedy
        n > 1 is one sequence computed once and handed out n times, as OpenAI's API and every engine here do."""
        if sampling.greedy and sampling.n > 1:
            copies = sampling.n
            async for i, deltas in self.stream(prepared, replace(sampling, n=1), request_id):
                yield i, [replace(d, index=k) for d in deltas for k in range(copies)]
            return
        for p in prepared:
            self.metrics.prompt_positions.inc(p.positions)
            if p.positions_saved and p.positions_saved > 0:  # a document shorter than its compressed form saves none
                self.metrics.positions_saved.inc(p.positions_saved)
        if len(prepared) == 1:
            async for deltas in self.backend.generate(prepared[0].embeds, sampling, request_id):
                yield 0, deltas
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def run(i: int, p: Prepared) -> None:
            try:
                async for deltas in self.backend.generate(p.embeds, sampling, f"{request_id}-{i}"):
                    await merged.put((i, deltas))
            except BaseException as e:
                await merged.put(e)
                raise
            finally:
                await merged.put(None)

        tasks = [asyncio.create_task(run(i, p)) for i, p in enumerate(prepared)]
        try:
            left = len(tasks)
            while left:
                item = await merged.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    self.metrics.generated_tokens.inc(sum(len(d.token_ids) for d in item[1]))
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
