"""The proxy's parts that need no vLLM: the affinity key, rendezvous ranking with bounded load, and the fleet's
failover and bounds against upstreams played by httpx's mock transport (answers cut, slow, malformed, refused).

The same proxy against real vLLM servers is tests/test_proxy.py (vLLM environment).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time

import httpx
import pytest
import torch

from arccompress import Compressor, ContextText
from arccompress.engines.base import Observer, Sampling
from arccompress.engines.decoder_files import decoder_files
from arccompress.engines.remote.fleet import AsyncVLLMFleet, NoUpstream, UpstreamCard, UpstreamError, upstream_root
from arccompress.engines.remote.routing import AffinityKeys, Router, RowKinds, Upstream
from arccompress.errors import InputError, UnavailableError
from arccompress.prompts import PromptBuilder, fewshot_qa_prompt
from arccompress.tiny import build_tiny_pair

DOCS = ["The Loire is the longest river in France, flowing 1,006 km.", "Mont Blanc is 4,806 metres high.",
        "Paris is the capital of France.", "The Rhone reaches the Mediterranean near Marseille."]
EXAMPLE = [([DOCS[0], DOCS[1]], "Which river?", "The Loire")]


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    encoder, decoder = build_tiny_pair()
    files = decoder_files(decoder)
    return PromptBuilder(files.tokenizer, Compressor.from_pretrained(encoder, device="cpu"), files.embedding)


@pytest.fixture(scope="module")
def keys(builder) -> AffinityKeys:
    return AffinityKeys(RowKinds(builder.weight, builder.compressor.cont_row()))


def rows_of(builder: PromptBuilder, prompt) -> torch.Tensor:
    return builder.embeds(builder.layout([prompt]))[0]


def spans(builder: PromptBuilder, prompt) -> list[tuple[str, int, int]]:
    """("text" or "doc", start, end) of each piece of the prompt's layout."""
    out, at = [], 0
    for piece in builder.layout([prompt])[0]:
        n = len(piece) if isinstance(piece, list) else piece.embeddings.shape[0]
        out.append(("text" if isinstance(piece, list) else "doc", at, at + n))
        at += n
    return out


def test_the_key_covers_the_prompt_through_the_first_document_of_its_last_group(builder, keys):
    a = fewshot_qa_prompt("How high?", [DOCS[2], DOCS[3]], EXAMPLE)
    b = fewshot_qa_prompt("Another question, longer than the first one?", [DOCS[2], DOCS[1]], EXAMPLE)
    c = fewshot_qa_prompt("How high?", [DOCS[3], DOCS[2]], EXAMPLE)
    docs = [s for s in spans(builder, a) if s[0] == "doc"]
    assert len(docs) == 4 and keys.leading_positions(rows_of(builder, a)) == docs[2][2]  # the question's first
    assert keys.of(rows_of(builder, a)) == keys.of(rows_of(builder, b)) != keys.of(rows_of(builder, c))
    # documents separated by a few text positions are one group: the key ends after the first of them
    grouped = ["Sources:\n", ContextText(DOCS[0]), "\n", ContextText(DOCS[1]), "\nWhat do they say?"]
    first = [s for s in spans(builder, grouped) if s[0] == "doc"][0]
    assert keys.leading_positions(rows_of(builder, grouped)) == first[2]
    # without a document, or keyed on the whole prompt: every row
    plain = rows_of(builder, "A question without documents?")
    assert keys.leading_positions(plain) == plain.shape[0]
    whole = AffinityKeys(keys.kinds, whole_prompt=True)
    assert whole.leading_positions(rows_of(builder, a)) == rows_of(builder, a).shape[0]
    assert whole.of(rows_of(builder, a)) != whole.of(rows_of(builder, b))


def test_a_context_stored_in_float16_still_ends_where_it_did(builder, keys):
    """A store's codec may round a context (float16): its <Cont> row still closes it."""
    ctx = builder.compressor.compress(DOCS[2])
    rounded = dataclasses.replace(ctx, embeddings=ctx.embeddings.half().float())
    assert not torch.equal(rounded.embeddings, ctx.embeddings)
    for c in (ctx, rounded):
        prompt = ["Document: ", c, "\nQuestion: what?\nAnswer:"]
        assert keys.leading_positions(rows_of(builder, prompt)) == spans(builder, prompt)[1][2]


def test_rendezvous_ranking_is_the_same_everywhere_and_moves_little():
    names = [f"http://vllm-{i}:8000" for i in range(3)]
    keys = [random.Random(k).randbytes(16) for k in range(3000)]
    router = Router([Upstream(n) for n in names])
    shuffled = Router([Upstream(n) for n in reversed(names)])
    firsts = [router.ranking(k)[0].name for k in keys]
    assert firsts == [shuffled.ranking(k)[0].name for k in keys]  # the order they are given in does not matter
    assert all(800 < firsts.count(n) < 1200 for n in names)  # spread evenly
    fewer = Router([Upstream(n) for n in names[:2]])
    for k, first in zip(keys, firsts):  # the keys of the upstream that left move; no other key does
        if first != names[2]:
            assert fewer.ranking(k)[0].name == first


def test_bounded_load_spills_to_the_next_in_the_ranking_and_skips_what_is_out():
    ups = [Upstream(f"http://u{i}") for i in range(3)]
    router = Router(ups, load_factor=1.25)
    key = b"a hot document"
    first, second, third = router.ranking(key)
    assert router.choose(key) == (first, "affinity")
    first.in_flight = 4  # 4 in flight, 3 upstreams: a share is ceil(1.25 * 5 / 3) = 3
    assert router.share() == 3 and router.choose(key) == (second, "spill")
    second.in_flight = 4  # 8 in flight: a share is ceil(1.25 * 9 / 3) = 4
    assert router.choose(key) == (third, "spill")
    first.in_flight = second.in_flight = 0
    first.up = False
    assert router.choose(key) == (second, "failover")
    assert router.choose(key, tried=[second]) == (third, "failover")
    assert router.choose(key, tried=[second, third]) is None
    # round robin: in turn, skipping what is out of rotation
    first.up, ups[0].up = True, False
    assert [router.choose(None)[0].name for _ in range(4)] == ["http://u1", "http://u2", "http://u1", "http://u2"]
    with pytest.raises(InputError, match="load_factor"):
        Router(ups, load_factor=0.5)
    with pytest.raises(InputError, match="distinct"):
        Router([Upstream("http://x"), Upstream("http://x")])


def test_upstream_urls_name_the_server_with_or_without_v1():
    assert upstream_root("http://vllm-0.vllm:8000/v1/") == upstream_root("http://vllm-0.vllm:8000") == \
        "http://vllm-0.vllm:8000"
    with pytest.raises(InputError, match="http"):
        upstream_root("vllm-0:8000")


# ----------------------------------------------------------------------------- the fleet against played upstreams


def event(tokens: list[int], finish: str | None = None) -> bytes:
    choice = {"index": 0, "text": "?", "token_ids": tokens, "finish_reason": finish}
    return f"data: {json.dumps({'choices': [choice]})}\n\n".encode()


class Played:
    """Upstreams played by a function per host: (request) -> an httpx.Response; every request recorded."""

    def __init__(self, **behaviours):
        self.behaviours = behaviours
        self.seen: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.seen.append(host)
        return await self.behaviours[host](request)


def streamed(*chunks: bytes, pause: float = 0.0):
    async def answer(request: httpx.Request) -> httpx.Response:
        async def body():
            for c in chunks:
                await asyncio.sleep(pause)
                yield c
        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})
    return answer


def status(code: int, message: str):
    async def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(code, json={"error": {"message": message}})
    return answer


@pytest.fixture(scope="module")
def text_ids(builder) -> list[int]:
    return builder.text.tokenizer("Hello world, all good", add_special_tokens=False)["input_ids"]


def fleet_of(builder, played: Played, *, timeout: float = 30.0, routing: str = "round-robin"):
    observer_log: list[tuple[str, str]] = []
    failed: list[str] = []
    fleet = AsyncVLLMFleet([Upstream("http://a"), Upstream("http://b")], builder, "tiny", {},
                           UpstreamCard("tiny", 512), api_key="k", routing=routing, load_factor=1.25,
                           timeout=timeout, health_interval=60,
                           observer=Observer(routed=lambda u, d: observer_log.append((u, d)), failed=failed.append))
    fleet.client = httpx.AsyncClient(transport=httpx.MockTransport(played))
    return fleet, observer_log, failed


def run(fleet: AsyncVLLMFleet, builder, sampling: Sampling | None = None):
    """The deltas of one request (or the exception it raised, with the deltas handed out before it)."""
    sampling = sampling or Sampling(max_new_tokens=8)
    rows = rows_of(builder, ["Document: ", ContextText(DOCS[0]), "\nAnswer:"])

    async def go():
        out = []
        try:
            async for deltas in fleet.generate(rows, sampling, "req-1"):
                out.extend(deltas)
        except Exception as e:  # noqa: BLE001 - what the test looks at
            return out, e
        finally:
            await fleet.close()
        return out, None

    return asyncio.run(go())


def test_a_failing_upstream_before_the_first_token_passes_the_request_on(builder, text_ids):
    text = builder.text.tokenizer.decode(text_ids)
    good = streamed(event(text_ids[:2]), event(text_ids[2:], "length"), b"data: [DONE]\n\n")
    for broken in (status(500, "engine dead"), streamed(b"data: {not json\n\n"), streamed(b""),
                   streamed(b'data: {"error": {"message": "the engine died"}}\n\n')):
        played = Played(a=broken, b=good)
        fleet, routed, failed = fleet_of(builder, played)
        deltas, error = run(fleet, builder)
        assert error is None and "".join(d.text for d in deltas) == text
        assert [u for u, _ in routed] == ["http://a", "http://b"] and failed == ["http://a"]
        assert [u.up for u in fleet.upstreams] == [False, True] and fleet.waiting == 0


def test_a_stream_cut_after_a_token_ends_in_an_error_and_a_refusal_is_not_retried(builder, text_ids):
    fleet, routed, failed = fleet_of(builder, Played(a=streamed(event(text_ids[:2])), b=streamed()))
    deltas, error = run(fleet, builder)
    assert deltas and isinstance(error, UpstreamError) and "middle of the answer" in str(error)
    assert routed == [("http://a", "round-robin")] and not fleet.upstreams[0].up
    fleet, routed, failed = fleet_of(builder, Played(a=status(400, "bad sampling"), b=streamed()))
    deltas, error = run(fleet, builder)
    assert isinstance(error, UpstreamError) and "bad sampling" in str(error) and not deltas
    assert len(routed) == 1 and fleet.upstreams[0].up and not failed  # the request's fault, not the upstream's


def test_every_wait_ends_by_the_deadline_and_nothing_left_is_503(builder, text_ids):
    slow = streamed(event(text_ids[:1]), event(text_ids[1:2]), pause=5.0)
    fleet, _, _ = fleet_of(builder, Played(a=slow, b=slow), timeout=1.0)
    start = time.monotonic()
    deltas, error = run(fleet, builder)
    assert isinstance(error, UpstreamError) and "timeout" in str(error) and time.monotonic() - start < 4
    down = streamed()
    fleet, _, _ = fleet_of(builder, Played(a=down, b=down))
    for u in fleet.upstreams:
        u.up = False
    _, error = run(fleet, builder)
    assert isinstance(error, NoUpstream) and isinstance(error, UnavailableError) and "out of rotation" in str(error)


def test_a_stop_string_ends_the_sequence_here_and_closes_the_stream(builder, text_ids):
    closed = []

    async def endless(request: httpx.Request) -> httpx.Response:
        async def body():
            try:
                for t in text_ids * 50:
                    yield event([t])
                    await asyncio.sleep(0)
            finally:
                closed.append(True)
        return httpx.Response(200, content=body())

    fleet, _, _ = fleet_of(builder, Played(a=endless, b=endless))
    deltas, error = run(fleet, builder, Sampling(max_new_tokens=500, stop=("world",)))
    assert error is None and "".join(d.text for d in deltas) == "Hello " and deltas[-1].finish_reason == "stop"
    assert closed == [True]
