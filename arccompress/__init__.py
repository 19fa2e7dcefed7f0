"""arccompress: compressed contexts from ARC-Encoders for frozen decoder LLMs."""

from .checkpoint import CheckpointError
from .compressor import Compressor
from .context import CompressedContext
from .generation import ContextText, Generator, PromptSavings, fewshot_qa_prompt

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "CompressedContext",
    "Compressor",
    "ContextText",
    "Generator",
    "PromptSavings",
    "fewshot_qa_prompt",
    "__version__",
]
