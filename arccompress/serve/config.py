"""What a service is made of: its models, its store, its engine, its limits. Plain data, picklable (Ray Serve ships
it to every replica)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

BACKENDS = ("transformers", "vllm", "upstream")


CHARS_PER_TOKEN = 16  # prose takes 4-5 characters per token: a text over 16 per token of a limit cannot fit it
DEFAULT_CACHE_POSITIONS = 131072  # context rows the compression cache keeps by default (1 GiB at 4096 wide, bf16)


@dataclass(frozen=True)
class Limits:
    """What one request may ask; each refused with a 4xx naming the field, before the work it bounds.

    In the order they are checked: the body's bytes (before it is read) and JSON values (while it is parsed);
    prompts, documents, stop strings and n (before anything is tokenized); the characters of each document and
    each prompt's text (a cheap bound that refuses, untokenized, a text that could not fit the token limits: None
    means `CHARS_PER_TOKEN` per token of `max_document_tokens`, or of the decoder's context length); the tokens of
    each document (before it is compressed); the prompt's positions plus max_tokens against the decoder's context
    (from token counts, before its rows are built).
    """

    max_body_bytes: int = 16 << 20  # request body
    max_json_values: int = 16384  # objects, arrays, strings, numbers, ... in one body
    max_prompts: int = 64  # prompts in one completions request
    max_documents: int = 64  # document parts per request, all prompts and examples together
    max_stop: int = 8  # stop strings
    max_stop_chars: int = 1024  # characters per stop string
    max_n: int = 16  # sequences per prompt
    max_document_chars: int | None = None
    max_prompt_chars: int | None = None
    max_document_tokens: int = 16384  # encoder tokens per document given as text

    @property
    def document_chars(self) -> int:
        return self.max_document_chars or CHARS_PER_TOKEN * self.max_document_tokens

    def prompt_chars(self, context_length: int) -> int:
        return self.max_prompt_chars or CHARS_PER_TOKEN * context_length


@dataclass(frozen=True)
class ServiceConfig:
    """A service: `encoder` and `decoder` (hub ids or folders), an optional `store` of precompressed contexts, the
    `backend` that generates ("transformers" or "vllm"), and the name clients address it by (`served_name`,
    default: the decoder's folder name).

    `encoder_options` go to `Compressor.from_pretrained` (tokenizer, head, device, dtype, revision, ...);
    `engine_options` to the backend (transformers: `Generator.from_pretrained`'s quantization, dtype, ...; vLLM:
    `AsyncEngineArgs` fields such as quantization, dtype, max_model_len, tensor_parallel_size,
    gpu_memory_utilization; upstreams: `AsyncVLLMFleet.connect`'s model, routing, load_factor, timeout,
    health_interval, wait, dtype). `upstreams`: vLLM OpenAI servers of the decoder, started with
    `--enable-prompt-embeds`, that generate instead of an engine in this process (the backend is then "upstream";
    `upstream_api_key` is sent to them). Texts of concurrent requests are compressed together: a batch gathers for
    `batch_window` seconds, up to `batch_tokens` encoder tokens; compressed texts are kept for reuse (LRU) within
    `cache_mib` MiB (None: room for `DEFAULT_CACHE_POSITIONS` rows of the decoder's width; 0: none). The
    transformers backend generates up to `max_batch` sequences in one `generate`.

    `max_queued_requests`: requests the service holds at once (compressing, waiting or generating); past it a
    request is refused at once with 503 and Retry-After. `request_timeout`: seconds a request may take from its
    arrival (None: no limit); past it, it is stopped, its generation cancelled, and its client told.
    """

    encoder: str
    decoder: str
    store: str | None = None
    backend: str = "transformers"
    served_name: str | None = None
    api_key: str | None = None
    encoder_options: dict[str, Any] = field(default_factory=dict)
    engine_options: dict[str, Any] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    batch_window: float = 0.005
    batch_tokens: int = 16384
    cache_mib: float | None = None
    max_batch: int = 32
    max_queued_requests: int = 512
    request_timeout: float | None = None
    verbose: bool = False
    upstreams: tuple[str, ...] = ()
    upstream_api_key: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise InputError(f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.api_key is not None and not self.api_key:
            raise InputError("an empty API key would let everyone in: give a key, or none")
        if isinstance(self.upstreams, str) or not all(isinstance(u, str) for u in self.upstreams):
            raise InputError(f"upstreams must be a list of URLs, not {self.upstreams!r}")
        object.__setattr__(self, "upstreams", tuple(self.upstreams))
        if self.upstreams and self.backend == "transformers":  # the default: upstreams given, they generate
            object.__setattr__(self, "backend", "upstream")
        if (self.backend == "upstream") != bool(self.upstreams):
            raise InputError("the upstream backend generates on upstreams: give their URLs" if not self.upstreams
                             else f"upstreams generate instead of the {self.backend} backend: leave the backend out")
        if self.upstream_api_key is not None and not self.upstream_api_key:
            raise InputError("an empty upstream API key: give a key, or none")
        if self.cache_mib is not None and self.cache_mib < 0:
            raise InputError(f"cache_mib must be >= 0 (0: no cache), not {self.cache_mib}")
        if self.max_queued_requests < 1:
            raise InputError(f"max_queued_requests must be >= 1, not {self.max_queued_requests}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise InputError(f"request_timeout must be > 0 seconds (None: no limit), not {self.request_timeout}")

    @property
    def model_name(self) -> str:
        return self.served_name or Path(str(self.decoder).rstrip("/")).name or str(self.decoder)
