"""The engines that generate for the service, behind one async interface.

- `TransformersBackend`: a transformers decoder; the requests waiting when a batch starts are generated together in
  one `generate` (greedy requests together whatever their lengths and stops; sampled ones by settings; a seeded
  one alone, so that its seed means the same as alone), each row's tokens streamed to its request as they come.
- `VLLMBackend`: vLLM's async engine in this process: continuous batching, paged KV cache, prefix caching (a
  stored or cached document is the same bytes every time, so shared prefixes hit the cache).

Both take one prompt's decoder input rows, (T, H), and yield `Delta`s: new text and token ids per sequence, and the
reason a sequence finished. A request whose consumer stops (its client left, its time ran out) is cancelled on the
engine within a step; both count the tokens they generate as they make them (`arccompress_generated_tokens`).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import StoppingCriteriaList

from ..compressor import Compressor
from ..engine import Sampling, StopFilter, decoder_fingerprint, without_cut_character
from ..errors import EngineError
from ..generation import Generator, left_pad, seeded
from ..prompts import PromptBuilder, check_head
from ..vllm.generator import prepare_engine
from .metrics import Metrics


@dataclass
class Delta:
    """New output of sequence `index` of a request; `finish_reason` ("stop" or "length") when it ended."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class Backend(ABC):
    """A decoder that reads prompt rows and streams tokens, shared by the service's requests."""

    name: str
    prompts: PromptBuilder  # the decoder's tokenizer and input embeddings, and the compressor
    max_model_len: int
    penalties: bool  # whether it applies OpenAI's presence and frequency penalties (`Sampling.extra`)

    @abstractmethod
    def generate(self, embeds: torch.Tensor, sampling: Sampling, request_id: str) -> AsyncIterator[list[Delta]]:
        """Deltas of the request's sequences as they are produced, until every sequence finished."""

    @property
    @abstractmethod
    def waiting(self) -> int:
        """Sequences waiting for, or in, generation."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What determines the outputs: backend, decoder and its fingerprint, quantization, dtype, encoder."""

    async def close(self) -> None:
        """Stop the engine (the requests in flight are done first by the caller)."""


# ----------------------------------------------------------------------------- text as tokens arrive


class SequenceText:
    """One sequence's text as its tokens arrive, cut before the first stop string (the engines' `StopFilter`).

    Decoded incrementally over a short window of tokens (the text of the last tokens, minus that of the ones
    before them, as vLLM's and TGI's detokenizers do: constant work per token, and a tokenizer's clean-ups at a
    window's start cancel out), holding back an incomplete UTF-8 character; at the end, whatever the whole
    sequence's decoding adds, by the rule every engine follows (`tokenizer.decode` of all the ids, without a
    character cut short at the end).
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # the window: ids[prefix:read] were decoded already, as its start
        self.text = ""  # decoded so far
        self.filter = StopFilter(stop)

    @property
    def stopped(self) -> bool:
        return self.filter.done

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True)

    def add(self, token: int) -> str:
        """The text that can be handed out after this token."""
        self.ids.append(token)
        before, after = self._decode(self.prefix, self.read), self._decode(self.prefix, len(self.ids))
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        new = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += new
        return self.filter.feed(new)

    def finish(self) -> str:
        """What the whole sequence's decoding adds, once it ended."""
        whole = without_cut_character(self._decode(0, len(self.ids)))
        rest = whole[len(self.text):] if whole.startswith(self.text) else ""
        self.text += rest
        return self.filter.feed(rest) + self.filter.flush()


# ----------------------------------------------------------------------------- transformers


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

    def __init__(self, rows: list[_Row], eos: set[int], metrics: Metrics):
        self.rows, self.eos, self.metrics = rows, eos, metrics
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
        self.metrics.generated_tokens.inc(sum(len(d.token_ids) for deltas in out.values() for d in deltas))
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


class TransformersBackend(Backend):
    """A transformers decoder (a `Generator`'s model) serving batches of waiting requests from one worker thread."""

    name = "transformers"
    penalties = False

    def __init__(self, generator: Generator, *, metrics: Metrics, max_batch: int):
        self.generator = generator
        self.metrics = metrics
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
    def load(cls, decoder: str, compressor: Compressor, *, options: dict[str, Any], metrics: Metrics, max_batch: int
             ) -> TransformersBackend:
        return cls(Generator.from_pretrained(decoder, compressor=compressor, **options), metrics=metrics,
                   max_batch=max_batch)

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._deferred) + self._busy

    def describe(self) -> dict[str, Any]:
        return self.generator.describe()

    async def generate(self, embeds: torch.Tensor, sampling: Sampling, request_id: str) -> AsyncIterator[list[Delta]]:
        request = _Waiting(embeds, sampling, asyncio.get_running_loop(), asyncio.Queue())
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
            self.model.generate(**inputs, **kwargs, streamer=_RowStreamer(rows, self.eos, self.metrics),
                                stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]))
        for request in batch:  # rows the generation ended without a reason of their own
            ended = [Delta(r.index, r.text.finish(), [], "length") for r in rows if r.request is request and
                     r.finish is None]
            if ended:
                request.send(ended)


# ----------------------------------------------------------------------------- vLLM


CPU_BLOCK_SIZE = 32  # the smallest the CPU backend runs well (multiples of 32); GPUs default to 16


class VLLMBackend(Backend):
    """vLLM's async engine (`AsyncLLM`) in this process, reading prompt embeddings, prefix caching on."""

    name = "vllm"
    penalties = True

    def __init__(self, engine: Any, prompts: PromptBuilder, metrics: Metrics, decoder_config: dict[str, Any]):
        self.engine = engine
        self.prompts = prompts
        self.metrics = metrics
        self.decoder_config = decoder_config
        self.eos = {prompts.text.tokenizer.eos_token_id} - {None}  # reported as the finish reason, not as a token
        self.max_model_len = int(engine.model_config.max_model_len)
        self.dtype = engine.model_config.dtype
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, decoder: str, compressor: Compressor, *, options: dict[str, Any], metrics: Metrics,
             verbose: bool) -> VLLMBackend:
        """Start the engine on `decoder`; `options` are `AsyncEngineArgs` fields, plus `VLLMGenerator`'s
        `quantization` ("4bit"), memory settings (`gpu_memory_utilization`, `kv_cache_gib`: on a CPU 1 GiB by
        default) and `local_files_only`."""
        args = dict(options)
        files = prepare_engine(decoder, args, quantization=args.pop("quantization", None),
                               gpu_memory_utilization=args.pop("gpu_memory_utilization", None),
                               kv_cache_gib=args.pop("kv_cache_gib", None), verbose=verbose,
                               local_files_only=args.pop("local_files_only", None))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        if current_platform.is_cpu():
            # compressed prompts are short: the CPU's 128-position KV blocks would rarely fill with a shared prefix
            # (a few-shot example of five documents takes ~60 positions), and only full blocks are cached
            args.setdefault("block_size", CPU_BLOCK_SIZE)
        check_head(files.model_type, compressor)
        args = {"enable_prefix_caching": True, "disable_log_stats": True} | args
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(decoder), enable_prompt_embeds=True, **args))
        prompts = PromptBuilder(files.tokenizer, compressor, files.embedding.to(engine.model_config.dtype),
                                sentencepiece_model=files.sentencepiece_model)
        return cls(engine, prompts, metrics, files.config)

    @property
    def waiting(self) -> int:
        return int(self.engine.get_num_unfinished_requests())

    def describe(self) -> dict[str, Any]:
        c = self.engine.model_config
        compressor = self.prompts.compressor
        if self._fingerprint is None:  # hashes the embedding matrix: once
            self._fingerprint = decoder_fingerprint(self.decoder_config, self.prompts.weight)
        return {"backend": "vllm", "decoder": str(c.model), "decoder_fingerprint": self._fingerprint,
                "quantization": c.quantization, "dtype": str(self.dtype).replace("torch.", ""),
                "encoder": compressor.name, "encoder_fingerprint": compressor.fingerprint, "head": compressor.head}

    async def generate(self, embeds: torch.Tensor, sampling: Sampling, request_id: str) -> AsyncIterator[list[Delta]]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_new_tokens, stop=list(sampling.stop) or None, seed=sampling.seed,
                                output_kind=RequestOutputKind.DELTA, **sampling.extra)
        # a copy (from a GPU, or into the engine's dtype), off the event loop
        rows = await asyncio.to_thread(lambda: embeds.detach().to("cpu", self.dtype).contiguous())
        # the text comes from the token ids by the same rule as the transformers backend and Generator (vLLM's own
        # detokenizer holds back a trailing partial character that transformers' decode keeps)
        texts = [SequenceText(self.prompts.text.tokenizer, sampling.stop) for _ in range(sampling.n)]
        async for out in self.engine.generate({"prompt_embeds": rows}, params, request_id):
            if out.finished and out.num_cached_tokens is not None:
                self.metrics.prefix_cached_tokens.inc(out.num_cached_tokens)
                self.metrics.prefix_prompt_tokens.inc(rows.shape[0])
            deltas = []
            for c in out.outputs:
                seq, ids = texts[c.index], [t for t in c.token_ids if t not in self.eos]
                text = "".join(seq.add(t) for t in ids) + (seq.finish() if c.finish_reason is not None else "")
                deltas.append(Delta(c.index, text, ids, c.finish_reason))
            self.metrics.generated_tokens.inc(sum(len(d.token_ids) for d in deltas))
            yield deltas

    async def close(self) -> None:
        self.engine.shutdown()
