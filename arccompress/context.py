"""CompressedContext: what an ARC-Encoder made of one text, ready to stand in a decoder prompt."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "arccompress-context"


@dataclass(eq=False)
class CompressedContext:
    """A text compressed for one decoder head.

    `embeddings` is (num_embeddings, decoder_hidden_size): the pooled vectors of every chunk in order,
    then the head's `<Cont>` vector, all after the head's MLP — exactly what the decoder reads in place
    of the text's token embeddings.
    """

    embeddings: torch.Tensor
    num_tokens: int  # encoder (Llama 3) tokens of the text
    encoder: str  # the encoder's hub id or path
    decoder_index: int  # which head of the encoder made it
    pooling_factor: int
    chunk_size: int | None = None
    text: str | None = None  # kept to count what the text would cost a decoder; None from compress_ids
    encoder_fingerprint: str | None = None  # hash of the encoder's weight files

    @property
    def num_embeddings(self) -> int:
        return int(self.embeddings.shape[0])

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

    def metadata(self, include_text: bool = False) -> dict[str, str]:
        """What identifies this context and what made it, as strings (safetensors metadata)."""
        from . import __version__

        meta = {
            "format": FORMAT,
            "encoder": self.encoder,
            "encoder_fingerprint": self.encoder_fingerprint or "",
            "decoder_index": str(self.decoder_index),
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
    def from_metadata(cls, embeddings: torch.Tensor, meta: dict[str, str]) -> CompressedContext:
        return cls(
            embeddings=embeddings,
            num_tokens=int(meta["num_tokens"]),
            encoder=meta["encoder"],
            decoder_index=int(meta["decoder_index"]),
            pooling_factor=int(meta["pooling_factor"]),
            chunk_size=int(meta["chunk_size"]) if meta.get("chunk_size") else None,
            text=meta.get("text"),
            encoder_fingerprint=meta.get("encoder_fingerprint") or None,
        )

    def save(self, path: str | Path, *, dtype: torch.dtype | None = None, include_text: bool = False) -> None:
        """Write the embeddings (cast to `dtype` if given) and metadata to one safetensors file."""
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
            raise FileNotFoundError(f"no compressed context at {path}")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{path}: not an arccompress context file")
                emb = f.get_tensor("embeddings")
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        return cls.from_metadata(emb.to(device=device, dtype=dtype), meta)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> CompressedContext:
        """A copy with the embeddings moved or cast; the metadata is kept."""
        return replace(self, embeddings=self.embeddings.to(device=device, dtype=dtype))

    def __repr__(self) -> str:
        chunk = "" if self.chunk_size is None else f", chunk_size={self.chunk_size}"
        return (
            f"CompressedContext({self.num_tokens} tokens -> {self.num_embeddings} embeddings "
            f"x {self.hidden_size}, ratio {self.compression_ratio:.2f}x, encoder={self.encoder!r}, "
            f"decoder_index={self.decoder_index}{chunk}, dtype={str(self.dtype).replace('torch.', '')}, "
            f"device={self.device})"
        )
