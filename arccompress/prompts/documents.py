"""Documents to contexts, written once: every engine's prompts, the service, the framework adapters and `evaluate`
turn the documents of a prompt into compressed contexts here.

    resolve_documents(prompts, compressor, store)   # ContextText -> compressed, ContextRef -> read from the store

All texts of a call are compressed together (one batched call per chunk size), all ids read together (one
`get_many`); other parts pass unchanged, and errors name the prompt and part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ..context import CompressedContext
from ..errors import ContextNotFoundError, InputError
from .parts import ContextRef, ContextText, Part


class ContextSource(Protocol):
    """Where ContextRef parts are read from: a ContextStore, or anything with the same two methods."""

    def __contains__(self, key: object) -> bool: ...

    def get_many(self, keys: Sequence[str], *, device: torch.device | str = ...) -> list[CompressedContext]: ...


def resolve_documents(prompts: Sequence[Sequence[Part]], compressor: Any, store: ContextSource | None = None, *,
                      device: torch.device | str | None = None,
                      show_progress_bar: bool | None = None) -> list[list[Part]]:
    """The prompts with every ContextText compressed by `compressor` (`show_progress_bar` as in
    `Compressor.compress`) and every ContextRef read from `store` (on `device`, default the compressor's), as
    CompressedContexts; other parts unchanged."""
    out = [list(parts) for parts in prompts]
    texts: dict[int | None, list[tuple[int, int, ContextText]]] = {}
    refs: list[tuple[int, int, ContextRef]] = []
    for i, parts in enumerate(out):
        for j, part in enumerate(parts):
            if isinstance(part, ContextText):
                texts.setdefault(part.chunk_size, []).append((i, j, part))
            elif isinstance(part, ContextRef):
                refs.append((i, j, part))
    for chunk, places in texts.items():
        made = compressor.compress([p.text for _, _, p in places], chunk_size=chunk, show_progress_bar=show_progress_bar)
        for (i, j, _), ctx in zip(places, made):
            out[i][j] = ctx
    if refs:
        by_id = _read(refs, store, device if device is not None else compressor.device)
        for i, j, ref in refs:
            out[i][j] = by_id[ref.id]
    return out


def _read(refs: list[tuple[int, int, ContextRef]], store: ContextSource | None, device: torch.device | str
          ) -> dict[str, CompressedContext]:
    """The stored contexts of these references, one `get_many` for all; errors name the first prompt and part."""
    if store is None:
        i, j, ref = refs[0]
        raise InputError(f"prompt {i}, part {j}: {ref} names a stored context, and this engine has no store: "
                         "pass store= when creating it")
    ids = list(dict.fromkeys(ref.id for _, _, ref in refs))
    missing = store.missing(ids) if hasattr(store, "missing") else [key for key in ids if key not in store]
    if missing:
        i, j, _ = next(place for place in refs if place[2].id == missing[0])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ContextNotFoundError(f"prompt {i}, part {j}: the store {getattr(store, 'path', store)} holds no "
                                   f"context {', '.join(map(repr, missing[:5]))}{more}")
    return dict(zip(ids, store.get_many(ids, device=device)))
