"""Reading ARC-Encoder checkpoints: the hub layout and the research layout, safetensors only.

Two layouts hold the same weights:

- hub (`kyutai/ARC8_Encoder_*`): `config.json` as written by PyTorchModelHubMixin (`model_args`,
  `embedder_args`, `bridge_args`, `empty_init`) and `model.safetensors` (or shards with an index),
  tensors named `embedder.*` and `bridge_module.*`;
- research (what the research code's fine-tuning writes): `params.json`, `embedder/consolidated.safetensors`,
  `bridge_module/consolidated.safetensors`, plus the backbone's Meta-style `params.json`.

Everything is checked against the configuration before any weight is read: a missing, unexpected or
mis-shaped tensor is an error naming the tensor and the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .encoder import ARCEncoder, EncoderConfig

HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model"]
# written by the research code for reconstruction pre-training; inference never reads them
UNUSED_PREFIXES = ("rec_tok.",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose contents do not match its configuration."""


@dataclass
class Checkpoint:
    """A located, validated checkpoint: its configuration and where each parameter is stored."""

    name: str  # as the caller gave it: a hub id or a path
    path: Path  # local directory
    layout: str  # "hub" or "research"
    config: EncoderConfig
    tensors: dict[str, tuple[Path, str]]  # model parameter name -> (file, key inside the file)

    def fingerprint(self) -> str:
        """A short hash of the weight files' headers and sizes: it changes when the weights do."""
        h = hashlib.sha256()
        for file in sorted({f for f, _ in self.tensors.values()}):
            with open(file, "rb") as fh:
                header_len = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(header_len))
            h.update(str(file.stat().st_size).encode())
        return h.hexdigest()[:16]

    def disk_dtype(self) -> str:
        file, key = self.tensors["tok_embeddings.weight"]
        with safe_open(file, framework="pt") as f:
            return str(f.get_slice(key).get_dtype())


# ----------------------------------------------------------------------------- locating


def resolve_directory(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """A local checkpoint directory for a path or a hub id (downloaded or taken from the HF cache)."""
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a str or a Path, not {type(name_or_path).__name__}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; a checkpoint is a directory")
    name = str(name_or_path)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or name.startswith((".", "/")):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    return Path(hub_snapshot(name, revision=revision, token=token, local_files_only=local_files_only))


def hub_snapshot(
    repo_id: str,
    *,
    revision: str | None,
    token: str | bool | None,
    local_files_only: bool | None,
    allow_patterns: list[str] | None = None,
) -> str:
    """The local folder of a hub repository's snapshot, with errors that say what is missing."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            local_files_only=bool(local_files_only),
            allow_patterns=allow_patterns or HUB_ALLOW_PATTERNS,
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise FileNotFoundError(
            f"{repo_id!r} (revision {revision or 'main'}) is not in the Hugging Face cache and could not be "
            f"downloaded (offline or unreachable). Download it once with network access, or pass a local "
            f"directory. ({type(e).__name__})"
        ) from None
    except GatedRepoError:
        raise PermissionError(
            f"{repo_id!r} is gated on the Hugging Face hub: accept its terms and pass token=... "
            "(or log in with `hf auth login`)"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"{repo_id!r}: {type(e).__name__}: no such repository or revision") from None
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"{repo_id!r} could not be fetched from the hub: {e}") from None


# ----------------------------------------------------------------------------- configuration


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _require(section: dict[str, Any], key: str, where: Path) -> Any:
    if key not in section or section[key] is None:
        raise CheckpointError(f"{where}: missing required setting {key!r}")
    return section[key]


def check_supported(embedder: dict[str, Any], bridge: dict[str, Any], where: Path) -> int:
    """Refuse configurations the released encoders do not use; return the pooling factor."""
    pooling = embedder.get("pooling_module") or {}
    pool_type = pooling.get("pool_type", "mean_pooled_queries")
    place = pooling.get("where", "before")
    rates = embedder.get("compress_rates") or []
    problems = []
    if pool_type != "mean_pooled_queries":
        problems.append(f"pool_type {pool_type!r} (only 'mean_pooled_queries')")
    if place != "before":
        problems.append(f"pooling where {place!r} (only 'before')")
    if len(rates) != 1 or not isinstance(rates[0], int) or rates[0] >= -1:
        problems.append(f"compress_rates {rates!r} (only one pooling factor, written [-k] with k >= 2)")
    if embedder.get("causal_embedder", False):
        problems.append("a causal encoder (causal_embedder: true)")
    if embedder.get("memory_tokens", 0):
        problems.append(f"memory tokens ({embedder['memory_tokens']})")
    if not embedder.get("cont_tok", False):
        problems.append("no <Cont> token (cont_tok: false)")
    if bridge.get("bridge_type") not in ("mlp", "multi_module"):
        problems.append(f"bridge_type {bridge.get('bridge_type')!r} (only 'mlp' or 'multi_module')")
    if problems:
        raise CheckpointError(
            f"{where}: unsupported ARC-Encoder configuration: {'; '.join(problems)}. "
            "arccompress computes the released ARC encoders' architecture exactly and refuses the rest."
        )
    return -rates[0]


def build_config(
    backbone: dict[str, Any], embedder: dict[str, Any], bridge: dict[str, Any], num_decoders: int, where: Path
) -> EncoderConfig:
    factor = check_supported(embedder, bridge, where)
    dim = int(_require(backbone, "dim", where))
    n_layers = int(_require(backbone, "n_layers", where)) - int(embedder.get("n_truncated_layers", 0))
    if n_layers < 1:
        raise CheckpointError(f"{where}: n_layers minus n_truncated_layers leaves {n_layers} blocks; need >= 1")
    in_dim = int(bridge.get("in_dim") or dim)
    if in_dim != dim:
        raise CheckpointError(f"{where}: bridge in_dim {in_dim} differs from the encoder dim {dim}")
    out_dim = int(_require(bridge, "out_dim", where))
    return EncoderConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=int(_require(backbone, "n_heads", where)),
        n_kv_heads=int(_require(backbone, "n_kv_heads", where)),
        head_dim=int(_require(backbone, "head_dim", where)),
        hidden_dim=int(_require(backbone, "hidden_dim", where)),
        norm_eps=float(_require(backbone, "norm_eps", where)),
        rope_theta=float(_require(backbone, "rope_theta", where)),
        vocab_size=int(_require(backbone, "vocab_size", where)),
        pooling_factor=factor,
        num_decoders=num_decoders,
        bridge_hidden_dim=int(bridge.get("hidden_dim") or out_dim),  # the reference's default
        decoder_hidden_size=out_dim,
    )


def meta_backbone_args(params: dict[str, Any], where: Path) -> dict[str, Any]:
    """Encoder sizes from a Meta-style Llama `params.json`, derived as the research code derives them."""
    dim = int(_require(params, "dim", where))
    n_heads = int(_require(params, "n_heads", where))
    multiple_of = int(_require(params, "multiple_of", where))
    hidden = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    # use_scaled_rope is deliberately ignored: the reference encoder applies plain RoPE
    return {
        "dim": dim,
        "n_layers": _require(params, "n_layers", where),
        "n_heads": n_heads,
        "n_kv_heads": params.get("n_kv_heads") or n_heads,
        "head_dim": dim // n_heads,
        "hidden_dim": hidden,
        "norm_eps": _require(params, "norm_eps", where),
        "rope_theta": params.get("rope_theta", 10000.0),
        "vocab_size": _require(params, "vocab_size", where),
    }


# ----------------------------------------------------------------------------- tensors


def safetensors_keys(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of one safetensors file (header only)."""
    if not file.is_file():
        raise FileNotFoundError(f"missing weight file {file}")
    try:
        with safe_open(file, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers and truncation
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def hub_weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        return sorted({directory / name for name in weight_map.values()})
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(f"{directory}: only pickle weights found; arccompress reads safetensors only")
    raise FileNotFoundError(f"{directory}: no model.safetensors (or model.safetensors.index.json)")


def _map_hub_key(key: str) -> str | None:
    """`embedder.X` -> X; `bridge_module.layerN.*` -> `bridge_module.0.layerN.*`; None when unused."""
    if key.startswith("embedder."):
        name = key[len("embedder."):]
        return None if name.startswith(UNUSED_PREFIXES) else name
    if key.startswith("bridge_module.layer"):
        return "bridge_module.0." + key[len("bridge_module."):]
    return key


def _map_research_bridge_key(key: str) -> str:
    return "bridge_module." + (key if key[0].isdigit() else "0." + key)


def count_heads(keys: list[str], prefix: str) -> int:
    heads = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(heads) + 1 if heads else 0


def match_tensors(config: EncoderConfig, found: dict[str, tuple[Path, str, tuple[int, ...]]]) -> dict[str, tuple[Path, str]]:
    """Check the stored tensors against the model's parameters, one to one, names and shapes."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ARCEncoder(config).state_dict().items()}
    errors = []
    for name, shape in expected.items():
        if name not in found:
            errors.append(f"missing tensor {name!r} {list(shape)}")
        elif found[name][2] != shape:
            file, key, got = found[name]
            errors.append(f"tensor {key!r} in {file} has shape {list(got)}, expected {list(shape)}")
    for name, (file, key, _) in found.items():
        if name not in expected:
            errors.append(f"unexpected tensor {key!r} in {file}")
    if errors:
        shown = "\n  ".join(errors[:20]) + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else "")
        raise CheckpointError(f"checkpoint does not match its configuration:\n  {shown}")
    return {name: (file, key) for name, (file, key, _) in found.items()}


def read_checkpoint(
    name: str, directory: Path, *, backbone_params: str | Path | dict[str, Any] | None = None
) -> Checkpoint:
    """Configuration and tensor locations of the checkpoint in `directory`, validated; no weights read."""
    if (directory / "config.json").is_file():
        return _read_hub(name, directory)
    if (directory / "params.json").is_file():
        return _read_research(name, directory, backbone_params)
    raise FileNotFoundError(
        f"{directory}: neither config.json (hub layout) nor params.json (research layout) found"
    )


def _read_hub(name: str, directory: Path) -> Checkpoint:
    cfg_path = directory / "config.json"
    raw = read_json(cfg_path)
    for section in ("model_args", "embedder_args", "bridge_args"):
        if not isinstance(raw.get(section), dict):
            raise CheckpointError(f"{cfg_path}: missing section {section!r} (not an ARC-Encoder hub config)")
    backbone = dict(raw["model_args"])
    backbone.setdefault("rope_theta", None)
    if backbone["rope_theta"] is None:
        backbone["rope_theta"] = 1_000_000.0  # the reference's fallback when rope_theta is unset
    found: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for file in hub_weight_files(directory):
        for key, shape in safetensors_keys(file).items():
            mapped = _map_hub_key(key)
            if mapped is not None:
                found[mapped] = (file, key, shape)
    n_heads = int(raw.get("empty_init") or 0) or count_heads(list(found), "cont_tok.")
    config = build_config(backbone, raw["embedder_args"], raw["bridge_args"], n_heads, cfg_path)
    return Checkpoint(name, directory, "hub", config, match_tensors(config, found))


def _read_research(name: str, directory: Path, backbone_params: str | Path | dict[str, Any] | None) -> Checkpoint:
    params_path = directory / "params.json"
    raw = read_json(params_path)
    embedder, bridge = raw.get("embedder_params"), raw.get("bridge_module")
    if not isinstance(embedder, dict) or not isinstance(bridge, dict):
        raise CheckpointError(f"{params_path}: missing 'embedder_params' or 'bridge_module' (not a research checkpoint)")
    if isinstance(backbone_params, dict):
        backbone_raw, where = backbone_params, params_path
    else:
        where = _find_backbone_params(directory, backbone_params)
        backbone_raw = read_json(where)
    backbone = meta_backbone_args(backbone_raw, where)
    embed_file = directory / "embedder" / "consolidated.safetensors"
    bridge_file = directory / "bridge_module" / "consolidated.safetensors"
    found: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for key, shape in safetensors_keys(embed_file).items():
        if not key.startswith(UNUSED_PREFIXES):
            found[key] = (embed_file, key, shape)
    for key, shape in safetensors_keys(bridge_file).items():
        found[_map_research_bridge_key(key)] = (bridge_file, key, shape)
    config = build_config(backbone, embedder, bridge, count_heads(list(found), "cont_tok."), params_path)
    if "tok_embeddings.weight" not in found or "layers.0.attention.wq.weight" not in found:
        raise CheckpointError(
            f"{embed_file}: the encoder's token embeddings or first layers are not in the checkpoint "
            "(trained_layers / train_embedding_mtx below the full encoder): arccompress needs a complete encoder"
        )
    return Checkpoint(name, directory, "research", config, match_tensors(config, found))


def _find_backbone_params(directory: Path, given: str | Path | None) -> Path:
    if given is not None:
        path = Path(given).expanduser()
        path = path / "params.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"backbone_params: no such file {path}")
        return path
    for candidate in (directory / "backbone" / "params.json", directory / "backbone_params.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{directory} is a research checkpoint: pass backbone_params= (the Llama-3.2-3B params.json the "
        "encoder was built from), or put it at backbone/params.json inside the checkpoint"
    )


# ----------------------------------------------------------------------------- loading


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def stream_tensors(file: Path, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the named tensors of a safetensors file one at a time, read with plain file reads.

    safetensors' own loader maps the whole file into memory, and every page it touches counts in the
    process's resident memory until the file is closed: reading a 12 GB checkpoint that way shows 12 GB of
    host RSS. Plain reads into one buffer per tensor keep host memory at the largest tensor.
    """
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        for key in keys:
            entry = header[key]
            begin, end = entry["data_offsets"]
            buffer = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(8 + header_len + begin)
            if f.readinto(memoryview(buffer.numpy())) != end - begin:
                raise CheckpointError(f"{file}: tensor {key!r} is cut short; is the file truncated?")
            yield key, buffer.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def load_model(checkpoint: Checkpoint, *, device: torch.device, dtype: torch.dtype) -> ARCEncoder:
    """Build the encoder on the meta device and fill it tensor by tensor on `device` in `dtype`.

    Host memory holds at most one stored tensor at a time: a float32 checkpoint loaded in bfloat16 on a
    GPU never exists as a whole in host RAM.
    """
    with torch.device("meta"):
        model = ARCEncoder(checkpoint.config)
    by_file: dict[Path, dict[str, str]] = {}
    for name, (file, key) in checkpoint.tensors.items():
        by_file.setdefault(file, {})[key] = name
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        try:
            for key, tensor in stream_tensors(file, list(names)):
                state[names[key]] = tensor.to(device=device, dtype=dtype)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{file}: could not read tensor data ({e})") from None
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
