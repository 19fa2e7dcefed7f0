"""What a service is made of: its models, its store, its engine, its limits. Plain data, picklable (Ray Serve ships
it to every replica)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

BACKENDS = ("transformers", "vllm", "upstream")


@dataclass(frozen=True)
class Limits:
    """What one request may ask; each refused with a 4xx naming the field."""

    max_documents: int = 64  # document parts per request, all prompts and examples together
    max_document_tokens: int = 16384  # encoder tokens per document given as text
    max_body_bytes: int = 16 << 20  # request body
    max_prompts: int = 64  # prompts in one completions request
    max_n: int = 16  # sequences per prompt
    max_stop: int = 8  # stop strings


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
    `batch_window` seconds, up to `batch_tokens` encoder tokens; `cache_size` compressed texts are kept (LRU).
    The transformers backend generates up to `max_batch` sequences in one `generate`.
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
    cache_size: int = 1024
    max_batch: int = 32
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

    @property
    def model_name(self) -> str:
        return self.served_name or Path(str(self.decoder).rstrip("/")).name or str(self.decoder)
