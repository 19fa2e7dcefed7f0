"""Which upstream serves a request: document affinity by rendezvous hashing, with bounded load.

    keys = AffinityKeys(RowKinds(prompts.weight, compressor.head_cont_row))   # once
    key = keys.of(rows)                            # the same bytes on every proxy replica for the same rows
    router = Router([Upstream("http://vllm-0:8000"), Upstream("http://vllm-1:8000")], load_factor=1.25)
    upstream, decision = router.choose(key, tried=[])   # decision: affinity, spill, failover or round-robin

The key. vLLM's prefix cache keeps full KV blocks, and a request reuses the blocks of the longest prefix of rows it
shares byte for byte with an earlier request on the same upstream. Requests whose leading content is the same —
the shared instructions and few-shot examples, then the same first document — should meet on one upstream, while
requests that differ in their first document may go anywhere: what all requests share is cached on every upstream
after one miss each. So the key is a digest of the prompt's rows up to the end of the first document of its last
group of documents (documents separated by at most `GROUP_GAP` text positions form a group: in a few-shot prompt
each example's documents are a group, the question's documents the last one). Requests of one topic — the same
retrieved documents, different questions — get one key; keying on more (the whole prompt) would scatter them, keying
on less (the first document of the prompt, an example's) would put every request on one key. A prompt without a
document is keyed by all its rows. The rows themselves say where documents are: the row of a text position is a
row of the decoder's embedding matrix, bit for bit, and every compressed context ends with its head's <Cont> row.

The ranking: rendezvous (highest random weight) hashing. Each upstream's score for a key is a digest of the key and
the upstream's name (its URL as configured); the upstreams by decreasing score are the key's ranking. Replicas given
the same upstream names rank alike without talking, and an upstream that leaves moves only the keys it ranked first.

Bounded load: the first upstream of the ranking that is in rotation and under its share of this replica's
requests in flight, ceil(load_factor * (in flight + 1) / upstreams in rotation), takes the request (consistent
hashing with bounded loads, Mirrokni, Thorup and Zadimoghaddam, 2018): a hot document spills over to the next
upstream of its ranking, the same next one on every replica.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from ...errors import InputError

GROUP_GAP = 8  # text positions that may stand between two documents of one group ("\n\nDocument 2: ", say)
ROUTINGS = ("documents", "prompt", "round-robin")
CONT_TOLERANCE = 1e-2  # of the <Cont> row's largest value: a stored context's <Cont> may have been rounded (float16)
_INTEGER_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(eq=False)
class Upstream:
    """One upstream server as the router sees it: its name (the URL it was given as), whether it is in rotation,
    and how many of this replica's requests it holds."""

    name: str
    up: bool = True
    in_flight: int = 0

    def __repr__(self) -> str:
        return f"Upstream({self.name!r}, up={self.up}, in_flight={self.in_flight})"


class RowKinds:
    """Which rows of a prompt are text (rows of the decoder's embedding matrix `weight`, bit for bit) and which
    close a compressed context (its head's <Cont> row `cont`, (1, H) or (H,))."""

    def __init__(self, weight: torch.Tensor, cont: torch.Tensor):
        if weight.dim() != 2 or cont.numel() != weight.shape[1]:
            raise InputError(f"a (vocab, H) matrix and an (H,) <Cont> row, not {list(weight.shape)} and "
                             f"{list(cont.shape)}")
        generator = torch.Generator().manual_seed(0)
        self.coefficients = torch.randint(-(2 ** 62), 2 ** 62, (weight.shape[1],), generator=generator) | 1
        self.dtype = weight.dtype
        self.vocabulary = torch.sort(self.fingerprints(weight)).values
        self.cont = cont.detach().reshape(-1).to("cpu", weight.dtype).float()
        self.cont_tolerance = CONT_TOLERANCE * float(self.cont.abs().max())

    def fingerprints(self, rows: torch.Tensor, block: int = 1024) -> torch.Tensor:
        """(N,) int64: a random linear hash of each row's bits (wrapping arithmetic), `block` rows at a time."""
        rows = rows.detach().to("cpu").contiguous()
        out = []
        for part in rows.split(block):
            bits = part.view(_INTEGER_VIEW[part.element_size()]).to(torch.int64)
            out.append((bits * self.coefficients).sum(dim=1))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)

    def text(self, rows: torch.Tensor) -> torch.Tensor:
        """(T,) bool: the rows that are rows of the embedding matrix (text positions, BOS)."""
        fingerprints = self.fingerprints(rows.to(self.dtype))
        at = torch.searchsorted(self.vocabulary, fingerprints).clamp(max=len(self.vocabulary) - 1)
        return self.vocabulary[at] == fingerprints

    def closes_context(self, rows: torch.Tensor, block: int = 1024) -> torch.Tensor:
        """(T,) bool: the rows that are the <Cont> row ending a compressed context (`block` rows at a time)."""
        rows = rows.detach().to("cpu", self.dtype)
        return torch.cat([(part.float() - self.cont).abs().amax(dim=1) <= self.cont_tolerance
                          for part in rows.split(block)]) if rows.shape[0] else torch.zeros(0, dtype=torch.bool)


class AffinityKeys:
    """The routing key of a prompt's rows: a digest of its leading content (the module's docstring says which
    rows), or of all its rows with `whole_prompt=True`."""

    def __init__(self, kinds: RowKinds, *, whole_prompt: bool = False):
        self.kinds = kinds
        self.whole_prompt = whole_prompt

    def leading_positions(self, rows: torch.Tensor) -> int:
        """How many leading rows the key covers: through the first document of the prompt's last group of
        documents (all of them without a document, or with `whole_prompt`)."""
        if self.whole_prompt:
            return int(rows.shape[0])
        text = self.kinds.text(rows)
        ends = torch.nonzero(self.kinds.closes_context(rows) & ~text).flatten()  # each document's last row
        if ends.numel() == 0:
            return int(rows.shape[0])
        text_before = torch.cumsum(text.to(torch.int64), 0)[ends]
        separated = torch.nonzero(text_before[1:] - text_before[:-1] > GROUP_GAP).flatten()
        first_of_last_group = int(separated[-1]) + 1 if separated.numel() else 0
        return int(ends[first_of_last_group]) + 1

    def of(self, rows: torch.Tensor) -> bytes:
        """The key: a digest of the leading rows' bytes, as the upstream's prefix cache compares them."""
        leading = rows.detach()[: self.leading_positions(rows)].to("cpu").contiguous()
        return hashlib.blake2b(leading.view(torch.uint8).numpy().tobytes(), digest_size=16).digest()


class Router:
    """Chooses an upstream per request: by the key's rendezvous ranking under the load bound, or in turn (a key of
    None: round robin). Counts in flight are the caller's to keep (`Upstream.in_flight`)."""

    def __init__(self, upstreams: Sequence[Upstream], *, load_factor: float = 1.25):
        names = [u.name for u in upstreams]
        if not names or len(set(names)) != len(names):
            raise InputError(f"the upstreams must be one or more distinct names, not {names}")
        if isinstance(load_factor, bool) or not isinstance(load_factor, (int, float)) or not load_factor >= 1:
            raise InputError(f"load_factor must be a number >= 1 (1.25: an upstream may hold 25% over its share), "
                             f"not {load_factor!r}")
        self.upstreams = list(upstreams)
        self.load_factor = float(load_factor)
        self.turn = 0

    def ranking(self, key: bytes) -> list[Upstream]:
        """The upstreams in the key's order of preference: rendezvous hashing on their names."""
        def score(u: Upstream) -> bytes:
            return hashlib.blake2b(key + b"\0" + u.name.encode(), digest_size=8).digest()

        return sorted(self.upstreams, key=score, reverse=True)

    def share(self) -> int:
        """How many requests in flight an upstream in rotation may hold before the next one takes its work."""
        live = [u for u in self.upstreams if u.up]
        return math.ceil(self.load_factor * (sum(u.in_flight for u in live) + 1) / max(len(live), 1))

    def choose(self, key: bytes | None, tried: Collection[Upstream] = ()) -> tuple[Upstream, str] | None:
        """(the upstream, how it was chosen) for a request, skipping those out of rotation and those `tried`
        already; None when no upstream is left. How: "affinity" (the key's first), "spill" (one before it was
        over its share), "failover" (the ones before it were out or tried), "round-robin"."""
        if key is None:
            start = self.turn % len(self.upstreams)
            order = self.upstreams[start:] + self.upstreams[:start]
            chosen = next((u for u in order if u.up and u not in tried), None)
            if chosen is None:
                return None
            self.turn = self.upstreams.index(chosen) + 1  # the next turn is the next one's, whoever was skipped
            return chosen, "round-robin"
        ranking = self.ranking(key)
        candidates = [u for u in ranking if u.up and u not in tried]
        if not candidates:
            return None
        share = self.share()
        chosen = next((u for u in candidates if u.in_flight < share), min(candidates, key=lambda u: u.in_flight))
        if chosen is ranking[0]:
            return chosen, "affinity"
        passed = candidates[: candidates.index(chosen)]
        return chosen, "spill" if passed else "failover"
