"""Prompts in which compressed contexts stand where text would, turned into a decoder's input rows.

    parts       the prompt language (str, CompressedContext, ContextText, ContextRef, TokenIds) and `normalize`
    documents   `resolve_documents`: texts compressed, stored ids read (every engine, the service, adapters, eval)
    builder     `PromptBuilder`: prompts -> the decoder's input rows, exactly the reference's; `PromptSavings`
    fewshot     the paper's few-shot QA prompt and how its answer is read

Transformers (`Generator`), vLLM in process and vLLM's server (`arccompress.engines`) all read the rows
`PromptBuilder` makes.
"""

from __future__ import annotations

from .builder import Piece, PromptBuilder, PromptSavings, check_head
from .documents import ContextSource, resolve_documents
from .fewshot import ANSWER_END, fewshot_qa_prompt, first_answer
from .parts import (PART_TYPES, ContextRef, ContextText, Document, Part, Prompt, TokenIds, check_parts, normalize,
                    normalize_one)

__all__ = ["ANSWER_END", "PART_TYPES", "ContextRef", "ContextSource", "ContextText", "Document", "Part", "Piece",
           "Prompt", "PromptBuilder", "PromptSavings", "TokenIds", "check_head", "check_parts", "fewshot_qa_prompt",
           "first_answer", "normalize", "normalize_one", "resolve_documents"]
