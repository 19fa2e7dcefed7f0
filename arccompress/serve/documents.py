"""Documents into contexts, for many requests at once: texts compressed together, stored ids read together.

A text is looked up in an LRU of finished contexts (keyed by the text's hash and chunk size: the encoder is the
service's one), else joins the compression micro-batch of whatever concurrent requests sent (one encoder call
per batch on the service's device); the same text asked for twice at once is compressed once. Stored ids go
through a micro-batch of their own: one `get_many` per batch. A context, cached or stored, is the same bytes every
time it is used, so prompts that share documents share a prefix (vLLM's prefix cache sees it).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import defaultdict
from dataclasses import dataclass, replace

from ..compressor import Compressor
from ..context import CompressedContext
from ..errors import ContextNotFoundError, InputError
from ..store import ContextStore
from .batching import LRUCache, MicroBatcher
from .config import Limits
from .metrics import Metrics


class RequestError(InputError):
    """A request the service refuses, with the HTTP status and the field to name in OpenAI's error schema."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


@dataclass(frozen=True)
class TextDocument:
    text: str
    chunk_size: int | None
    tokens: int

    @property
    def key(self) -> tuple[int | None, str]:
        return self.chunk_size, hashlib.sha256(self.text.encode("utf-8")).hexdigest()


class DocumentResolver:
    """Contexts for the documents of requests: `await resolve(documents)`, in order."""

    def __init__(self, compressor: Compressor, store: ContextStore | None, *, limits: Limits, metrics: Metrics, window: float,
                 batch_tokens: int, cache_size: int):
        self.compressor = compressor
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self.cache: LRUCache[CompressedContext] = LRUCache(cache_size)
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

    def check_text(self, text: str, chunk_size: int | None, where: str) -> TextDocument:
        """The document, its tokens counted; a RequestError naming `where` if it is over the limit or not text."""
        try:
            ids = self.compressor.tokenize([text])[0]
        except (InputError, TypeError) as e:
            raise RequestError(f"{where}: {e}", param=where) from None
        if not ids:
            raise RequestError(f"{where}: the document's text has no tokens", param=where)
        if len(ids) > self.limits.max_document_tokens:
            raise RequestError(f"{where}: the document has {len(ids)} tokens, over this service's limit of "
                               f"{self.limits.max_document_tokens} per document", param=where)
        return TextDocument(text, chunk_size, len(ids))

    def check_ids(self, ids: list[tuple[str, str]]) -> None:
        """404 naming every id (and where it was asked) that the store does not hold."""
        if not ids:
            return
        if self.store is None:
            raise RequestError(f"{ids[0][1]}: documents by id need a store, and this service has none",
                               param=ids[0][1])
        missing = [(key, where) for key, where in ids if key not in self.store]
        if missing:
            named = ", ".join(f"{key!r} ({where})" for key, where in missing[:8])
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
        """One encoder call per chunk size for a batch of texts; contexts kept without their pooled vectors."""
        by_chunk: dict[int | None, list[int]] = defaultdict(list)
        for i, d in enumerate(docs):
            by_chunk[d.chunk_size].append(i)
        out: list[CompressedContext | None] = [None] * len(docs)
        for chunk, places in by_chunk.items():
            made = self.compressor.compress([docs[i].text for i in places], chunk_size=chunk, show_progress_bar=False)
            for i, ctx in zip(places, made):
                out[i] = replace(ctx, pooled=None, bottleneck=None)  # what a prompt reads; half the memory kept
        return out  # type: ignore[return-value]

    def _read_batch(self, ids: list[str]) -> list[CompressedContext | ContextNotFoundError]:
        """One store read for a batch of ids; an id that vanished since it was checked fails its own request."""
        present = [key for key in dict.fromkeys(ids) if key in self.store]
        found = dict(zip(present, self.store.get_many(present, device=self.compressor.device))) if present else {}
        return [found.get(key) or ContextNotFoundError(f"not in the store: {key!r}") for key in ids]
