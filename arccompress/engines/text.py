"""From generated tokens to text, by the rules every engine follows (OpenAI's for stop strings).

    cut_at_eos(ids, eos)          the ids before the first end-of-sequence id
    without_cut_character(text)   no U+FFFD of a character cut short at the end (as vLLM's detokenizer)
    cut_at_stop(text, stop)       the text before the first stop string
    StopFilter(stop).feed(piece)  the same rule on streamed text: pieces pass, held back only while they may
                                  begin a stop string
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


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
    string; nothing from the first stop string on (`done` then says so)."""

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.pending = ""
        self.done = False

    def feed(self, piece: str) -> str:
        if self.done:
            return ""
        text, hit = cut_at_stop(self.pending + piece, self.stop)
        if hit:
            self.done, self.pending = True, ""
            return text
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        rest, self.pending = ("" if self.done else self.pending), ""
        return rest


