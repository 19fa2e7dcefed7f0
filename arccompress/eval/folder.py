"""A run's folder: its key (everything that determines the predictions), claimed once, and predictions written as
they come and read back when a run resumes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..engines.base import Sampling
from ..errors import InputError
from .data import QARow

RUN_FILE = "run.json"
REPORT_FILES = ("report.json", "report.md", "report.png")

IDENTITY_FIELDS = ("backend", "decoder_fingerprint", "quantization", "dtype", "encoder_fingerprint", "head")


def run_settings(rows: list[QARow], engine: dict[str, Any], store: Any, *, shots: int, seed: int,
                  chunk_size: int | None, batch_size: int, sampling: Sampling) -> dict[str, Any]:
    """Everything that determines a run's predictions, readable, and its key (a hash of it)."""
    data = hashlib.sha256(json.dumps([[r.question, r.answers, r.passages, r.passage_ids] for r in rows],
                                     ensure_ascii=True).encode()).hexdigest()
    manifest = getattr(store, "manifest", None) or {}
    settings: dict[str, Any] = {
        "data": f"{len(rows)} rows, sha256 {data[:16]}",
        **{k: engine.get(k) for k in IDENTITY_FIELDS},
        "store": None if store is None else f"{manifest.get('store_id')} ({manifest.get('codec', {}).get('name')})",
        "shots": shots, "seed": seed, "chunk_size": chunk_size, "batch_size": batch_size,
        **{f"sampling.{k}": _jsonable(v) for k, v in dataclasses.asdict(sampling).items()},
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return {"key": key, "settings": settings, "names": {"encoder": engine.get("encoder"),
                                                          "decoder": engine.get("decoder")}}


def _jsonable(value: Any) -> Any:
    """A setting as JSON: plain values as they are, containers element by element, objects by their type."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return type(value).__name__


def claim_output(out: Path, run: dict[str, Any], *, overwrite: bool) -> None:
    """Make `out` this run's folder. A folder holding another run's predictions is refused, naming what differs,
    unless `overwrite`: then that run's files (and only those) are removed first."""
    marker = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")
    previous: dict[str, Any] = {}
    if marker.is_file():
        try:
            previous = json.loads(marker.read_bytes())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            previous = {}
        if isinstance(previous, dict) and previous.get("key") == run["key"]:
            return
    ours = [out / name for name in (RUN_FILE, *REPORT_FILES)] + sorted(out.glob("predictions-*.jsonl"))
    if any(p.exists() for p in ours):
        if not overwrite:
            raise InputError(f"{out} holds predictions of another run ({_differences(previous, run)}); choose another "
                             "output folder, or replace them with --overwrite (overwrite=True)")
        for p in ours:
            p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(run, indent=2))
    os.replace(tmp, marker)


def _differences(previous: Any, run: dict[str, Any]) -> str:
    """What differs between a folder's run and this one, in a few words: "data 12 rows, sha256 ... -> ..."."""
    old = previous.get("settings") if isinstance(previous, dict) else None
    if not isinstance(old, dict):
        return "made by an earlier arccompress, or its run.json is unreadable"
    new = run["settings"]
    diffs = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in dict.fromkeys([*new, *old]) if old.get(k) != new.get(k)]
    return "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")


PREDICTION_FIELDS: dict[str, tuple[type, ...]] = {
    "question": (str,), "prediction": (str,), "generated": (str,), "answers": (list,),
    "exact_match": (int, float), "f1": (int, float), "prompt_positions": (int,), "tokens_saved": (int,),
    "prefill_seconds": (int, float), "total_seconds": (int, float),
}


def _valid_prediction(p: Any, rows: set[int]) -> bool:
    return isinstance(p, dict) and type(p.get("row")) is int and p["row"] in rows and all(
        isinstance(p.get(k), kinds) and not isinstance(p.get(k), bool) for k, kinds in PREDICTION_FIELDS.items())


def read_predictions(out: Path | None, mode: str, rows: set[int]) -> tuple[dict[int, dict[str, Any]], int]:
    """Predictions a previous run of this folder wrote for `rows`, and how many lines were dropped: a line that
    is not UTF-8, not JSON or not a whole prediction (a crash cut it, an editor broke it). When any was dropped,
    or the last line has no newline, the file is rewritten with the good lines only, so that the next append
    starts on a fresh line."""
    path = None if out is None else out / f"predictions-{mode}.jsonl"
    if path is None or not path.is_file():
        return {}, 0
    data = path.read_bytes()
    done: dict[int, dict[str, Any]] = {}
    kept: list[bytes] = []
    dropped = 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            p = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            p = None
        if isinstance(p, dict) and type(p.get("row")) is int and p["row"] not in rows:
            kept.append(line)  # a row of another limit or of the examples: kept, not used
        elif _valid_prediction(p, rows):
            done[p["row"]] = p
            kept.append(line)
        else:
            dropped += 1
    if dropped or (data and not data.endswith(b"\n")):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(b"".join(line + b"\n" for line in kept))
        os.replace(tmp, path)
    return done, dropped


def write_predictions(out: Path | None, mode: str, preds: list[dict[str, Any]]) -> None:
    if out is None:
        return
    with open(out / f"predictions-{mode}.jsonl", "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds))
        f.flush()
