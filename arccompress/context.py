"""CompressedContext: what an ARC-Encoder made of one text, ready to stand in a decoder prompt."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import InputError, NotFoundError
from .version import __version__

FORMAT = "arccompress-context"
# what repr() of a context looks like: a prompt string holding it was made by formatting a context by mistake
REPR_PATTERN = re.compile(r"CompressedContext\(\d+ tokens -> \d+ embeddings")
REQUIRED_METADATA = ("num_tokens", "encoder", "pooling_factor")


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise ValueError naming `what` and the first bad row if `tensor` holds NaN or infinity."""
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        row = int(bad.reshape(tensor.shape[0], -1).any(1).nonzero()[0]) if tensor.dim() else 0
        raise InputError(f"{what}: NaN or infinite values (first at row {row})")


def check_castable(tensor: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Raise ValueError if casting `tensor` to `dtype` would turn finite values into infinity."""
    if dtype.is_floating_point and dtype.itemsize < tensor.dtype.itemsize:
        limit = torch.finfo(dtype).max
        big = tensor.detach().abs().max().item() if tensor.numel() else 0.0
        if big > limit:
            raise InputError(
                f"{what}: values up to {big:.4g} do not fit in {str(dtype).replace('torch.', '')} "
                f"(max {limit:.4g}); store them as float32 or bfloat16"
            )


@dataclass
class CompressedContext:
    """A text compressed for one decoder head.

    `embeddings` is (num_embeddings, decoder_hidden_size): the pooled vectors of every chunk in order,
    then the head's `<Cont>` vector, all after the head's MLP — exactly what the decoder reads in place
    of the text's token embeddings. `len(ctx)` is the number of decoder positions it takes. Two contexts
    are equal when their embeddings and metadata are.

    It is not text: put it in a prompt as its own part (`["Document: ", ctx, "\\nQuestion: ..."]`). A prompt
    string holding a context's repr (`f"Document: {ctx}"`) is refused with that advice, never sent as text.
    """

    embeddings: torch.Tensor
    num_tokens: int  # encoder (Llama 3) tokens of the text
    encoder: str  # the encoder's hub id or path
    head: int  # which decoder head of the encoder made it
    pooling_factor: int
    chunk_size: int | None = None
    text: str | None = None  # kept to count what the text would cost a decoder; None from compress_ids
    encoder_fingerprint: str | None = None  # hash of the encoder's weights and configuration
    # the encoder's vectors before the head, (num_embeddings - 1, encoder dim), and the head's bottleneck
    # (num_embeddings - 1, bottleneck dim), as Compressor.compress made them on its device: a ContextStore
    # with a compact codec keeps one of these, not `embeddings`. Not saved by `save`.
    pooled: torch.Tensor | None = field(default=None, repr=False, compare=False)
    bottleneck: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def num_embeddings(self) -> int:
        return int(self.embeddings.shape[0])

    def __len__(self) -> int:
        return self.num_embeddings

    @property
    def hidden_size(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def compression_ratio(self) -> float:
        """Encoder tokens per embedding, the final `<Cont>` included."""
        return self.num_tokens / self.num_embeddings

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.dtype

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompressedContext):
            return NotImplemented
        same_meta = all(getattr(self, f) == getattr(other, f) for f in (
            "num_tokens", "encoder", "head", "pooling_factor", "chunk_size", "text", "encoder_fingerprint"))
        return same_meta and self.embeddings.shape == other.embeddings.shape and \
            self.dtype == other.dtype and torch.equal(self.embeddings.cpu(), other.embeddings.cpu())

    __hash__ = None  # mutable tensor inside: not hashable, like a list

    def metadata(self, include_text: bool = False) -> dict[str, str]:
        """What identifies this context and what made it, as strings (safetensors metadata)."""
        meta = {
            "format": FORMAT,
            "encoder": self.encoder,
            "encoder_fingerprint": self.encoder_fingerprint or "",
            "head": str(self.head),
            "pooling_factor": str(self.pooling_factor),
            "chunk_size": "" if self.chunk_size is None else str(self.chunk_size),
            "num_tokens": str(self.num_tokens),
            "dtype": str(self.dtype).replace("torch.", ""),
            "arccompress_version": __version__,
        }
        if self.text is not None:
            data = self.text.encode("utf-8")
            meta |= {"text_sha256": hashlib.sha256(data).hexdigest(), "text_bytes": str(len(data))}
            if include_text:
                meta["text"] = self.text
        return meta

    @classmethod
    def from_metadata(cls, embeddings: torch.Tensor, meta: dict[str, str], where: str = "context") -> CompressedContext:
        """A context from its embeddings and `metadata()`; ValueError naming `where` if anything is off."""
        missing = [k for k in REQUIRED_METADATA if not meta.get(k)]
        head = meta.get("head") or meta.get("decoder_index")  # files of arccompress 0.1 say decoder_index
        if missing or head is None:
            raise InputError(f"{where}: metadata lacks {', '.join(missing + ([] if head is not None else ['head']))}")
        if embeddings.dim() != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
            raise InputError(f"{where}: embeddings must be a non-empty (positions, hidden) matrix, "
                             f"found shape {list(embeddings.shape)}")
        if not embeddings.dtype.is_floating_point:
            raise InputError(f"{where}: embeddings must be floating point, found {embeddings.dtype}")
        check_finite(embeddings, f"{where}: embeddings")
        try:
            return cls(
                embeddings=embeddings,
                num_tokens=int(meta["num_tokens"]),
                encoder=meta["encoder"],
                head=int(head),
                pooling_factor=int(meta["pooling_factor"]),
                chunk_size=int(meta["chunk_size"]) if meta.get("chunk_size") else None,
                text=meta.get("text"),
                encoder_fingerprint=meta.get("encoder_fingerprint") or None,
            )
        except ValueError as e:
            raise InputError(f"{where}: bad metadata ({e})") from None

    def save(self, path: str | Path, *, dtype: torch.dtype | None = None, include_text: bool = False) -> None:
        """Write the embeddings (cast to `dtype` if given) and metadata to one safetensors file.

        Refuses a cast that would overflow (float16 holds at most 65504) and writes nothing then.
        """
        path = Path(path)
        if not path.parent.is_dir():
            raise NotFoundError(f"cannot save {path}: the folder {path.parent} does not exist")
        if dtype is not None:
            check_castable(self.embeddings, dtype, f"saving {path}")
        ctx = self if dtype is None else self.to(dtype=dtype)
        save_file({"embeddings": ctx.embeddings.detach().cpu().contiguous()}, str(path),
                  metadata=ctx.metadata(include_text))

    @classmethod
    def load(
        cls, path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> CompressedContext:
        """Read a context written by `save`; `dtype` casts it (default: as stored)."""
        path = Path(path)
        if not path.is_file():
            raise NotFoundError(f"no compressed context at {path}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise InputError(f"{path}: not an arccompress context file")
                if "embeddings" not in f.keys():
                    raise InputError(f"{path}: no 'embeddings' tensor")
                emb = f.get_tensor("embeddings")
        except ValueError:
            raise
        except Exception as e:
            raise InputError(f"{path}: not a readable safetensors file ({e})") from None
        ctx = cls.from_metadata(emb, meta, str(path))
        return ctx.to(device=device, dtype=dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CompressedContext:
        """A copy with the embeddings (and pooled and bottleneck vectors) moved or cast; the metadata is kept."""
        pooled = None if self.pooled is None else self.pooled.to(device=device)
        bottleneck = None if self.bottleneck is None else self.bottleneck.to(device=device)
        return replace(self, embeddings=self.embeddings.to(device=device, dtype=dtype), pooled=pooled,
                       bottleneck=bottleneck)

    def __repr__(self) -> str:
        chunk = "" if self.chunk_size is None else f", chunk_size={self.chunk_size}"
        return (
            f"CompressedContext({self.num_tokens} tokens -> {self.num_embeddings} embeddings "
            f"x {self.hidden_size}, ratio {self.compression_ratio:.2f}x, encoder={self.encoder!r}, "
            f"head={self.head}{chunk}, dtype={str(self.dtype).replace('torch.', '')}, device={self.device})"
        )
