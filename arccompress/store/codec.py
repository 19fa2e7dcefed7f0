"""Codecs: which vectors a store keeps for each context, and in how many bits.

A context's decoder input is `head(pooled) ++ head(<Cont>)`, where the head is two linear layers with no
activation between them (encoder dim C -> bottleneck B -> decoder H; 3072 -> 2048 -> 4096 in the released
models). Any of three vector spaces therefore determines it:

- `decoder`:    the H-wide vectors the decoder reads, `<Cont>` included (what a CompressedContext holds);
- `bottleneck`: the B-wide vectors between the head's two layers, without `<Cont>`: reading applies the
  head's second layer and appends the head's `<Cont>`. For the released models half the size of `decoder`,
  and everything the decoder will see;
- `encoder`:    the encoder's own C-wide pooled vectors: reading applies the whole head, so on a two-head
  (`*_multi`) encoder one store serves both decoders.

Each space is kept with a quantizer: float32, float16, bfloat16 (exact up to rounding), int8 (a float32
scale per vector) or pq (faiss product quantization: `bits_per_dim` x dim / 8 sub-quantizers of 8 bits, a
codebook trained on the store's first vectors and kept with it). Codec names are `[space-]quantizer`:
"float16" is the decoder space (the store format of arccompress 0.1), "int8" and "pq" default to the
bottleneck, e.g. "bottleneck-float16", "encoder-float16", "pq".

Every codec turns a (n, dim) matrix into n fixed-size byte strings and back. Decoding needs only torch
(product-quantization codes are a table lookup); training and encoding pq need faiss
(`pip install 'arccompress[pq]'`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import CodecError, InputTypeError
from ..extras import missing

SPACES = ("decoder", "bottleneck", "encoder")
QUANTIZERS = ("float32", "float16", "bfloat16", "int8", "pq")
FLOAT_QUANTIZERS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PQ_BITS = 8  # bits per sub-quantizer: 256 centroids each, one byte per code
PQ_MIN_TRAIN = 1 << PQ_BITS  # k-means needs at least as many points as centroids


DEFAULT_CODEC = "bottleneck-float16"
# what a message offers: the names people use; every [space-]quantizer pair is valid
SUGGESTED = ("float32", "float16", "bfloat16", DEFAULT_CODEC, "int8", "pq", "encoder-float16")


def parse_codec(name: str) -> tuple[str, str]:
    """(space, quantizer) of a codec name: "pq" -> ("bottleneck", "pq"), "float16" -> ("decoder", "float16")."""
    if not isinstance(name, str):
        raise InputTypeError(f"codec must be a str, not {type(name).__name__}")
    space, _, quantizer = name.rpartition("-")
    if not space:
        space = "decoder" if quantizer in FLOAT_QUANTIZERS else "bottleneck"
    if space not in SPACES or quantizer not in QUANTIZERS:
        offered = ", ".join(n + (" (the default)" if n == DEFAULT_CODEC else "") for n in SUGGESTED[:-1])
        raise CodecError(
            f"unknown codec {name!r}: choose {offered} or {SUGGESTED[-1]} (a codec is an optional space, "
            f"{', '.join(SPACES[:-1])} or {SPACES[-1]}, then a quantizer: e.g. bottleneck-int8)"
            + _did_you_mean(name)
        )
    return space, quantizer


def _did_you_mean(name: str) -> str:
    """"; did you mean 'float16'?" for a near miss (each part matched on its own), else ""."""
    space, _, quantizer = name.lower().rpartition("-")
    q = difflib.get_close_matches(quantizer, QUANTIZERS, n=1, cutoff=0.5)
    s = difflib.get_close_matches(space, SPACES, n=1, cutoff=0.5) if space else [""]
    if not q or not s:
        return ""
    return f"; did you mean {(s[0] + '-' if s[0] else '') + q[0]!r}?"


@dataclass
class Codec:
    """Vectors of one space <-> fixed-size byte strings.

    `codebook` (pq only) is (M, 256, dim / M) float32: sub-quantizer m maps code c to codebook[m, c].
    """

    space: str
    quantizer: str
    dim: int
    bits_per_dim: float | None = None
    codebook: torch.Tensor | None = None
    _faiss_pq: Any = field(default=None, init=False, repr=False, compare=False)  # (codebook, faiss quantizer)

    def __post_init__(self) -> None:
        if self.quantizer == "pq":
            bits = self.bits_per_dim if self.bits_per_dim is not None else 1.0
            if isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits <= 0:
                raise CodecError(f"bits_per_dim must be a positive number, not {self.bits_per_dim!r}")
            m = self.dim * bits / PQ_BITS
            if not float(m).is_integer() or self.dim % int(m):
                options = [b for b in (0.125, 0.25, 0.5, 1, 2, 4, 8)
                           if float(self.dim * b / PQ_BITS).is_integer() and self.dim % int(self.dim * b / PQ_BITS) == 0]
                raise CodecError(f"bits_per_dim={bits} does not split {self.dim} dimensions into 8-bit "
                                 f"sub-quantizers; possible: {options}")
            self.bits_per_dim = float(bits)
        elif self.bits_per_dim is not None:
            raise CodecError(f"bits_per_dim applies to the pq codec only, not {self.name!r}")

    @property
    def name(self) -> str:
        return f"{self.space}-{self.quantizer}"

    @property
    def label(self) -> str:
        """The name, with the pq bits: "bottleneck-pq at 1 bits/dim"."""
        return self.name + (f" at {self.bits_per_dim:g} bits/dim" if self.quantizer == "pq" else "")

    @property
    def num_subquantizers(self) -> int:
        return int(self.dim * self.bits_per_dim / PQ_BITS)  # type: ignore[operator]

    @property
    def bytes_per_vector(self) -> int:
        if self.quantizer in FLOAT_QUANTIZERS:
            return self.dim * FLOAT_QUANTIZERS[self.quantizer].itemsize
        if self.quantizer == "int8":
            return self.dim + 4  # the int8 values, then the vector's float32 scale
        return self.num_subquantizers

    @property
    def needs_training(self) -> bool:
        return self.quantizer == "pq" and self.codebook is None

    def describe(self) -> dict:
        out = {"name": self.name, "space": self.space, "quantizer": self.quantizer, "dim": self.dim,
               "bytes_per_vector": self.bytes_per_vector}
        if self.quantizer == "pq":
            out |= {"bits_per_dim": self.bits_per_dim, "subquantizers": self.num_subquantizers,
                    "bits_per_subquantizer": PQ_BITS}
        return out

    # ------------------------------------------------------------------ pq training

    def train(self, vectors: torch.Tensor, *, max_vectors: int = 65536, seed: int = 0) -> int:
        """Train the pq codebook on (n, dim) vectors (at most `max_vectors` of them, a seeded sample);
        return how many were used. No-op for the other quantizers."""
        if self.quantizer != "pq":
            return 0
        faiss = import_faiss()
        x = self._check(vectors, "training vectors")
        if x.shape[0] < PQ_MIN_TRAIN:
            raise CodecError(f"the pq codebook needs at least {PQ_MIN_TRAIN} training vectors, got {x.shape[0]}: "
                             "add more contexts before the first flush, or call train() with more texts")
        if x.shape[0] > max_vectors:
            keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_vectors, replace=False))
            x = x[keep]
        pq = faiss.ProductQuantizer(self.dim, self.num_subquantizers, PQ_BITS)
        pq.cp.min_points_per_centroid = 1  # small samples are allowed (and reported), not warned about
        pq.cp.seed = seed
        pq.train(np.ascontiguousarray(x))
        centroids = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
        self.codebook = torch.from_numpy(centroids.copy())
        return int(x.shape[0])

    # ------------------------------------------------------------------ encode / decode

    def _check_shape(self, vectors: torch.Tensor, what: str) -> None:
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise CodecError(f"{what}: expected (n, {self.dim}) vectors for codec {self.name!r}, "
                             f"got {list(vectors.shape)}")

    def _check(self, vectors: torch.Tensor, what: str) -> np.ndarray:
        """The vectors as a float32 numpy array, after checking their shape."""
        self._check_shape(vectors, what)
        return vectors.detach().to("cpu", torch.float32).contiguous().numpy()

    def encode(self, vectors: torch.Tensor) -> np.ndarray:
        """(n, dim) floats -> (n, bytes_per_vector) uint8."""
        if self.quantizer in FLOAT_QUANTIZERS:
            self._check_shape(vectors, "vectors")
            x = vectors.detach().to("cpu", FLOAT_QUANTIZERS[self.quantizer]).contiguous()
            return x.view(torch.uint8).numpy().reshape(x.shape[0], self.bytes_per_vector)
        if self.quantizer == "int8":  # computed where the vectors are (on a GPU, the host only copies the bytes)
            self._check_shape(vectors, "vectors")
            with torch.no_grad():
                x = vectors.detach().to(torch.float32, copy=True)  # a copy: worked on in place below
                scale = x.abs().amax(dim=1, keepdim=True).div_(127.0)
                scale.masked_fill_(scale == 0, 1.0)
                q = x.div_(scale).round_().clamp_(-127, 127).to(torch.int8).cpu().numpy()
            return np.concatenate([q.view(np.uint8), scale.cpu().numpy().astype("<f4").view(np.uint8)], axis=1)
        x = self._check(vectors, "vectors")
        return self._quantizer().compute_codes(np.ascontiguousarray(x))

    def _quantizer(self) -> Any:
        """faiss's ProductQuantizer holding the codebook, built once per codebook (every flush encodes)."""
        if self.codebook is None:
            raise CodecError("the pq codebook is not trained yet")
        if self._faiss_pq is None or self._faiss_pq[0] is not self.codebook:
            faiss = import_faiss()
            pq = faiss.ProductQuantizer(self.dim, self.num_subquantizers, PQ_BITS)
            faiss.copy_array_to_vector(self.codebook.numpy().ravel(), pq.centroids)
            self._faiss_pq = (self.codebook, pq)
        return self._faiss_pq[1]

    def decode(self, codes: np.ndarray) -> torch.Tensor:
        """(n, bytes_per_vector) uint8 -> (n, dim) float32."""
        codes = np.ascontiguousarray(codes)
        codes = torch.from_numpy(codes if codes.flags.writeable else codes.copy())
        n = codes.shape[0]
        if self.quantizer in ("float32", "float16"):  # numpy's cast: one thread, as the pq lookup below
            return torch.from_numpy(codes.numpy().view(f"<f{FLOAT_QUANTIZERS[self.quantizer].itemsize}")
                                    .reshape(n, self.dim).astype(np.float32))
        if self.quantizer in FLOAT_QUANTIZERS:
            return codes.view(FLOAT_QUANTIZERS[self.quantizer]).reshape(n, self.dim).float()
        if self.quantizer == "int8":
            values = codes[:, : self.dim].view(torch.int8).float()
            scale = codes[:, self.dim:].contiguous().view(torch.float32)  # (n, 1)
            return values * scale
        assert self.codebook is not None
        m, k = self.num_subquantizers, self.codebook.shape[1]
        # a table lookup in numpy: one thread (torch's indexing spreads a few hundred rows over its thread pool,
        # 12 ms instead of 0.3 ms for a top-5 read on a busy 2-core machine), and one np.take of rows of the
        # flattened codebook (M*K, dsub): 0.05 ms for 85 vectors where 2-D fancy indexing took 0.35 ms
        rows = codes.numpy().astype(np.intp) + np.arange(m, dtype=np.intp) * k  # (n, M): sub-quantizer j's row
        book = self.codebook.numpy().reshape(m * k, -1)
        return torch.from_numpy(np.take(book, rows, axis=0).reshape(n, self.dim))  # (n, M, dsub) -> (n, dim)


def import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise missing("pq", "the pq codec", e) from None
    return faiss
