"""Work from concurrent requests, gathered into one call: a micro-batcher, and an LRU of finished results within
a budget of bytes.

Requests arrive one by one; the device is best used by one call over many of their items. The batcher waits for
a first item, keeps gathering for a short window (or until a cost budget, e.g. tokens, is reached), runs one
call over the batch in a thread of its own, and hands each request its own result. One batch runs at a time per
batcher, so the call never races itself, and never waits behind other work in the event loop's shared threads.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Waiting(Generic[Item]):
    item: Item
    cost: int
    future: asyncio.Future = field(repr=False)


class MicroBatcher(Generic[Item, Result]):
    """`await submit(item)` -> that item's result, computed by `run(items) -> results` over a gathered batch.

    `window`: seconds to keep gathering after the first item; `max_cost`: a batch's budget (item costs summed; an
    item over the budget goes alone); `max_items`: items per batch. `run` is a blocking function (it runs in a
    worker thread); if it raises, every item of its batch gets the exception, and a result that is an exception is
    raised to its own item's caller only. `on_batch(n_items)` is told the size of every batch (for metrics).
    """

    def __init__(self, run: Callable[[list[Item]], list[Result]], *, window: float, max_cost: int, max_items: int,
                 on_batch: Callable[[int], None] | None = None):
        self.run = run
        self.window = window
        self.max_cost = max_cost
        self.max_items = max_items
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Waiting[Item]] | None = None
        self._task: asyncio.Task | None = None
        self._carry: _Waiting[Item] | None = None  # an item that did not fit the last batch: first in the next
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="arccompress-batch")  # the batches' own thread

    @property
    def waiting(self) -> int:
        """Items queued and not yet in a batch."""
        return (self._queue.qsize() if self._queue is not None else 0) + (self._carry is not None)

    async def submit(self, item: Item, cost: int = 1) -> Result:
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="arccompress-micro-batcher")
        assert self._queue is not None
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Waiting(item, cost, future))
        return await future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._thread.shutdown(wait=False)

    async def _gather(self) -> list[_Waiting[Item]]:
        assert self._queue is not None
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, cost = [first], first.cost
        deadline = time.monotonic() + self.window
        while len(batch) < self.max_items and cost < self.max_cost:
            remaining = deadline - time.monotonic()
            try:
                nxt = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(self._queue.get(), remaining)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            if cost + nxt.cost > self.max_cost:
                self._carry = nxt
                break
            batch.append(nxt)
            cost += nxt.cost
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._gather()
            live = [w for w in batch if not w.future.cancelled()]
            if not live:
                continue
            if self.on_batch is not None:
                self.on_batch(len(live))
            try:
                results = await asyncio.get_running_loop().run_in_executor(self._thread, self.run,
                                                                           [w.item for w in live])
            except Exception as e:  # every request of the batch hears of it
                for w in live:
                    if not w.future.done():
                        w.future.set_exception(e)
                continue
            for w, r in zip(live, results, strict=True):
                if not w.future.done():
                    if isinstance(r, BaseException):
                        w.future.set_exception(r)
                    else:
                        w.future.set_result(r)


class LRUCache(Generic[Result]):
    """The most recently used results by key within `max_bytes`, each weighed by `weigh(result)` (an OrderedDict:
    moved to the end when used, the least recently used dropped first; a result over the whole budget is not
    kept)."""

    def __init__(self, max_bytes: int, weigh: Callable[[Result], int]):
        self.max_bytes = max_bytes
        self.weigh = weigh
        self.bytes = 0
        self._data: OrderedDict[Hashable, tuple[Result, int]] = OrderedDict()

    def get(self, key: Hashable) -> Result | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        self._data.move_to_end(key)
        return entry[0]

    def peek(self, key: Hashable) -> Result | None:
        """The result without marking it used: one dict lookup, safe from another thread."""
        entry = self._data.get(key)
        return None if entry is None else entry[0]

    def put(self, key: Hashable, value: Result) -> None:
        size = self.weigh(value)
        if size > self.max_bytes:
            return
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._data[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._data.popitem(last=False)
            self.bytes -= dropped

    def __len__(self) -> int:
        return len(self._data)
