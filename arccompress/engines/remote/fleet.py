"""A fleet of vLLM OpenAI servers behind one async face: `AsyncVLLMFleet`, what `arccompress serve --upstream` runs.

The prompts are laid out here (`PromptBuilder`: the decoder's tokenizer and input-embedding matrix, never its other
weights) and each goes to one upstream as `prompt_embeds` on `/v1/completions`, streamed, with the generated token
ids asked for: the text comes from the ids by the rule every engine follows (`SequenceText`), so the fleet answers
the same greedy text as `Generator`. Which upstream: `routing` (document affinity, bounded load).

Health: every `health_interval` seconds each upstream's `/health` is probed; one that fails a probe or a request
(unreachable, a 5xx, a stream cut or malformed) is taken out of rotation, and taken back once it answers its probe
and passes the start-up checks again. A request that has not yet handed out a token goes to the next upstream of its
ranking when one fails, within its deadline (`timeout`); one that has is ended with an `UpstreamError` (the service
turns it into an error event, then `[DONE]`). Every wait is bounded: a request never outlives its deadline.

Start-up checks (`check_upstreams`, also what the command line runs before loading anything): each upstream that
answers `/health` must serve the model (its only one, or `model`), say its `max_model_len`, and take prompt
embeddings of this decoder's width; one started without `--enable-prompt-embeds`, or behind another API key, is an
`UpstreamError` at once. Upstreams that do not answer yet are waited for, `wait` seconds at most, until one does;
the others join when they answer.

Upstreams are trusted with the proxy's tensors and nobody else's: vLLM `torch.load`s prompt embeddings, so they
must be reachable by the proxy alone (a private network, `api_key`); clients of the service never send tensors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import torch

from ...compressor import Compressor
from ...devices import resolve_dtype
from ...errors import ArcCompressError, InputError, UnavailableError
from ...prompts import PromptBuilder, check_head
from ..base import AsyncEngine, DecoderCard, Observer, Sampling
from ..decoder_files import decoder_files
from ..text import Delta, SequenceText
from . import replies
from .http import (EventParser, EventStreamError, Wire, WireError, authorization, error_message, json_field,
                   parse_json)
from .routing import ROUTINGS, AffinityKeys, Router, RowKinds, Upstream
from .vllm_server import check_shape, encode_prompt_embeds

import httpx  # after .http, which says how to install it when it is missing

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 10.0  # seconds a health probe or a start-up check may take
HEADERS_TIMEOUT = 30.0  # seconds an upstream may take to answer a request's headers (it streams tokens after)
MAX_EVENT_BYTES = 1 << 20  # one streamed event (a few tokens' text and ids)
MAX_ERROR_BYTES = 64 << 10  # an error answer's body, read for its message


class UpstreamError(WireError):
    """An upstream vLLM server that could not be reached, refused, or answered something unusable."""


class NoUpstream(UpstreamError, UnavailableError):
    """No upstream in rotation could take the request (the service answers 503: try again later)."""


class _Failed(Exception):
    """An upstream failed a request (unreachable, 5xx, a stream cut or malformed): taken out, the request may go on."""


class UpstreamCard(NamedTuple):
    model: str
    max_model_len: int


def upstream_root(url: str) -> str:
    """The server's root URL (what names it for routing), from its URL with or without `/v1`."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise InputError(f"an upstream's URL must start with http:// or https://, not {url!r}")
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/").removesuffix("/v1"), "", ""))


def upstream_health(root: str, api_key: str | None) -> str | None:
    """None when the upstream answers `/health` with 200 (vLLM: its engine is up), else why not."""
    try:
        with Wire(root, timeout=PROBE_TIMEOUT, headers=authorization(api_key), server="upstream vLLM server",
                  error=UpstreamError) as wire:
            wire.get("/health")
    except UpstreamError as e:
        return str(e)
    return None


def check_upstream(root: str, *, hidden_size: int, api_key: str | None, model: str | None) -> UpstreamCard:
    """What the proxy needs of an upstream that answers: the model it serves (its only one, or `model`) and its
    `max_model_len`, and a prompt of embeddings `hidden_size` wide generated. UpstreamError saying what to change."""
    api = f"{root}/v1"
    with Wire(api, timeout=PROBE_TIMEOUT, headers=authorization(api_key), server="upstream vLLM server",
              error=UpstreamError) as wire:
        try:
            card = replies.choose_model(replies.model_cards(wire), model, api)
        except InputError as e:
            raise UpstreamError(str(e)) from None
        limit = json_field(card, "max_model_len", int, where=f"{api}/models", error=UpstreamError)
        probe = {"model": card["id"], "prompt_embeds": encode_prompt_embeds(torch.zeros(1, hidden_size)),
                 "max_tokens": 1, "temperature": 0.0}
        try:
            wire.post_json("/completions", probe)
        except UpstreamError as e:
            if "enable-prompt-embeds" in str(e):
                raise UpstreamError(f"the upstream {root} does not take prompt embeddings: start it with "
                                    "--enable-prompt-embeds") from None
            raise UpstreamError(f"the upstream {root} refused a prompt of embeddings {hidden_size} wide (is it serving "
                                f"this decoder?): {e}") from None
    return UpstreamCard(card["id"], limit)


def check_upstreams(roots: Sequence[str], *, hidden_size: int, api_key: str | None = None, model: str | None = None,
                    wait: float = 300.0, say: Callable[[str], None] = logger.warning) -> list[UpstreamCard | None]:
    """Each upstream's card, or None for one that does not answer `/health` yet: waits up to `wait` seconds for one
    to answer (saying so once, through `say`). An upstream that answers but refuses, upstreams serving different
    models, or none answering in time: UpstreamError."""
    deadline = time.monotonic() + wait
    waiting = False
    while True:
        cards: list[UpstreamCard | None] = []
        silent = []
        for root in roots:
            reason = upstream_health(root, api_key)
            if reason is not None:
                silent.append(reason)
                cards.append(None)
            else:
                cards.append(check_upstream(root, hidden_size=hidden_size, api_key=api_key, model=model))
        found = {c.model for c in cards if c is not None}
        if len(found) > 1:
            raise UpstreamError(f"the upstreams serve different models ({', '.join(sorted(found))}): give them one "
                                "name (vLLM's --served-model-name), or choose one with --upstream-model")
        if found:
            return cards
        left = deadline - time.monotonic()
        if left <= 0:
            raise UpstreamError(f"no upstream answers: {'; '.join(silent)}")
        if not waiting:
            say(f"waiting up to {wait:g} s for an upstream to answer ({'; '.join(silent)})")
            waiting = True
        time.sleep(min(2.0, left))


class AsyncVLLMFleet(AsyncEngine):
    """vLLM OpenAI servers started with `--enable-prompt-embeds`, serving one decoder, as one async engine."""

    backend = "vllm-upstreams"
    penalties = True  # vLLM applies OpenAI's presence and frequency penalties

    def __init__(self, upstreams: list[Upstream], prompts: PromptBuilder, decoder: str, decoder_config: dict[str, Any],
                 card: UpstreamCard, *, api_key: str | None, routing: str, load_factor: float, timeout: float,
                 health_interval: float, observer: Observer | None = None):
        if routing not in ROUTINGS:
            raise InputError(f"routing must be one of {', '.join(ROUTINGS)}, not {routing!r}")
        for name, value in (("timeout", timeout), ("health_interval", health_interval)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InputError(f"{name} must be a positive number of seconds, not {value!r}")
        self.router = Router(upstreams, load_factor=load_factor)
        self.prompts = prompts
        self.decoder = decoder
        self.decoder_config = decoder_config
        self.model, self.max_model_len = card
        self.api_key = api_key
        self.routing = routing
        self.timeout = float(timeout)
        self.health_interval = float(health_interval)
        self.observer = observer or Observer()
        self.eos = {prompts.text.tokenizer.eos_token_id} - {None}  # reported as the finish reason, not as a token
        self.keys = None if routing == "round-robin" else AffinityKeys(
            RowKinds(prompts.weight, prompts.compressor.cont_row()), whole_prompt=routing == "prompt")
        # connections are kept alive and pooled per upstream; every wait is bounded by the request's deadline
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(HEADERS_TIMEOUT, read=None), follow_redirects=False,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))
        self.watch: asyncio.Task | None = None

    @classmethod
    async def connect(cls, upstreams: Sequence[str], decoder: str, compressor: Compressor, *,
                      api_key: str | None = None, model: str | None = None, routing: str = "documents",
                      load_factor: float = 1.25, timeout: float = 600.0, health_interval: float = 5.0,
                      wait: float = 300.0, dtype: str | torch.dtype | None = None, local_files_only: bool | None = None,
                      observer: Observer | None = None) -> AsyncVLLMFleet:
        """Read the decoder's tokenizer and input embeddings (in `dtype` if given: the rows sent are in it), check
        the upstreams (`check_upstreams`), and start watching their health. `model`: the upstreams' model name
        (default: their only one); `timeout`: seconds a request may take, failovers included; `load_factor`:
        how far over its share of requests in flight an upstream may go before the next takes its work."""
        roots = [upstream_root(u) for u in upstreams]
        if not roots or len(set(roots)) != len(roots):
            raise InputError(f"give one or more distinct upstream URLs, not {list(upstreams)}")
        files = await asyncio.to_thread(decoder_files, decoder, local_files_only=local_files_only)
        check_head(files.model_type, compressor)
        embedding = files.embedding if dtype is None else files.embedding.to(resolve_dtype(dtype, torch.device("cpu")))
        prompts = PromptBuilder(files.tokenizer, compressor, embedding, sentencepiece_model=files.sentencepiece_model)
        cards = await asyncio.to_thread(check_upstreams, roots, hidden_size=prompts.hidden_size, api_key=api_key,
                                        model=model, wait=wait)
        answered = [c for c in cards if c is not None]
        card = UpstreamCard(answered[0].model, min(c.max_model_len for c in answered))
        # a thread: the routing keys' index hashes every row of the embedding matrix (a second for a large vocabulary)
        fleet = await asyncio.to_thread(
            cls, [Upstream(root, up=c is not None) for root, c in zip(roots, cards)], prompts, str(decoder),
            files.config, card, api_key=api_key, routing=routing, load_factor=load_factor, timeout=timeout,
            health_interval=health_interval, observer=observer)
        fleet.watch = asyncio.create_task(fleet._watch())
        return fleet

    @property
    def upstreams(self) -> list[Upstream]:
        """The upstreams, in the order given (the router's list)."""
        return self.router.upstreams

    def __repr__(self) -> str:
        return f"AsyncVLLMFleet({self.upstreams}, model={self.model!r}, routing={self.routing!r})"

    def decoder_card(self) -> DecoderCard:
        # quantization and dtype are the upstreams' own; their addresses are no client's business
        return DecoderCard(self.decoder, self.decoder_config, None, None,
                           where={"upstream_model": self.model, "upstreams": len(self.upstreams)})

    @property
    def waiting(self) -> int:
        return sum(u.in_flight for u in self.upstreams)

    async def close(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
            await asyncio.gather(self.watch, return_exceptions=True)
        await self.client.aclose()

    # ------------------------------------------------------------------ requests

    def _request(self, rows: torch.Tensor, sampling: Sampling) -> tuple[bytes, bytes | None]:
        """The request's body (JSON bytes) and routing key: work for a thread, not for the event loop."""
        check_shape(rows, self.prompts.hidden_size, "the prompt")
        body = replies.request_body(self.model, {"prompt_embeds": encode_prompt_embeds(rows)}, sampling, sampling.n)
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        return json.dumps(body, allow_nan=False).encode(), None if self.keys is None else self.keys.of(rows)

    async def generate(self, rows: torch.Tensor, sampling: Sampling, request_id: str) -> AsyncIterator[list[Delta]]:
        body, key = await asyncio.to_thread(self._request, rows, sampling)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        tried: list[Upstream] = []
        failures: list[str] = []
        while True:
            choice = self.router.choose(key, tried)
            if choice is None:
                raise NoUpstream("no upstream could take the request: " + ("; ".join(failures) if failures else
                                 f"all {len(self.upstreams)} are out of rotation (failing their health checks)"))
            upstream, decision = choice
            tried.append(upstream)
            self.observer.routed(upstream.name, decision)
            upstream.in_flight += 1
            handed_out = False
            try:
                async with aclosing(self._deltas(upstream, body, sampling, deadline, request_id)) as deltas:
                    async for out in deltas:
                        handed_out = True
                        yield out
                return
            except _Failed as e:
                self._take_out(upstream, str(e))
                if handed_out:
                    raise UpstreamError(f"the upstream {upstream.name} failed in the middle of the answer: "
                                        f"{e}") from None
                failures.append(f"{upstream.name}: {e}")
                if loop.time() >= deadline:
                    raise UpstreamError(f"no upstream answered within the {self.timeout:g} s timeout: "
                                        + "; ".join(failures)) from None
            finally:
                upstream.in_flight -= 1

    async def _deltas(self, upstream: Upstream, body: bytes, sampling: Sampling, deadline: float,
                      request_id: str) -> AsyncIterator[list[Delta]]:
        """One attempt: the upstream's stream as Deltas, the text from the token ids by `SequenceText`."""
        n, where = sampling.n, f"{upstream.name}/v1/completions, stream event"
        texts = [SequenceText(self.prompts.text.tokenizer, sampling.stop) for _ in range(n)]
        done = [False] * n
        async with aclosing(self._events(upstream, body, deadline, request_id)) as events:
            async for event in events:
                if isinstance(event, dict) and "error" in event:  # vLLM's error in the stream: the request failed
                    raise _Failed(f"its stream carried an error: {error_message(json.dumps(event).encode())}")
                try:
                    choices = replies.choices(event, n, where, UpstreamError, partial=True)
                    usage = json_field(event, "usage", dict, where=where, error=UpstreamError, optional=True)
                except UpstreamError as e:
                    raise _Failed(str(e)) from None
                deltas = []
                for c in choices:
                    if done[c.index]:
                        continue
                    seq, ids = texts[c.index], [t for t in c.token_ids or () if t not in self.eos]
                    text = "".join(seq.add(t) for t in ids)
                    finish = c.finish_reason or ("stop" if seq.stopped else None)
                    if finish is not None:
                        text += seq.finish()
                        done[c.index] = True
                    deltas.append(Delta(c.index, text, ids, finish))
                if deltas:
                    self.observer.tokens(sum(len(d.token_ids) for d in deltas))
                    yield deltas
                if usage is not None:
                    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                    if isinstance(cached, int) and isinstance(usage.get("prompt_tokens"), int):
                        self.observer.prefix_cache(cached, usage["prompt_tokens"])
                if all(done) and not any(c.finish_reason for c in choices) and usage is None:
                    return  # a stop string ended every sequence here first: closing the stream aborts the rest

    async def _events(self, upstream: Upstream, body: bytes, deadline: float, request_id: str) -> AsyncIterator[Any]:
        """The upstream's server-sent events for one request, parsed, until `[DONE]`; every wait bounded."""
        url = f"{upstream.name}/v1/completions"
        headers = authorization(self.api_key) | {"Content-Type": "application/json", "X-Request-Id": request_id}
        request = self.client.build_request("POST", url, content=body, headers=headers)
        response = await self._within(self.client.send(request, stream=True), deadline, url)
        try:
            if response.status_code >= 300:
                message = error_message(await self._error_body(response, deadline, url))
                if response.status_code >= 500:
                    raise _Failed(f"it answered {response.status_code}: {message}")
                raise UpstreamError(f"{url}: the upstream refused the request ({response.status_code}): {message}")
            events = EventParser(MAX_EVENT_BYTES)
            chunks = response.aiter_bytes()
            while True:
                try:
                    chunk = await self._within(anext(chunks), deadline, url)
                except StopAsyncIteration:
                    raise _Failed("its stream ended before its final [DONE]") from None
                try:
                    for data in events.feed(chunk):
                        if data == "[DONE]":
                            return
                        yield parse_json(data, f"{url}, stream event", UpstreamError)
                except (EventStreamError, UpstreamError) as e:
                    raise _Failed(str(e)) from None
        finally:
            await response.aclose()

    async def _within(self, step: Any, deadline: float, url: str) -> Any:
        """`await step` by the request's deadline; an exchange that fails is `_Failed`."""
        left = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(step, max(left, 0.0))
        except asyncio.TimeoutError:
            raise UpstreamError(f"{url}: no answer within the request's {self.timeout:g} s timeout") from None
        except httpx.HTTPError as e:
            raise _Failed(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None

    async def _error_body(self, response: Any, deadline: float, url: str) -> bytes:
        data = bytearray()
        chunks = response.aiter_bytes()
        while len(data) < MAX_ERROR_BYTES:
            try:
                data += await self._within(anext(chunks), deadline, url)
            except StopAsyncIteration:
                break
        return bytes(data[:MAX_ERROR_BYTES])

    # ------------------------------------------------------------------ health

    def _take_out(self, upstream: Upstream, reason: str) -> None:
        self.observer.failed(upstream.name)
        if upstream.up:
            upstream.up = False
            logger.warning("upstream %s taken out of rotation: %s", upstream.name, reason)

    async def _watch(self) -> None:
        """Probe every upstream every `health_interval` seconds: out on a failed probe, back in once it passes."""
        while True:
            await asyncio.sleep(self.health_interval)
            for upstream, outcome in zip(self.upstreams, await asyncio.gather(
                    *(self._probe(u) for u in self.upstreams), return_exceptions=True)):
                if isinstance(outcome, Exception):  # a bug, not the upstream's state: said, and the watch goes on
                    logger.error("probing upstream %s failed: %r", upstream.name, outcome)

    async def _probe(self, upstream: Upstream) -> None:
        reason = await asyncio.to_thread(upstream_health, upstream.name, self.api_key)
        if reason is not None:
            if upstream.up:
                self._take_out(upstream, reason)
            return
        if upstream.up:
            return
        try:
            card = await asyncio.to_thread(check_upstream, upstream.name, hidden_size=self.prompts.hidden_size,
                                           api_key=self.api_key, model=self.model)
        except ArcCompressError as e:
            logger.warning("upstream %s answers but stays out of rotation: %s", upstream.name, e)
            return
        if card.max_model_len < self.max_model_len:
            logger.warning("upstream %s stays out of rotation: its max_model_len %d is below the fleet's %d",
                           upstream.name, card.max_model_len, self.max_model_len)
            return
        upstream.up = True
        logger.warning("upstream %s back in rotation", upstream.name)

