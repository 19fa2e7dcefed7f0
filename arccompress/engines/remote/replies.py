"""OpenAI's completions API as this package's clients read it, over a `Wire`: model cards, choices, streams.

Both clients of servers speak it — `VLLMClient` (prompt embeddings to vLLM's server) and `ServiceClient` (documents
to `arccompress serve`) — and both read the answers the same way: every field checked, a choice's index within the
sequences asked for, a stream's pieces joined per sequence, anything else one error naming the URL and the problem.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from ...errors import InputError
from ..base import Sampling
from .http import Wire, WireError, int_list, json_field


class Choice(NamedTuple):
    index: int
    text: str
    token_ids: list[int] | None
    finish_reason: str | None


class Outputs(NamedTuple):
    """One prompt's sequences: texts, token ids, finish reasons, and the seconds to the first token when timed."""

    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    first_token_seconds: float | None
    usage: dict[str, Any] | None


def model_cards(wire: Wire) -> list[dict[str, Any]]:
    """The server's model cards (`GET /models`), each with a string `id` (and an int `max_model_len`, if any)."""
    url = wire.url("/models")
    data = json_field(wire.get_json("/models"), "data", list, where=url, error=wire.error)
    for k, card in enumerate(data):
        json_field(card, "id", str, where=f"{url}, data[{k}]", error=wire.error)
        json_field(card, "max_model_len", int, where=f"{url}, data[{k}]", error=wire.error, optional=True)
    if not data:
        raise wire.error(f"{url}: the server lists no model")
    return data


def choose_model(cards: list[dict[str, Any]], model: str | None, url: str) -> dict[str, Any]:
    """The card of `model`, or of the only model served."""
    names = [card["id"] for card in cards]
    if model is None:
        if len(names) != 1:
            raise InputError(f"{url} serves {names}: choose one with model=")
        return cards[0]
    if model not in names:
        raise InputError(f"{url} does not serve {model!r}; it serves {names}")
    return cards[names.index(model)]


def check_max_concurrency(value: Any) -> int:
    """Requests a client keeps in flight at once: a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"max_concurrency must be a positive int, not {value!r}")
    return value


def request_body(model: str, prompt: dict[str, Any], sampling: Sampling, n: int) -> dict[str, Any]:
    """A completions request for `n` sequences: the prompt field (`{"prompt": ...}` or `{"prompt_embeds": ...}`),
    the sampling settings as OpenAI names them (the engine's own options beside them), token ids asked for."""
    body = dict(sampling.extra) | {"model": model, **prompt, "max_tokens": sampling.max_new_tokens,
                                   "temperature": sampling.temperature, "top_p": sampling.top_p, "n": n,
                                   "return_token_ids": True}
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    return body


def complete_all(wire: Wire, path: str, bodies: list[dict[str, Any]], n: int, *, timed: bool,
                 max_concurrency: int) -> list[Outputs]:
    """`complete` for every body, `max_concurrency` requests at a time, in order; the first failure stops the
    ones not sent yet (a failing server is not asked again for every remaining prompt)."""
    if not bodies:
        return []
    with ThreadPoolExecutor(max_workers=min(max_concurrency, len(bodies))) as pool:
        futures = [pool.submit(complete, wire, path, body, n, timed=timed) for body in bodies]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def choices(answer: Any, n: int, where: str, error: type[WireError], *, partial: bool) -> list[Choice]:
    """The choices of a completions answer (`partial`: of a stream's event), checked."""
    out = []
    for k, choice in enumerate(json_field(answer, "choices", list, where=where, error=error)):
        at = f"{where}, choices[{k}]"
        index = json_field(choice, "index", int, where=at, error=error, optional=partial)
        index = k if index is None else index
        if not 0 <= index < n:
            raise error(f"{at}: index {index} is not one of the {n} sequences asked for")
        text = json_field(choice, "text", str, where=at, error=error, optional=partial) or ""
        ids = json_field(choice, "token_ids", list, where=at, error=error, optional=partial)  # both clients ask them
        ids = None if ids is None else int_list(ids, f"{at}, token_ids", error)
        reason = json_field(choice, "finish_reason", str, where=at, error=error, optional=True)
        out.append(Choice(index, text, ids, reason))
    return out


def complete(wire: Wire, path: str, body: dict[str, Any], n: int, *, timed: bool) -> Outputs:
    """One completions request for `n` sequences; timed requests stream, and say when the first token came."""
    url, error = wire.url(path), wire.error
    texts, ids, reasons = [""] * n, [[] for _ in range(n)], ["length"] * n
    first, usage = None, None
    if not timed:
        answer = wire.post_json(path, body)
        got = choices(answer, n, url, error, partial=False)
        if sorted(c.index for c in got) != list(range(n)):
            raise error(f"{url}: the answer's choices are {sorted(c.index for c in got)}, not the {n} sequences "
                        "asked for")
        usage = json_field(answer, "usage", dict, where=url, error=error, optional=True)
    else:
        start = time.perf_counter()
        got = []
        for event in wire.post_events(path, body | {"stream": True}):
            for choice in choices(event, n, f"{url}, stream event", error, partial=True):
                if first is None and (choice.text or choice.token_ids):
                    first = time.perf_counter() - start
                got.append(choice)
            usage = json_field(event, "usage", dict, where=f"{url}, stream event", error=error, optional=True) or usage
    for choice in got:
        texts[choice.index] += choice.text
        ids[choice.index] += choice.token_ids or []
        reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    return Outputs(texts, ids, reasons, first, usage)


def stream_text(wire: Wire, path: str, body: dict[str, Any]) -> Iterator[str]:
    """The text of one sequence's stream, piece by piece."""
    where = f"{wire.url(path)}, stream event"
    for event in wire.post_events(path, body | {"stream": True}):
        for choice in choices(event, 1, where, wire.error, partial=True):
            if choice.text:
                yield choice.text
