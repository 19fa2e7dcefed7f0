"""What a vLLM engine or server needs of its decoder here, without its weights: the tokenizer, the
input-embedding matrix (read alone from the safetensors, locally or by HTTP range requests), its config."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..checkpoint import read_json
from ..tensor_files import parse_header, read_tensor_from
from ..errors import CheckpointError, NotFoundError
from ..hub import is_hub_id, resolve_folder
from ..tokenization import find_sentencepiece_model

DECODER_SIDE_FILES = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "*.model"]


def _embedding_key(keys: Sequence[str], where: str) -> str:
    """The input-embedding matrix among a decoder's tensor names (`model.embed_tokens.weight` for Llama/Mistral)."""
    found = sorted((k for k in keys if k.endswith("embed_tokens.weight")), key=len)
    if not found:
        raise CheckpointError(f"{where}: no '*embed_tokens.weight' tensor among the decoder's weights")
    return found[0]


def read_embedding_matrix(
    decoder: str | Path, *, revision: str | None = None, token: str | bool | None = None, filesystem: Any = None
) -> torch.Tensor:
    """The decoder's input-embedding matrix (vocab, H), read alone from its safetensors.

    `decoder` is a local folder or a hub id; from the hub only the index and that tensor's bytes are fetched,
    by HTTP range requests through huggingface_hub's HfFileSystem (or the fsspec `filesystem` given).
    """
    local = Path(decoder).expanduser()
    if local.is_dir():
        def size_of(name: str) -> int:
            return (local / name).stat().st_size

        def open_file(name: str):
            return open(local / name, "rb")

        where = str(local)
    else:
        if not is_hub_id(decoder):
            raise NotFoundError(f"no decoder folder at {local}")
        if filesystem is None:
            from huggingface_hub import HfFileSystem

            filesystem = HfFileSystem(token=token)
        prefix = f"{decoder}@{revision}" if revision else str(decoder)

        def size_of(name: str) -> int:
            return int(filesystem.size(f"{prefix}/{name}"))

        def open_file(name: str):
            return filesystem.open(f"{prefix}/{name}", "rb", block_size=1 << 20)

        where = str(decoder)
    try:
        with open_file("model.safetensors.index.json") as f:
            weight_map = json.loads(f.read()).get("weight_map") or {}
        key = _embedding_key(list(weight_map), where)
        name = weight_map[key]
    except FileNotFoundError:
        name, key = "model.safetensors", None
    if Path(name).name != name or not name.endswith(".safetensors"):
        raise CheckpointError(f"{where}: weight file {name!r} is not a .safetensors file of the decoder")
    try:
        size = size_of(name)
        with open_file(name) as f:
            if key is None:
                key = _embedding_key(list(parse_header(f, size, f"{where}/{name}")[1]), where)
                f.seek(0)
            return read_tensor_from(f, size, key, f"{where}/{name}")
    except FileNotFoundError:
        raise NotFoundError(f"{where}: no {name} (safetensors weights) to read the input embeddings from") from None


@dataclass
class DecoderFiles:
    """A decoder as engines that hold its weights elsewhere need it."""

    tokenizer: PreTrainedTokenizerBase
    embedding: torch.Tensor  # (vocab, H), as stored
    sentencepiece_model: Path | None
    config: dict[str, Any]  # config.json ({} if there is none)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")


def decoder_files(
    decoder: str | Path,
    *,
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> DecoderFiles:
    """The tokenizer, input-embedding matrix, SentencePiece model file and config of a decoder, without its
    other weights."""
    folder, config = _side_files(decoder, revision, token, local_files_only)
    try:
        tok = tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else AutoTokenizer.from_pretrained(
            str(tokenizer or folder), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise NotFoundError(f"{decoder}: no usable tokenizer ({e}); pass tokenizer=") from None
    weight = read_embedding_matrix(decoder, revision=revision, token=token)
    return DecoderFiles(tok, weight, find_sentencepiece_model(tok, folder), config)


def decoder_config(
    decoder: str | Path, *, revision: str | None = None, token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> dict[str, Any]:
    """A decoder's config.json ({} if there is none), its weights left where they are."""
    return _side_files(decoder, revision, token, local_files_only)[1]


def _side_files(decoder: str | Path, revision: str | None, token: str | bool | None,
                local_files_only: bool | None) -> tuple[Path, dict[str, Any]]:
    """The decoder's folder holding its files other than weights (fetched from the hub if need be), and its config."""
    folder = resolve_folder(decoder, what="decoder", revision=revision, token=token, local_files_only=local_files_only,
                            allow_patterns=DECODER_SIDE_FILES)
    return folder, read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
