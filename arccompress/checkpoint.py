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
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .encoder import ARCEncoder, EncoderConfig
from .errors import CheckpointError, NotFoundError
from .tensor_files import (FLOAT_DTYPES, SAFETENSORS_DTYPES, all_finite, as_tensor, read_header, safetensors_keys,
                           stream_raw)
from .hub import cache_dir

ENCODER_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model"]  # what a hub encoder needs
# written by the research code for reconstruction pre-training; inference never reads them
UNUSED_PREFIXES = ("rec_tok.",)


@dataclass
class Checkpoint:
    """A located, validated checkpoint: its configuration and where each parameter is stored."""

    name: str  # as the caller gave it: a hub id or a path
    path: Path  # local directory
    layout: str  # "hub" or "research"
    config: EncoderConfig
    tensors: dict[str, tuple[Path, str]]  # model parameter name -> (file, key inside the file)

    def fingerprint(self) -> str:
        """A hash of every weight (name, dtype, shape, bytes) and of the configuration.

        It changes whenever any weight or setting does, and is the same for the same weights in either
        layout. Hashing reads every byte once (sha256, about 1.8 GB/s here: ~4 s for a 6.5 GB checkpoint);
        the result is cached under ~/.cache/arccompress keyed by the files' paths, sizes and modification
        times, and `load_model` computes it from the bytes it reads anyway.
        """
        cached = fingerprint_cache_read(self)
        if cached is not None:
            return cached
        digests: dict[str, str] = {}
        for file, names in self.by_file().items():
            for key, raw, _ in stream_raw(file, list(names)):
                digests[names[key]] = hashlib.sha256(memoryview(raw.numpy())).hexdigest()
        return fingerprint_cache_write(self, combine_digests(self, digests))

    def by_file(self) -> dict[Path, dict[str, str]]:
        """{weight file: {key in the file: model parameter name}}."""
        out: dict[Path, dict[str, str]] = {}
        for name, (file, key) in self.tensors.items():
            out.setdefault(file, {})[key] = name
        return out

    def disk_dtype(self) -> str:
        file, key = self.tensors["tok_embeddings.weight"]
        return str(SAFETENSORS_DTYPES[read_header(file)[1][key]["dtype"]]).replace("torch.", "")


def combine_digests(checkpoint: Checkpoint, digests: dict[str, str]) -> str:
    """One hash from the configuration and every tensor's (name, dtype, shape, sha256), in name order."""
    h = hashlib.sha256(json.dumps(asdict(checkpoint.config), sort_keys=True).encode())
    headers: dict[Path, dict[str, Any]] = {}
    for name in sorted(digests):
        file, key = checkpoint.tensors[name]
        header = headers.setdefault(file, read_header(file)[1])
        h.update(f"{name}|{header[key]['dtype']}|{header[key]['shape']}|{digests[name]}\n".encode())
    return h.hexdigest()[:16]


def _cache_file(checkpoint: Checkpoint) -> Path | None:
    """Where the fingerprint of these exact files is cached: keyed by path, size, mtime and inode of each."""
    root = cache_dir()
    h = hashlib.sha256(json.dumps(asdict(checkpoint.config), sort_keys=True).encode())
    try:
        for file in sorted({f for f, _ in checkpoint.tensors.values()}):
            st = file.stat()
            h.update(f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}\n".encode())
    except OSError:
        return None
    return root / "fingerprints" / h.hexdigest()


def fingerprint_cache_read(checkpoint: Checkpoint) -> str | None:
    file = _cache_file(checkpoint)
    try:
        value = file.read_text().strip() if file is not None else ""
    except OSError:
        return None
    return value if re.fullmatch(r"[0-9a-f]{16}", value) else None


def fingerprint_cache_write(checkpoint: Checkpoint, value: str) -> str:
    file = _cache_file(checkpoint)
    if file is not None:
        try:  # a cache only: a read-only home or a full disk costs a re-hash next time, nothing else
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
            tmp.write_text(value)
            os.replace(tmp, file)
        except OSError:
            pass
    return value


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


# sane bounds, far above any released model (Llama-3.2-3B: dim 3072, 28 layers, vocab 128256): a value
# outside them is a corrupt or hostile config, refused before anything is built from it
LIMITS = {"dim": 1 << 16, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024, "head_dim": 1 << 12,
          "hidden_dim": 1 << 20, "vocab_size": 1 << 23, "out_dim": 1 << 16, "hidden_dim_bridge": 1 << 20,
          "num_decoders": 64, "pooling_factor": 1 << 12, "multiple_of": 1 << 16}
_MISSING = object()


def _int(section: dict[str, Any], key: str, where: Path, *, default: Any = _MISSING, low: int = 1,
         limit: str | None = None) -> int:
    """section[key] as an int within [low, LIMITS[limit or key]], or a CheckpointError naming it."""
    value = section.get(key, default)
    if value is _MISSING or value is None:
        raise CheckpointError(f"{where}: missing required setting {key!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where}: {key} must be an integer, found {value!r}")
    high = LIMITS.get(limit or key)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise CheckpointError(f"{where}: {key} = {value} is out of range (must be {bound})")
    return value


def _float(section: dict[str, Any], key: str, where: Path, *, default: Any = _MISSING, positive: bool) -> float:
    value = section.get(key, default)
    if value is _MISSING or value is None:
        raise CheckpointError(f"{where}: missing required setting {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{where}: {key} must be a finite number, found {value!r}")
    if value < 0 or (positive and value == 0):
        raise CheckpointError(f"{where}: {key} = {value} must be {'positive' if positive else 'non-negative'}")
    return float(value)


def check_supported(embedder: dict[str, Any], bridge: dict[str, Any], where: Path) -> int:
    """Refuse configurations the released encoders do not use; return the pooling factor."""
    pooling = embedder.get("pooling_module") or {}
    if not isinstance(pooling, dict):
        raise CheckpointError(f"{where}: pooling_module must be an object, found {pooling!r}")
    pool_type = pooling.get("pool_type", "mean_pooled_queries")
    place = pooling.get("where", "before")
    rates = embedder.get("compress_rates") or []
    problems = []
    if pool_type != "mean_pooled_queries":
        problems.append(f"pool_type {pool_type!r} (only 'mean_pooled_queries')")
    if place != "before":
        problems.append(f"pooling where {place!r} (only 'before')")
    if not isinstance(rates, list) or len(rates) != 1 or isinstance(rates[0], bool) or not isinstance(rates[0], int) \
            or not -LIMITS["pooling_factor"] <= rates[0] < -1:
        problems.append(f"compress_rates {rates!r} (only one pooling factor, written [-k] with "
                        f"2 <= k <= {LIMITS['pooling_factor']})")
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
    """The EncoderConfig of a checkpoint, every value type- and range-checked."""
    factor = check_supported(embedder, bridge, where)
    dim = _int(backbone, "dim", where)
    n_layers = _int(backbone, "n_layers", where) - _int(embedder, "n_truncated_layers", where, default=0, low=0,
                                                         limit="n_layers")
    if n_layers < 1:
        raise CheckpointError(f"{where}: n_layers minus n_truncated_layers leaves {n_layers} blocks; need >= 1")
    in_dim = _int(bridge, "in_dim", where, default=dim, limit="dim")
    if in_dim != dim:
        raise CheckpointError(f"{where}: bridge in_dim {in_dim} differs from the encoder dim {dim}")
    out_dim = _int(bridge, "out_dim", where)
    n_heads, n_kv_heads = _int(backbone, "n_heads", where), _int(backbone, "n_kv_heads", where)
    if n_heads % n_kv_heads:
        raise CheckpointError(f"{where}: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
    return EncoderConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=_int(backbone, "head_dim", where),
        hidden_dim=_int(backbone, "hidden_dim", where),
        norm_eps=_float(backbone, "norm_eps", where, positive=False),
        rope_theta=_float(backbone, "rope_theta", where, positive=True),
        vocab_size=_int(backbone, "vocab_size", where),
        pooling_factor=factor,
        num_decoders=num_decoders,
        # the reference's default bottleneck is the output size
        bridge_hidden_dim=_int(bridge, "hidden_dim", where, default=out_dim, limit="hidden_dim_bridge"),
        decoder_hidden_size=out_dim,
    )


def meta_backbone_args(params: dict[str, Any], where: Path) -> dict[str, Any]:
    """Encoder sizes from a Meta-style Llama `params.json`, derived as the research code derives them."""
    dim = _int(params, "dim", where)
    n_heads = _int(params, "n_heads", where)
    multiple_of = _int(params, "multiple_of", where)
    hidden = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(_float(params, "ffn_dim_multiplier", where, positive=True) * hidden)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    if dim % n_heads:
        raise CheckpointError(f"{where}: dim {dim} is not a multiple of n_heads {n_heads}")
    # use_scaled_rope is deliberately ignored: the reference encoder applies plain RoPE
    return {
        "dim": dim,
        "n_layers": params.get("n_layers"),
        "n_heads": n_heads,
        "n_kv_heads": params.get("n_kv_heads") or n_heads,
        "head_dim": dim // n_heads,
        "hidden_dim": hidden,
        "norm_eps": params.get("norm_eps"),
        "rope_theta": params.get("rope_theta", 10000.0),
        "vocab_size": params.get("vocab_size"),
    }


def hub_weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: no 'weight_map' of file names")
        root = directory.resolve()
        files = set()
        for name in weight_map.values():
            file = (directory / name).resolve()
            if file.parent != root or not name.endswith(".safetensors"):
                raise CheckpointError(f"{index}: weight file {name!r} is not a .safetensors file inside {directory}")
            files.add(directory / name)
        return sorted(files)
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(f"{directory}: only pickle weights found; arccompress reads safetensors only")
    raise NotFoundError(f"{directory}: no model.safetensors (or model.safetensors.index.json)")


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
    """1 + the largest N of keys `prefix`N.*; 0 if there is none."""
    heads = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(heads) + 1 if heads else 0


Found = dict[str, tuple[Path, str, tuple[int, ...], str]]  # parameter name -> (file, key, shape, dtype)


def match_tensors(config: EncoderConfig, found: Found, where: Path) -> dict[str, tuple[Path, str]]:
    """Check the stored tensors against the model's parameters, one to one: names, shapes, float dtypes.

    Block and head counts are compared with the files first, so that a config claiming a million layers
    is refused before any module is built.
    """
    for prefix, count, what in (("layers.", config.n_layers, "encoder blocks"),
                                ("cont_tok.", config.num_decoders, "decoder heads")):
        stored = count_heads(list(found), prefix)
        if stored != count:
            raise CheckpointError(f"{where}: the configuration says {count} {what}, the weight files hold {stored}")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ARCEncoder(config).state_dict().items()}
    errors = []
    for name, shape in expected.items():
        if name not in found:
            errors.append(f"missing tensor {name!r} {list(shape)}")
        elif found[name][2] != shape:
            file, key, got, _ = found[name]
            errors.append(f"tensor {key!r} in {file} has shape {list(got)}, expected {list(shape)}")
        elif found[name][3] not in FLOAT_DTYPES:
            file, key, _, dtype = found[name]
            errors.append(f"tensor {key!r} in {file} is {dtype}, not a floating-point type")
    for name, (file, key, _, _) in found.items():
        if name not in expected:
            errors.append(f"unexpected tensor {key!r} in {file}")
    if errors:
        shown = "\n  ".join(errors[:20]) + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else "")
        raise CheckpointError(f"checkpoint does not match its configuration:\n  {shown}")
    return {name: (file, key) for name, (file, key, _, _) in found.items()}


def read_checkpoint(
    name: str, directory: Path, *, backbone_params: str | Path | dict[str, Any] | None = None
) -> Checkpoint:
    """Configuration and tensor locations of the checkpoint in `directory`, validated; no weights read."""
    if (directory / "config.json").is_file():
        return _read_hub(name, directory)
    if (directory / "params.json").is_file():
        return _read_research(name, directory, backbone_params)
    raise NotFoundError(
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
    found: Found = {}
    for file in hub_weight_files(directory):
        for key, (shape, dtype) in safetensors_keys(file).items():
            mapped = _map_hub_key(key)
            if mapped is not None:
                found[mapped] = (file, key, shape, dtype)
    n_heads = _int(raw, "empty_init", cfg_path, default=None, limit="num_decoders") if raw.get("empty_init") \
        else count_heads(list(found), "cont_tok.")
    config = build_config(backbone, raw["embedder_args"], raw["bridge_args"], n_heads, cfg_path)
    return Checkpoint(name, directory, "hub", config, match_tensors(config, found, cfg_path))


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
    found: Found = {}
    for key, (shape, dtype) in safetensors_keys(embed_file).items():
        if not key.startswith(UNUSED_PREFIXES):
            found[key] = (embed_file, key, shape, dtype)
    for key, (shape, dtype) in safetensors_keys(bridge_file).items():
        found[_map_research_bridge_key(key)] = (bridge_file, key, shape, dtype)
    config = build_config(backbone, embedder, bridge, count_heads(list(found), "cont_tok."), params_path)
    if "tok_embeddings.weight" not in found or "layers.0.attention.wq.weight" not in found:
        raise CheckpointError(
            f"{embed_file}: the encoder's token embeddings or first layers are not in the checkpoint "
            "(trained_layers / train_embedding_mtx below the full encoder): arccompress needs a complete encoder"
        )
    return Checkpoint(name, directory, "research", config, match_tensors(config, found, params_path))


def _find_backbone_params(directory: Path, given: str | Path | None) -> Path:
    if given is not None:
        path = Path(given).expanduser()
        path = path / "params.json" if path.is_dir() else path
        if not path.is_file():
            raise NotFoundError(f"backbone_params: no such file {path}")
        return path
    for candidate in (directory / "backbone" / "params.json", directory / "backbone_params.json"):
        if candidate.is_file():
            return candidate
    raise NotFoundError(
        f"{directory} is a research checkpoint: pass backbone_params= (the Llama-3.2-3B params.json the "
        "encoder was built from), or put it at backbone/params.json inside the checkpoint"
    )


# ----------------------------------------------------------------------------- loading


def load_model(checkpoint: Checkpoint, *, device: torch.device, dtype: torch.dtype) -> tuple[ARCEncoder, str]:
    """Build the encoder on the meta device, fill it tensor by tensor on `device` in `dtype`; also fingerprint it.

    Host memory holds at most one stored tensor at a time: a float32 checkpoint loaded in bfloat16 on a
    GPU never exists as a whole in host RAM. Every tensor is checked for NaN and infinity. Unless the
    fingerprint is cached, each tensor's bytes are hashed in a second thread while the main thread converts
    the same buffer (sha256 releases the GIL), and the fingerprint is returned with the model.
    """
    with torch.device("meta"):
        model = ARCEncoder(checkpoint.config)
    fingerprint = fingerprint_cache_read(checkpoint)
    state: dict[str, torch.Tensor] = {}
    digests: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=1) as hasher:
        for file, names in checkpoint.by_file().items():
            try:
                for key, raw, entry in stream_raw(file, list(names)):
                    name = names[key]
                    digest = None if fingerprint is not None else hasher.submit(
                        lambda b: hashlib.sha256(memoryview(b.numpy())).hexdigest(), raw)
                    tensor = as_tensor(raw, entry).to(device=device, dtype=dtype)
                    if digest is not None:
                        digests[name] = digest.result()  # before the next read: one buffer in memory at a time
                    if not all_finite(tensor):
                        raise CheckpointError(f"{file}: tensor {key!r} holds NaN or infinite values "
                                              f"(after conversion to {str(dtype).replace('torch.', '')})")
                    state[name] = tensor
            except (OSError, KeyError, ValueError, RuntimeError) as e:
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(f"{file}: could not read tensor data ({e})") from None
    if fingerprint is None:
        fingerprint = fingerprint_cache_write(checkpoint, combine_digests(checkpoint, digests))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False), fingerprint
