"""Prompts in which compressed contexts stand where text would, turned into a decoder's input rows.

A prompt is a str, or a list of parts:

    str                  text, tokenized by the decoder's tokenizer
    CompressedContext    a compressed context, inserted unchanged
    ContextText(text)    raw context text, compressed on the fly (all of a call's texts in one batch)
    ContextRef(id)       a context kept in a store, read through the engine's `store=` (one read per call)
    TokenIds(ids)        decoder token ids inserted verbatim (a chat template already tokenized, say)

The decoder gets exactly the reference pipeline's input: BOS once (none when the prompt starts with TokenIds:
those ids are the caller's), then each run of text between contexts tokenized on its own (SentencePiece on
the segment for SentencePiece decoders such as Mistral, dummy prefix included; plain BPE otherwise, e.g.
Llama 3), special-token strings kept as text, and every context's embeddings inserted unchanged.

`normalize` reads what a caller passed, once, at an engine's public entry; below it everything takes lists of
part lists. `PromptBuilder` turns those into rows for every engine: transformers (`Generator`), vLLM in process
and vLLM's server (`arccompress.engines`) all read the rows it makes.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from .compressor import Compressor
from .context import REPR_PATTERN, CompressedContext, check_finite
from .errors import ContextNotFoundError, InputError, InputTypeError
from .heads import head_for_decoder
from .tokenization import TextTokenizer, check_text


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
Piece = Union[list[int], CompressedContext]  # decoder token ids (text runs, TokenIds, BOS), or a context


class ContextSource(Protocol):
    """Where ContextRef parts are read from: a ContextStore, or anything with the same two methods."""

    def __contains__(self, key: object) -> bool: ...

    def get_many(self, keys: Sequence[str], *, device: torch.device | str = ...) -> list[CompressedContext]: ...


@dataclass(frozen=True)
class PromptSavings:
    """What compression saved in one prompt, counted in decoder positions.

    The contexts' text is counted with the decoder's tokenizer when a context carries its text; a context
    without text (read from a store, or made from token ids) is counted by its own token count, the encoder's
    (Llama 3) tokens: exact when the decoder's tokenizer is the encoder's, else an estimate (`estimated`).
    """

    context_text_tokens: int  # decoder tokens the contexts' text would take
    context_embeddings: int  # positions the compressed contexts take
    text_tokens: int  # positions of the prompt's own text and token ids, BOS included
    num_contexts: int
    estimated: bool = False  # context_text_tokens counts encoder tokens for a decoder with another tokenizer

    @property
    def prompt_length(self) -> int:
        return self.text_tokens + self.context_embeddings

    @property
    def full_text_prompt_length(self) -> int:
        return self.text_tokens + self.context_text_tokens

    @property
    def tokens_saved(self) -> int:
        """Decoder positions the compression saved in this prompt."""
        return self.context_text_tokens - self.context_embeddings

    @property
    def context_compression_ratio(self) -> float | None:
        return self.context_text_tokens / self.context_embeddings if self.context_embeddings else None


# ----------------------------------------------------------------------------- reading what callers pass


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


# ----------------------------------------------------------------------------- the paper's QA format

Document = Union[str, CompressedContext, ContextText, ContextRef]


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


def check_head(model_type: str | None, compressor: Compressor) -> None:
    """Two-head encoders: the head must be the decoder family's; pick it if the compressor left it open."""
    head = head_for_decoder(model_type, compressor.num_heads, compressor.head)
    if head is not None and head != compressor.head:
        compressor.select_head(head)


# ----------------------------------------------------------------------------- prompts -> rows


class PromptBuilder:
    """The decoder's input rows for prompts: its tokenizer, its input-embedding table and the compressor.

    `embedding` is the decoder's input-embedding module (transformers) or its weight matrix (vocab, H),
    e.g. read alone from the decoder's safetensors by engines that hold the model elsewhere.

        layouts = builder.layout(prompts, store=store)   # [[ids, ctx, ids, ...], ...]: documents resolved
        rows = builder.embeds(layouts)                    # one (T, H) tensor per prompt
        savings = [builder.savings_of(p) for p in layouts]
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
        self._decoder_tokens = functools.lru_cache(maxsize=8192)(lambda text: len(self.text.encode(text)))

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

    @functools.cached_property
    def shares_encoder_tokenizer(self) -> bool:
        """Whether the decoder tokenizes text as the encoder does (Llama 3 decoders): a context's own token count
        is then exactly what its text would take in the decoder."""
        own, encoder = self.text, self.compressor.text_tokenizer
        return own.kind == encoder.kind == "bpe" and own.tokenizer.get_vocab() == encoder.tokenizer.get_vocab()

    # ------------------------------------------------------------------ documents

    def check_context(self, ctx: CompressedContext, where: str) -> None:
        """A context this decoder can read: its width, head and encoder (finiteness: `check_finite_contexts`)."""
        comp = self.compressor
        if ctx.hidden_size != self.hidden_size:
            raise InputError(f"{where}: context hidden size {ctx.hidden_size} != decoder's {self.hidden_size}")
        if ctx.head != comp.head:
            raise InputError(f"{where}: context was made by encoder head {ctx.head}, this decoder reads head {comp.head}")
        if ctx.encoder_fingerprint and ctx.encoder_fingerprint != comp.fingerprint:
            raise InputError(f"{where}: context was made by another encoder ({ctx.encoder!r}, weights "
                             f"{ctx.encoder_fingerprint}) than this one ({comp.fingerprint})")

    @staticmethod
    def check_finite_contexts(contexts: Sequence[tuple[CompressedContext, str]]) -> None:
        """InputError naming the first context holding NaN or infinity: one host wait per device, not per context."""
        by_device: dict[torch.device, list[tuple[CompressedContext, str]]] = {}
        for ctx, where in contexts:
            by_device.setdefault(ctx.embeddings.device, []).append((ctx, where))
        for group in by_device.values():
            flags = torch.stack([torch.isfinite(ctx.embeddings).all() for ctx, _ in group])
            if not bool(flags.all()):
                for ok, (ctx, where) in zip(flags.tolist(), group):
                    if not ok:
                        check_finite(ctx.embeddings, f"{where}: context embeddings")

    def documents(self, prompts: list[list[Part]], store: ContextSource | None = None) -> list[list[Part]]:
        """The prompts with every ContextText compressed (one batched call per chunk size) and every ContextRef
        read from `store` (one `get_many` for all of them), as CompressedContexts; other parts unchanged."""
        out = [list(parts) for parts in prompts]
        texts: dict[int | None, list[tuple[int, int, ContextText]]] = {}
        refs: list[tuple[int, int, ContextRef]] = []
        for i, parts in enumerate(out):
            for j, part in enumerate(parts):
                if isinstance(part, ContextText):
                    texts.setdefault(part.chunk_size, []).append((i, j, part))
                elif isinstance(part, ContextRef):
                    refs.append((i, j, part))
        for chunk, places in texts.items():
            for (i, j, _), ctx in zip(places, self.compressor.compress([p.text for _, _, p in places], chunk_size=chunk)):
                out[i][j] = ctx
        if not refs:
            return out
        if store is None:
            i, j, ref = refs[0]
            raise InputError(f"prompt {i}, part {j}: {ref} names a stored context, and this engine has no store: "
                             "pass store= when creating it")
        ids = list(dict.fromkeys(ref.id for _, _, ref in refs))
        missing = [key for key in ids if key not in store]
        if missing:
            i, j, _ = next(place for place in refs if place[2].id == missing[0])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ContextNotFoundError(f"prompt {i}, part {j}: the store {getattr(store, 'path', store)} holds no "
                                       f"context {', '.join(map(repr, missing[:5]))}{more}")
        by_id = dict(zip(ids, store.get_many(ids, device=self.device)))
        for i, j, ref in refs:
            out[i][j] = by_id[ref.id]
        return out

    # ------------------------------------------------------------------ layout

    def layout(self, prompts: list[list[Part]], *, store: ContextSource | None = None) -> list[list[Piece]]:
        """Each normalised prompt as pieces [BOS + text ids, context, text ids, ...], documents resolved
        (`documents`); every id checked against the embedding table here, on the host.

        Adjacent ids (BOS, text runs, TokenIds) form one piece; the text runs of all prompts are tokenized in
        one call. Prompts whose documents are already CompressedContexts need no compressor work nor store.
        """
        prompts = self.documents(prompts, store)
        vocab, bos = self.vocab_size, self.text.bos_id
        runs: list[str] = []
        run_places: list[tuple[int, int]] = []
        plans: list[list[Any]] = []  # per prompt: id lists, contexts, and ints (an index into `runs`)
        contexts: dict[int, tuple[CompressedContext, str]] = {}
        for i, parts in enumerate(prompts):
            plan: list[Any] = []
            if bos is not None and not (parts and isinstance(parts[0], TokenIds)):
                plan.append([bos])
            run, start = "", 0
            for j, part in enumerate(parts + [None]):  # a sentinel closes the last text run
                if isinstance(part, str):
                    if not run:
                        start = j
                    run += part
                    continue
                if run:
                    plan.append(len(runs))
                    runs.append(run)
                    run_places.append((i, start))
                    run = ""
                if isinstance(part, TokenIds):
                    bad = next((t for t in part.ids if t >= vocab), None)
                    if bad is not None:
                        raise InputError(f"prompt {i}, part {j}: token id {bad} is outside the decoder's embedding "
                                         f"table ({vocab} rows)")
                    plan.append(list(part.ids))
                elif isinstance(part, CompressedContext):
                    where = f"prompt {i}, part {j}"
                    self.check_context(part, where)
                    contexts.setdefault(id(part), (part, where))
                    plan.append(part)
            plans.append(plan)
        self.check_finite_contexts(list(contexts.values()))
        encoded = self.text.encode_batch(runs) if runs else []
        for ids, (i, j) in zip(encoded, run_places):
            if ids and max(ids) >= vocab:
                raise InputError(f"prompt {i}, part {j}: the tokenizer gave token id {max(ids)}, outside the decoder's "
                                 f"embedding table ({vocab} rows): is it this decoder's tokenizer?")
        layouts = []
        for i, plan in enumerate(plans):
            pieces: list[Piece] = []
            for item in plan:
                ids = encoded[item] if isinstance(item, int) else item
                if isinstance(ids, CompressedContext):
                    pieces.append(ids)
                elif pieces and isinstance(pieces[-1], list):
                    pieces[-1] = pieces[-1] + ids
                elif ids:
                    pieces.append(list(ids))
            if not pieces:
                raise InputError(f"prompt {i} is empty: no text, no context and no BOS token")
            layouts.append(pieces)
        return layouts

    def segment_ids(self, prompt: Prompt) -> list[list[int]]:
        """Decoder token ids of each text run of one prompt (BOS on the first), as fed to the decoder."""
        out: list[list[int]] = []
        expect_text = True
        for piece in self.layout([normalize_one(prompt, "segment_ids")])[0]:
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

    # ------------------------------------------------------------------ outputs

    def embeds(self, layouts: list[list[Piece]]) -> list[torch.Tensor]:
        """One (T, H) tensor per laid-out prompt, on the embedding's device and dtype: the ids of every prompt
        go to the device in one copy and through one embedding lookup."""
        flat = [t for pieces in layouts for piece in pieces if isinstance(piece, list) for t in piece]
        rows = []
        with torch.inference_mode():
            table = self._embed(torch.tensor(flat, dtype=torch.long).to(self.device)).to(self.dtype) if flat else None
            at = 0
            for pieces in layouts:
                parts = []
                for piece in pieces:
                    if isinstance(piece, list):
                        parts.append(table[at: at + len(piece)])  # type: ignore[index]
                        at += len(piece)
                    else:
                        parts.append(piece.embeddings.to(device=self.device, dtype=self.dtype))
                rows.append(torch.cat(parts))  # a copy: a row never aliases a context
        return rows

    def savings_of(self, pieces: list[Piece]) -> PromptSavings:
        """What compression saved in one laid-out prompt (see PromptSavings for how text is counted)."""
        contexts = [p for p in pieces if isinstance(p, CompressedContext)]
        exact_counts = self.shares_encoder_tokenizer
        full = sum(c.num_tokens if exact_counts or c.text is None else self._decoder_tokens(c.text) for c in contexts)
        return PromptSavings(
            context_text_tokens=full,
            context_embeddings=sum(c.num_embeddings for c in contexts),
            text_tokens=sum(len(p) for p in pieces if isinstance(p, list)),
            num_contexts=len(contexts),
            estimated=not exact_counts and any(c.text is None for c in contexts),
        )
