"""The one protocol every engine implements: sampling settings, completions, and the public API written once.

    engine.generate(prompt_or_prompts, **kwargs)   # str -> str, list -> list (n > 1: a list of n per prompt)
    engine.generate_ids(...), engine.stream(prompt), engine.answer(question, documents, examples=...)
    engine.savings(prompt), engine.prompt_embeds(prompts)
    engine.complete(prompts, sampling, time_prefill=True)   # Completions: texts, ids, positions, prefill time

An engine implements `complete` (normalised prompts -> one `Completion` each, in order), `stream_completion`
and `describe`; `Engine` reads what callers pass once, at its entry (`prompts.normalize`, `engine.sampling`),
as vLLM's `LLM.generate` does, and below that everything takes lists. `Sampling` holds the settings every
engine understands, with OpenAI's meanings; `extra` carries an engine's own options through untouched.

`LocalEngine` is the base of the engines that build the decoder's input rows in this process (`Generator`,
`VLLMGenerator`, `VLLMClient`): a PromptBuilder, a Compressor and optionally a store for ContextRef parts.
An engine that leaves prompts to a server (a service's client) derives from `Engine` itself. How tokens become
text (stops, EOS, a character cut short) is `arccompress.engines.text`, shared by all of them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..compressor import Compressor
from ..errors import EngineError, InputError, InputTypeError
from ..prompts import (ContextSource, Document, Part, Piece, Prompt, PromptBuilder, PromptSavings, fewshot_qa_prompt,
                      first_answer, normalize, normalize_one)
from .text import Delta

DEFAULT_MAX_NEW_TOKENS = 128
ANSWER_MAX_NEW_TOKENS = 64
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "stop", "seed", "n")


@dataclass(frozen=True)
class Sampling:
    """How to generate, in the terms every engine understands (OpenAI's meanings).

    temperature 0 is greedy, > 0 samples; `stop` strings end a sequence and the returned text stops before
    them; `seed` makes sampling reproducible; `n` sequences per prompt. `extra` holds an engine's own options,
    passed through untouched: transformers `generate` arguments, vLLM `SamplingParams` fields, request fields
    for a server.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive int, not {value!r}")

        positive_int("max_new_tokens", self.max_new_tokens)
        positive_int("n", self.n)
        for name, value in (("temperature", self.temperature), ("top_p", self.top_p)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a number, not {value!r}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0: greedy), not {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], not {self.top_p!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Iterable) or not all(isinstance(s, str) and s for s in stop):
            raise InputError(f"stop must be a str or a list of non-empty str, not {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InputError(f"seed must be an int or None, not {self.seed!r}")
        if not isinstance(self.extra, Mapping):
            raise InputTypeError(f"extra must be a mapping of engine options, not {type(self.extra).__name__}")
        object.__setattr__(self, "extra", dict(self.extra))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Sampling:
        """Sampling from keyword arguments: the fields above (`max_tokens` is accepted for max_new_tokens, and
        None for any of them means its default); every other key goes to `extra`."""
        if "max_tokens" in kwargs:
            if kwargs.get("max_new_tokens") is not None:
                raise InputError("give max_new_tokens or max_tokens, not both")
            kwargs["max_new_tokens"] = kwargs.pop("max_tokens")
        given = {k: kwargs.pop(k) for k in SAMPLING_FIELDS if k in kwargs}
        return cls(**{k: v for k, v in given.items() if v is not None}, extra=kwargs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One prompt's result: `n` sequences, and what the prompt cost.

    texts: each sequence's text, before the first stop string, without a character cut short at its end.
    token_ids: the generated ids of each sequence, EOS dropped (with a stop string: up to the token that
    completed it). finish_reasons: "stop" (EOS or a stop string) or "length". prompt_positions: decoder
    positions of the prompt; positions_saved: positions its compressed contexts saved (None if unknown).
    prefill_seconds: from the prompt's rows reaching the engine to its first generated token (for prompts
    prefilled together, their common prefill), when asked for (`time_prefill=True`) and measurable.
    """

    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    prompt_positions: int | None = None
    positions_saved: int | None = None
    prefill_seconds: float | None = None


class Engine(ABC):
    """What every engine offers; subclasses implement `complete`, `stream_completion` and `describe`.

    The public methods read their input once (`normalize`, `self.sampling`) and pass lists of normalised
    prompts down; nothing below them normalises again.
    """

    # ------------------------------------------------------------------ what an engine implements

    @abstractmethod
    def complete(self, prompts: list[list[Part]], sampling: Sampling, *, time_prefill: bool = False) -> list[Completion]:
        """One Completion per normalised prompt, in order."""

    @abstractmethod
    def stream_completion(self, prompt: list[Part], sampling: Sampling) -> Iterator[str]:
        """The text of one normalised prompt's single sequence, piece by piece as it is produced."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What determines this engine's outputs, JSON-serialisable (an evaluation run's key): backend, decoder
        and its fingerprint, quantization, dtype, encoder and its fingerprint, head."""

    def sampling(self, **kwargs: Any) -> Sampling:
        """This engine's reading of generation keywords (engines map their own aliases here)."""
        return Sampling.from_kwargs(**kwargs)

    def prompt_rows(self, prompts: list[list[Part]]) -> list[torch.Tensor]:
        """The decoder's input rows of normalised prompts: engines that build them locally."""
        raise EngineError(f"{type(self).__name__} does not build the decoder's input rows in this process")

    def prompt_savings(self, prompts: list[list[Part]]) -> list[PromptSavings]:
        """What compression saved in each normalised prompt: engines that lay prompts out locally."""
        raise EngineError(f"{type(self).__name__} does not lay out prompts in this process")

    # ------------------------------------------------------------------ the public API, written once

    def generate(self, prompt_or_prompts: Prompt | Sequence[Prompt], **kwargs: Any) -> str | list[str] | list[list[str]]:
        """Generated text: a str for one prompt, a list for a list of prompts; with n > 1, a list of n texts
        in place of each str.

        A prompt is a str or a list of parts (str, CompressedContext, ContextText, ContextRef, TokenIds); a
        list of strs or of part lists is a batch. Keywords: max_new_tokens (default 128), temperature (default
        0: greedy), top_p, stop, seed, n, and the engine's own options.
        """
        prompts, single = normalize(prompt_or_prompts)
        sampling = self.sampling(**kwargs)
        done = self.complete(prompts, sampling) if prompts else []
        texts = [c.texts if sampling.n > 1 else c.texts[0] for c in done]
        return texts[0] if single else texts

    def generate_ids(self, prompt_or_prompts: Prompt | Sequence[Prompt], **kwargs: Any) -> list[list[int]]:
        """Generated token ids per prompt, EOS dropped; with n > 1 the n sequences of each prompt follow one another."""
        prompts, _ = normalize(prompt_or_prompts)
        sampling = self.sampling(**kwargs)
        return [ids for c in (self.complete(prompts, sampling) if prompts else []) for ids in c.token_ids]

    def stream(self, prompt: Prompt, **kwargs: Any) -> Iterator[str]:
        """The generated text of one prompt, piece by piece as it is produced."""
        parts = normalize_one(prompt, "stream")
        sampling = self.sampling(**kwargs)
        if sampling.n != 1:
            raise InputError(f"stream gives one sequence: n must be 1, not {sampling.n}")
        return self.stream_completion(parts, sampling)

    def answer(
        self,
        question: str,
        documents: Document | Sequence[Document],
        *,
        examples: Sequence[tuple[Any, str, str]] = (),
        **kwargs: Any,
    ) -> str:
        """Answer a question from compressed documents in the paper's few-shot format; the first answer only
        (max_new_tokens defaults to 64)."""
        kwargs.setdefault("max_new_tokens", ANSWER_MAX_NEW_TOKENS)
        sampling = self.sampling(**kwargs)
        if sampling.n != 1:
            raise InputError(f"answer gives one answer: n must be 1, not {sampling.n}")
        prompt = normalize_one(fewshot_qa_prompt(question, documents, examples), "answer")
        return first_answer(self.complete([prompt], sampling)[0].texts[0])

    def savings(self, prompt: Prompt) -> PromptSavings:
        """Decoder positions the prompt takes with its contexts compressed, and what their text would take."""
        return self.prompt_savings([normalize_one(prompt, "savings")])[0]

    def prompt_embeds(self, prompt_or_prompts: Prompt | Sequence[Prompt]) -> list[torch.Tensor]:
        """One unpadded (T, H) tensor per prompt — BOS, text segments, contexts — exactly the rows the decoder
        reads: what any engine accepting prompt embeddings takes."""
        prompts, _ = normalize(prompt_or_prompts)
        return self.prompt_rows(prompts) if prompts else []


class LocalDecoder(ABC):
    """What an engine holding a decoder's tokenizer and input embeddings in this process has: `prompts` (a
    PromptBuilder, with the compressor), a `backend` name, and `describe`, written here once from `decoder_card`."""

    backend: str  # how `describe` names the engine: "transformers", "vllm", "vllm-server"
    prompts: PromptBuilder

    @abstractmethod
    def decoder_card(self) -> DecoderCard:
        """The decoder this engine runs, as `describe` reports it."""

    @functools.cached_property
    def decoder_fingerprint(self) -> str:
        """The decoder's fingerprint (its settings and input-embedding matrix): hashed once."""
        return decoder_fingerprint(self.decoder_card().config, self.prompts.weight)

    def describe(self) -> dict[str, Any]:
        """What determines this engine's outputs, JSON-serialisable: backend, decoder and its fingerprint,
        quantization, dtype, encoder and its fingerprint, head."""
        card, comp = self.decoder_card(), self.prompts.compressor
        return {"backend": self.backend, **card.where, "decoder": card.name,
                "decoder_fingerprint": self.decoder_fingerprint, "quantization": card.quantization,
                "dtype": None if card.dtype is None else str(card.dtype).removeprefix("torch."), "encoder": comp.name,
                "encoder_fingerprint": comp.fingerprint, "head": comp.head}


class LocalEngine(LocalDecoder, Engine):
    """An engine that builds the decoder's input rows in this process.

    Subclasses set `prompts` (a PromptBuilder: the decoder's tokenizer and input-embedding table, and the
    compressor), `compressor` and `store` (where ContextRef parts are read; None: they are refused), and say what
    they run on through `decoder_card`.
    """

    compressor: Compressor
    store: ContextSource | None

    def build(self, prompts: list[list[Part]]) -> tuple[list[torch.Tensor], list[PromptSavings]]:
        """The rows and savings of normalised prompts, from one layout."""
        layouts = self.prompts.layout(prompts, store=self.store)
        return self.prompts.embeds(layouts), [self.prompts.savings_of(p) for p in layouts]

    def layouts(self, prompts: list[list[Part]]) -> list[list[Piece]]:
        return self.prompts.layout(prompts, store=self.store)

    def prompt_rows(self, prompts: list[list[Part]]) -> list[torch.Tensor]:
        return self.prompts.embeds(self.layouts(prompts))

    def prompt_savings(self, prompts: list[list[Part]]) -> list[PromptSavings]:
        return [self.prompts.savings_of(p) for p in self.layouts(prompts)]


@dataclass
class Observer:
    """What an async engine reports as it works, for whoever counts (the service's metrics): tokens as they are
    generated, and, at a request's end, its prompt positions read from the engine's prefix cache and looked up; an
    engine over several servers, which server each request went to and how it was chosen (`routed`), and each
    failure of a server (`failed`)."""

    tokens: Callable[[int], None] = lambda n: None
    prefix_cache: Callable[[int, int], None] = lambda hits, queried: None
    routed: Callable[[str, str], None] = lambda server, decision: None
    failed: Callable[[str], None] = lambda server: None


class AsyncEngine(LocalDecoder):
    """An engine's async face, for a service: one prompt's decoder rows in (laid out by `prompts`), its sequences'
    `Delta`s out as they are produced, many requests at once. Stopping the iteration (a client gone, a deadline)
    cancels the request on the engine within a step."""

    max_model_len: int
    penalties: bool  # whether it applies OpenAI's presence and frequency penalties (given in `Sampling.extra`)

    @abstractmethod
    def generate(self, rows: torch.Tensor, sampling: Sampling, request_id: str) -> AsyncIterator[list[Delta]]:
        """Deltas of the request's sequences as they are produced, until every sequence finished."""

    @property
    @abstractmethod
    def waiting(self) -> int:
        """Sequences waiting for, or in, generation."""

    async def close(self) -> None:
        """Stop the engine (the requests in flight are done first by the caller)."""


@dataclass(frozen=True)
class DecoderCard:
    """What a local engine's `describe` says of its decoder: its name, the config its fingerprint hashes, its
    quantization and dtype as run (None where a server decides), and where it runs (a server's URL, say)."""

    name: str
    config: Mapping[str, Any]
    quantization: str | None
    dtype: torch.dtype | None
    where: Mapping[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- rules every engine shares


def check_prompt_lengths(rows: Sequence[torch.Tensor], max_new_tokens: int, max_model_len: int | None, what: str) -> None:
    """InputError naming the first prompt whose positions and new tokens do not fit the engine's context."""
    for i, row in enumerate(rows):
        if max_model_len is not None and row.shape[0] + max_new_tokens > max_model_len:
            raise InputError(f"prompt {i}: {row.shape[0]} positions + {max_new_tokens} new tokens exceed the "
                             f"{what}'s max_model_len {max_model_len}")


DECODER_CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps",
                       "sliding_window", "tie_word_embeddings")


def decoder_fingerprint(config: Mapping[str, Any], embedding: torch.Tensor) -> str:
    """A decoder's fingerprint: its architecture's settings and its input-embedding matrix (values and dtype),
    the same for an engine holding the model and one that read the matrix alone."""
    h = hashlib.sha256(json.dumps({k: config.get(k) for k in DECODER_CONFIG_KEYS}, sort_keys=True, default=str).encode())
    weight = embedding.detach()
    h.update(f"{weight.dtype}|{list(weight.shape)}|".encode())
    for block in weight.split(4096):  # bounded host memory for a large vocabulary
        h.update(block.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
