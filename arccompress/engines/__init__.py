"""Engines: one protocol, the engines that implement it, and the rules they share.

    base            Sampling, Completion, Engine (the public API, written once), LocalEngine (rows built here)
    text            generated tokens -> text: end of sequence, stop strings, a character cut short
    transformers    Generator: a transformers decoder in this process
    vllm            VLLMGenerator: a vLLM engine in this process
    decoder_files   what an engine needs of a decoder served elsewhere: its tokenizer and input embeddings only
    remote/         engines behind HTTP: VLLMClient (a vLLM server, prompt embeddings), ServiceClient (a service),
                    AsyncVLLMFleet (vLLM servers behind a service: routing, health, failover)

Every engine reads the same prompts (`arccompress.prompts`) and answers through the same `Engine` methods. Names
load on first use: the remote engines need httpx (`arccompress[client]`), the vLLM engine needs vllm when started.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Completion": "base", "DecoderCard": "base", "Engine": "base", "LocalEngine": "base", "Sampling": "base",
    "Generator": "transformers", "VLLMGenerator": "vllm", "decoder_files": "decoder_files",
    "read_embedding_matrix": "decoder_files", "VLLMClient": "remote.vllm_server",
    "VLLMServerError": "remote.vllm_server", "encode_prompt_embeds": "remote.vllm_server",
    "ServiceClient": "remote.service", "ServiceError": "remote.service", "AsyncVLLMFleet": "remote.fleet",
    "UpstreamError": "remote.fleet",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
