"""Sources: every reader names its rows, whole-file problems name the file, and one row rule decides ids and texts."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from arccompress.errors import InputError, InputTypeError, NotFoundError
from arccompress.sources import (CheckedRows, Items, TextFiles, Unreadable, normalize_id, open_source, parse_json_line,
                                 read_records)


@pytest.mark.parametrize("value, key", [("doc-1", "doc-1"), (" padded ", " padded "), (7, "7"), (np.int64(-3), "-3"),
                                        ("a\x00b", "a\x00b"), ("é", "é")])
def test_ids_are_strs_as_they_are_or_ints_as_decimal_text(value, key):
    assert normalize_id(value) == key


@pytest.mark.parametrize("value, reason", [
    (2.5, "id 2.5 is a float: ids must be strings or integers"),
    (1.0, "id 1.0 is a float: ids must be strings or integers"),
    (np.float32(2.5), "id 2.5 is a float"),
    (True, "id True is a bool: ids must be strings or integers"),
    (np.bool_(False), "id False is a bool"),
    (None, "the id is null"),
    ("", "the id is empty"),
    (" \t", r"the id ' \\t' is blank"),
    ([1, 2], r"id \[1, 2\] is a list: ids must be strings or integers"),
    ("bad \udc80", "the id holds a lone surrogate"),
])
def test_other_ids_are_refused_with_their_reason(value, reason):
    with pytest.raises(InputError, match=reason):
        normalize_id(value)


def test_json_lines_keep_the_whole_parser_message():
    bad = parse_json_line(b'{"id": "a", "text": "tab\there"}\n')
    assert isinstance(bad, Unreadable)
    assert bad.reason == "not JSON (Invalid control character at column 25)"  # never cut at "... at"
    assert parse_json_line(b"{oops\n").reason == \
        "not JSON (Expecting property name enclosed in double quotes at column 2)"
    assert parse_json_line(b'{"id": "caf\xc3"}\n').reason == "not valid UTF-8 (byte 0xc3 at column 12)"
    assert parse_json_line(b"[1, 2]").reason == "a JSON list, not an object"
    assert parse_json_line('{"id": "é"}'.encode()) == {"id": "é"}


def test_jsonl_rows_are_named_by_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    # blank lines, and no newline at the end
    path.write_bytes(b'{"id": "a", "text": "x"}\n\n   \n{oops\n{"id": "b", "text": "y"}')
    records = list(open_source(path).records())
    assert [w for w, _ in records] == [f"{path}:1", f"{path}:4", f"{path}:5"]
    assert isinstance(records[1][1], Unreadable) and records[2][1] == {"id": "b", "text": "y"}
    with pytest.raises(InputError, match=r"rows.jsonl:4: not JSON \(Expecting property name"):
        read_records(path)
    with pytest.raises(NotFoundError, match="no such source file"):
        open_source(tmp_path / "none.jsonl")
    with pytest.raises(InputError, match="must end in .jsonl or .parquet"):
        (tmp_path / "rows.csv").write_text("id,text\n")
        open_source(tmp_path / "rows.csv")
    with pytest.raises(InputTypeError, match="a source must be"):
        open_source(42)


def test_parquet_problems_name_the_file(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"], "extra": [1, 2]}), good)
    assert [(w, r) for w, r in open_source(good).records(["id", "text"])] == \
        [(f"{good} row 0", {"id": "a", "text": "x"}), (f"{good} row 1", {"id": "b", "text": "y"})]
    truncated = tmp_path / "cut.parquet"
    truncated.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(InputError, match=r"cut.parquet: not a readable Parquet file \("):
        list(open_source(truncated).records())
    with pytest.raises(InputError, match=r"good.parquet: no 'body' column \(columns: id, text, extra\)"):
        list(open_source(good).records(["id", "body"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match="no Parquet files in"):
        open_source(tmp_path / "empty")


def test_lists_text_files_and_datasets(tmp_path):
    records = list(Items([("a", "x"), {"id": "b", "text": "y"}, "oops"]).records())
    assert records[:2] == [("item 0", {"id": "a", "text": "x"}), ("item 1", {"id": "b", "text": "y"})]
    assert records[2] == ("item 2", Unreadable("expected a dict or an (id, text) pair, found str"))
    (tmp_path / "a.txt").write_text("A document.")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9")
    checked = CheckedRows(TextFiles([tmp_path / "a.txt", tmp_path / "b.txt"]), on_bad_row="skip")
    assert list(checked.rows()) == [(str(tmp_path / "a.txt"), "A document.")]
    assert [str(b) for b in checked.bad_rows] == \
        [f"{tmp_path / 'b.txt'} (id {str(tmp_path / 'b.txt')!r}): not valid UTF-8 (byte 0xe9 at offset 3)"]
    with pytest.raises(NotFoundError, match="no such file"):
        TextFiles([tmp_path / "c.txt"])
    from datasets import Dataset

    ds = Dataset.from_dict({"id": [1, 2], "text": ["x", "y"]})
    assert list(CheckedRows(open_source(ds)).rows()) == [("1", "x"), ("2", "y")]
    with pytest.raises(InputError, match="the dataset has no 'body' column"):
        CheckedRows(open_source(ds), text_field="body")


HOSTILE = [("a", "fine"), (2.5, "float id"), (True, "bool id"), (7, "int seven"), ("7", "str seven"), (" ", "blank"),
           ("b", ""), ("c", "text of c"), ("c", "another text of c"), ("d", None), ("e", "bad \udc80 text"),
           ("e", "e again"), ("f\x00nul", "a NUL in the id"), ({"text": "no id"}), ("g", 12), ("h", "last")]


def test_one_rule_for_every_row():
    checked = CheckedRows(Items(HOSTILE), on_bad_row="skip")
    assert list(checked.rows()) == [("a", "fine"), ("f\x00nul", "a NUL in the id"), ("h", "last")]
    assert list(checked.rows(exclude={"a"})) == [("f\x00nul", "a NUL in the id"), ("h", "last")]
    assert checked.ids == {"a", "f\x00nul", "h"}
    assert [str(b) for b in checked.bad_rows] == [
        "item 1: id 2.5 is a float: ids must be strings or integers",
        "item 2: id True is a bool: ids must be strings or integers",
        "item 3 (id '7'): duplicate id (also at item 4): every row with this id is left out",
        "item 4 (id '7'): duplicate id (also at item 3): every row with this id is left out",
        "item 5: the id ' ' is blank",
        "item 6 (id 'b'): the text is empty",
        "item 7 (id 'c'): duplicate id (also at item 8): every row with this id is left out",
        "item 8 (id 'c'): duplicate id (also at item 7): every row with this id is left out",
        "item 9 (id 'd'): the text is null",
        "item 10 (id 'e'): the text holds a lone surrogate '\\udc80' at character 4, which is not text (decode your "
        "input with errors='replace' or 'surrogatepass' and fix it)",
        "item 11 (id 'e'): duplicate id (also at item 10): every row with this id is left out",
        "item 13: no 'id' field",
        "item 14 (id 'g'): the text is a int, not a string",
    ]
    with pytest.raises(InputError) as raised:
        CheckedRows(Items(HOSTILE))
    assert str(raised.value) == ("bad source row item 1: id 2.5 is a float: ids must be strings or integers (nothing "
                                 "was compressed; on_bad_row='skip' / --on-bad-row skip leaves such rows out)")
    with pytest.raises(InputError, match=r"item 1 \(id 'x'\): duplicate id \(also at item 0\)"):
        CheckedRows(Items([("x", "one"), ("x", "two")]))
    with pytest.raises(InputError, match="on_bad_row must be 'raise' or 'skip'"):
        CheckedRows(Items([]), on_bad_row="ignore")


def test_fields_can_be_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"key": k, "body": f"text {k}"}) + "\n" for k in range(3)))
    checked = CheckedRows(open_source(path), id_field="key", text_field="body")
    assert list(checked.rows()) == [("0", "text 0"), ("1", "text 1"), ("2", "text 2")]
    with pytest.raises(InputError, match=r"rows.jsonl:1: no 'id' field"):
        CheckedRows(open_source(path))
