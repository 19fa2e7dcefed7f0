"""A store's manifest: what made its contexts (identity), its codec, and the codec file (head weights, pq codebook).

    manifest.json               format, version, store id, identity, codec; the codec file's name and SHA-256
    codec-<sha256>.safetensors  what reading needs besides the codes: the head weights, the pq codebook

Both are created once, atomically (written aside, then hard-linked into place, which fails if another
writer got there first: that writer's manifest is then the store's).
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from ..codec import Codec, parse_codec
from ..context import CompressedContext
from ..errors import InputError, StoreError
from ..heads import DecoderHead
from ..version import __version__
from .files import create_exclusive
from .format import FORMAT, MANIFEST, VERSION, FragmentIdentity
from .spaces import SPACES, Space

CONVERT = "convert it once with `arccompress convert {old} NEW_STORE` (or ContextStore.convert)"


def read_json(folder: Path) -> dict[str, Any]:
    """The manifest file's contents, if it is an arccompress store manifest (of any format version)."""
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StoreError(f"{path}: not an arccompress store manifest")
    return data


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
    """An open store's manifest, codec and head weights (float32, on the CPU)."""

    data: dict[str, Any]
    codec: Codec
    space: Space
    identity: Identity
    heads: dict[int, DecoderHead]

    @property
    def fragments(self) -> FragmentIdentity:
        """What each of the store's fragments records."""
        c = self.codec
        return FragmentIdentity(self.data["store_id"], c.name, c.bits_per_dim, c.dim, c.bytes_per_vector,
                                self.space.cont_stored, self.identity.encoder_fingerprint,
                                self.data.get("codec_sha256"))

    # ------------------------------------------------------------------ reading

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        data = read_json(folder)
        version = data.get("version")
        if version == 1 or (folder / "index.jsonl").exists():
            raise StoreError(f"{folder} is an arccompress 0.1 store: " + CONVERT.format(old=folder))
        if version == 2:
            raise StoreError(f"{folder} is a store of arccompress 0.2 (format 2, without checksums): "
                             + CONVERT.format(old=folder) + "; its codes are copied as they are")
        if version != VERSION:
            raise StoreError(f"{folder / MANIFEST}: store format {version!r}; this arccompress reads format {VERSION}")
        return cls.parse(folder, data)

    @classmethod
    def parse(cls, folder: Path, data: dict[str, Any]) -> Manifest:
        """The manifest `data` of the store at `folder`, checked, with its codec file."""
        path = folder / MANIFEST
        required = {"store_id": str, "codec": dict, "encoder": str, "encoder_fingerprint": str, "hidden_size": int,
                    "pooling_factor": int, "encoder_dim": int, "bottleneck_dim": int}
        for key, kind in required.items():
            if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
                raise StoreError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
        if data.get("head") is not None and not isinstance(data["head"], int):
            raise StoreError(f"{path}: field 'head' must be an int or null")
        identity = Identity.of_manifest(data | {"head": data.get("head")})
        codec, space = _codec(data, identity, path)
        tensors = _codec_file(folder, data)
        if codec.quantizer == "pq":
            book = tensors.get("codebook")
            want = (codec.num_subquantizers, 256, codec.dim // codec.num_subquantizers)
            if book is None or tuple(book.shape) != want:
                raise StoreError(f"{folder / str(data.get('codec_file'))}: pq codebook missing or not {list(want)}")
            codec.codebook = book.float()
        kept = {int(key[4:].partition(".")[0]) for key in tensors if key.startswith("head")}
        heads = {}
        for h in space.heads_kept(identity.head, len(kept)):
            heads[h] = _head(tensors, h, identity, folder / str(data.get("codec_file")))
        return cls(data, codec, space, identity, heads)

    # ------------------------------------------------------------------ creating

    @classmethod
    def create(cls, folder: Path, identity: Identity, codec: Codec, space: Space, heads: dict[int, DecoderHead],
               trained_on: int | None) -> Manifest:
        """Write the codec file and the manifest; return the store's manifest: this one, or that of a writer that
        created the store first."""
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
        folder.mkdir(parents=True, exist_ok=True)
        if tensors:
            blob = save(tensors)
            digest = hashlib.sha256(blob).hexdigest()
            data |= {"codec_file": f"codec-{digest[:16]}.safetensors", "codec_sha256": digest}
            try:
                create_exclusive(folder / data["codec_file"], blob)
            except FileExistsError:
                pass  # the same bytes, named by their hash (checked whenever the store is opened)
        try:
            create_exclusive(folder / MANIFEST, json.dumps(data, indent=2, ensure_ascii=False).encode())
        except FileExistsError:
            return cls.read(folder)
        return cls(data, codec, space, identity, heads)


def _codec(data: dict[str, Any], identity: Identity, path: Path) -> tuple[Codec, Space]:
    spec = data["codec"]
    try:
        space, quantizer = parse_codec(f"{spec['space']}-{spec['quantizer']}")
        codec = Codec(space, quantizer, int(spec["dim"]), spec.get("bits_per_dim"))
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{path}: bad codec description {spec!r} ({e})") from None
    if codec.dim != identity.dims[space] or spec.get("bytes_per_vector") != codec.bytes_per_vector:
        raise StoreError(f"{path}: codec dims {spec!r} do not match the store's sizes")
    return codec, SPACES[space]


def _codec_file(folder: Path, data: dict[str, Any]) -> dict[str, torch.Tensor]:
    name = data.get("codec_file")
    if name is None:
        return {}
    path = folder / str(name)
    if Path(str(name)).name != name or not path.is_file():
        raise StoreError(f"{folder / MANIFEST}: codec file {name!r} is missing")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != data.get("codec_sha256"):
        raise StoreError(f"{path}: contents do not match the manifest's sha256 (changed or damaged)")
    try:
        tensors = load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise StoreError(f"{path}: not a readable safetensors file ({e})") from None
    for key, tensor in tensors.items():  # aminmax: one pass, no copy; NaN and infinity reach its results
        finite = tensor.dtype.is_floating_point and all(map(math.isfinite, torch.stack(torch.aminmax(tensor)).tolist()))
        if not finite:
            raise StoreError(f"{path}: {key} is not finite floating-point data")
    return tensors


def _head(tensors: dict[str, torch.Tensor], h: int, identity: Identity, path: Path) -> DecoderHead:
    try:
        w = {name: tensors[f"head{h}.{name}"].float() for name in ("layer1", "layer2", "cont")}
        head = DecoderHead.from_weights(w["layer1"], w["layer2"], w["cont"])
    except (KeyError, InputError) as e:
        raise StoreError(f"{path}: head {h} weights missing or inconsistent ({e})") from None
    if head.dims != identity.dims:
        raise StoreError(f"{path}: head {h} has sizes {head.dims}, the manifest says {identity.dims}")
    return head
