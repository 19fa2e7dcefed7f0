"""Documents into contexts, for many requests at once: texts compressed together, stored ids read together.

A text is checked (characters, then tokens: tokenized once, its ids are what the encoder reads) and looked up in an
LRU of finished contexts within a budget of bytes (keyed by the text's hash and chunk size: the encoder is the
service's one), else joins the compression micro-batch of whatever concurrent requests sent (one encoder call
per batch on the service's device); the same text asked for twice at once is compressed once. Stored ids go
through a micro-batch of their own: one `get_many` per batch. A context, cached or stored, is the same bytes every
time it is used, so prompts that share documents share a prefix (vLLM's prefix cache sees it).
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch

from ..compressor import Compressor
from ..context import CompressedContext
from ..encoder import group_counts
from ..errors import ContextNotFoundError, InputError
from ..store import ContextStore
from .batching import LRUCache, MicroBatcher
from .config import Limits
from .metrics import Metrics
from .protocol import quote
from .refusals import RequestError, check_text_or_refuse

ENTRY_BYTES = 1024  # a cached context's own object, its key and the cache's entry, besides its rows and text


@dataclass(frozen=True)
class TextDocument:
    """A document given as text, checked: its cache key, its encoder tokens (their ids, None when its context was
    in the cache as it was checked) and the decoder positions its context takes."""

    text: str
    chunk_size: int | None
    key: tuple[int | None, str]
    ids: list[int] | None = field(repr=False, compare=False)
    tokens: int
    positions: int


def text_key(text: str, chunk_size: int | None) -> tuple[int | None, str]:
    return chunk_size, hashlib.sha256(text.encode("utf-8")).hexdigest()


def context_bytes(ctx: CompressedContext) -> int:
    """What a cached context holds in memory: its rows, its text, and the entry around them."""
    return ctx.embeddings.numel() * ctx.embeddings.element_size() + sys.getsizeof(ctx.text or "") + ENTRY_BYTES


class DocumentResolver:
    """Contexts for the documents of requests: `check_texts` (in a worker thread), then `await resolve(documents)`."""

    def __init__(self, compressor: Compressor, store: ContextStore | None, *, limits: Limits, metrics: Metrics,
                 window: float, batch_tokens: int, cache_bytes: int):
        self.compressor = compressor
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self.cache: LRUCache[CompressedContext] = LRUCache(cache_bytes, context_bytes)
        metrics.cache_budget.set(cache_bytes)
        metrics.cache_bytes.set_function(lambda: self.cache.bytes)
        metrics.cache_entries.set_function(lambda: len(self.cache))
        self._in_flight: dict[tuple, asyncio.Future] = {}
        self._compress = MicroBatcher(self._compress_batch, window=window, max_cost=batch_tokens, max_items=256,
                                      on_batch=metrics.compress_batches.observe)
        self._read = MicroBatcher(self._read_batch, window=window, max_cost=256, max_items=256,
                                  on_batch=metrics.store_batches.observe)

    @property
    def waiting(self) -> int:
        return self._compress.waiting + self._read.waiting

    async def close(self) -> None:
        await self._compress.close()
        await self._read.close()

    # ------------------------------------------------------------------ checking, before any work

    def check_texts(self, texts: list[tuple[str, int | None, str]]) -> list[TextDocument]:
        """Documents given as (text, chunk_size, where), checked in order of cost: text that UTF-8 can encode and
        characters (every document), then tokens (one tokenizer call for those not in the cache); a RequestError
        naming the first one over a limit. Blocking: call it in a worker thread."""
        max_chars = self.limits.document_chars
        for text, _, where in texts:
            check_text_or_refuse(text, where)
            if len(text) > max_chars:
                raise RequestError(f"{where}: the document has {len(text):,} characters, over this service's limit "
                                   f"of {max_chars:,} per document (checked before tokenizing)", param=where)
        keys = [text_key(text, chunk) for text, chunk, _ in texts]
        known = {k: ctx for k in keys if (ctx := self.cache.peek(k)) is not None}
        fresh = [i for i, k in enumerate(keys) if k not in known]
        try:
            encoded = dict(zip(fresh, self.compressor.tokenize([texts[i][0] for i in fresh]))) if fresh else {}
        except (InputError, TypeError) as e:
            raise RequestError(f"documents: {e}", param="documents") from None
        out = []
        for i, ((text, chunk, where), key) in enumerate(zip(texts, keys)):
            ids = encoded.get(i)
            if ids is None:
                out.append(TextDocument(text, chunk, key, None, known[key].num_tokens, known[key].num_embeddings))
                continue
            if not ids:
                raise RequestError(f"{where}: the document's text has no tokens", param=where)
            if len(ids) > self.limits.max_document_tokens:
                raise RequestError(f"{where}: the document has {len(ids):,} tokens, over this service's limit of "
                                   f"{self.limits.max_document_tokens:,} per document", param=where)
            out.append(TextDocument(text, chunk, key, ids, len(ids), self.positions(len(ids), chunk)))
        return out

    def positions(self, tokens: int, chunk_size: int | None) -> int:
        """Decoder positions of the context of `tokens` encoder tokens: the encoder's pooled vectors of each chunk,
        and the head's <Cont> after them."""
        step = chunk_size or tokens
        chunks = torch.tensor([min(step, tokens - start) for start in range(0, tokens, step)])
        return int(group_counts(chunks, self.compressor.pooling_factor).sum()) + 1

    def check_ids(self, ids: list[tuple[str, str]]) -> None:
        """404 naming every id (and where it was asked) that the store does not hold, each quoted briefly."""
        if not ids:
            return
        if self.store is None:
            raise RequestError(f"{ids[0][1]}: documents by id need a store, and this service has none",
                               param=ids[0][1])
        missing = [(key, where) for key, where in ids if key not in self.store]
        if missing:
            named = ", ".join(f"{quote(key)} ({where})" for key, where in missing[:8])
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise RequestError(f"not in the store: {named}{more}", param=missing[0][1], status=404)

    # ------------------------------------------------------------------ resolving

    async def resolve(self, documents: list[TextDocument | str]) -> list[CompressedContext]:
        """Contexts of checked documents (a TextDocument, or a stored id as a str), in order."""
        return list(await asyncio.gather(*(self._one(d) for d in documents)))

    async def _one(self, doc: TextDocument | str) -> CompressedContext:
        if isinstance(doc, str):
            ctx = await self._read.submit(doc)
            self.metrics.documents.labels("store").inc()
            return ctx
        key = doc.key
        cached = self.cache.get(key)
        task = self._in_flight.get(key)
        if cached is not None or task is not None:  # done before, or being done for another request
            self.metrics.cache_hits.inc()
            self.metrics.documents.labels("cache").inc()
            if cached is not None:
                return cached
        else:
            # a task of its own: a requester that goes away does not cancel the others' compression
            task = asyncio.get_running_loop().create_task(self._compress.submit(doc, doc.tokens))
            self._in_flight[key] = task
            task.add_done_callback(lambda t: self._finished(key, t))
        return await asyncio.shield(task)

    def _finished(self, key: tuple, task: asyncio.Task) -> None:
        del self._in_flight[key]
        if not task.cancelled() and task.exception() is None:
            self.cache.put(key, task.result())
            self.metrics.documents.labels("compressed").inc()

    def _compress_batch(self, docs: list[TextDocument]) -> list[CompressedContext]:
        """One encoder call per chunk size for a batch of texts, from the token ids their check made (a text whose
        cached context was dropped since is tokenized here); contexts kept without their pooled vectors."""
        by_chunk: dict[int | None, list[int]] = defaultdict(list)
        for i, d in enumerate(docs):
            by_chunk[d.chunk_size].append(i)
        untokenized = [i for i, d in enumerate(docs) if d.ids is None]
        ids = dict(zip(untokenized, self.compressor.tokenize([docs[i].text for i in untokenized])))
        out: list[CompressedContext | None] = [None] * len(docs)
        for chunk, places in by_chunk.items():
            made = self.compressor.compress_ids([docs[i].ids or ids[i] for i in places], chunk_size=chunk,
                                                show_progress_bar=False)
            for i, ctx in zip(places, made):
                # what a prompt reads, with its text (as `compress` keeps it); half the memory kept
                out[i] = replace(ctx, text=docs[i].text, pooled=None, bottleneck=None)
        return out  # type: ignore[return-value]

    def _read_batch(self, ids: list[str]) -> list[CompressedContext | ContextNotFoundError]:
        """One store read for a batch of ids; an id that vanished since it was checked fails its own request."""
        present = [key for key in dict.fromkeys(ids) if key in self.store]
        found = dict(zip(present, self.store.get_many(present, device=self.compressor.device))) if present else {}
        return [found.get(key) or ContextNotFoundError(f"not in the store: {quote(key)}") for key in ids]
