"""VLLMClient: prompts in which compressed contexts stand where text would, sent to a running vLLM server.

The client builds each prompt's rows here (`PromptBuilder`: the decoder's tokenizer and its input-embedding
matrix, read alone from the decoder's safetensors; never its other weights) and sends them as vLLM's
`prompt_embeds`. Every exchange goes through `arccompress.engines.remote.http`: `timeout` is a deadline for the whole request
(for a stream: for each gap and overall), answers are capped in size, and anything the server says that is
not what vLLM's OpenAI-compatible API promises is a `VLLMServerError` naming the URL and the problem.

vLLM's own warning applies: accept prompt embeddings only from trusted clients (the server `torch.load`s
them). This client checks what it sends: hidden size, finite values, and length against the server's
`max_model_len`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ...compressor import Compressor
from ...context import check_finite
from ...errors import InputError, InputTypeError
from ...prompts import ContextSource, Part, PromptBuilder, check_head
from ..base import Completion, DecoderCard, LocalEngine, Sampling, check_prompt_lengths
from ..decoder_files import decoder_files
from ..text import cut_at_eos
from . import replies
from .http import DEFAULT_MAX_BODY_BYTES, Wire, WireError, authorization


class VLLMServerError(WireError):
    """The vLLM server could not be reached, refused a request, or answered something unusable."""


def encode_prompt_embeds(tensor: torch.Tensor) -> str:
    """vLLM's wire format for one prompt's embeddings: base64 of `torch.save` of a (T, H) tensor."""
    buffer = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def check_shape(embeds: torch.Tensor, hidden_size: int, where: str) -> None:
    """InputError unless `embeds` is one prompt's (positions, hidden_size) embeddings, with at least one position."""
    if embeds.dim() != 2 or embeds.shape[1] != hidden_size or embeds.shape[0] == 0:
        raise InputError(f"{where}: prompt embeddings must be (positions, {hidden_size}), not {list(embeds.shape)}")


class VLLMClient(LocalEngine):
    """Generate from a running `vllm serve <decoder> --enable-prompt-embeds` with compressed prompts.

    >>> client = VLLMClient("http://localhost:8000/v1", compressor=comp, decoder="mistralai/Mistral-7B-v0.3")
    >>> client.generate(["Document: ", ctx, "\\nQuestion: Who?\\nAnswer:"], max_new_tokens=20)

    `decoder` is the served model's folder or hub id: its tokenizer and input-embedding matrix are read from it,
    nothing else. `model` is the name the server serves it under (default: its only model). Prompts of one call
    are sent concurrently (at most `max_concurrency` at a time); the server batches them. Keywords other than
    the common ones go into the request (vLLM's extra sampling fields, e.g. top_k).
    """

    backend = "vllm-server"

    def __init__(
        self,
        base_url: str,
        *,
        compressor: Compressor,
        decoder: str | Path,
        model: str | None = None,
        store: ContextSource | None = None,
        api_key: str | None = None,
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        max_concurrency: int = 32,
        timeout: float = 600.0,
        max_response_bytes: int = DEFAULT_MAX_BODY_BYTES,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
    ):
        if not isinstance(compressor, Compressor):
            raise InputTypeError(f"compressor must be a Compressor, not {type(compressor).__name__}")
        self.max_concurrency = replies.check_max_concurrency(max_concurrency)
        self.wire = Wire(base_url, timeout=timeout, max_body_bytes=max_response_bytes,
                         headers=authorization(api_key),
                         server="vLLM server", error=VLLMServerError)
        self.base_url = self.wire.base_url
        card = replies.choose_model(replies.model_cards(self.wire), model, self.base_url)
        self.model: str = card["id"]
        self.max_model_len: int | None = card.get("max_model_len")
        files = decoder_files(decoder, tokenizer=tokenizer, revision=revision, token=token,
                              local_files_only=local_files_only)
        self.decoder = str(decoder)
        self.tokenizer = files.tokenizer
        self.compressor = compressor
        self.store = store
        self.prompts = PromptBuilder(files.tokenizer, compressor, files.embedding,
                                     sentencepiece_model=files.sentencepiece_model)
        check_head(files.model_type, compressor)
        self._config = files.config

    def __repr__(self) -> str:
        return (f"VLLMClient({self.base_url!r}, model={self.model!r}, max_model_len={self.max_model_len}, "
                f"encoder={self.compressor.name!r}, head={self.compressor.head})")

    def decoder_card(self) -> DecoderCard:
        # quantization and dtype are the server's own
        return DecoderCard(self.decoder, self._config, None, None, where={"server": self.base_url, "model": self.model})

    def check(self, embeds: torch.Tensor, where: str) -> None:
        """What the client refuses to send: a wrong shape, NaN/infinity (lengths: against max_model_len)."""
        check_shape(embeds, self.prompts.hidden_size, where)
        check_finite(embeds, f"{where}: prompt embeddings")

    def _checked_rows(self, rows: list[torch.Tensor], sampling: Sampling) -> list[torch.Tensor]:
        for i, row in enumerate(rows):
            self.check(row, f"prompt {i}")
        check_prompt_lengths(rows, sampling.max_new_tokens, self.max_model_len, "server")
        return rows

    # ------------------------------------------------------------------ requests

    @staticmethod
    def _asked(sampling: Sampling) -> int:
        """Sequences to ask the server for: greedy n > 1 is one sequence, n times (vLLM refuses n > 1 without
        sampling; OpenAI repeats it)."""
        return 1 if sampling.greedy else sampling.n

    def _body(self, row: torch.Tensor, sampling: Sampling) -> dict[str, Any]:
        return replies.request_body(self.model, {"prompt_embeds": encode_prompt_embeds(row)}, sampling,
                                       self._asked(sampling))

    def complete(self, prompts: list[list[Part]], sampling: Sampling, *, time_prefill: bool = False) -> list[Completion]:
        """One request per prompt, concurrently. The prefill, when timed: from sending the request to the first
        streamed token (the request's upload and the server's queue included)."""
        if not prompts:
            return []
        rows, savings = self.build(prompts)
        self._checked_rows(rows, sampling)
        results = replies.complete_all(self.wire, "/completions", [self._body(row, sampling) for row in rows],
                                          self._asked(sampling), timed=time_prefill,
                                          max_concurrency=self.max_concurrency)
        eos, copies = [self.tokenizer.eos_token_id], sampling.n // self._asked(sampling)  # greedy n: one, n times
        return [Completion(texts=r.texts * copies, token_ids=[cut_at_eos(i, eos) for i in r.token_ids] * copies,
                           finish_reasons=r.finish_reasons * copies, prompt_positions=s.prompt_length,
                           positions_saved=s.tokens_saved, prefill_seconds=r.first_token_seconds)
                for r, s in zip(results, savings)]

    def stream_completion(self, prompt: list[Part], sampling: Sampling) -> Iterator[str]:
        """The server's stream of one prompt's text."""
        rows = self._checked_rows(self.prompt_rows([prompt]), sampling)
        return replies.stream_text(self.wire, "/completions", self._body(rows[0], sampling))
