"""arccompress: compressed contexts from ARC-Encoders for frozen decoder LLMs.

Names are imported on first use: `import arccompress` (and the command line's start-up) does not pay for
torch and transformers until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import deprecated
from .version import __version__

_EXPORTS = {
    "ArcCompressError": "errors",
    "CheckpointError": "errors",
    "ContextNotFoundError": "errors",
    "EngineError": "errors",
    "InputError": "errors",
    "StoreError": "errors",
    "CompressedContext": "context",
    "Compressor": "compressor",
    "ContextStore": "store",
    "ContextRef": "prompts",
    "ContextText": "prompts",
    "PromptSavings": "prompts",
    "TokenIds": "prompts",
    "fewshot_qa_prompt": "prompts",
    "Completion": "engines.base",
    "Engine": "engines.base",
    "Sampling": "engines.base",
    "Generator": "engines.transformers",
    "VLLMGenerator": "engines.vllm",
    "VLLMClient": "engines.remote.vllm_server",
    "ServiceClient": "engines.remote.service",
    "compress_corpus": "corpus",
    "evaluate": "eval",
}
__all__ = [
    "ArcCompressError", "CheckpointError", "Completion", "CompressedContext", "Compressor", "ContextNotFoundError",
    "ContextRef", "ContextStore", "ContextText", "Engine", "EngineError", "Generator", "InputError", "PromptSavings",
    "Sampling", "ServiceClient", "StoreError", "TokenIds", "VLLMClient", "VLLMGenerator", "compress_corpus",
    "evaluate", "fewshot_qa_prompt", "__version__",
]

if TYPE_CHECKING:
    from .compressor import Compressor
    from .context import CompressedContext
    from .corpus import compress_corpus
    from .engines.base import Completion, Engine, Sampling
    from .engines.remote.service import ServiceClient
    from .engines.remote.vllm_server import VLLMClient
    from .engines.transformers import Generator
    from .engines.vllm import VLLMGenerator
    from .errors import ArcCompressError, CheckpointError, ContextNotFoundError, EngineError, InputError, StoreError
    from .eval import evaluate
    from .prompts import ContextRef, ContextText, PromptSavings, TokenIds, fewshot_qa_prompt
    from .store import ContextStore


deprecated.install()  # the import paths of 0.3 (arccompress.vllm, arccompress.generation, ...) for one release


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
