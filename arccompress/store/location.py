"""Where a store lives: a local folder or an object store (`s3://`, `gs://`, `az://`), with the storage options
Lance needs to reach it (endpoint, credentials; unset ones come from the environment, as AWS_* variables); and how
a failure to reach it is told: one StoreError naming the store and the cause in the user's terms.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lance.file import LanceFileSession

from ..errors import InputTypeError, StoreError

LANCE_ERRORS = (OSError, ValueError, RuntimeError)  # what Lance raises when its I/O or a commit fails
OBJECT_STORES = ("s3", "gs", "az", "abfss", "s3+ddb", "memory")  # the URI schemes Lance reaches, besides local paths

# (what a Lance, object-store or OS error says, what it means): the first match names the cause
CAUSES = (
    (("NoSuchBucket", "bucket does not exist", "ContainerNotFound", "container does not exist"),
     "the bucket does not exist"),
    (("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden", "Unauthorized", "credential"),
     "access denied: check the credentials (storage options or the environment)"),
    (("error sending request", "Connection refused", "dns error", "tcp connect", "timed out", "Timeout",
      "Connection reset"), "the endpoint cannot be reached"),
    (("Too many open files", "os error 24"), "too many open files: the process's limit (`ulimit -n`) is too low"),
    (("Read-only file system", "os error 30"), "the file system is read-only"),
    (("Permission denied", "os error 13"), "permission denied"),
    (("No space left", "os error 28"), "no space left on the device"),
    (("Unable to rename file: Operation not permitted",),
     "the file system refuses hard links, which commits on a local disk need (Lance puts each version in place "
     "only if it is absent): use a local or NFS file system with hard links, or an object store URI"),
)
ERRNO_CAUSES = {errno.EMFILE: CAUSES[3][1], errno.ENFILE: CAUSES[3][1], errno.EROFS: CAUSES[4][1],
                errno.EACCES: CAUSES[5][1], errno.EPERM: CAUSES[5][1], errno.ENOSPC: CAUSES[6][1]}


RUST_SOURCE = re.compile(r",?\s*/\S+\.rs:\d+:\d+")  # where in Lance's sources an error was raised: not for users


def explain(error: BaseException) -> tuple[str | None, str]:
    """(what went wrong in the user's terms, None if it is none of the known causes; the original message,
    shortened). One of our own errors, raised inside a Lance call, is its own explanation."""
    if isinstance(error, StoreError):
        return str(error), str(error)
    text = RUST_SOURCE.sub("", " ".join(str(error).split()))
    detail = text if len(text) <= 300 else text[:297] + "..."
    if isinstance(error, OSError) and error.errno in ERRNO_CAUSES:
        return ERRNO_CAUSES[error.errno], detail
    for needles, meaning in CAUSES:
        if any(n in text for n in needles):
            return meaning, detail
    return None, detail or type(error).__name__


def cause(error: BaseException) -> str:
    """What went wrong, in the user's terms, with the original message after it."""
    meaning, detail = explain(error)
    return f"{meaning} ({detail})" if meaning else detail


class LanceProcess:
    """Whether this process may use Lance. Lance's engine keeps threads and locks of its own (its runtime, its object
    stores): a process forked from one that used it inherits the locks without the threads and may hang in its
    first call. Such a process gets a StoreError saying so instead; one forked before any store was opened, or
    started with spawn or forkserver, is free."""

    used = False
    forked = False

    @classmethod
    def check(cls, where: object) -> None:
        if cls.forked:
            raise StoreError(f"{where}: this process was forked from one that had opened a store, and the store's "
                             "engine (Lance) cannot run in such a process (its threads stayed behind): start workers "
                             "with the spawn or forkserver method, e.g. multiprocessing.get_context('spawn')")
        cls.used = True

    @classmethod
    def after_fork(cls) -> None:
        cls.forked = cls.forked or cls.used


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=LanceProcess.after_fork)


@dataclass(frozen=True)
class Location:
    """A store's address: `uri` (an absolute local path, or an object store's URI) and the storage options.

    Small and picklable: what a write task carries to reach the store."""

    uri: str
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, where: str | os.PathLike | Location, storage_options: Mapping[str, str] | None = None) -> Location:
        if isinstance(where, Location):
            return where if storage_options is None else cls(where.uri, _options(storage_options))
        if not isinstance(where, (str, os.PathLike)):
            raise InputTypeError(f"a store's path must be a str or a path, not {type(where).__name__}")
        text = os.fspath(where)
        if not isinstance(text, str):
            raise InputTypeError("a store's path must be text, not bytes")
        scheme, sep, _ = text.partition("://")
        if sep:
            if scheme == "file":
                text = text[len("file://"):]
            elif scheme.lower() not in OBJECT_STORES:
                raise StoreError(f"{text}: unknown storage scheme {scheme!r}; a store is a local folder or "
                                 f"{', '.join(s + '://' for s in OBJECT_STORES[:3])} URI")
            else:
                return cls(text.rstrip("/"), _options(storage_options))
        return cls(str(Path(text).expanduser().absolute()), _options(storage_options))

    @property
    def storage_options(self) -> dict[str, str] | None:
        return dict(self.options) or None

    @property
    def is_local(self) -> bool:
        return "://" not in self.uri

    @property
    def path(self) -> Path | str:
        """A local store's folder as a Path; an object store's URI as it is."""
        return Path(self.uri) if self.is_local else self.uri

    def __str__(self) -> str:
        return self.uri

    def absent(self, error: BaseException) -> bool:
        """Whether a failure to open the dataset says there is none."""
        return "was not found" in str(error) and "_versions" in str(error)

    def error(self, action: str, error: BaseException, hint: str = "") -> StoreError:
        """One StoreError naming the store, what was being done, and the cause; `hint` (what to do) when the
        cause is none of the known ones of the environment. One of our own errors (raised inside a Lance call) is
        returned as it is."""
        if isinstance(error, StoreError):
            return error
        meaning, detail = explain(error)
        if meaning:
            return StoreError(f"{self.uri}: cannot {action}: {meaning} ({detail})")
        return StoreError(f"{self.uri}: cannot {action}: {detail}{hint}")

    # ------------------------------------------------------------------ files beside the dataset

    def lance(self) -> str:
        """The URI to give Lance, once this process is known to be able to use it (see `LanceProcess`)."""
        LanceProcess.check(self.uri)
        return self.uri

    def files(self) -> LanceFileSession:
        """The store's files through Lance's object store (any scheme, the same storage options)."""
        return LanceFileSession(self.lance(), storage_options=self.storage_options)

    def write_file(self, name: str, data: bytes) -> None:
        """Write a whole file under the store (relative `name`): atomic on every backend (written aside, then
        renamed or put at once), replacing a file of that name."""
        with tempfile.TemporaryDirectory(prefix="arccompress-") as tmp:
            local = Path(tmp) / "upload"
            local.write_bytes(data)
            self.files().upload_file(local, name)

    def read_whole(self, name: str) -> bytes | None:
        """A small file under the store, whole (None if it is not there)."""
        with tempfile.TemporaryDirectory(prefix="arccompress-") as tmp:
            local = Path(tmp) / "download"
            try:
                self.files().download_file(name, local)
            except OSError:
                return None
            return local.read_bytes()

    def read_file(self, name: str, size: int) -> bytes:
        """The `size` bytes of the file `name` under the store."""
        return self.files().read_range(name, 0, size)


def _options(options: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    if options is None:
        return ()
    if not isinstance(options, Mapping):
        raise InputTypeError(f"storage_options must be a dict of str, not {type(options).__name__}")
    for key, value in options.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InputTypeError(f"storage_options must map str to str, not {key!r}: {value!r}")
    return tuple(sorted(options.items()))
