"""Prompts in which compressed contexts stand where text would, turned into a decoder's input rows.

A prompt is a str, or a list of parts: str, `CompressedContext`, or `ContextText` (raw context text that the
compressor compresses on the fly). The decoder gets exactly the reference pipeline's input: BOS once, then
each run of text between contexts tokenized on its own (SentencePiece on the segment for SentencePiece
decoders such as Mistral, dummy prefix included; plain BPE otherwise, e.g. Llama 3), special-token strings
kept as text, and every context's embeddings inserted unchanged between the segments.

`PromptBuilder` does this once for every engine: transformers (`Generator`), vLLM in process and vLLM's
server (`arccompress.vllm`) all read the rows it makes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from .compressor import Compressor
from .context import REPR_PATTERN, CompressedContext, check_finite
from .errors import InputError, InputTypeError
from .heads import head_for_decoder
from .tokenization import TextTokenizer, check_text


@dataclass(frozen=True)
class ContextText:
    """Raw context text inside a prompt, compressed on the fly by the compressor."""

    text: str
    chunk_size: int | None = None


Part = Union[str, CompressedContext, ContextText]
Prompt = Union[str, Sequence[Part]]
Piece = Union[list[int], CompressedContext]  # a text run's token ids, or a context


@dataclass(frozen=True)
class PromptSavings:
    """What compression saved in one prompt, counted in decoder positions."""

    context_text_tokens: int | None  # decoder tokens the contexts' text would take (None: a context has no text)
    context_embeddings: int  # positions the compressed contexts take
    text_tokens: int  # positions of the prompt's own text, BOS included
    num_contexts: int

    @property
    def prompt_length(self) -> int:
        return self.text_tokens + self.context_embeddings

    @property
    def full_text_prompt_length(self) -> int | None:
        return None if self.context_text_tokens is None else self.text_tokens + self.context_text_tokens

    @property
    def tokens_saved(self) -> int | None:
        """Decoder positions the compression saved in this prompt."""
        return None if self.context_text_tokens is None else self.context_text_tokens - self.context_embeddings

    @property
    def context_compression_ratio(self) -> float | None:
        if self.context_text_tokens is None or not self.context_embeddings:
            return None
        return self.context_text_tokens / self.context_embeddings


def fewshot_qa_prompt(
    question: str,
    documents: str | CompressedContext | Sequence[str | CompressedContext],
    examples: Sequence[tuple[Any, str, str]] = (),
    *,
    mode: str = "compressed",
) -> list[Part] | str:
    """The paper's few-shot QA prompt: its compressed, open-book and closed-book forms.

    Each example is (documents, question, answer). mode="compressed" (default): every document is compressed
    (a str becomes a ContextText) and an example reads `Document: <ctx>\nQuestion: {q}\nAnswer: {a}\n\n`;
    several documents for one question are compressed separately and placed back to back after one
    "Document: ", as the reference evaluation does; the prompt ends `Document: <ctx>\nQuestion: {question}
    \nAnswer:`. mode="text" (open book): the same with the documents' text, joined by newlines; mode="closed":
    no documents, `Question: {q}\nAnswer: {a}\n\n`. Texts and questions are stripped, as there. The text and
    closed forms are returned as one str.
    """
    if mode not in ("compressed", "text", "closed"):
        raise InputError(f"mode must be 'compressed', 'text' or 'closed', not {mode!r}")
    parts: list[Part] = []

    def add_documents(docs: Any, where: str) -> None:
        docs = [docs] if isinstance(docs, (str, CompressedContext, ContextText)) else docs
        if not isinstance(docs, Sequence) or not docs:
            raise InputError(f"{where}: every question needs at least one document (a str, a CompressedContext "
                             "or a list of them)")
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
            elif isinstance(d, (CompressedContext, ContextText)):
                parts.append(d)
            else:
                raise InputTypeError(f"{where}, document {k}: expected a str or a CompressedContext, not {type(d).__name__}")

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


def first_answer(text: str) -> str:
    """The answer as the paper's evaluation reads it: the text before the first blank line, stripped."""
    return text.split("\n\n")[0].strip()


def as_batch(prompts: Prompt | Sequence[Prompt]) -> tuple[list[Prompt], bool]:
    """(list of prompts, whether a single prompt was given).

    A str, or a list holding anything but strs and lists (a context, or a wrong type to report by
    position), is one prompt; a list of strs or of part lists is a batch.
    """
    if isinstance(prompts, (str, CompressedContext, ContextText)):
        return [prompts], True
    if not isinstance(prompts, Sequence):
        raise InputTypeError(f"prompts must be a str, a list of parts or a list of prompts, not {type(prompts).__name__}")
    if all(isinstance(p, str) or (isinstance(p, Sequence) and not isinstance(p, str)) for p in prompts):
        return list(prompts), False
    return [prompts], True


def check_head(model_type: str | None, compressor: Compressor) -> None:
    """Two-head encoders: the head must be the decoder family's; pick it if the compressor left it open."""
    head = head_for_decoder(model_type, compressor.num_heads, compressor.head)
    if head is not None and head != compressor.head:
        compressor.select_head(head)


class PromptBuilder:
    """The decoder's input rows for prompts: its tokenizer, its input-embedding table and the compressor.

    `embedding` is the decoder's input-embedding module (transformers) or its weight matrix (vocab, H),
    e.g. read alone from the decoder's safetensors by engines that hold the model elsewhere.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        compressor: Compressor,
        embedding: torch.nn.Module | torch.Tensor,
        *,
        sentencepiece_model: str | Path | None = None,
    ):
        if not isinstance(compressor, Compressor):
            raise InputTypeError(f"compressor must be a Compressor, not {type(compressor).__name__}")
        weight = embedding if isinstance(embedding, torch.Tensor) else embedding.weight
        if weight.dim() != 2:
            raise InputError(f"the decoder's input embeddings must be a (vocab, hidden) matrix, not {list(weight.shape)}")
        if weight.shape[1] != compressor.decoder_hidden_size:
            raise InputError(
                f"decoder hidden size {weight.shape[1]} does not match the encoder head's output size "
                f"{compressor.decoder_hidden_size}: this encoder was not trained for this decoder"
            )
        self.compressor = compressor
        self.text = TextTokenizer(tokenizer, sentencepiece_model)
        self.weight = weight
        self._embed: Callable[[torch.Tensor], torch.Tensor] = (
            (lambda ids: F.embedding(ids, weight)) if isinstance(embedding, torch.Tensor) else embedding)

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    # ------------------------------------------------------------------ parsing

    def parse(self, prompt: Prompt, index: int | None) -> list[Part]:
        where = "prompt" if index is None else f"prompt {index}"
        if isinstance(prompt, (str, CompressedContext, ContextText)):
            prompt = [prompt]
        if not isinstance(prompt, Sequence):
            raise InputTypeError(f"{where} must be a str or a list of parts, not {type(prompt).__name__}")
        for j, part in enumerate(prompt):
            text = part if isinstance(part, str) else part.text if isinstance(part, ContextText) else None
            if text is not None:
                check_text(text, f"{where}, part {j}")
                if REPR_PATTERN.search(text):
                    raise InputError(
                        f"{where}, part {j}: the text holds a CompressedContext's repr, not the context: put the "
                        "context in the list as its own part, e.g. [\"Document: \", ctx, \"\\nQuestion: ...\"]"
                    )
            elif not isinstance(part, CompressedContext):
                raise InputTypeError(
                    f"{where}, part {j}: expected str, CompressedContext or ContextText, not {type(part).__name__}"
                )
        return list(prompt)

    def check_context(self, ctx: CompressedContext, where: str) -> None:
        comp = self.compressor
        if ctx.hidden_size != self.hidden_size:
            raise InputError(f"{where}: context hidden size {ctx.hidden_size} != decoder's {self.hidden_size}")
        if ctx.head != comp.head:
            raise InputError(f"{where}: context was made by encoder head {ctx.head}, this decoder reads head {comp.head}")
        if ctx.encoder_fingerprint and ctx.encoder_fingerprint != comp.fingerprint:
            raise InputError(f"{where}: context was made by another encoder ({ctx.encoder!r}, weights "
                             f"{ctx.encoder_fingerprint}) than this one ({comp.fingerprint})")
        check_finite(ctx.embeddings, f"{where}: context embeddings")

    def layout(self, prompts: Sequence[Prompt]) -> list[list[Piece]]:
        """Each prompt as [BOS + text ids, context, text ids, context, ...] with contexts compressed.

        Raw context texts of all prompts are compressed together, one batched call per chunk size.
        """
        parsed = [self.parse(p, i if len(prompts) > 1 else None) for i, p in enumerate(prompts)]
        pending: dict[int | None, list[tuple[int, int]]] = {}
        for i, parts in enumerate(parsed):
            for j, part in enumerate(parts):
                if isinstance(part, ContextText):
                    pending.setdefault(part.chunk_size, []).append((i, j))
        for chunk, places in pending.items():
            texts = [parsed[i][j].text for i, j in places]  # type: ignore[union-attr]
            for (i, j), ctx in zip(places, self.compressor.compress(texts, chunk_size=chunk)):
                parsed[i][j] = ctx
        layouts = []
        for i, parts in enumerate(parsed):
            pieces: list[Piece] = []
            run, first = "", True
            for j, part in enumerate(parts + [None]):  # a sentinel closes the last text run
                if isinstance(part, str):
                    run += part
                    continue
                if run or first:
                    ids = self.text.encode(run)
                    if first and self.text.bos_id is not None:
                        ids = [self.text.bos_id] + ids
                    if ids:
                        pieces.append(ids)
                run, first = "", False
                if isinstance(part, CompressedContext):
                    self.check_context(part, f"prompt {i}, part {j}")
                    pieces.append(part)
            layouts.append(pieces)
        return layouts

    # ------------------------------------------------------------------ outputs

    def segment_ids(self, prompt: Prompt) -> list[list[int]]:
        """Decoder token ids of each text run of a prompt (BOS on the first), as fed to the decoder."""
        out: list[list[int]] = []
        expect_text = True
        for piece in self.layout([prompt])[0]:
            if isinstance(piece, list):
                out.append(piece)
                expect_text = False
            else:
                if expect_text:
                    out.append([])
                expect_text = True
        if expect_text:
            out.append([])
        return out

    def embeds(self, layouts: list[list[Piece]]) -> list[torch.Tensor]:
        """One (T, H) tensor per laid-out prompt, on the embedding's device and dtype."""
        rows = []
        with torch.inference_mode():
            for i, pieces in enumerate(layouts):
                parts = []
                for piece in pieces:
                    if isinstance(piece, list):
                        ids = torch.tensor(piece, device=self.device)
                        if int(ids.max()) >= self.vocab_size:
                            raise InputError(f"prompt {i}: token id {int(ids.max())} is outside the decoder's "
                                             f"embedding table ({self.vocab_size})")
                        parts.append(self._embed(ids).to(self.dtype))
                    else:
                        parts.append(piece.embeddings.to(device=self.device, dtype=self.dtype))
                if not parts:
                    raise InputError(f"prompt {i} is empty: no text, no context and no BOS token")
                rows.append(torch.cat(parts))
        return rows

    def prompt_embeds(self, prompts: Prompt | Sequence[Prompt]) -> list[torch.Tensor]:
        """One unpadded (T, H) tensor per prompt: BOS, text segments and contexts, as the decoder reads them."""
        batch, _ = as_batch(prompts)
        return self.embeds(self.layout(batch)) if batch else []

    def savings(self, prompt: Prompt) -> PromptSavings:
        """Decoder positions the prompt takes with its contexts compressed, and what their text would take."""
        return self.savings_of(self.layout([prompt])[0])

    def savings_of(self, pieces: list[Piece]) -> PromptSavings:
        contexts = [p for p in pieces if isinstance(p, CompressedContext)]
        text_ids = sum(len(p) for p in pieces if isinstance(p, list))
        if all(c.text is not None for c in contexts):
            full = sum(len(ids) for ids in self.text.encode_batch([c.text for c in contexts]))  # type: ignore[misc]
        else:
            full = None
        return PromptSavings(full, sum(c.num_embeddings for c in contexts), text_ids, len(contexts))


class CompressedPromptEngine:
    """What every engine that reads compressed prompts offers besides its own `generate`: the rows it reads,
    what compression saved, and the paper's QA format. Subclasses set `self.prompts` (a PromptBuilder)."""

    prompts: PromptBuilder

    def generate(self, prompt_or_prompts: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def prompt_embeds(self, prompts: Prompt | Sequence[Prompt]) -> list[torch.Tensor]:
        """One unpadded (T, H) tensor per prompt — BOS, text segments, contexts — exactly the rows the decoder
        reads (`Generator.prepare_inputs` left-pads them): what any engine accepting prompt embeddings takes."""
        return self.prompts.prompt_embeds(prompts)

    def savings(self, prompt: Prompt) -> PromptSavings:
        """Decoder positions the prompt takes with its contexts compressed, and what their text would take."""
        return self.prompts.savings(prompt)

    def answer(
        self,
        question: str,
        documents: str | CompressedContext | Sequence[str | CompressedContext],
        *,
        examples: Sequence[tuple[Any, str, str]] = (),
        **generate_kwargs: Any,
    ) -> str:
        """Answer a question from compressed documents in the paper's few-shot format; the first answer only
        (max_new_tokens defaults to 64)."""
        generate_kwargs.setdefault("max_new_tokens", 64)
        return first_answer(self.generate(fewshot_qa_prompt(question, documents, examples), **generate_kwargs))
