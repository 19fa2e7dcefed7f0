"""Compressing a corpus into a ContextStore: sources, checks, work units, engines (one process, or Ray).

    from arccompress import compress_corpus
    summary = compress_corpus("wiki.jsonl", "wiki-store", encoder="kyutai/ARC8_Encoder_Mistral", codec="pq",
                              bits_per_dim=1.0, engine="ray", num_workers=8, num_gpus_per_worker=1)

A source is a JSONL or Parquet file (or folder of Parquet files) of `{id, text}` rows, a list of `(id, text)`
pairs, a `datasets.Dataset` or a Ray `Dataset`. Before anything is compressed, every row is checked (an id,
distinct, a non-empty text that is valid Unicode) and ids already in the store are set aside, so a job that
died or was stopped resumes where it was. The rows left are cut into work units of `batch_size` consecutive
rows, each compressed by one `Compressor.compress` call and written as one fragment of the store: with the
same units, device and thread count, both engines store exactly the same bytes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, InputTypeError, NotFoundError
from .tokenization import check_text

SOURCE_KINDS = "a JSONL or Parquet path, a list of (id, text), a datasets.Dataset or a ray.data.Dataset"


@dataclass(frozen=True)
class BadRow:
    """A source row that cannot be stored: where it is, its id if it has one, and what is wrong."""

    where: str
    id: str | None
    problem: str

    def __str__(self) -> str:
        return f"{self.where}{'' if self.id is None else f' (id {self.id!r})'}: {self.problem}"


@dataclass
class CorpusSummary:
    """What a compress_corpus job did."""

    store: str
    texts: int  # compressed and stored by this job
    already_stored: int  # skipped: in the store before the job
    tokens: int  # encoder tokens of the texts compressed
    seconds: float
    bytes_written: int  # store data written by this job
    engine: str
    bad_rows: list[BadRow] = field(default_factory=list)  # skipped (on_bad_row="skip")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        bad = f", {len(self.bad_rows)} bad rows skipped" if self.bad_rows else ""
        return (f"compressed {self.texts} texts ({self.already_stored} already stored{bad}) into {self.store}: "
                f"{self.tokens} tokens in {self.seconds:.1f} s ({self.tokens_per_s:,.0f} tokens/s, {self.engine}), "
                f"{self.bytes_written / 1e6:.2f} MB written")


# ----------------------------------------------------------------------------- sources


def iter_source(source: Any, *, id_field: str = "id", text_field: str = "text") -> Iterator[tuple[str, Any, Any]]:
    """(where, id, text) of every row of a source, in order; `where` names the row for error messages."""
    missing = _MISSING
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix in (".jsonl", ".json") and path.is_file():
            for where, record in jsonl_records(path):
                if isinstance(record, BadRowValue):
                    yield where, None, record
                else:
                    yield where, record.get(id_field, missing), record.get(text_field, missing)
            return
        if path.suffix == ".parquet" or path.is_dir():
            import pyarrow.parquet as pq

            files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
            if not files:
                raise NotFoundError(f"no Parquet files in {path}")
            for file in files:
                pf = pq.ParquetFile(file)
                for column in (id_field, text_field):
                    if column not in pf.schema_arrow.names:
                        raise InputError(f"{file}: no {column!r} column (columns: {pf.schema_arrow.names})")
                k = 0
                for batch in pf.iter_batches(columns=[id_field, text_field], batch_size=4096):
                    for i, t in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                        yield f"{file} row {k}", i, t
                        k += 1
            return
        if not path.exists():
            raise NotFoundError(f"no such source file {path}")
        raise InputError(f"{path}: a source file must end in .jsonl or .parquet")
    if is_ray_dataset(source) or is_hf_dataset(source):
        names = source.schema().names if is_ray_dataset(source) else source.column_names
        for column in (id_field, text_field):
            if column not in names:
                raise InputError(f"the dataset has no {column!r} column (columns: {names})")
        if is_ray_dataset(source):
            batches = source.iter_batches(batch_size=4096, batch_format="pyarrow")
            batches = ({c: b.column(c).to_pylist() for c in (id_field, text_field)} for b in batches)
        else:
            batches = source.select_columns([id_field, text_field]).iter(batch_size=4096)
        k = 0
        for batch in batches:
            for i, t in zip(batch[id_field], batch[text_field]):
                yield f"row {k}", i, t
                k += 1
        return
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        for k, item in enumerate(source):
            if isinstance(item, dict):
                yield f"item {k}", item.get(id_field, missing), item.get(text_field, missing)
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                yield f"item {k}", item[0], item[1]
            else:
                yield f"item {k}", None, BadRowValue(f"expected an (id, text) pair, found {type(item).__name__}")
        return
    raise InputTypeError(f"source must be {SOURCE_KINDS}, not {type(source).__name__}")


class BadRowValue(str):
    """A text slot holding the reason a row could not be parsed."""


def jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any] | BadRowValue]]:
    """("file:line", object) for every non-blank line of a JSONL file; a line that is not a JSON object gives
    the reason instead, for the caller to raise or to skip."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", BadRowValue(f"not JSON ({e.msg})")
                continue
            yield f"{path}:{n}", (record if isinstance(record, dict) else
                                  BadRowValue(f"a JSON {type(record).__name__}, not an object"))


_MISSING = object()  # a field the row does not have


def is_ray_dataset(source: Any) -> bool:
    return type(source).__module__.startswith("ray.data") and hasattr(source, "map_batches")


def is_hf_dataset(source: Any) -> bool:
    return type(source).__module__.startswith("datasets") and hasattr(source, "column_names")


def normalize_id(value: Any) -> str | None:
    """A row id as a str (ints become their decimal text); None if it cannot be one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value and not value.isspace():
        return value
    return None


@dataclass
class CheckedRows:
    """What checking a source found: bad rows, ids never to store, and the distinct good ids' count."""

    bad: list[BadRow]
    skip: set[str]
    good: set[str]


def check_rows(rows: Iterable[tuple[str, Any, Any]], *, on_bad_row: str) -> CheckedRows:
    """Check every row: it needs an id (a str or an int), a non-empty text, both valid Unicode, and an id no
    other row has. A duplicated id is ambiguous (which text is right?): every row carrying it is bad. With
    on_bad_row="raise" the first bad row raises ValueError naming it."""
    bad: list[BadRow] = []
    skip: set[str] = set()
    first: dict[str, str] = {}
    for where, raw_id, text in rows:
        key = normalize_id(raw_id)
        problem = None
        if isinstance(text, BadRowValue):
            problem = str(text)
        elif key is None:
            problem = "no id" if raw_id is None or not isinstance(raw_id, (str, int)) else f"id {raw_id!r} is not usable"
        else:
            try:
                check_text(key, "the id")
                if not isinstance(text, str):
                    problem = "no text" if text is None or text is _MISSING else \
                        f"the text is a {type(text).__name__}, not a str"
                elif not text.strip():
                    problem = "the text is empty"
                else:
                    check_text(text, "the text")
            except (TypeError, ValueError) as e:
                problem = str(e)
            if problem is None and key in first:
                problem = f"duplicate id (also at {first[key]}): every row with this id is skipped"
            first.setdefault(key, where)
        if problem is not None:
            row = BadRow(where, key, problem)
            if on_bad_row == "raise":
                raise InputError(f"bad source row {row} (nothing was compressed; on_bad_row='skip' skips such rows)")
            bad.append(row)
            if key is not None:
                skip.add(key)
    return CheckedRows(bad, skip, set(first) - skip)


def work_units(rows: Iterable[tuple[str, Any, Any]], skip: set[str], stored: Any, size: int
               ) -> Iterator[tuple[list[str], list[str]]]:
    """Consecutive groups of `size` (ids, texts) among the rows to store."""
    ids: list[str] = []
    texts: list[str] = []
    for _, raw_id, text in rows:
        key = normalize_id(raw_id)
        if key is None or key in skip or key in stored:
            continue
        ids.append(key)
        texts.append(text)
        if len(ids) == size:
            yield ids, texts
            ids, texts = [], []
    if ids:
        yield ids, texts


# ----------------------------------------------------------------------------- workers


class EncodeBatch:
    """Compress batches of `{id, text}` rows into rows of a store's format: a worker of a corpus job.

    Pass it to Ray Data (`ds.map_batches(EncodeBatch, fn_constructor_kwargs=dict(store=..., encoder=...),
    concurrency=N, num_gpus=1, batch_size=...)`) or to `datasets` (`ds.map(EncodeBatch(store, encoder=...),
    batched=True, with_rank=True, num_proc=num_gpus)`: rank r uses cuda:r). The encoder is loaded once per
    worker process, on first use; `store` may also be an open ContextStore with its compressor. The store
    must exist (its manifest says the codec and holds the codebook). Returns a dict of columns: id,
    num_tokens, num_embeddings, chunk_size, text_sha256, text_bytes, codes — `ContextStore.append` writes them.
    """

    def __init__(self, store: Any, *, encoder: str | Path | None = None, chunk_size: int | None = None,
                 num_threads: int | None = None, **compressor_kwargs: Any):
        from .store import ContextStore

        opened = isinstance(store, ContextStore)
        if opened and store.compressor is None:
            raise InputError("EncodeBatch needs a ContextStore opened with compressor=")
        if not opened and encoder is None:
            raise InputError("EncodeBatch needs encoder= (a hub id or folder) with a store path")
        self._store = store if opened else None
        self.store_path = str(store.path if opened else store)
        self.encoder = None if encoder is None else str(encoder)
        self.chunk_size = chunk_size
        self.num_threads = num_threads
        self.compressor_kwargs = compressor_kwargs

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_store": None}  # a worker process loads its own encoder

    def _open(self, rank: int | None) -> Any:
        if self._store is None:
            import torch

            from .compressor import Compressor
            from .store import ContextStore

            if self.num_threads:
                torch.set_num_threads(self.num_threads)
            kwargs = dict(self.compressor_kwargs)
            if rank is not None and "device" not in kwargs and torch.cuda.is_available():
                kwargs["device"] = f"cuda:{rank % torch.cuda.device_count()}"
            comp = Compressor.from_pretrained(self.encoder, **kwargs)
            store = ContextStore(self.store_path, compressor=comp)
            if store.manifest is None:
                raise NotFoundError(f"{self.store_path}: no store there yet; create it (compress_corpus does) first")
            self._store = store
        return self._store

    def __call__(self, batch: dict[str, Any], rank: int | None = None) -> dict[str, list]:
        store = self._open(rank)
        ids = [normalize_id(i) for i in _as_list(batch["id"])]
        texts = [str(t) for t in _as_list(batch["text"])]
        bad = [i for i, key in enumerate(ids) if key is None]
        if bad:
            raise InputError(f"row {bad[0]} of the batch has no usable id ({_as_list(batch['id'])[bad[0]]!r})")
        contexts = store.compressor.compress(texts, chunk_size=self.chunk_size, show_progress_bar=False)
        return store.encode(ids, contexts).to_pydict()


def _as_list(column: Any) -> list:
    return column.tolist() if hasattr(column, "tolist") else list(column)


# ----------------------------------------------------------------------------- the job


def compress_corpus(
    source: Any,
    store_path: str | Path,
    *,
    encoder: str | Path,
    codec: str | None = None,
    bits_per_dim: float | None = None,
    engine: str = "local",
    num_workers: int | None = None,
    num_gpus_per_worker: float | None = None,
    num_cpus_per_worker: float | None = None,
    batch_size: int = 256,
    chunk_size: int | None = None,
    train_size: int = 16384,
    on_bad_row: str = "raise",
    id_field: str = "id",
    text_field: str = "text",
    address: str | None = None,
    show_progress: bool | None = None,
    **compressor_kwargs: Any,
) -> CorpusSummary:
    """Compress every `{id, text}` row of `source` not yet in the store at `store_path`; return a summary.

    engine="local" compresses in this process; engine="ray" on a Ray cluster (the one `ray.init` joined, else
    `address`, else a new local one): `num_workers` actors (default: one per GPU, else 2), each loading the
    encoder once, with `num_gpus_per_worker` GPUs each (default 1 when the cluster has GPUs). This process
    checks the source, creates the store (for pq: trains the codebook on the first `train_size` vectors) and
    needs the encoder for that. `compressor_kwargs` go to `Compressor.from_pretrained` (tokenizer, head,
    dtype, device, ...). on_bad_row="raise" (default) stops at the first bad row before compressing anything;
    "skip" skips and reports them in the summary.
    """
    import pyarrow as pa

    from .codec import parse_codec
    from .compressor import Compressor, check_batching
    from .runtime import interactive_output, progress_bar, resolve_device
    from .store import ContextStore, row_schema

    if engine not in ("local", "ray"):
        raise InputError(f"engine must be 'local' or 'ray', not {engine!r}")
    if on_bad_row not in ("raise", "skip"):
        raise InputError(f"on_bad_row must be 'raise' or 'skip', not {on_bad_row!r}")
    check_batching(chunk_size, batch_size, 1)
    resolve_device(compressor_kwargs.get("device"))  # arguments first: before reading a large source
    if codec is not None:
        parse_codec(codec)

    def rows() -> Iterator[tuple[str, Any, Any]]:
        return iter_source(source, id_field=id_field, text_field=text_field)

    checked = check_rows(rows(), on_bad_row=on_bad_row)
    start = time.perf_counter()
    driver_kwargs = dict(compressor_kwargs)
    if engine == "ray":
        driver_kwargs.setdefault("device", "cpu")  # the workers hold the GPUs
    comp = Compressor.from_pretrained(encoder, **driver_kwargs)
    store = ContextStore(store_path, compressor=comp, codec=codec, bits_per_dim=bits_per_dim, train_size=train_size)
    stored = set(store)
    todo = len(checked.good - stored)
    before_bytes = _data_bytes(store)
    if store.manifest is None:  # created here, once, before any worker writes
        store.train(t for _, texts in work_units(rows(), checked.skip, stored, batch_size) for t in texts)
    if show_progress is None:
        show_progress = interactive_output()
    if engine == "local":
        tokens = 0
        worker = EncodeBatch(store, chunk_size=chunk_size)
        with progress_bar(total=todo, unit="text", desc="compress", disable=not show_progress) as bar:
            for ids, texts in work_units(rows(), checked.skip, stored, batch_size):
                table = pa.Table.from_pydict(worker({"id": ids, "text": texts}), schema=row_schema())
                store.append(table, check_ids=False)  # stored ids were left out above
                tokens += pa.compute.sum(table.column("num_tokens")).as_py()
                bar.update(len(ids))
    else:
        from .ray import run_ray_job

        tokens = run_ray_job(source, store, checked.skip | stored, encoder=encoder, chunk_size=chunk_size,
                             batch_size=batch_size, num_workers=num_workers, num_gpus_per_worker=num_gpus_per_worker,
                             num_cpus_per_worker=num_cpus_per_worker, id_field=id_field, text_field=text_field, address=address,
                             compressor_kwargs=compressor_kwargs)
    store.refresh()
    return CorpusSummary(
        store=str(store_path), texts=len(store) - len(stored), already_stored=len(stored), tokens=tokens,
        seconds=time.perf_counter() - start, bytes_written=_data_bytes(store) - before_bytes, engine=engine,
        bad_rows=checked.bad,
    )


def _data_bytes(store: Any) -> int:
    data = Path(store.path) / "data"
    return sum(f.stat().st_size for f in data.glob("*.parquet")) if data.is_dir() else 0
