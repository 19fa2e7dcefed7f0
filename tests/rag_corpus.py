"""The corpus the framework adapters' tests retrieve from: passages (half of them stored), questions, and a
deterministic embedding for the frameworks' vector stores. Fixtures live in tests/rag_fixtures.py."""

from __future__ import annotations

import math
import re
import zlib

from arccompress.engines.base import Completion, Engine
from arccompress.prompts import ContextRef

TOWNS = ["Avenor", "Belcastel", "Corvel", "Dunmere", "Esterly", "Falkirk", "Glenroe", "Harrow", "Istria", "Jorvik"]
TRADES = ["salt", "wool", "glass", "timber", "cheese", "copper", "wine", "paper"]
PASSAGES = {
    f"p{i:03d}": (f"{TOWNS[i % 10]} district {i // 10} trades in {TRADES[i % 8]}; its market opens at "
                  f"{6 + i % 5} o'clock and the bridge there is {10 + 3 * i} metres long.")
    for i in range(80)
}
STORED = [key for i, key in enumerate(PASSAGES) if i % 2 == 0]  # half the corpus has its context in the store
QUESTIONS = ["Which district of Corvel trades in glass?", "How long is the bridge in Harrow district 3?"]
KEY = "rag-key-42"


def embed(text: str, dim: int = 64) -> list[float]:
    """A bag of words hashed into `dim` buckets, unit length: deterministic, and similar texts are near."""
    vec = [0.0] * dim
    for word in re.findall(r"\w+", text.lower()):
        vec[zlib.crc32(word.encode()) % dim] += 1.0
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def expected_documents(rag: dict, ids_and_texts: list[tuple[str, str]]) -> list:
    """What Generator.answer must be given for the same documents: their stored contexts, else their texts."""
    store = rag["store"]
    return [store[key] if key in store else text for key, text in ids_and_texts]


def service_documents(ids_and_texts: list[tuple[str, str]]) -> list:
    """What ServiceClient.answer must be given for the same documents: stored ids by reference, else texts."""
    return [ContextRef(key) if key in STORED else text for key, text in ids_and_texts]


class ScriptedEngine(Engine):
    """An engine that leaves documents to a server, as a service's client does, and answers every prompt with the
    same pieces of text: what an adapter sends, and what it makes of the text, seen exactly."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces
        self.prompts: list = []  # every prompt received, as parts

    def complete(self, prompts, sampling, *, time_prefill=False):
        self.prompts.extend(prompts)
        return [Completion(texts=["".join(self.pieces)], token_ids=[list(range(len(self.pieces)))],
                           finish_reasons=["stop"]) for _ in prompts]

    def stream_completion(self, prompt, sampling):
        self.prompts.append(prompt)
        return iter(self.pieces)

    def describe(self):
        return {"backend": "scripted"}
