"""Safetensors files read by hand: each header checked against the file before any data is read, tensors read one at a
time into a buffer of their own (host memory holds the largest tensor, never a mapped file), NaN and infinity found
a slice at a time. Checkpoints (`checkpoint`) and decoders served elsewhere (`engines.decoder_files`) read here."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import CheckpointError, InputError, NotFoundError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header



def read_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(header length, {key: {"dtype", "shape", "data_offsets"}}) of a safetensors file, checked."""
    if not file.is_file():
        raise NotFoundError(f"missing weight file {file}")
    try:
        with open(file, "rb") as f:
            return parse_header(f, file.stat().st_size, str(file))
    except OSError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def parse_header(f: BinaryIO, size: int, where: str) -> tuple[int, dict[str, Any]]:
    """The checked header of the safetensors file open as `f` (at its start), `size` bytes long."""
    try:
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n <= min(MAX_HEADER, size - 8):
            raise InputError(f"header length {n} does not fit in a file of {size} bytes")
        header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise InputError("header is not a JSON object")
        header.pop("__metadata__", None)
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            shape = entry["shape"]
            if entry["dtype"] not in SAFETENSORS_DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise InputError(f"tensor {key!r}: bad dtype or shape")
            if not 0 <= begin <= end <= size - 8 - n or \
                    end - begin != math.prod(shape) * SAFETENSORS_DTYPES[entry["dtype"]].itemsize:
                raise InputError(f"tensor {key!r}: data offsets {begin}..{end} do not match its shape or the file")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: not a readable safetensors file ({e})") from None
    return n, header


def safetensors_keys(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor names -> (shape, safetensors dtype) of one safetensors file (header only)."""
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in read_header(file)[1].items()}


def stream_raw(file: Path, keys: list[str]) -> Iterator[tuple[str, torch.Tensor, dict[str, Any]]]:
    """Yield (key, raw bytes as a uint8 tensor, header entry) of the named tensors, one at a time.

    Plain reads into one buffer per tensor: safetensors' own loader maps the whole file, and every page it
    touches counts in the process's resident memory until the file is closed (12 GB of host RSS for a
    12 GB checkpoint); this keeps host memory at the largest tensor.
    """
    header_len, header = read_header(file)
    with open(file, "rb") as f:
        for key in keys:
            entry = header[key]
            begin, end = entry["data_offsets"]
            buffer = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(8 + header_len + begin)
            if f.readinto(memoryview(buffer.numpy())) != end - begin:
                raise CheckpointError(f"{file}: tensor {key!r} is cut short; is the file truncated?")
            yield key, buffer, entry


def as_tensor(raw: torch.Tensor, entry: dict[str, Any]) -> torch.Tensor:
    """The tensor stored in `raw` bytes, as the header entry describes it."""
    return raw.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def read_tensor_from(f: BinaryIO, size: int, key: str, where: str) -> torch.Tensor:
    """One tensor of the safetensors file open as `f`, read alone: the header, then that tensor's bytes (a
    decoder's embedding matrix out of a multi-GB shard, locally or by HTTP range requests)."""
    header_len, header = parse_header(f, size, where)
    if key not in header:
        raise CheckpointError(f"{where}: no tensor {key!r}")
    begin, end = header[key]["data_offsets"]
    f.seek(8 + header_len + begin)
    buffer = torch.empty(end - begin, dtype=torch.uint8)
    if f.readinto(memoryview(buffer.numpy())) != end - begin:
        raise CheckpointError(f"{where}: tensor {key!r} is cut short; is the file truncated?")
    return as_tensor(buffer, header[key])


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """No NaN or infinity in `tensor`, checked a slice at a time: isfinite on a whole bfloat16 embedding matrix
    would briefly hold a float32 copy of it (1.6 GB for Llama 3's), twice what loading it needs."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))
