"""From generated tokens to text, by the rules every engine follows (OpenAI's for stop strings).

    cut_at_eos(ids, eos)          the ids before the first end-of-sequence id
    without_cut_character(text)   no U+FFFD of a character cut short at the end (as vLLM's detokenizer)
    cut_at_stop(text, stop)       the text before the first stop string
    StopFilter(stop).feed(piece)  the same rule on streamed text: pieces pass, held back only while they may
                                  begin a stop string
    SequenceText(tokenizer, stop) one sequence's text as its tokens arrive, by those rules (every streaming engine)
    Delta                         what a streaming engine hands out per sequence: new text, token ids, the end
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


def cut_at_eos(ids: Iterable[int], eos_ids: Iterable[int | None]) -> list[int]:
    """Token ids up to the first end-of-sequence id, which is dropped."""
    ids, stops = list(ids), set(eos_ids) - {None}
    return next((ids[:k] for k, t in enumerate(ids) if t in stops), ids)


def without_cut_character(text: str) -> str:
    """The text without a character cut short at its end (the U+FFFD that decoding an incomplete UTF-8 sequence
    gives), which vLLM's detokenizer leaves out: every engine returns the same text for the same tokens."""
    return text.rstrip("\ufffd")


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """(the text before the first occurrence of any stop string, whether there was one): OpenAI's rule."""
    found = [k for k in (text.find(s) for s in stop) if k >= 0]
    return (text[: min(found)], True) if found else (text, False)


class StopFilter:
    """OpenAI's stop rule on streamed text: pieces pass through, held back only while they could begin a stop
    string; nothing from the first stop string on (`done` then says so).

    Each stop string is followed by a Knuth-Morris-Pratt matcher whose state is the longest prefix of the stop that
    ends the text so far: a piece costs its own length per stop (amortised), whatever the stops' lengths, and what
    is held back is the longest such prefix. Building the matchers costs the stops' total length, once.
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.fallback = [prefix_function(s) for s in self.stop]
        self.matched = [0] * len(self.stop)  # per stop: the length of its longest prefix that ends the text
        self.pending = ""
        self.done = False

    def feed(self, piece: str) -> str:
        if self.done:
            return ""
        text = self.pending + piece
        offset = len(self.pending)
        cut = None  # where the earliest stop completed in this piece begins
        for k, (s, fallback) in enumerate(zip(self.stop, self.fallback)):
            state = self.matched[k]
            for i, ch in enumerate(piece):
                while state and s[state] != ch:
                    state = fallback[state - 1]
                if s[state] == ch:
                    state += 1
                if state == len(s):
                    start = offset + i + 1 - len(s)
                    cut = start if cut is None else min(cut, start)
                    break
            self.matched[k] = state
        if cut is not None:
            self.done, self.pending = True, ""
            return text[:cut]
        hold = max(self.matched, default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        rest, self.pending = ("" if self.done else self.pending), ""
        return rest


def prefix_function(s: str) -> list[int]:
    """KMP's table: for each prefix s[:i + 1], the length of its longest proper prefix that is also its suffix."""
    table = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        if s[i] == s[k]:
            k += 1
        table[i] = k
    return table


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


@dataclass
class Delta:
    """New output of sequence `index` of a request; `finish_reason` ("stop" or "length") when it ended."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
