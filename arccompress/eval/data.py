"""A QA set as a run reads it: rows checked one by one, the few-shot examples drawn, the modes the rows can run."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ContextNotFoundError, InputError, NotFoundError
from ..sources import MISSING, normalize_id, read_records
from ..tokenization import check_text

MODES = ("compressed", "full", "closed")


@dataclass(frozen=True)
class QARow:
    """One question of a QA set: its gold answers, and its passages as text and/or as ids in a store."""

    question: str
    answers: list[str]
    passages: list[str] | None
    passage_ids: list[str] | None
    where: str  # the row's place in the data, for messages


def load_rows(data: Any) -> list[QARow]:
    """The rows of a QA set (a JSONL or Parquet path, a datasets.Dataset, or a list of dicts), each checked:
    InputError naming the row and the field at the first problem."""
    if isinstance(data, (str, Path)) and not Path(data).exists():
        raise NotFoundError(f"no such data file {data}")
    if isinstance(data, Iterator):
        data = list(data)  # a generator of dicts: read once
    rows = [qa_row(where, record) for where, record in read_records(data)]
    if not rows:
        raise InputError("the data has no rows")
    return rows


def qa_row(where: str, record: dict[str, Any]) -> QARow:
    """A checked row: a non-empty question, one answer or a non-empty list of them, and optional `passages`
    (non-empty texts) and `passage_ids` (ids as the corpus rule reads them: strs, or ints as their text)."""
    question = record.get("question", MISSING)
    if question is MISSING:
        raise InputError(f"{where}: no 'question' field")
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"{where}: field 'question' must be a non-empty string, found {_shown(question)}")
    check_text(question, f"{where}, field 'question'")
    field_name = "answers" if "answers" in record or "answer" not in record else "answer"
    answers = record.get(field_name, MISSING)
    if answers is MISSING:
        raise InputError(f"{where}: no 'answers' field (the gold answers, a list of strings)")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise InputError(f"{where}: field {field_name!r} must be a non-empty list of strings, found {_shown(answers)}")
    for k, a in enumerate(answers):
        check_text(a, f"{where}, field {field_name!r} item {k}")
    passages = record.get("passages")
    if passages is not None:
        if not isinstance(passages, list) or not passages or \
                not all(isinstance(p, str) and p.strip() for p in passages):
            raise InputError(f"{where}: field 'passages' must be a non-empty list of non-empty strings, found "
                             f"{_shown(passages)}")
        for k, p in enumerate(passages):
            check_text(p, f"{where}, field 'passages' item {k}")
    ids = record.get("passage_ids")
    if ids is not None:
        if not isinstance(ids, list) or not ids:
            raise InputError(f"{where}: field 'passage_ids' must be a non-empty list of ids, found {_shown(ids)}")
        try:
            ids = [normalize_id(i) for i in ids]
        except InputError as e:
            raise InputError(f"{where}: field 'passage_ids': {e}") from None
    return QARow(question, list(answers), passages, ids, where)


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def choose_examples(n_rows: int, shots: int, seed: int) -> list[int]:
    """Indices of the few-shot example rows: `shots` of them, drawn with `seed` (the same for every run)."""
    if shots < 0 or shots >= n_rows:
        raise InputError(f"shots (--shots) must be between 0 and {n_rows - 1} for {n_rows} rows, not {shots}")
    return sorted(random.Random(seed).sample(range(n_rows), shots))


@dataclass(frozen=True)
class Questions:
    """Which rows a run uses: the few-shot examples, the rows it could score, and those it scores (`limit`)."""

    examples: list[int]
    candidates: list[int]
    scored: list[int]

    @classmethod
    def select(cls, n_rows: int, *, shots: int, seed: int, limit: int | None) -> Questions:
        examples = choose_examples(n_rows, shots, seed)
        candidates = [i for i in range(n_rows) if i not in set(examples)]
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InputError(f"limit (--limit) must be a positive int, not {limit!r}")
        return cls(examples, candidates, candidates[:limit] if limit is not None else candidates)


def parse_modes(modes: str | Sequence[str]) -> list[str]:
    """The modes asked for, in order, each once; InputError for an unknown one."""
    asked = list(dict.fromkeys([modes] if isinstance(modes, str) else modes))
    unknown = [m for m in asked if m not in MODES]
    if unknown or not asked:
        raise InputError(f"unknown mode {unknown[0]!r}: modes (--modes) are compressed, full and closed" if unknown
                         else "no modes: choose among compressed, full and closed (--modes)")
    return asked


def check_modes(modes: Sequence[str], rows: list[QARow], questions: Questions, store: Any) -> None:
    """Refuse up front a mode the rows cannot run, naming the first row and the way out: closed needs nothing,
    full needs the passages' text, compressed the text or ids in `store` (all present there)."""
    needed = questions.scored + questions.examples
    compressible = all(rows[i].passages is not None or (rows[i].passage_ids is not None and store is not None)
                       for i in needed)
    others = ["compressed", "closed"] if compressible else ["closed"]
    for i in needed:
        r = rows[i]
        if "full" in modes and r.passages is None:
            has = "only 'passage_ids'" if r.passage_ids is not None else "no 'passages'"
            raise InputError(f"mode full needs the passages' text: {r.where} has {has}; add 'passages' to the rows, "
                             f"or run --modes {','.join(others)} (modes={others})")
        if "compressed" in modes and r.passages is None:
            if r.passage_ids is None:
                raise InputError(f"mode compressed needs 'passages' or 'passage_ids': {r.where} has neither; add them, "
                                 f"or run closed book only (--modes closed / modes=['closed'])")
            if store is None:
                raise InputError(f"{r.where}: 'passage_ids' name contexts in a store: give the store "
                                 "(--store / store=)")
    if "compressed" in modes and store is not None:
        for i in needed:
            r = rows[i]
            missing = [k for k in r.passage_ids or () if k not in store]
            if missing:
                raise ContextNotFoundError(f"{r.where}: passage_ids not in the store {store.path}: "
                                           f"{', '.join(map(repr, missing[:5]))}")
