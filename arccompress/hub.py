"""Where models come from: a local folder, or a Hugging Face hub repository (cache first, then the network).

One rule for every model this package reads (encoders, their tokenizer, decoders): a path that is a folder
is used as it is; a name written like a hub id (`owner/name`) is a hub repository, taken from the local
cache or downloaded (`revision`, `token`, offline with `local_files_only` or `HF_HUB_OFFLINE=1`); anything
else is a missing local folder. Errors say which of the two was looked for, and both when the name could be
either (`runs/ckpt` may be a mistyped folder or a hub repository).
"""

from __future__ import annotations

import functools
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import AccessError, InputTypeError, NotFoundError

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def cache_dir() -> Path:
    """arccompress's own cache: $ARCCOMPRESS_CACHE, else $XDG_CACHE_HOME/arccompress, else ~/.cache/arccompress."""
    return Path(os.environ.get("ARCCOMPRESS_CACHE") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "arccompress")


def is_hub_id(name: str | Path) -> bool:
    """Whether `name` is written like a hub repository id (`owner/name`), not like a path."""
    text = str(name)
    return isinstance(name, str) and bool(HUB_ID.fullmatch(text)) and not text.startswith((".", "~"))


def resolve_folder(
    name_or_path: str | Path,
    *,
    what: str,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """A local folder for a path or a hub id; `what` names the thing in errors ("encoder", "decoder", ...).

    A hub id is resolved to its snapshot in the Hugging Face cache, downloading what `allow_patterns` selects
    when the hub is reachable and `local_files_only` is not set.
    """
    if not isinstance(name_or_path, (str, Path)):
        raise InputTypeError(f"the {what} must be a path or a hub id, not {type(name_or_path).__name__}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotFoundError(f"{path} is a file; the {what} must be a folder (or a hub id)")
    if not is_hub_id(name_or_path):
        raise NotFoundError(f"no {what} folder at {path}")
    try:
        return Path(hub_snapshot(str(name_or_path), revision=revision, token=token,
                                 local_files_only=local_files_only, allow_patterns=allow_patterns))
    except NotFoundError as e:
        raise NotFoundError(f"no {what} folder at {path}, and as a hub id: {e}") from None


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a connection (always True behind a proxy, which we cannot probe).

    Without a network huggingface_hub retries with back-off for about 50 s before giving up; one TCP
    connection attempt tells the same in milliseconds (DNS failure) or at most `timeout` seconds.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def hub_snapshot(
    repo_id: str,
    *,
    revision: str | None,
    token: str | bool | None,
    local_files_only: bool | None,
    allow_patterns: list[str] | None = None,
) -> str:
    """The local folder of a hub repository's snapshot, with errors that say what is missing."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if not local_files_only and not hub_reachable():
        local_files_only = True  # fail in milliseconds, not after a minute of retries; the cache still serves
    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            local_files_only=bool(local_files_only),
            allow_patterns=allow_patterns,
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise NotFoundError(
            f"{repo_id!r} (revision {revision or 'main'}) is not in the Hugging Face cache and could not be "
            f"downloaded (offline or unreachable): download it once with network access, or pass a local "
            f"folder ({type(e).__name__})"
        ) from None
    except GatedRepoError:
        raise AccessError(
            f"{repo_id!r} is gated on the Hugging Face hub: accept its terms and pass a token "
            "(or log in with `hf auth login`)"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise NotFoundError(f"{repo_id!r}: {type(e).__name__}: no such repository or revision") from None
    except HfHubHTTPError as e:
        raise NotFoundError(f"{repo_id!r} could not be fetched from the hub: {e}") from None
