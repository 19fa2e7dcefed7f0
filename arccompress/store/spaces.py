"""The three vector spaces a store can keep, each a small object: what a context gives, what reading applies.

    space        stored per context                      reading
    decoder      the decoder rows, <Cont> included        nothing
    bottleneck   the head's bottleneck, without <Cont>    the head's second layer, then the head's <Cont>
    encoder      the pooled encoder vectors               the whole head (any head of the encoder)

The head's math is `arccompress.heads.DecoderHead`'s; a space only says which of its steps apply.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..context import CompressedContext
from ..errors import StoreError
from ..heads import DecoderHead, resolve_head

HeadOn = Callable[[int, torch.device, torch.dtype], DecoderHead]  # head index, device, dtype -> that head there


class Space:
    name: str
    what: str  # how messages call its vectors
    cont_stored: bool  # the decoder's <Cont> row is kept (decoder space) or appended by reading
    serves_every_head: bool = False

    def width(self, dims: dict[str, int]) -> int:
        """Its vectors' width, from the head's dims (encoder C, bottleneck B, decoder H)."""
        return dims[self.name]

    def heads_kept(self, head: int | None, num_heads: int) -> list[int]:
        """The heads whose weights the store keeps to read it."""
        return [head]  # type: ignore[list-item]

    def vectors(self, ctx: CompressedContext, head_on: HeadOn) -> torch.Tensor | None:
        """The context's vectors of this space, where the compressor made them (None if it does not carry them)."""
        raise NotImplementedError

    def rows(self, vectors: torch.Tensor, lengths: list[int], head: int, head_on: HeadOn) -> list[torch.Tensor]:
        """Decoder rows of contexts whose stored vectors are stacked in `vectors` (`lengths` each), computed
        where the vectors are, by decoder head `head`."""
        return head_on(head, vectors.device, vectors.dtype).contexts(vectors, lengths, self.name)

    def read_head(self, stored: int | None, asked: int | str | None, default: int | None, num_heads: int,
                  where: str) -> int | None:
        """The head contexts are read for: the store's own (an `asked` other one is an error)."""
        if isinstance(asked, int) and stored is not None and asked != stored:
            raise StoreError(f"{where} holds contexts for head {stored}, not {asked}")
        return stored


class DecoderSpace(Space):
    name, what, cont_stored = "decoder", "decoder inputs", True

    def heads_kept(self, head: int | None, num_heads: int) -> list[int]:
        return []

    def vectors(self, ctx: CompressedContext, head_on: HeadOn) -> torch.Tensor | None:
        return ctx.embeddings.detach()

    def rows(self, vectors: torch.Tensor, lengths: list[int], head: int, head_on: HeadOn) -> list[torch.Tensor]:
        return list(vectors.split(lengths))


class BottleneckSpace(Space):
    name, what, cont_stored = "bottleneck", "bottleneck vectors", False

    def vectors(self, ctx: CompressedContext, head_on: HeadOn) -> torch.Tensor | None:
        if ctx.bottleneck is not None:
            return ctx.bottleneck.detach()
        if ctx.pooled is None:
            return None
        with torch.no_grad():  # computed where the pooled vectors are, by the head that made the context
            return head_on(ctx.head, ctx.pooled.device, ctx.pooled.dtype).bottleneck(ctx.pooled)


class EncoderSpace(Space):
    name, what, cont_stored, serves_every_head = "encoder", "encoder vectors", False, True

    def heads_kept(self, head: int | None, num_heads: int) -> list[int]:
        return list(range(num_heads))

    def vectors(self, ctx: CompressedContext, head_on: HeadOn) -> torch.Tensor | None:
        return None if ctx.pooled is None else ctx.pooled.detach()

    def read_head(self, stored: int | None, asked: int | str | None, default: int | None, num_heads: int,
                  where: str) -> int | None:
        """Any head of the encoder: the one asked for, else the compressor's, else the only one."""
        if asked is not None:
            return resolve_head(asked, num_heads)
        if default is not None:
            return default
        return 0 if num_heads == 1 else None


SPACES: dict[str, Space] = {s.name: s for s in (DecoderSpace(), BottleneckSpace(), EncoderSpace())}
