"""The transformers engine's async face, for a service: `AsyncGenerator` serves a `Generator` to many requests.

The requests waiting when a batch starts are generated together in one `generate` on a worker thread (greedy
requests together whatever their lengths and stops; sampled ones by settings; a seeded one alone, so that its seed
means the same as alone), each row's tokens streamed to its request as they come, by the text rule every engine
follows (`SequenceText`). A request whose consumer stops (its client left, its time ran out) has its rows dropped
at the next step. The generation arguments are the `Generator`'s own (`generate_kwargs`): the same sampling as the
engine in a notebook.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import StoppingCriteriaList

from ..compressor import Compressor
from ..errors import EngineError
from .base import AsyncEngine, DecoderCard, Observer, Sampling
from .text import Delta, SequenceText
from .transformers import Generator, left_pad, seeded


@dataclass
class _Waiting:
    embeds: torch.Tensor
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    gone: bool = False  # the client went away: its rows stop

    def send(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)

    @property
    def group(self) -> tuple:
        """Requests that may share one `generate`: greedy ones; sampled ones with the same settings and no seed."""
        s = self.sampling
        if s.greedy:
            return ("greedy",)
        return ("seeded", id(self)) if s.seed is not None else ("sampled", s.temperature, s.top_p)


class _Row:
    def __init__(self, request: _Waiting, index: int, tokenizer: Any):
        self.request, self.index = request, index
        self.text = SequenceText(tokenizer, request.sampling.stop)
        self.count = 0
        self.finish: str | None = None


class _RowStreamer:
    """transformers' streamer for a batch: every step's tokens (B,) routed to their rows' requests, counted."""

    def __init__(self, rows: list[_Row], eos: set[int], observer: Observer):
        self.rows, self.eos, self.observer = rows, eos, observer
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        out: dict[int, list[Delta]] = {}
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            if row.finish is not None:
                continue
            if row.request.gone:
                row.finish = "abort"
                continue
            if token in self.eos:
                row.finish = "stop"
                delta = Delta(row.index, row.text.finish(), [], "stop")
            else:
                row.count += 1
                delta = Delta(row.index, row.text.add(token), [token])
                if row.text.stopped:
                    row.finish = delta.finish_reason = "stop"
                elif row.count >= row.request.sampling.max_new_tokens:
                    row.finish = delta.finish_reason = "length"
                    delta.text += row.text.finish()
            out.setdefault(id(row.request), []).append(delta)
        self.observer.tokens(sum(len(d.token_ids) for deltas in out.values() for d in deltas))
        for row in self.rows:
            if id(row.request) in out:
                row.request.send(out.pop(id(row.request)))

    def end(self) -> None:
        pass


class _RowsDone:
    """A stopping criterion: a row is done when its request has what it asked for (or went away)."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.tensor([r.finish is not None for r in self.rows], device=input_ids.device)


class AsyncGenerator(AsyncEngine):
    """A `Generator`'s async face: batches of waiting requests generated on one worker thread."""

    backend = "transformers"
    penalties = False

    def __init__(self, generator: Generator, *, max_batch: int, observer: Observer | None = None):
        self.generator = generator
        self.observer = observer or Observer()
        self.prompts = generator.prompts
        self.model = generator.model
        self.tokenizer = generator.tokenizer
        self.max_batch = max_batch
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.eos = set(generator.eos_ids())
        self._queue: queue.Queue[_Waiting | None] = queue.Queue()
        self._deferred: list[_Waiting] = []
        self._busy = 0
        self._thread = threading.Thread(target=self._work, name="arccompress-generate", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, decoder: str, compressor: Compressor, *, options: dict[str, Any], max_batch: int,
             observer: Observer | None = None) -> AsyncGenerator:
        """`Generator.from_pretrained(decoder, compressor=compressor, **options)`, served `max_batch` sequences at a
        time."""
        return cls(Generator.from_pretrained(decoder, compressor=compressor, **options), max_batch=max_batch,
                   observer=observer)

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._deferred) + self._busy

    def decoder_card(self) -> DecoderCard:
        return self.generator.decoder_card()

    async def generate(self, rows: torch.Tensor, sampling: Sampling, request_id: str) -> AsyncIterator[list[Delta]]:
        request = _Waiting(rows, sampling, asyncio.get_running_loop(), asyncio.Queue())
        self._queue.put(request)
        finished = 0
        try:
            while finished < sampling.n:
                item = await request.out.get()
                if isinstance(item, BaseException):
                    raise EngineError(f"generation failed: {item}") from item
                finished += sum(d.finish_reason is not None for d in item)
                yield item
        finally:
            request.gone = True

    async def close(self) -> None:
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    # ------------------------------------------------------------------ the worker thread

    def _next_batch(self) -> list[_Waiting] | None:
        """The oldest waiting request and every waiting one that may join it, within max_batch sequences."""
        first = self._deferred.pop(0) if self._deferred else self._queue.get()
        if first is None:
            return None
        batch, rows = [first], first.sampling.n
        while True:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)  # stop after this batch
                break
            self._deferred.append(nxt)
        keep = []
        for request in self._deferred:
            if request.group == first.group and rows + request.sampling.n <= self.max_batch:
                batch.append(request)
                rows += request.sampling.n
            else:
                keep.append(request)
        self._deferred = keep
        return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            live = [r for r in batch if not r.gone]
            self._busy = sum(r.sampling.n for r in live)
            try:
                if live:
                    self._generate(live)
            except Exception as e:  # every request of the batch hears of it; the worker goes on
                for request in live:
                    request.send(e)
            finally:
                self._busy = 0

    def _generate(self, batch: list[_Waiting]) -> None:
        rows = [_Row(request, i, self.tokenizer) for request in batch for i in range(request.sampling.n)]
        inputs = left_pad([row.request.embeds for row in rows])  # as Generator pads
        # the batch's requests share their sampling settings (one group); each row is one sequence, its stops and
        # length watched by the streamer
        first = batch[0].sampling
        kwargs, _ = self.generator.generate_kwargs(replace(
            first, n=1, stop=(), max_new_tokens=max(r.sampling.max_new_tokens for r in batch)))
        with torch.inference_mode(), seeded(first.seed, self.generator.device):
            self.model.generate(**inputs, **kwargs, streamer=_RowStreamer(rows, self.eos, self.observer),
                                stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]))
        for request in batch:  # rows the generation ended without a reason of their own
            ended = [Delta(r.index, r.text.finish(), [], "length") for r in rows if r.request is request and
                     r.finish is None]
            if ended:
                request.send(ended)
