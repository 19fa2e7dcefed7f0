"""ServiceClient: the Python prompt language, spoken to a running `arccompress serve`.

    from arccompress import ContextRef, ContextText, ServiceClient
    client = ServiceClient("http://localhost:8000", api_key="...")
    client.generate(["Document: ", ContextRef("doc-17"), "\\nQuestion: Who signed?\\nAnswer:"], max_new_tokens=32)
    client.answer("Who signed?", [ContextRef("doc-17"), "a document's text, compressed on the server"])
    for piece in client.stream(["Summarise: ", ContextText(long_text, chunk_size=1024)]):
        print(piece, end="")

Documents travel as documents: text (a str in `answer`'s documents, or `ContextText`) is compressed on the server,
`ContextRef(id)` is read from the server's store. Tensors never travel: a `CompressedContext` is refused here, with
the way out. It is an engine like the others (`arccompress.engines.Engine`), so `evaluate`, the RAG framework
adapters and notebooks use a running service as they use a local decoder. Needs only httpx (`arccompress[client]`);
every request is bounded in time and size (`arccompress.engines.remote.http`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ...context import CompressedContext
from ...errors import InputTypeError
from ...prompts import ContextRef, ContextText, Part, TokenIds
from ..base import Completion, Engine, Sampling
from . import replies
from .http import DEFAULT_MAX_BODY_BYTES, Wire, WireError, authorization


class ServiceError(WireError):
    """The arccompress service could not be reached, refused a request, or answered something unusable."""


class ServiceClient(Engine):
    """A client of `arccompress serve` (`base_url`: the server, with or without its `/v1`).

    `api_key`: the service's key, if it has one. `model`: the served name (default: its only model). The prompts of
    one call are sent concurrently, at most `max_concurrency` at a time (the server batches them). `timeout` bounds
    each request as a whole (a stream: each gap and the whole), `max_response_bytes` its answer.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, model: str | None = None,
                 timeout: float = 600.0, max_concurrency: int = 16, max_response_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.max_concurrency = replies.check_max_concurrency(max_concurrency)
        if not isinstance(base_url, str):
            raise InputTypeError(f"base_url must be a str, not {type(base_url).__name__}")
        base = base_url.rstrip("/")
        base = base if base.endswith("/v1") else f"{base}/v1"
        self.wire = Wire(base, timeout=timeout, max_body_bytes=max_response_bytes, headers=authorization(api_key),
                         server="arccompress service", error=ServiceError)
        self.base_url = self.wire.base_url
        card = replies.choose_model(replies.model_cards(self.wire), model, self.base_url)
        self.model: str = card["id"]
        self.max_model_len: int | None = card.get("max_model_len")
        self.server_description: dict[str, Any] = card.get("arccompress") if isinstance(card.get("arccompress"), dict) \
            else {}

    def __repr__(self) -> str:
        backend = self.server_description.get("backend", "?")
        return f"ServiceClient({self.base_url!r}, model={self.model!r}, backend={backend}, max_model_len={self.max_model_len})"

    def describe(self) -> dict[str, Any]:
        """The service's own account of what determines its outputs (backend, decoder and encoder fingerprints,
        quantization, store), and where it is."""
        return {**self.server_description, "backend": f"service ({self.server_description.get('backend', '?')})",
                "server": self.base_url, "model": self.model}

    # ------------------------------------------------------------------ requests

    def wire_prompt(self, prompt: list[Part], index: int) -> list[Any]:
        """A normalised prompt in the service's JSON: strings, and document parts by text or by id."""
        out: list[Any] = []
        for j, part in enumerate(prompt):
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, ContextText):
                out.append({"type": "document", "text": part.text}
                           | ({} if part.chunk_size is None else {"chunk_size": part.chunk_size}))
            elif isinstance(part, ContextRef):
                out.append({"type": "document", "id": part.id})
            elif isinstance(part, (CompressedContext, TokenIds)):
                kind = "tensors" if isinstance(part, CompressedContext) else "token ids"
                raise InputTypeError(f"prompt {index}, part {j}: a service accepts documents, never {kind}: give the "
                                     "document's text (ContextText, or a str in answer's documents) or the id of its "
                                     "context in the server's store (ContextRef)")
            else:
                raise InputTypeError(f"prompt {index}, part {j}: expected str, ContextText or ContextRef, not "
                                     f"{type(part).__name__}")
        return out

    def body(self, prompt: list[Part], index: int, sampling: Sampling) -> dict[str, Any]:
        return replies.request_body(self.model, {"prompt": self.wire_prompt(prompt, index)}, sampling, sampling.n)

    def complete(self, prompts: list[list[Part]], sampling: Sampling, *, time_prefill: bool = False) -> list[Completion]:
        """One request per prompt, concurrently; positions and savings as the service counted them. The prefill,
        when timed: from sending the request to the first streamed token (the service's queue included)."""
        bodies = [self.body(p, i, sampling) for i, p in enumerate(prompts)]  # every prompt checked before sending
        if time_prefill:
            bodies = [b | {"stream_options": {"include_usage": True}} for b in bodies]
        results = replies.complete_all(self.wire, "/completions", bodies, sampling.n, timed=time_prefill,
                                          max_concurrency=self.max_concurrency)
        return [Completion(texts=r.texts, token_ids=r.token_ids, finish_reasons=r.finish_reasons,
                           prompt_positions=(r.usage or {}).get("prompt_tokens"),
                           positions_saved=(r.usage or {}).get("prompt_positions_saved"),
                           prefill_seconds=r.first_token_seconds) for r in results]

    def stream_completion(self, prompt: list[Part], sampling: Sampling) -> Iterator[str]:
        """The service's stream of one prompt's text."""
        return replies.stream_text(self.wire, "/completions", self.body(prompt, 0, sampling))
