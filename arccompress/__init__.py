"""arccompress: compressed contexts from ARC-Encoders for frozen decoder LLMs."""

from .checkpoint import CheckpointError
from .compressor import Compressor
from .context import CompressedContext
from .store import ContextStore, StoreError
from .generation import ContextText, Generator, PromptSavings, fewshot_qa_prompt

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "CompressedContext",
    "Compressor",
    "ContextStore",
    "ContextText",
    "Generator",
    "PromptSavings",
    "StoreError",
    "fewshot_qa_prompt",
    "__version__",
]
