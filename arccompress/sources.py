"""Rows from where users keep them, read one way and checked by one rule.

A source is a JSONL file, a Parquet file or folder of Parquet files, text files (`TextFiles`), a list of
`(id, text)` pairs or of dicts, a `datasets.Dataset` or a Ray `Dataset`. `open_source` picks the reader; every
reader yields `(where, record)` in the source's order, `where` naming the row in the user's terms (`file:line`
for JSONL, `file row k` for Parquet, `item k` for lists, `row k` for datasets), `record` a dict of fields or
an `Unreadable` saying why the row could not be read (a line that is not UTF-8 or not a JSON object).
A problem with a whole file (missing, unreadable, a truncated or corrupt Parquet file) is an exception naming
the file, not a bad row.

The corpus rule (`CheckedRows`) is the one place that decides which `{id, text}` rows can be stored:

- an id is a str (kept as it is) or an int (its decimal text); a float, a bool, null, an empty or blank str or
  anything else makes the row bad, with the reason ("id 2.5 is a float: ids must be strings or integers");
- a text is a non-empty str that UTF-8 can encode;
- an id carried by two rows is ambiguous (which text is right?): every row carrying it is bad;
- a bad row raises `InputError` naming it (on_bad_row="raise") or is left out and reported ("skip").

Both corpus engines and the eval reader go through here, so they agree on every row.
"""

from __future__ import annotations

import json
import numbers
from abc import ABC, abstractmethod
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError, InputTypeError, NotFoundError
from .tokenization import check_text

SOURCE_KINDS = ("a JSONL or Parquet path (or a folder of Parquet files), TextFiles, a list of (id, text) pairs or "
                "dicts, a datasets.Dataset or a ray.data.Dataset")
BAD_ROW_CHOICES = ("raise", "skip")
READ_BATCH = 4096  # rows per batch read from Parquet, datasets and Ray


class _Missing:
    """The value of a field a record does not have."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class Unreadable:
    """A record, or a field, that could not be read; `reason` says why in the user's terms."""

    reason: str


@dataclass(frozen=True)
class BadRow:
    """A source row that cannot be used: where it is, its id if it has a usable one, and what is wrong."""

    where: str
    id: str | None
    problem: str

    def __str__(self) -> str:
        return f"{self.where}{'' if self.id is None else f' (id {self.id!r})'}: {self.problem}"


Record = dict[str, Any] | Unreadable


# ----------------------------------------------------------------------------- readers


class Source(ABC):
    """Records of one source, in order; iterable again (the corpus job reads it twice: to check, then to store)."""

    @abstractmethod
    def records(self, columns: Sequence[str] | None = None) -> Iterator[tuple[str, Record]]:
        """(where, record) of every row. `columns`: the fields the caller needs; readers with a schema read only
        those and raise InputError naming the file when one is absent; others yield whole records."""


class JsonlFile(Source):
    """A file of JSON objects, one per line; blank lines are skipped. Each line is decoded on its own, so a line
    that is not UTF-8 or not JSON is one unreadable row and the others are read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def records(self, columns: Sequence[str] | None = None) -> Iterator[tuple[str, Record]]:
        try:
            with open(self.path, "rb") as f:
                for n, raw in enumerate(f, 1):
                    if raw.strip():
                        yield f"{self.path}:{n}", parse_json_line(raw)
        except FileNotFoundError:
            raise NotFoundError(f"no such source file {self.path}") from None
        except OSError as e:
            raise InputError(f"{self.path}: cannot read it ({e.strerror or e})") from None


def parse_json_line(raw: bytes) -> Record:
    """The JSON object a line of bytes holds, or why it holds none."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Unreadable(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        return Unreadable(f"not JSON ({json_error(e)})")
    if not isinstance(value, dict):
        return Unreadable(f"a JSON {type(value).__name__}, not an object")
    return value


def json_error(e: json.JSONDecodeError) -> str:
    """The whole of a JSON parser's complaint on one line: "Invalid control character at column 12"."""
    where = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno} column {e.colno}"
    return f"{e.msg} {where}" if e.msg.endswith(" at") else f"{e.msg} at {where}"


class ParquetFiles(Source):
    """A Parquet file, or every `*.parquet` file of a folder in name order, read in batches."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            self.files = sorted(self.path.glob("*.parquet"))
            if not self.files:
                raise NotFoundError(f"no Parquet files in {self.path}")
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise NotFoundError(f"no such source file {self.path}")

    def records(self, columns: Sequence[str] | None = None) -> Iterator[tuple[str, Record]]:
        for file in self.files:
            yield from self._file_records(file, columns)

    @staticmethod
    def _file_records(file: Path, columns: Sequence[str] | None) -> Iterator[tuple[str, Record]]:
        k = 0
        try:
            pf = pq.ParquetFile(file)
            names = pf.schema_arrow.names
            missing = [c for c in columns or () if c not in names]
            if missing:
                raise InputError(f"{file}: no {missing[0]!r} column (columns: {', '.join(names)})")
            for batch in pf.iter_batches(columns=list(columns) if columns else None, batch_size=READ_BATCH):
                for record in batch.to_pylist():
                    yield f"{file} row {k}", record
                    k += 1
        except (pa.ArrowException, UnicodeDecodeError) as e:
            at = f" at row {k}" if k else ""
            raise InputError(f"{file}: not a readable Parquet file{at} ({' '.join(str(e).split())})") from None
        except OSError as e:
            raise InputError(f"{file}: cannot read it ({e.strerror or e})") from None


class TextFiles(Source):
    """Text files, one row each: the id is the file's path as given, the text its contents (UTF-8)."""

    def __init__(self, paths: Sequence[str | Path], *, fields: tuple[str, str] = ("id", "text")):
        self.paths = [Path(p) for p in paths]
        self.fields = fields
        for path in self.paths:
            if not path.is_file():
                raise NotFoundError(f"no such file {path}")

    def records(self, columns: Sequence[str] | None = None) -> Iterator[tuple[str, Record]]:
        id_field, text_field = self.fields
        for path in self.paths:
            try:
                data = path.read_bytes()
            except OSError as e:
                raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None
            try:
                text: str | Unreadable = data.decode("utf-8")
            except UnicodeDecodeError as e:
                text = Unreadable(f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})")
            yield str(path), {id_field: str(path), text_field: text}


class Items(Source):
    """A list of dicts, or of `(id, text)` pairs (read as the fields `pair_fields`)."""

    def __init__(self, items: Sequence[Any], *, pair_fields: tuple[str, str] | None = ("id", "text")):
        self.items = items
        self.pair_fields = pair_fields

    def records(self, columns: Sequence[str] | None = None) -> Iterator[tuple[str, Record]]:
        for k, item in enumerate(self.items):
            if isinstance(item, dict):
                record: Record = item
            elif self.pair_fields is not None and isinstance(item, (tuple, list)) and len(item) == 2:
                record = dict(zip(self.pair_fields, item))
            else:
                wanted = "a dict or an (id, text) pair" if self.pair_fields is not None else "a dict"
                record = Unreadable(f"expected {wanted}, found {type(item).__name__}")
            yield f"item {k}", record


class HFDataset(Source):
    """A `datasets.Dataset`, read in batches of the columns asked for."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def records(self, columns: Sequence[str] | None = None) -> Iterator[tuple[str, Record]]:
        names = list(self.dataset.column_names)
        missing = [c for c in columns or () if c not in names]
        if missing:
            raise InputError(f"the dataset has no {missing[0]!r} column (columns: {', '.join(names)})")
        data = self.dataset.select_columns(list(columns)) if columns else self.dataset
        k = 0
        for batch in data.iter(batch_size=READ_BATCH):
            keys = list(batch)
            for values in zip(*(batch[c] for c in keys)):
                yield f"row {k}", dict(zip(keys, values))
                k += 1


class RayDataset(Source):
    """A Ray `Dataset`, read on this process in batches (its own execution, the dataset's order)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def records(self, columns: Sequence[str] | None = None) -> Iterator[tuple[str, Record]]:
        names = list(self.dataset.schema().names)
        missing = [c for c in columns or () if c not in names]
        if missing:
            raise InputError(f"the dataset has no {missing[0]!r} column (columns: {', '.join(names)})")
        data = self.dataset.select_columns(list(columns)) if columns else self.dataset
        k = 0
        for batch in data.iter_batches(batch_size=READ_BATCH, batch_format="pyarrow"):
            for record in batch.to_pylist():
                yield f"row {k}", record
                k += 1


def open_source(source: Any, *, pair_fields: tuple[str, str] | None = ("id", "text")) -> Source:
    """The reader of a source (see the module's docstring); NotFoundError for a path that is not there.
    `pair_fields`: the fields an `(id, text)` pair of a list fills (None: lists hold dicts only)."""
    if isinstance(source, Source):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix in (".jsonl", ".json") and not path.is_dir():
            if not path.exists():
                raise NotFoundError(f"no such source file {path}")
            return JsonlFile(path)
        if path.suffix == ".parquet" or path.is_dir():
            return ParquetFiles(path)
        if not path.exists():
            raise NotFoundError(f"no such source file {path}")
        raise InputError(f"{path}: a source file must end in .jsonl or .parquet (or be a folder of Parquet files)")
    module = type(source).__module__
    if module.startswith("ray.data") and hasattr(source, "iter_batches"):
        return RayDataset(source)
    if module.startswith("datasets") and hasattr(source, "column_names"):
        return HFDataset(source)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return Items(source, pair_fields=pair_fields)
    raise InputTypeError(f"a source must be {SOURCE_KINDS}, not {type(source).__name__}")


def read_records(source: Any) -> list[tuple[str, dict[str, Any]]]:
    """Every record of a source of dicts (JSONL, Parquet, a list of dicts, a dataset) as (where, dict); the
    first unreadable one raises InputError naming its place (`file:line: not JSON (...)`)."""
    records = []
    for where, record in open_source(source, pair_fields=None).records():
        if isinstance(record, Unreadable):
            raise InputError(f"{where}: {record.reason}")
        records.append((where, record))
    return records


# ----------------------------------------------------------------------------- the row rule


def normalize_id(value: Any) -> str:
    """A row id as text: a str as it is, an int as its decimal text; InputError saying why anything else is not
    an id (a float, a bool, null, a blank str, a str UTF-8 cannot encode, another type)."""
    if isinstance(value, str):
        if not value.strip():
            raise InputError("the id is empty" if not value else f"the id {value!r} is blank")
        check_text(value, "the id")
        return value
    if value is None:
        raise InputError("the id is null")
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"id {bool(value)} is a bool: ids must be strings or integers")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    kind = "float" if isinstance(value, numbers.Real) else type(value).__name__
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise InputError(f"id {value if kind == 'float' else shown} is a {kind}: ids must be strings or integers")


def check_row_text(value: Any) -> str:
    """A row's text if it is a non-empty str UTF-8 can encode; InputError saying what it is otherwise."""
    if isinstance(value, Unreadable):
        raise InputError(value.reason)
    if value is None:
        raise InputError("the text is null")
    if not isinstance(value, str):
        raise InputError(f"the text is a {type(value).__name__}, not a string")
    if not value.strip():
        raise InputError("the text is empty")
    return check_text(value, "the text")


def bad_row_error(row: BadRow, consequence: str) -> InputError:
    """The error a bad row raises with on_bad_row="raise", in both spellings of the way out."""
    return InputError(f"bad source row {row} ({consequence}; on_bad_row='skip' / --on-bad-row skip "
                      "leaves such rows out)")


def check_bad_row_choice(on_bad_row: str) -> None:
    if on_bad_row not in BAD_ROW_CHOICES:
        raise InputError(f"on_bad_row must be 'raise' or 'skip', not {on_bad_row!r}")


@dataclass
class CheckedRows:
    """The `{id, text}` rows of a source, checked once by the corpus rule; `rows()` reads the good ones again.

    `bad_rows` lists every bad row in source order (with on_bad_row="raise" the first one raised instead);
    `ids` holds the distinct ids of the good rows.
    """

    source: Source
    id_field: str = "id"
    text_field: str = "text"
    on_bad_row: str = "raise"
    bad_rows: list[BadRow] = field(init=False)
    ids: set[str] = field(init=False)
    _bad_positions: set[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_bad_row_choice(self.on_bad_row)
        bad: dict[int, BadRow] = {}
        first: dict[str, tuple[int, str]] = {}  # id -> (position, where) of the first row carrying it
        unusable: set[str] = set()  # ids of bad rows: duplicated, or carried by a row with a bad text
        for k, (where, raw_id, text) in enumerate(self._raw_rows()):
            key, problem = None, None
            try:
                if isinstance(raw_id, Unreadable):
                    raise InputError(raw_id.reason)
                if raw_id is MISSING:
                    raise InputError(f"no {self.id_field!r} field")
                key = normalize_id(raw_id)
                if text is MISSING:
                    raise InputError(f"no {self.text_field!r} field")
                check_row_text(text)
            except InputError as e:
                problem = str(e)
            if key is not None and key in first:  # a second row with this id: neither text can be trusted
                at, other = first[key]
                problem = problem or f"duplicate id (also at {other}): every row with this id is left out"
                if at not in bad:
                    bad[at] = BadRow(other, key, f"duplicate id (also at {where}): every row with this id is left out")
            elif key is not None:
                first[key] = (k, where)
            if problem is not None:
                row = BadRow(where, key, problem)
                if self.on_bad_row == "raise":
                    raise bad_row_error(row, "nothing was compressed")
                bad[k] = row
                if key is not None:
                    unusable.add(key)
        self.bad_rows = [bad[k] for k in sorted(bad)]
        self._bad_positions = set(bad)
        self.ids = set(first) - unusable

    def _raw_rows(self) -> Iterator[tuple[str, Any, Any]]:
        """(where, raw id, raw text) of every row; an unreadable record gives its reason as its id."""
        for where, record in self.source.records(columns=(self.id_field, self.text_field)):
            if isinstance(record, Unreadable):
                yield where, record, MISSING
            else:
                yield where, record.get(self.id_field, MISSING), record.get(self.text_field, MISSING)

    def rows(self, exclude: Container[str] = ()) -> Iterator[tuple[str, str]]:
        """(id, text) of every good row whose id is not in `exclude`, in source order (the source read again)."""
        for k, (_, raw_id, text) in enumerate(self._raw_rows()):
            if k in self._bad_positions:
                continue
            key = normalize_id(raw_id)
            if key not in exclude:
                yield key, text
