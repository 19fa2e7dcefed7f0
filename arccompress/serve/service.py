"""The service itself, in Python terms: requests become prompts of compressed documents, prompts become tokens.

`Service` loads the encoder, the store and an engine once; for each request it checks the limits, each before the
work it bounds (`Reading`), resolves the documents (compressed together with other requests' texts, cached, or read
from the store), lays the prompt out exactly as `Generator` would (text runs tokenized on their own, BOS once,
contexts in place; for chat, the decoder's chat template with the documents spliced where they stand), checks the
length against the engine from token counts, builds the rows and streams the engine's output. What costs more
than the request's size in fields (tokenizing, templates, compressing, building rows) runs in worker threads, off
the event loop. The HTTP layer (`app.py`) only translates.
"""

from __future__ import annotations

import asyncio
import gc
import re
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..compressor import Compressor
from ..engines.base import AsyncEngine, Observer, Sampling
from ..engines.remote.fleet import AsyncVLLMFleet
from ..engines.text import Delta
from ..engines.transformers_async import AsyncGenerator
from ..engines.vllm_async import AsyncVLLMGenerator
from ..errors import InputError, NotFoundError
from ..prompts import ANSWER_END, TokenIds, fewshot_qa_prompt
from ..store import ContextStore
from .config import DEFAULT_CACHE_POSITIONS, ServiceConfig
from .documents import DocumentResolver, TextDocument
from .refusals import RequestError
from .metrics import Metrics
from .protocol import (AnswerRequest, ChatCompletionRequest, CompletionRequest, DocumentPart, SamplingFields, TextPart,
                       quote)
from .reading import Reading, Slot, StoredId

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
        self.engine: AsyncEngine | None = None  # what generates: a decoder here, or upstream servers
        self.resolver: DocumentResolver | None = None
        self.ready = False

    @property
    def model_name(self) -> str:
        return self.config.model_name

    def describe(self) -> dict[str, Any]:
        """What determines this service's outputs (its engine's identity and its store's), for clients' records."""
        store = None if self.store is None else {"store_id": self.store.manifest["store_id"],
                                                  "codec": self.store.manifest["codec"]}
        return self.engine.describe() | {"store": store}

    async def start(self) -> None:
        """Load the encoder, the store and the engine (minutes for real models: threads keep the loop free), then
        freeze the garbage collector's view of the process (`gc.freeze()`: what is alive then, the models above all,
        is never scanned again; a process that embeds the service gets this too)."""
        c = self.config
        if c.store is not None and not ContextStore.exists(c.store):
            raise NotFoundError(f"no context store at {c.store} (make one with `arccompress compress`)")
        self.compressor = await asyncio.to_thread(Compressor.from_pretrained, c.encoder, **c.encoder_options)
        if c.store is not None:
            self.store = await asyncio.to_thread(ContextStore, c.store, compressor=self.compressor)
        observer = Observer(tokens=self.metrics.generated_tokens.inc, prefix_cache=self.metrics.prefix_cache,
                            routed=self.metrics.routed, failed=self.metrics.upstream_failed)
        if c.backend == "upstream":
            self.engine = await AsyncVLLMFleet.connect(c.upstreams, c.decoder, self.compressor,
                                                       api_key=c.upstream_api_key, observer=observer,
                                                       **c.engine_options)
            self.metrics.watch_upstreams(self.engine.upstreams)
        elif c.backend == "vllm":
            self.engine = await asyncio.to_thread(AsyncVLLMGenerator.load, c.decoder, self.compressor,
                                                   options=c.engine_options, verbose=c.verbose, observer=observer)
        else:
            self.engine = await asyncio.to_thread(AsyncGenerator.load, c.decoder, self.compressor,
                                                   options=c.engine_options, max_batch=c.max_batch, observer=observer)
        self.resolver = DocumentResolver(self.compressor, self.store, limits=self.limits, metrics=self.metrics,
                                         window=c.batch_window, batch_tokens=c.batch_tokens,
                                         cache_bytes=self.cache_bytes())
        self.metrics.queue_depth.labels("documents").set_function(lambda: self.resolver.waiting)
        self.metrics.queue_depth.labels("generation").set_function(lambda: self.engine.waiting)
        # the millions of objects of the models and libraries loaded so far live as long as the service: out of the
        # garbage collector's sight, a full collection (which any request's allocations can trigger) scans only
        # what requests made since, instead of holding the interpreter for hundreds of milliseconds
        gc.freeze()
        self.ready = True

    def cache_bytes(self) -> int:
        """The compression cache's budget: `cache_mib`, else room for DEFAULT_CACHE_POSITIONS context rows of the
        decoder's width in the encoder's dtype (a context is as wide as the decoder)."""
        if self.config.cache_mib is not None:
            return int(self.config.cache_mib * (1 << 20))
        comp = self.compressor
        return DEFAULT_CACHE_POSITIONS * comp.decoder_hidden_size * comp.dtype.itemsize

    async def stop(self) -> None:
        self.ready = False
        if self.resolver is not None:
            await self.resolver.close()
        if self.engine is not None:
            await self.engine.close()

    # ------------------------------------------------------------------ requests -> prompts

    async def prepare_completion(self, request: CompletionRequest, default_max_tokens: int | None
                                 ) -> tuple[list[Prepared], Sampling]:
        self.check_sampling(request)
        try:
            prompts = request.prompts()
        except ValueError as e:
            raise RequestError(str(e), param="prompt") from None
        if not prompts:
            raise RequestError("prompt is empty", param="prompt")
        if len(prompts) > self.limits.max_prompts:
            raise RequestError(f"{len(prompts)} prompts in one request, over this service's limit of "
                               f"{self.limits.max_prompts}", param="prompt")

        def read(reading: Reading) -> list[list[Slot]]:
            slots: list[list[Slot]] = []
            for i, parts in enumerate(prompts):
                group: list[Slot] = []
                for j, part in enumerate(parts):
                    where = f"prompt[{i}][{j}]" if len(prompts) > 1 else f"prompt[{j}]"
                    if isinstance(part, DocumentPart):
                        group.append(reading.document(part, where))
                    else:
                        group.append(reading.text(part if isinstance(part, str) else part.text, where, i))
                slots.append(group)
            return slots

        return await self._prepare(read, request, "prompt", default_max_tokens=default_max_tokens)

    async def prepare_chat(self, request: ChatCompletionRequest, default_max_tokens: int | None
                           ) -> tuple[list[Prepared], Sampling]:
        self.check_sampling(request)
        tokenizer = self.engine.prompts.text.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError(f"the decoder {quote(self.model_name)} has no chat template: send the prompt to "
                               "/v1/completions (or the question and documents to /v1/answer)", param="messages")

        def read(reading: Reading) -> list[list[Slot]]:
            marker = f"<arccompress-document-{secrets.token_hex(8)}-"
            documents: list[Slot] = []
            messages = []
            for i, message in enumerate(request.messages):
                if isinstance(message.content, str):
                    content = reading.text(message.content, f"messages[{i}].content")
                else:
                    pieces = []
                    for j, part in enumerate(message.content):
                        if isinstance(part, TextPart):
                            pieces.append(reading.text(part.text, f"messages[{i}].content[{j}]"))
                        else:
                            pieces.append(f"{marker}{len(documents)}>")
                            documents.append(reading.document(part, f"messages[{i}].content[{j}]"))
                    content = "".join(pieces)
                messages.append({"role": "system" if message.role == "developer" else message.role,
                                 "content": content})
            reading.finish()  # every check before the template renders the text
            try:
                rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # jinja's TemplateError, or the template's own raise_exception
                raise RequestError(f"the decoder's chat template refused these messages: {e}",
                                   param="messages") from None
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
            return [slots]

        return await self._prepare(read, request, "messages", default_max_tokens=default_max_tokens)

    async def prepare_answer(self, request: AnswerRequest, default_max_tokens: int | None
                             ) -> tuple[list[Prepared], Sampling]:
        self.check_sampling(request)

        def read(reading: Reading) -> list[list[Slot]]:
            def docs(items: Sequence[str | DocumentPart], where: str) -> list[Slot]:
                # a document given as a str is stripped, as fewshot_qa_prompt strips it for every engine
                return [reading.document(d.strip() if isinstance(d, str) else d, f"{where}[{j}]")
                        for j, d in enumerate(items)]

            reading.text(request.question, "question")
            for i, e in enumerate(request.examples):
                reading.text(e.question, f"examples[{i}].question")
                reading.text(e.answer, f"examples[{i}].answer")
            return [docs(request.documents, "documents")] + [docs(e.documents, f"examples[{i}].documents")
                                                             for i, e in enumerate(request.examples)]

        def parts(groups: list[list[Any]]) -> list[list[Any]]:
            return [fewshot_qa_prompt(request.question, groups[0], [(ctx, e.question, e.answer) for ctx, e in
                                                                   zip(groups[1:], request.examples)])]

        return await self._prepare(read, request, "documents", default_max_tokens=default_max_tokens, answer=True,
                                   assemble=parts)

    async def _prepare(self, read: Callable[[Reading], list[list[Slot]]], fields: SamplingFields, param: str, *,
                       default_max_tokens: int | None, answer: bool = False,
                       assemble: Callable[[list[list[Any]]], list[list[Any]]] | None = None
                       ) -> tuple[list[Prepared], Sampling]:
        """A request's prompts and sampling, each limit checked before the work it bounds: `read` walks the
        request (in a worker thread, with the checks of `Reading`); the positions the documents alone take are
        checked against the context before they are compressed; the prompts' exact positions, from token counts,
        before their rows are built. `assemble` turns the groups of resolved slots into prompts (default: as
        they are)."""

        def read_all() -> list[list[Slot]]:
            reading = Reading(self.resolver, self.limits, self.engine.max_model_len, param)
            slots = read(reading)
            return Reading.resolve(slots, reading.finish())

        slots = await asyncio.to_thread(read_all)
        known = [sum(s.positions if isinstance(s, TextDocument) else len(s) if isinstance(s, TokenIds) else 0
                     for s in group) for group in slots]  # documents' contexts and a chat's template, so far
        self._check_positions(known, fields, default_max_tokens, param)
        groups = await self._resolve(slots)
        prompts = assemble(groups) if assemble is not None else groups
        return await asyncio.to_thread(self._lay_out, prompts, fields, default_max_tokens, param, answer)

    async def _resolve(self, groups: list[list[Slot]]) -> list[list[Any]]:
        """Each group's slots with documents replaced by their contexts (all documents of the request at once)."""
        flat = [(g, k, s) for g, group in enumerate(groups) for k, s in enumerate(group)]
        wanted = [(g, k, s) for g, k, s in flat if isinstance(s, (TextDocument, StoredId))]
        ids = [(s.id, s.where) for _, _, s in wanted if isinstance(s, StoredId)]
        if ids:  # a store lookup: off the event loop
            await asyncio.to_thread(self.resolver.check_ids, ids)
        contexts = await self.resolver.resolve([s.id if isinstance(s, StoredId) else s for _, _, s in wanted])
        out = [list(group) for group in groups]
        for (g, k, _), ctx in zip(wanted, contexts):
            out[g][k] = ctx
        return out

    def _lay_out(self, prompts: list[list[Any]], fields: SamplingFields, default_max_tokens: int | None, param: str,
                 answer: bool) -> tuple[list[Prepared], Sampling]:
        """Decoder rows of prompts whose documents are contexts (the PromptBuilder every engine uses), built once
        their positions, counted from the layout's token ids and contexts, fit the context with max_tokens."""
        builder = self.engine.prompts
        try:
            layouts = builder.layout(prompts)
        except InputError as e:
            raise RequestError(str(e)) from None
        positions = [sum(len(p) if isinstance(p, list) else p.num_embeddings for p in pieces) for pieces in layouts]
        sampling = self.sampling(fields, positions, default_max_tokens=default_max_tokens, prompt_param=param,
                                 answer=answer)
        rows = builder.embeds(layouts)
        out = []
        for pieces, row in zip(layouts, rows):
            savings = builder.savings_of(pieces)
            out.append(Prepared(row, savings.num_contexts, savings.tokens_saved))
        return out, sampling

    # ------------------------------------------------------------------ prompts -> tokens

    def check_sampling(self, fields: SamplingFields) -> None:
        """The generation settings' own limits, before any work: stop strings (count, length), n, penalties."""
        stops = fields.stops
        if len(stops) > self.limits.max_stop:
            raise RequestError(f"{len(stops)} stop strings, over this service's limit of {self.limits.max_stop}",
                               param="stop")
        for i, s in enumerate(stops):
            if not s:
                raise RequestError("a stop string is empty", param="stop")
            if len(s) > self.limits.max_stop_chars:
                raise RequestError(f"stop[{i}] has {len(s):,} characters, over this service's limit of "
                                   f"{self.limits.max_stop_chars:,} per stop string", param="stop")
        if fields.n > self.limits.max_n:
            raise RequestError(f"n = {fields.n}, over this service's limit of {self.limits.max_n}", param="n")
        for name in fields.penalties:
            if not self.engine.penalties:
                raise RequestError(f"{name}: the {self.engine.backend} backend applies no penalties; send 0 (none) "
                                   "or serve with --backend vllm", param=name)

    def _check_positions(self, positions: list[int], fields: SamplingFields, default_max_tokens: int | None,
                         param: str) -> None:
        """The prompts' positions known before their documents are compressed (a lower bound) with max_tokens,
        against the context length."""
        self._check_fit(max(positions, default=0), fields.new_tokens or default_max_tokens or 1, fields, param,
                        "at least ")

    def _check_fit(self, longest: int, max_tokens: int, fields: SamplingFields, param: str, bound: str = "") -> None:
        limit = self.engine.max_model_len
        if longest + max_tokens > limit:
            where = "max_tokens" if fields.new_tokens and longest < limit else param  # what to shorten
            raise RequestError(f"the prompt takes {bound}{longest:,} positions and max_tokens is {max_tokens:,}: "
                               f"together over the model's context length of {limit:,}", param=where)

    def sampling(self, fields: SamplingFields, positions: list[int], *, default_max_tokens: int | None,
                 prompt_param: str, answer: bool = False) -> Sampling:
        """The request's generation settings, its prompts' positions checked with max_tokens against the engine's
        context length; without max_tokens, `default_max_tokens` (None: what the context length leaves).
        `answer`: the paper's QA format, whose answer ends at the first blank line (a stop, so a stream ends there
        too)."""
        longest = max(positions)
        max_tokens = fields.new_tokens or default_max_tokens or max(self.engine.max_model_len - longest, 1)
        self._check_fit(longest, max_tokens, fields, prompt_param)
        return Sampling(max_new_tokens=max_tokens, temperature=fields.temperature, top_p=fields.top_p,
                        stop=(*fields.stops, *([ANSWER_END] if answer else [])), seed=fields.seed, n=fields.n,
                        extra=fields.penalties)

    async def stream(self, prepared: list[Prepared], sampling: Sampling, request_id: str
                     ) -> AsyncIterator[tuple[int, list[Delta]]]:
        """(prompt index, deltas) of every prompt's sequences, interleaved as the engine produces them. Greedy
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
            async for deltas in self.engine.generate(prepared[0].embeds, sampling, request_id):
                yield 0, deltas
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def run(i: int, p: Prepared) -> None:
            try:
                async for deltas in self.engine.generate(p.embeds, sampling, f"{request_id}-{i}"):
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
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
