"""File-system primitives of the store: temporary names, atomic creation, fsync, dead writers' leftovers, the lock.

Everything a store commits appears under its final name in one step, by `os.link` of a finished, flushed
temporary file: the link fails if the name exists, so nothing committed is ever replaced. Temporary files are
named `.tmp-<host>-<pid>-<random>` so that a writer can remove the leftovers of dead writers of its own host
(never a live writer's). The lock is an exclusive `flock` on `.lock` in the store folder: it makes a writer's
"check the ids, then commit" one step; the kernel (or the NFS server) releases it when its holder dies.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import StoreError

TEMPORARY_PREFIX = ".tmp-"
LOCK = ".lock"


def temporary_path(final: Path) -> Path:
    """Where a writer prepares `final`: beside it, named after this host and process."""
    return final.with_name(f"{TEMPORARY_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}")


def fsync_dir(path: Path) -> None:
    """Make the folder's entries (a new name) durable, where the file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_flushed(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def link_new(tmp: Path, final: Path) -> None:
    """Commit the finished file `tmp` as `final`, which must not exist yet (FileExistsError if it does)."""
    os.link(tmp, final)
    fsync_dir(final.parent)


def create_exclusive(path: Path, data: bytes) -> None:
    """Create `path` holding `data` atomically; FileExistsError if it exists (another writer was first)."""
    tmp = temporary_path(path)
    try:
        write_flushed(tmp, data)
        link_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_leftovers(folder: Path) -> None:
    """Remove the temporary files that writers of this host left in `folder` when they died."""
    if not folder.is_dir():
        return
    host = socket.gethostname()
    for file in folder.glob(f"{TEMPORARY_PREFIX}*"):
        owner, _, rest = file.name[len(TEMPORARY_PREFIX):].rpartition("-")  # "<host>-<pid>", "<random>"
        writer_host, _, pid = owner.rpartition("-")
        if writer_host == host and pid.isdigit() and not _alive(int(pid)):
            try:
                file.unlink(missing_ok=True)
            except OSError:  # a read-only mount: a reader leaves them to the next writer
                pass


def is_temporary(name: str) -> bool:
    return name.startswith(TEMPORARY_PREFIX)


@contextmanager
def store_lock(folder: Path) -> Iterator[None]:
    """Hold the store's commit lock (exclusive, blocking): only for checking ids and linking a fragment."""
    path = folder / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise StoreError(f"{path}: cannot open the store's lock file ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            hint = " (the store needs a file system with file locks: local, NFS with locking, Lustre mounted " \
                   "with -o flock)" if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS) else ""
            raise StoreError(f"{path}: cannot lock the store ({e.strerror}){hint}") from None
        yield
    finally:
        os.close(fd)  # releases the lock
