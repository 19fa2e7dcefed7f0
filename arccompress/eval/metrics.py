"""The paper's scores: SQuAD's answer normalization, exact match and token F1, and a mode's summary."""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..errors import InputError


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lower case, punctuation removed, articles (a, an, the) removed, single spaces.

    Punctuation is ASCII's (as in SQuAD) and every other Unicode punctuation character (curly quotes, dashes).
    """
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(c for c in text if c not in string.punctuation and not unicodedata.category(c).startswith("P"))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _answers(answers: str | Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    answers = list(answers)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise InputError(f"answers must be a str or a non-empty list of str, not {answers!r}")
    return answers


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalized prediction equals a normalized gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _answers(answers)))


def f1_score(prediction: str, answers: str | Sequence[str]) -> float:
    """Token F1 between the normalized prediction and the best-matching normalized gold answer."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for answer in _answers(answers):
        gold = normalize_answer(answer).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def summarize(preds: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's scores from its predictions: mean exact match, F1, prompt positions and positions saved; summed
    prefill and generation seconds."""
    n = len(preds)
    mean = (lambda key: sum(p[key] for p in preds) / n) if n else (lambda key: 0.0)  # noqa: E731
    return {"exact_match": mean("exact_match"), "f1": mean("f1"), "questions": n,
            "mean_prompt_positions": mean("prompt_positions"), "mean_tokens_saved": mean("tokens_saved"),
            "tokens_saved_estimated": any(p.get("tokens_saved_estimated") for p in preds),
            "prefill_seconds": sum(p["prefill_seconds"] for p in preds),
            "total_seconds": sum(p["total_seconds"] for p in preds)}
