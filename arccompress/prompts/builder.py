"""Prompts turned into a decoder's input rows: `PromptBuilder`, which every engine uses, and what compression saved.

The decoder gets exactly the reference pipeline's input: BOS once (none when the prompt starts with TokenIds:
those ids are the caller's), then each run of text between contexts tokenized on its own (SentencePiece on
the segment for SentencePiece decoders such as Mistral, dummy prefix included; plain BPE otherwise, e.g.
Llama 3), special-token strings kept as text, and every context's embeddings inserted unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from ..compressor import Compressor
from ..context import CompressedContext, check_finite
from ..errors import InputError, InputTypeError
from ..heads import head_for_decoder
from ..tokenization import TextTokenizer
from .documents import ContextSource, resolve_documents
from .parts import Part, Prompt, TokenIds, normalize_one

Piece = Union[list[int], CompressedContext]  # decoder token ids (text runs, TokenIds, BOS), or a context


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


def check_head(model_type: str | None, compressor: Compressor) -> None:
    """Two-head encoders: the head must be the decoder family's; pick it if the compressor left it open."""
    head = head_for_decoder(model_type, compressor.num_heads, compressor.head)
    if head is not None and head != compressor.head:
        compressor.select_head(head)


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

    # ------------------------------------------------------------------ layout

    def layout(self, prompts: list[list[Part]], *, store: ContextSource | None = None) -> list[list[Piece]]:
        """Each normalised prompt as pieces [BOS + text ids, context, text ids, ...], documents resolved
        (`resolve_documents`); every id checked against the embedding table here, on the host.

        Adjacent ids (BOS, text runs, TokenIds) form one piece; the text runs of all prompts are tokenized in
        one call. Prompts whose documents are already CompressedContexts need no compressor work nor store.
        """
        prompts = resolve_documents(prompts, self.compressor, store, device=self.device)
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
