"""The errors arccompress raises on purpose, one family: bad input, bad files, missing things, failing engines.

Every class derives from `ArcCompressError` and from the built-in exception a caller would expect
(`ValueError`, `TypeError`, `KeyError`, `FileNotFoundError`, `ImportError`, `RuntimeError`), so
`except ValueError` keeps working. The command line prints an `ArcCompressError` as one line (the user's
mistake or the environment's); any other exception is a bug and shows its traceback.
"""

from __future__ import annotations


class ArcCompressError(Exception):
    """Base of every error arccompress raises on purpose; its message says what is wrong and where."""


class InputError(ArcCompressError, ValueError):
    """A value the caller gave (an argument, a prompt part, a data row) that cannot be used."""


class InputTypeError(ArcCompressError, TypeError):
    """An argument or a part of the wrong type."""


class NotFoundError(ArcCompressError, FileNotFoundError):
    """A file, folder or hub repository that is not there."""


class AccessError(ArcCompressError, PermissionError):
    """A resource that exists but may not be read (a gated hub repository)."""


class MissingDependencyError(ArcCompressError, ImportError):
    """An optional dependency (an extra) that is not installed; the message names the install command."""


class CheckpointError(ArcCompressError, ValueError):
    """A checkpoint that cannot be read, or whose contents do not match its configuration."""


class StoreError(ArcCompressError, ValueError):
    """A store that cannot be read or written as asked, or a context that does not belong in it."""


class CodecError(StoreError):
    """A codec name or setting that cannot work for this encoder."""


class ContextNotFoundError(ArcCompressError, KeyError):
    """Ids that a store does not hold."""

    def __str__(self) -> str:  # KeyError's own str() would quote the message
        return str(self.args[0]) if self.args else ""


class EngineError(ArcCompressError, RuntimeError):
    """A generation engine or server that failed or answered something unusable."""


class UnavailableError(EngineError):
    """An engine that cannot take the work now (no server of a fleet in rotation): a service answers 503."""
