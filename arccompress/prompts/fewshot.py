"""The paper's few-shot QA prompt, in its compressed, open-book and closed-book forms, and how its answer is read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..context import CompressedContext
from ..errors import InputError, InputTypeError
from ..tokenization import check_text
from .parts import ContextRef, ContextText, Document, Part


def fewshot_qa_prompt(
    question: str,
    documents: Document | Sequence[Document],
    examples: Sequence[tuple[Any, str, str]] = (),
    *,
    mode: str = "compressed",
) -> list[Part] | str:
    """The paper's few-shot QA prompt: its compressed, open-book and closed-book forms.

    Each example is (documents, question, answer). A document is a str, a CompressedContext, a ContextText or a
    ContextRef (a stored context). mode="compressed" (default): every document is compressed (a str becomes a
    ContextText) and an example reads `Document: <ctx>\nQuestion: {q}\nAnswer: {a}\n\n`; several documents
    for one question are compressed separately and placed back to back after one "Document: ", as the
    reference evaluation does; the prompt ends `Document: <ctx>\nQuestion: {question}\nAnswer:`.
    mode="text" (open book): the same with the documents' text, joined by newlines; mode="closed": no
    documents, `Question: {q}\nAnswer: {a}\n\n`. Texts and questions are stripped, as there. The text and
    closed forms are returned as one str.
    """
    if mode not in ("compressed", "text", "closed"):
        raise InputError(f"mode must be 'compressed', 'text' or 'closed', not {mode!r}")
    parts: list[Part] = []
    kinds = (str, CompressedContext, ContextText, ContextRef)

    def add_documents(docs: Any, where: str) -> None:
        docs = [docs] if isinstance(docs, kinds) else docs
        if not isinstance(docs, Sequence) or not docs:
            raise InputError(f"{where}: every question needs at least one document (a str, a CompressedContext, "
                             "a ContextRef or a list of them)")
        if mode == "closed":
            return
        if mode == "text":
            texts = []
            for k, d in enumerate(docs):
                text = d if isinstance(d, str) else getattr(d, "text", None)
                if text is None:
                    raise InputError(f"{where}, document {k}: mode='text' needs the document's text")
                texts.append(check_text(text, f"{where}, document {k}").strip())
            parts.append("Document: " + "\n".join(texts))
            return
        parts.append("Document: ")
        for k, d in enumerate(docs):
            if isinstance(d, str):
                parts.append(ContextText(check_text(d, f"{where}, document {k}").strip()))
            elif isinstance(d, kinds):
                parts.append(d)
            else:
                raise InputTypeError(f"{where}, document {k}: expected a str, a CompressedContext or a ContextRef, "
                                     f"not {type(d).__name__}")

    newline = "" if mode == "closed" else "\n"
    for n, example in enumerate(examples):
        if not isinstance(example, (tuple, list)) or len(example) != 3:
            raise InputTypeError(f"example {n} must be a (documents, question, answer) triple")
        docs, q, a = example
        add_documents(docs, f"example {n}")
        q, a = check_text(q, f"example {n} question"), check_text(a, f"example {n} answer")
        parts.append(f"{newline}Question: {q.strip()}\nAnswer: {a.strip()}\n\n")
    check_text(question, "question")
    add_documents(documents, "question")
    parts.append(f"{newline}Question: {question.strip()}\nAnswer:")
    if mode != "compressed":
        return "".join(parts)  # type: ignore[arg-type, return-value]  # a plain text prompt
    return parts


ANSWER_END = "\n\n"  # where the paper's evaluation ends an answer: the first blank line


def first_answer(text: str) -> str:
    """The answer as the paper's evaluation reads it: the text before the first blank line, stripped."""
    return text.split(ANSWER_END)[0].strip()
