"""CompressedContext: what an ARC-Encoder made of one text, ready to stand in a decoder prompt."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


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
