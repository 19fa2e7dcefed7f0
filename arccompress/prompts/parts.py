"""The prompt language: the parts a prompt is made of, and `normalize`, which reads what a caller passed, once.

A prompt is a str, or a list of parts:

    str                  text, tokenized by the decoder's tokenizer
    CompressedContext    a compressed context, inserted unchanged
    ContextText(text)    raw context text, compressed on the fly (all of a call's texts in one batch)
    ContextRef(id)       a context kept in a store, read through the engine's `store=` (one read per call)
    TokenIds(ids)        decoder token ids inserted verbatim (a chat template already tokenized, say)

`normalize` is called at an engine's public entry; below it everything takes lists of part lists.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from ..context import REPR_PATTERN, CompressedContext
from ..errors import InputError, InputTypeError
from ..tokenization import check_text


@dataclass(frozen=True)
class ContextText:
    """Raw context text inside a prompt, compressed on the fly by the compressor."""

    text: str
    chunk_size: int | None = None


@dataclass(frozen=True)
class ContextRef:
    """A context kept in a store, by its id: the engine reads it through its `store=`."""

    id: str

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise InputTypeError(f"ContextRef takes a context's id, a non-empty str, not {self.id!r}")


@dataclass(frozen=True)
class TokenIds:
    """Decoder token ids inserted verbatim. A prompt that starts with TokenIds gets no BOS: the ids are the
    caller's (e.g. a chat template rendered and tokenized with its special tokens)."""

    ids: tuple[int, ...]

    def __init__(self, ids: Sequence[int] | torch.Tensor):
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise InputTypeError(f"TokenIds takes a list of ints, not {type(ids).__name__}")
        checked = []
        for k, t in enumerate(ids):
            try:
                if isinstance(t, bool):
                    raise TypeError
                t = operator.index(t)
            except TypeError:
                raise InputTypeError(f"TokenIds: the id at index {k} is a {type(t).__name__}, not an int") from None
            if t < 0:
                raise InputError(f"TokenIds: the id at index {k} is negative ({t})")
            checked.append(t)
        object.__setattr__(self, "ids", tuple(checked))

    def __len__(self) -> int:
        return len(self.ids)


Part = Union[str, CompressedContext, ContextText, ContextRef, TokenIds]
PART_TYPES = (str, CompressedContext, ContextText, ContextRef, TokenIds)
Prompt = Union[str, Sequence[Part]]
Document = Union[str, CompressedContext, ContextText, ContextRef]  # what a QA prompt's documents may be


def normalize(prompt_or_prompts: Prompt | Sequence[Prompt]) -> tuple[list[list[Part]], bool]:
    """(the prompts as lists of checked parts, whether one prompt was given): an engine's one reading of its input.

    A str or a single part is one prompt; a list holding anything but strs and lists (a part, or a wrong type
    to report by position) is one prompt; a list of strs or of part lists is a batch.
    """
    given = prompt_or_prompts
    if isinstance(given, PART_TYPES):
        batch, single = [[given]], True
    elif not isinstance(given, Sequence):
        raise InputTypeError(f"prompts must be a str, a list of parts or a list of prompts, not {type(given).__name__}")
    elif all(isinstance(p, str) or (isinstance(p, Sequence) and not isinstance(p, str)) for p in given):
        batch, single = [[p] if isinstance(p, str) else p for p in given], False
    else:
        batch, single = [given], True
    return [check_parts(parts, i) for i, parts in enumerate(batch)], single


def normalize_one(prompt: Prompt, what: str) -> list[Part]:
    """One prompt's checked parts, for calls that take one prompt (`what` names the call): a list of strs is the
    parts of one prompt here, and a list of lists is refused."""
    if isinstance(prompt, PART_TYPES):
        return check_parts([prompt], 0)
    if not isinstance(prompt, Sequence) or any(isinstance(p, Sequence) and not isinstance(p, str) for p in prompt):
        raise InputTypeError(f"{what} takes one prompt (a str or a list of parts), not a list of prompts")
    return check_parts(prompt, 0)


def check_parts(parts: Sequence[Any], index: int) -> list[Part]:
    """A prompt's parts, each of a known type, its text valid UTF-8 and free of a formatted context."""
    out = []
    for j, part in enumerate(parts):
        where = f"prompt {index}, part {j}"
        text = part if isinstance(part, str) else part.text if isinstance(part, ContextText) else None
        if text is not None:
            check_text(text, where)
            if REPR_PATTERN.search(text):
                raise InputError(
                    f"{where}: the text holds a CompressedContext's repr, not the context: put the context in the "
                    "list as its own part, e.g. [\"Document: \", ctx, \"\\nQuestion: ...\"]"
                )
        elif not isinstance(part, PART_TYPES):
            raise InputTypeError(f"{where}: expected str, CompressedContext, ContextText, ContextRef or TokenIds, "
                                 f"not {type(part).__name__}")
        out.append(part)
    return out
