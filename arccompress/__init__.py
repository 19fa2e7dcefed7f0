"""arccompress: compressed contexts from ARC-Encoders for frozen decoder LLMs."""

from .checkpoint import CheckpointError
from .compressor import Compressor
from .context import CompressedContext

__version__ = "0.1.0"
__all__ = ["CheckpointError", "CompressedContext", "Compressor", "__version__"]
