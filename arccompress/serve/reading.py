"""A request's prompts read into slots, every limit checked in order of cost before the work it bounds.

The service walks a request once, handing each text and document to a `Reading`; nothing is checked during the
walk but what costs nothing. `finish()` then checks, in this order: the number of documents; each prompt's text
(valid UTF-8, then its characters against the limit); each document's characters; the documents' tokens (one
tokenizer call). Only then is a slot that stood for a document given its checked `TextDocument`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ..prompts import TokenIds
from .config import Limits
from .documents import DocumentResolver, TextDocument
from .refusals import RequestError, check_text_or_refuse
from .protocol import DocumentPart


@dataclass(frozen=True)
class StoredId:
    id: str
    where: str


@dataclass(frozen=True)
class PendingText:
    """A document given as text, not yet checked: its place among the request's documents."""

    index: int


Slot = Union[str, TextDocument, StoredId, TokenIds, PendingText]  # a prompt part before its documents are resolved


class Reading:
    """One request's texts and documents, gathered by `text` and `document`, checked by `finish`."""

    def __init__(self, resolver: DocumentResolver, limits: Limits, context_length: int, param: str):
        self.resolver, self.limits, self.param = resolver, limits, param
        self.max_chars = limits.prompt_chars(context_length)
        self.texts: list[tuple[str, str, int]] = []  # (text, where, prompt)
        self.documents: list[tuple[str, int | None, str]] = []  # documents given as text: (text, chunk_size, where)
        self.stored = 0
        self.checked: list[TextDocument] | None = None

    def text(self, text: str, where: str, prompt: int = 0) -> str:
        self.texts.append((text, where, prompt))
        return text

    def document(self, part: str | DocumentPart, where: str) -> StoredId | PendingText:
        if isinstance(part, DocumentPart) and part.id is not None:
            self.stored += 1
            return StoredId(part.id, where)
        text, chunk = (part, None) if isinstance(part, str) else (part.text, part.chunk_size)
        self.documents.append((text, chunk, where))  # type: ignore[arg-type]
        return PendingText(len(self.documents) - 1)

    def finish(self) -> list[TextDocument]:
        """The checks, in order of cost (blocking: call it in a worker thread), once; the documents given as text."""
        if self.checked is not None:
            return self.checked
        n = len(self.documents) + self.stored
        if n > self.limits.max_documents:
            raise RequestError(f"{n} documents in one request, over this service's limit of "
                               f"{self.limits.max_documents}", param=self.param)
        chars: dict[int, int] = {}
        for text, where, prompt in self.texts:
            check_text_or_refuse(text, where)
            chars[prompt] = chars.get(prompt, 0) + len(text)
        for prompt, count in chars.items():
            if count > self.max_chars:
                where = f"{self.param}[{prompt}]" if len(chars) > 1 else self.param
                raise RequestError(f"{where}: the prompt's text has {count:,} characters, over this service's limit "
                                   f"of {self.max_chars:,} (checked before tokenizing)", param=where)
        self.checked = self.resolver.check_texts(self.documents)
        return self.checked

    @staticmethod
    def resolve(slots: list[list[Slot]], documents: list[TextDocument]) -> list[list[Slot]]:
        """The slots with each pending document replaced by its checked TextDocument."""
        return [[documents[s.index] if isinstance(s, PendingText) else s for s in group] for group in slots]
