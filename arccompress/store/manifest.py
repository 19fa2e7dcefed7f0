"""A store's description: what made its contexts (identity), its codec, and the codec file (head weights, pq codebook).

The description is JSON in the Lance schema's metadata (`arccompress`), written once with the dataset's first
version; the codec file, `_arccompress/codec-<sha256>.safetensors`, is named by its contents and written before
the dataset exists, so a reader who sees the dataset finds it. The codec file is checked against its SHA-256
whenever the store is opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import dataclass, fields
from typing import Any

import torch
from safetensors.torch import load, save

from .codec import Codec, parse_codec
from ..context import CompressedContext
from ..errors import InputError, StoreError
from ..heads import DecoderHead
from ..version import __version__
from .format import CODEC_FOLDER, FORMAT, METADATA_KEY, VERSION
from .location import Location
from .spaces import SPACES, Space


def description(metadata: dict[bytes, bytes] | None) -> dict[str, Any]:
    """The store's description in a Lance schema's metadata, unchecked ({} when there is none)."""
    return json.loads((metadata or {}).get(METADATA_KEY, b"{}"))


@dataclass(frozen=True)
class Identity:
    """What made a store's contexts. In a store: 0 and "" mean unknown (a store made from decoder vectors alone);
    of a context: None for the sizes a context does not carry."""

    encoder: str
    encoder_fingerprint: str
    hidden_size: int
    pooling_factor: int
    encoder_dim: int | None
    bottleneck_dim: int | None
    head: int | None

    @classmethod
    def of_compressor(cls, comp: Any) -> Identity:
        cfg = comp.model.config
        return cls(comp.name, comp.fingerprint, cfg.decoder_hidden_size, cfg.pooling_factor, cfg.dim,
                   cfg.bridge_hidden_dim, comp.head)

    @classmethod
    def of_context(cls, ctx: CompressedContext) -> Identity:
        return cls(ctx.encoder, ctx.encoder_fingerprint or "", ctx.hidden_size, ctx.pooling_factor, None, None,
                   ctx.head)

    @classmethod
    def of_manifest(cls, data: dict[str, Any]) -> Identity:
        return cls(**{f.name: data[f.name] for f in fields(cls)})

    @property
    def dims(self) -> dict[str, int]:
        return {"encoder": self.encoder_dim or 0, "bottleneck": self.bottleneck_dim or 0, "decoder": self.hidden_size}

    def matches(self, ctx: CompressedContext, *, every_head: bool) -> bool:
        """Whether the context was made like this store's contexts (`mismatch` is None), quickly."""
        return (self.encoder_fingerprint in ("", ctx.encoder_fingerprint or "") and
                self.hidden_size in (0, ctx.hidden_size) and self.pooling_factor in (0, ctx.pooling_factor) and
                (every_head or self.head is None or self.head == ctx.head))

    def mismatch(self, other: Identity, *, every_head: bool) -> str | None:
        """The first field in which `other` differs from this identity, as "field other != ours" (fields this
        identity does not know or `other` does not carry, and the head if every_head, aside); None if none does."""
        for f in fields(self):
            if f.name == "encoder" or (f.name == "head" and every_head):
                continue
            ours, theirs = getattr(self, f.name), getattr(other, f.name)
            if ours not in (None, "", 0) and theirs is not None and ours != theirs:
                return f"{f.name} {theirs!r} != {ours!r}"
        return None


@dataclass
class Manifest:
    """An open store's description, codec and head weights (float32, on the CPU)."""

    data: dict[str, Any]
    codec: Codec
    space: Space
    identity: Identity
    heads: dict[int, DecoderHead]

    @property
    def store_id(self) -> str:
        return self.data["store_id"]

    # ------------------------------------------------------------------ reading

    @classmethod
    def read(cls, location: Location, metadata: dict[bytes, bytes] | None) -> Manifest:
        """The description in a Lance schema's metadata, checked, with its codec file."""
        try:
            data = json.loads((metadata or {})[METADATA_KEY])
        except (KeyError, ValueError) as e:
            raise StoreError(f"{location}: a Lance dataset without a readable arccompress description ({e!r}): "
                             "not a context store") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StoreError(f"{location}: not an arccompress store (its schema's metadata says otherwise)")
        if data.get("version") != VERSION:
            raise StoreError(f"{location}: store format {data.get('version')!r}; this arccompress reads format "
                             f"{VERSION}")
        return cls.parse(str(location), data, lambda d: _codec_file(location, d))

    @classmethod
    def parse(cls, where: str, data: dict[str, Any], codec_file: Any) -> Manifest:
        """The description `data` of the store at `where`, checked; `codec_file(data)` gives its tensors."""
        required = {"store_id": str, "codec": dict, "encoder": str, "encoder_fingerprint": str, "hidden_size": int,
                    "pooling_factor": int, "encoder_dim": int, "bottleneck_dim": int}
        for key, kind in required.items():
            if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
                raise StoreError(f"{where}: description field {key!r} is missing or not a {kind.__name__}")
        if data.get("head") is not None and not isinstance(data["head"], int):
            raise StoreError(f"{where}: description field 'head' must be an int or null")
        identity = Identity.of_manifest(data | {"head": data.get("head")})
        codec, space = _codec(data, identity, where)
        tensors = codec_file(data)
        name = f"{where}/{data.get('codec_file')}"
        if codec.quantizer == "pq":
            book = tensors.get("codebook")
            want = (codec.num_subquantizers, 256, codec.dim // codec.num_subquantizers)
            if book is None or tuple(book.shape) != want:
                raise StoreError(f"{name}: pq codebook missing or not {list(want)}")
            codec.codebook = book.float()
        kept = {int(key[4:].partition(".")[0]) for key in tensors if key.startswith("head")}
        heads = {h: _head(tensors, h, identity, name) for h in space.heads_kept(identity.head, len(kept))}
        return cls(data, codec, space, identity, heads)

    # ------------------------------------------------------------------ creating

    @classmethod
    def describe(cls, identity: Identity, codec: Codec, space: Space, heads: dict[int, DecoderHead],
                 trained_on: int | None) -> tuple[Manifest, bytes | None]:
        """A new store's description, and its codec file's bytes (None when reading needs none)."""
        data = {"format": FORMAT, "version": VERSION, "store_id": uuid.uuid4().hex, "encoder": identity.encoder,
                "encoder_fingerprint": identity.encoder_fingerprint, "hidden_size": identity.hidden_size,
                "pooling_factor": identity.pooling_factor, "encoder_dim": identity.dims["encoder"],
                "bottleneck_dim": identity.dims["bottleneck"],
                "head": None if space.serves_every_head else identity.head,
                "codec": codec.describe() | ({"trained_on_vectors": trained_on} if codec.quantizer == "pq" else {}),
                "arccompress_version": __version__}
        tensors: dict[str, torch.Tensor] = {}
        if codec.codebook is not None:
            tensors["codebook"] = codec.codebook.contiguous()
        heads = {h: head.to("cpu", torch.float32) for h, head in heads.items()}
        for h, head in heads.items():
            for name, tensor in head.weights().items():
                as_bf16 = tensor.to(torch.bfloat16)  # half the bytes when exact (the released weights are bfloat16)
                tensors[f"head{h}.{name}"] = as_bf16 if torch.equal(as_bf16.float(), tensor) else tensor.contiguous()
        blob = None
        if tensors:
            blob = save(tensors)
            digest = hashlib.sha256(blob).hexdigest()
            data |= {"codec_file": f"{CODEC_FOLDER}/codec-{digest[:16]}.safetensors", "codec_sha256": digest,
                     "codec_bytes": len(blob)}
        return cls(data, codec, space, identity, heads), blob

    def metadata(self) -> dict[str, str]:
        """The description as a Lance schema's metadata."""
        return self.of_data(self.data)

    @staticmethod
    def of_data(data: dict[str, Any]) -> dict[str, str]:
        """A description as a Lance schema's metadata."""
        return {METADATA_KEY.decode(): json.dumps(data, ensure_ascii=False)}


CONVERTED_FROM = "converted_from"  # in a converted store's description: {"store": the old one, "complete": bool}


def unfinished(description: dict[str, Any]) -> str | None:
    """The old store a conversion into this store started from and did not finish (None: not a stopped one)."""
    source = description.get(CONVERTED_FROM)
    return source["store"] if isinstance(source, dict) and not source.get("complete") else None


def unfinished_advice(new: Location, old: str) -> str:
    return (f"{new} is a conversion of {old} that stopped part-way (it holds part of it): run `arccompress convert "
            f"{old} {new}` again to finish it")


def _codec(data: dict[str, Any], identity: Identity, where: str) -> tuple[Codec, Space]:
    spec = data["codec"]
    try:
        space, quantizer = parse_codec(f"{spec['space']}-{spec['quantizer']}")
        codec = Codec(space, quantizer, int(spec["dim"]), spec.get("bits_per_dim"))
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{where}: bad codec description {spec!r} ({e})") from None
    if codec.dim != identity.dims[space] or spec.get("bytes_per_vector") != codec.bytes_per_vector:
        raise StoreError(f"{where}: codec dims {spec!r} do not match the store's sizes")
    return codec, SPACES[space]


def _codec_file(location: Location, data: dict[str, Any]) -> dict[str, torch.Tensor]:
    name = data.get("codec_file")
    if name is None:
        return {}
    size = data.get("codec_bytes")
    prefix = f"{CODEC_FOLDER}/codec-"
    if not isinstance(name, str) or not name.startswith(prefix) or "/" in name[len(prefix):] \
            or not isinstance(size, int) or size < 0:
        raise StoreError(f"{location}: bad codec file entry {name!r} ({size!r} bytes) in the description")
    try:
        blob = location.read_file(name, size)
    except OSError as e:
        raise StoreError(f"{location}/{name}: the codec file cannot be read ({' '.join(str(e).split())[:300]})") \
            from None
    return read_codec_file(blob, data.get("codec_sha256"), f"{location}/{name}")


def read_codec_file(blob: bytes, sha256: Any, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a codec file, checked against its SHA-256 and for finite floating-point values."""
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise StoreError(f"{where}: contents do not match the description's sha256 (changed or damaged)")
    try:
        tensors = load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise StoreError(f"{where}: not a readable safetensors file ({e})") from None
    for key, tensor in tensors.items():  # aminmax: one pass, no copy; NaN and infinity reach its results
        finite = tensor.dtype.is_floating_point and all(map(math.isfinite, torch.stack(torch.aminmax(tensor)).tolist()))
        if not finite:
            raise StoreError(f"{where}: {key} is not finite floating-point data")
    return tensors


def _head(tensors: dict[str, torch.Tensor], h: int, identity: Identity, where: str) -> DecoderHead:
    try:
        w = {name: tensors[f"head{h}.{name}"].float() for name in ("layer1", "layer2", "cont")}
        head = DecoderHead.from_weights(w["layer1"], w["layer2"], w["cont"])
    except (KeyError, InputError) as e:
        raise StoreError(f"{where}: head {h} weights missing or inconsistent ({e})") from None
    if head.dims != identity.dims:
        raise StoreError(f"{where}: head {h} has sizes {head.dims}, the description says {identity.dims}")
    return head
