"""Nothing silent: missing, truncated and bit-flipped data files name themselves, every other id reads, `verify`
lists them with their ids and `repair` removes them; many small commits compact; versions are read back and
cleaned up.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import lance
import pytest
import torch

from arccompress import CompressedContext, ContextStore, StoreError
from arccompress.errors import ContextNotFoundError
from arccompress.store import StoreDamageWarning, maintenance
from arccompress.store.table import index_segments

WIDTH = 64


def ctx(seed: int, rows: int = 3) -> CompressedContext:
    g = torch.Generator().manual_seed(seed)
    return CompressedContext(torch.randn(rows, WIDTH, generator=g), 8 * rows, "enc", 0, 8, text=f"text {seed}",
                             encoder_fingerprint="weights")


def ten_files(path: Path, indexed: bool = True) -> ContextStore:
    """A store of 100 ids in 10 data files (10 commits of 10); the id index covering them, or none of them."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(maintenance, "AUTO_COMPACT_FRAGMENTS", 10**9)  # ten files, not merged
        if not indexed:
            m.setattr(maintenance, "AUTO_INDEX_FRAGMENTS", 10**9)
        store = ContextStore(path, codec="float32", flush_every=10)
        store.add_many([f"id-{i}" for i in range(100)], [ctx(i) for i in range(100)])
        store.close()
    if indexed:
        lance.dataset(path).optimize.optimize_indices()
    return ContextStore(path)


def data_file_of(path: Path, key: str) -> Path:
    """The data file holding an id's row."""
    rows = lance.dataset(path).to_table(columns=["id"], with_row_address=True, filter=f"id = '{key}'")
    fragment = lance.dataset(path).get_fragment(rows.column("_rowaddr")[0].as_py() >> 32)
    return path / "data" / fragment.metadata.files[0].path


def ids_of(path: Path, file: Path) -> list[str]:
    return [f"id-{i}" for i in range(100) if data_file_of(path, f"id-{i}") == file]


@pytest.mark.parametrize("how", ["deleted", "truncated"])
@pytest.mark.parametrize("indexed", [True, False], ids=["indexed", "unindexed"])
def test_a_lost_data_file_names_itself_and_the_rest_reads(tmp_path, how, indexed):
    """The failures of issue 25, met again: an rsync that left a file out, a copy cut short in its last file. The
    count does not shrink, ids in the file raise a StoreError naming it, every other id reads (found through the
    index; where the index does not cover the file, an id the file may hold is an error too), verify lists the
    file and its ids, repair makes a version without it and says which ids to compute again. Where nothing says
    which ids the file held (the index does not cover it yet), they read as absent, with the file named."""
    path = tmp_path / "s"
    ten_files(path, indexed)
    victim = data_file_of(path, "id-35")
    lost = ids_of(path, victim)
    if how == "deleted":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    store = ContextStore(path)
    assert len(store) == 100  # the manifest still lists the file: nothing shrinks silently
    readable = [k for k in (f"id-{i}" for i in range(100)) if k not in lost]
    if indexed:  # the index says which ids the file held: they are errors naming it
        with pytest.raises(StoreError, match=f"'id-35' are in damaged data files: data/{victim.name}"):
            store["id-35"]
        with pytest.raises(StoreError, match=victim.name):
            store.get_many(["id-0", "id-35"])
    else:  # nothing says which: its ids read as absent, with the file named (a warning, and in the KeyError)
        with pytest.warns(StoreDamageWarning, match=f"data/{victim.name} cannot be read .* ids are unknown"), \
                pytest.raises(ContextNotFoundError, match=f"'id-35'.*data/{victim.name} cannot be read"):
            store["id-35"]
        assert "id-35" not in store and store.missing(["id-35", "id-0"]) == ["id-35"]
    assert len(store.get_many(readable)) == 90 and torch.equal(store["id-99"].embeddings, ctx(99).embeddings)
    report = store.verify()
    assert not report.ok and report.rows == 90 and [d.file for d in report.damaged] == [f"data/{victim.name}"]
    damage = report.damaged[0]
    assert "unreadable" in damage.error and damage.rows == 10
    assert damage.ids == (lost if indexed else None)  # the id index remembers what the file held
    if not indexed:
        assert "ids are unknown" in str(damage) and "resumed corpus job" in str(damage)
    repaired = store.repair(report)
    assert repaired["ids"] == (lost if indexed else []) and repaired["unknown_rows"] == (0 if indexed else 10)
    after = ContextStore(path)
    assert len(after) == 90 and sorted(after) == sorted(readable) and after.verify().ok
    assert "id-35" not in after and len(after.get_many(readable)) == 90
    after.add_many(lost, [ctx(int(k[3:])) for k in lost])  # what a resumed corpus job does: the lost ids again
    after.close()
    assert len(ContextStore(path)) == 100 and torch.equal(ContextStore(path)["id-35"].embeddings, ctx(35).embeddings)


def four_unindexed_files(path: Path) -> ContextStore:
    """The red team's r01: 4 commits of 300 rows, none of them indexed yet."""
    store = ContextStore(path, codec="float32", flush_every=300)
    for c in range(4):
        store.add_many([f"c{c}-{i}" for i in range(300)], [ctx(1000 * c + i, rows=1) for i in range(300)])
    store.close()
    assert not any(index_segments(lance.dataset(path))[maintenance.ID_INDEX][0][1])
    return ContextStore(path)


def test_an_unindexed_lost_file_blocks_no_other_id_and_no_writer(tmp_path):
    """Red team r01 (issue 25's motivating failure): the first of four unindexed files deleted made 0 of 900 intact
    ids readable, absent ids a StoreError and every writer fail. Now every other id reads, an absent id is absent,
    a writer stores new ids and the ids of the lost file again (what a resumed corpus job does)."""
    path = tmp_path / "s"
    four_unindexed_files(path)
    (path / "data" / lance.dataset(path).get_fragments()[0].metadata.files[0].path).unlink()
    store = ContextStore(path)
    with pytest.warns(StoreDamageWarning):
        assert torch.equal(store["c1-1"].embeddings, ctx(1001, rows=1).embeddings)
        assert len(store.get_many([f"c{c}-{i}" for c in (1, 2, 3) for i in range(300)])) == 900
        assert "never-stored" not in store and "c0-1" not in store
        store.add_many(["new", "c0-1"], [ctx(7), ctx(1, rows=1)])
        store.flush()
        assert torch.equal(ContextStore(path)["new"].embeddings, ctx(7).embeddings)
    report = store.verify()
    assert [d.ids for d in report.damaged] == [None] and report.damaged[0].rows == 300
    assert store.repair(report)["unknown_rows"] == 300
    after = ContextStore(path)
    assert len(after) == 902 and after.verify().ok and torch.equal(after["c0-1"].embeddings, ctx(1, rows=1).embeddings)


def test_an_unreadable_file_whose_id_column_survives_names_its_ids(tmp_path):
    """A file whose codes cannot be read but whose id column can: its ids are known, and are errors naming it."""
    path = tmp_path / "s"
    four_unindexed_files(path)
    store = ContextStore(path)
    fragment = store.dataset().get_fragments()[1]
    real = store.dataset().scanner

    def scanner(*args, **kwargs):  # the codes of fragment 1 unreadable, its id column fine
        fragments = kwargs.get("fragments")
        if fragments and any(f.fragment_id == fragment.fragment_id for f in fragments) and \
                set(kwargs.get("columns") or ["codes"]) - {"id"}:
            raise OSError("LanceError(IO): unexpected end of file")
        if not fragments and set(kwargs.get("columns") or ["codes"]) - {"id"}:
            raise OSError("LanceError(IO): unexpected end of file")
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(lance.LanceDataset, "scanner", lambda self, *a, **k: scanner(*a, **k))
        with pytest.raises(StoreError, match="'c1-5' are in damaged data files"):
            store["c1-5"]
        assert torch.equal(store["c2-5"].embeddings, ctx(2005, rows=1).embeddings)
        report = store.verify()
    assert [(d.fragment, d.ids) for d in report.damaged] == [(fragment.fragment_id, [f"c1-{i}" for i in range(300)])]


def damage_index(path: Path, how: str) -> None:
    uuid = next(u for u, covered in index_segments(lance.dataset(path))[maintenance.ID_INDEX] if covered)
    pages = path / "_indices" / uuid / "page_data.lance"
    if how == "truncated":
        pages.write_bytes(pages.read_bytes()[: pages.stat().st_size // 2])
    elif how == "deleted":
        for f in pages.parent.iterdir():
            f.unlink()
        pages.parent.rmdir()
    else:  # one byte changed: 'id-77' reads 'id-76' in the index
        data = pages.read_bytes()
        at = data.index(b"id-77id-78")
        pages.write_bytes(data[: at + 4] + b"6" + data[at + 5:])


@pytest.mark.parametrize("how", ["truncated", "deleted", "flipped"])
def test_a_damaged_id_index_blames_no_data_file_and_verify_and_repair_mend_it(tmp_path, how):
    """Red team r08, r09, p23: the index's files are as exposed as data files. A truncated or deleted index is
    gone around (ids found by scanning, a warning naming the index, never a data file blamed); a changed byte in
    it (a stored id the index misses) is found by verify; repair rebuilds the index, and so does compact."""
    path = tmp_path / "s"
    ten_files(path)
    damage_index(path, how)
    store = ContextStore(path)
    if how != "flipped":
        with pytest.warns(StoreDamageWarning, match="the id index cannot be read"):
            assert torch.equal(store["id-77"].embeddings, ctx(77).embeddings)
            assert "never" not in store and len(store.get_many([f"id-{i}" for i in range(100)])) == 100
            store.add("new", ctx(500))
            store.flush()
    report = store.verify()
    assert not report.ok and not report.damaged and "index 'id_idx'" in report.indices[0]
    assert store.repair(report)["ids"] == []
    after = ContextStore(path)
    assert after.verify().ok and "id-77" in after and torch.equal(after["id-77"].embeddings, ctx(77).embeddings)


@pytest.mark.parametrize("how", ["truncated", "deleted", "flipped"])
def test_compact_makes_a_damaged_index_whole(tmp_path, how):
    """Red team r08, p23: compact failed on a cut-short index (no way back with the store's tools)."""
    path = tmp_path / "s"
    ten_files(path)
    damage_index(path, how)
    store = ContextStore(path)
    store.add("new", ctx(500))  # a file the index does not cover: compaction merges it with covered ones
    store.flush()
    assert not store.verify().ok
    store.compact()
    assert store.verify().ok and torch.equal(ContextStore(path)["id-77"].embeddings, ctx(77).embeddings)


def forty_in_four_commits(path: Path) -> list[Path]:
    """A store of 40 ids in 4 commits; its manifests, newest first."""
    with ContextStore(path, codec="float32", flush_every=10) as store:
        store.add_many([f"k{i}" for i in range(40)], [ctx(i) for i in range(40)])
    return sorted((path / "_versions").glob("*.manifest"))  # Lance's names sort the newest first


def test_a_deleted_newest_manifest_is_told_not_a_silent_rollback(tmp_path):
    """Red team r02: the newest manifest deleted, the store opened at the previous version without a word (ids
    told stored read as never stored). Now opening warns, naming the versions lost, and verify lists it."""
    path = tmp_path / "s"
    forty_in_four_commits(path)[0].unlink()
    with pytest.warns(StoreDamageWarning, match="the manifest of version .* is gone"):
        store = ContextStore(path)
    assert len(store) == 30
    report = store.verify()
    assert not report.ok and "latest_version_hint.json" in report.history and not report.damaged


def test_a_changed_byte_in_the_manifest_is_not_blamed_on_the_intact_file(tmp_path):
    """Red team r03: a flipped bit in the newest manifest renamed a data file in its list; verify called the intact
    file damaged and repair dropped its rows. Now verify says the manifest is the likely culprit and repair
    refuses."""
    path = tmp_path / "s"
    manifest = forty_in_four_commits(path)[0]
    name = lance.dataset(path).get_fragments()[0].metadata.files[0].path.encode()
    data = manifest.read_bytes()
    at = data.index(name) + len(name) - 12
    manifest.write_bytes(data[:at] + bytes([data[at] ^ 4]) + data[at + 1:])
    store = ContextStore(path)
    report = store.verify()
    assert [d.lookalike for d in report.damaged] == [f"data/{name.decode()}"]
    assert "the manifest (not the file) is probably damaged" in str(report.damaged[0])
    with pytest.raises(StoreError, match="not repaired"):
        store.repair(report)
    assert len(lance.dataset(path).get_fragments()) == 4


def test_a_cut_short_newest_manifest_names_itself_and_the_version_that_opens(tmp_path):
    """Red team p22: every command failed with "file size is too small", naming no file."""
    path = tmp_path / "s"
    manifest = forty_in_four_commits(path)[0]
    version = lance.dataset(path).version
    manifest.write_bytes(manifest.read_bytes()[:20])
    with pytest.raises(StoreError, match=f"{manifest.name} \\(version {version}\\), is damaged: version "
                                         f"{version - 1} opens"):
        ContextStore(path)
    assert len(ContextStore(path, version=version - 1)) >= 30


def test_a_flipped_bit_in_a_row_names_the_file_and_id_and_repair_drops_the_row(tmp_path):
    path = tmp_path / "s"
    ten_files(path)
    victim = data_file_of(path, "id-33")
    data = bytearray(victim.read_bytes())
    data[data.index(ctx(33).embeddings.numpy().tobytes()) + 100] ^= 8
    victim.write_bytes(bytes(data))
    store = ContextStore(path)
    assert torch.equal(store["id-34"].embeddings, ctx(34).embeddings)  # the same file's other rows read
    with pytest.raises(StoreError, match=f"data/{victim.name}: context 'id-33' does not match its checksum"):
        store.get_many(["id-1", "id-33"])
    report = store.verify()
    assert [(d.file, d.ids, d.offsets is not None) for d in report.damaged] == [(f"data/{victim.name}", ["id-33"],
                                                                                 True)]
    assert store.repair()["ids"] == ["id-33"]
    after = ContextStore(path)
    assert len(after) == 99 and "id-33" not in after and "id-34" in after and after.verify().ok


def test_verify_and_repair_from_the_command_line(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "s"
    ten_files(path)
    victim = data_file_of(path, "id-35")
    victim.unlink()

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "arccompress.cli", "store", *args, str(path)],
                              capture_output=True, text=True, timeout=300)

    out = cli("verify")
    assert out.returncode == 2 and f"data/{victim.name}: unreadable" in out.stdout
    assert "'id-35'" in out.stdout and "1 damaged data file" in out.stderr and "arccompress store repair" in out.stderr
    out = cli("repair")
    assert out.returncode == 0, out.stderr
    assert "removed 1 damaged data file" in out.stdout and "10 ids to compute again" in out.stdout
    assert "id-35" in out.stdout
    assert cli("verify").returncode == 0 and len(ContextStore(path)) == 90


def test_a_description_edited_or_foreign_is_refused(tmp_path):
    path = tmp_path / "s"
    ten_files(path)
    codec_file = next((path / "_arccompress").glob("*")) if (path / "_arccompress").exists() else None
    assert codec_file is None  # a decoder-float32 store reads nothing but its rows
    lance.write_dataset(lance.dataset(path).to_table().slice(0, 1), tmp_path / "plain")
    plain = lance.dataset(tmp_path / "plain")
    plain.update_schema_metadata({}, replace=True)
    with pytest.raises(StoreError, match="without a readable arccompress description.*not a context store"):
        ContextStore(tmp_path / "plain")
    description = json.loads(lance.dataset(path).schema.metadata[b"arccompress"])
    lance.dataset(path).update_schema_metadata({"arccompress": json.dumps(description | {"hidden_size": "64"})},
                                               replace=True)
    with pytest.raises(StoreError, match="hidden_size"):
        ContextStore(path)


@pytest.mark.parametrize("change", ["large types", "no checksum", "int64 counts", "text counts"])
def test_a_foreign_schema_is_refused_on_open_naming_the_column(tmp_path, change):
    """Red team r04, p70: a dataset with a store's description but other column types (large_string and
    large_binary, as many Arrow writers make them; int64 or text counts) or without the checksum column opened, and
    its reads were blamed on damaged files (repair then dropped every row). Now opening it names the column."""
    import pyarrow as pa

    path = tmp_path / "s"
    ten_files(path)
    dataset = lance.dataset(path)
    rows = dataset.to_table().select(list(maintenance.FIELDS))
    column, table = {
        "large types": ("id", rows.cast(rows.schema.set(0, pa.field("id", pa.large_string())))),
        "no checksum": ("checksum", rows.drop_columns(["checksum"])),
        "int64 counts": ("num_tokens", rows.cast(rows.schema.set(1, pa.field("num_tokens", pa.int64())))),
        "text counts": ("num_tokens", rows.set_column(1, "num_tokens", rows.column(1).cast(pa.string()))),
    }[change]
    lance.write_dataset(table.replace_schema_metadata(dataset.schema.metadata), tmp_path / "foreign")
    with pytest.raises(StoreError, match=f"not a context store of format 4: .*'{column}'"):
        ContextStore(tmp_path / "foreign")


def test_a_damaged_codec_file_is_refused(tmp_path):
    from arccompress import Compressor
    from arccompress.tiny import build_tiny_encoder

    build_tiny_encoder(tmp_path / "enc", layout="hub")
    comp = Compressor.from_pretrained(tmp_path / "enc")
    with ContextStore(tmp_path / "s", compressor=comp) as store:
        store.add_texts(["a"], ["a text"])
    codec_file = next((tmp_path / "s" / "_arccompress").glob("codec-*.safetensors"))
    codec_file.write_bytes(codec_file.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(StoreError, match="codec-.*sha256"):
        ContextStore(tmp_path / "s")
    codec_file.unlink()
    with pytest.raises(StoreError, match="the codec file cannot be read"):
        ContextStore(tmp_path / "s")


# ----------------------------------------------------------------------------- many commits, versions


def test_two_thousand_one_row_commits_then_compaction(tmp_path):
    """A service adding documents one by one: 2,000 commits of one row. Small data files are merged as they come
    (a few dozen at most, never thousands), the indices kept up to date, old versions cleaned up; `compact` then
    leaves one data file, and every id reads the same context as before."""
    path = tmp_path / "s"
    store = ContextStore(path, codec="float32", flush_every=1)
    for i in range(2000):
        store.add(f"doc-{i}", ctx(i, rows=1))
    fragments = lance.dataset(path).get_fragments()
    assert len(fragments) <= 2000 // maintenance.SMALL_ROWS + maintenance.AUTO_COMPACT_FRAGMENTS + 1
    assert len(lance.dataset(path).versions()) <= maintenance.KEEP_VERSIONS + maintenance.CLEANUP_INTERVAL + 16
    reader = ContextStore(path)
    assert len(reader) == 2000 and reader.stats()["duplicates"] == 0
    before = {k: c.embeddings for k, c in zip(["doc-0", "doc-999", "doc-1999"],
                                              reader.get_many(["doc-0", "doc-999", "doc-1999"]))}
    result = reader.compact()
    assert result["fragments"] == 1 and result["fragments_before"] == len(fragments)
    after = ContextStore(path)
    assert len(after) == 2000 and len(after.dataset().get_fragments()) == 1
    assert all(torch.equal(after[k].embeddings, v) for k, v in before.items())
    assert reader.version == after.version  # the handle that compacted looks at its result


def test_versions_are_read_back_and_cleaned_up(tmp_path):
    path = tmp_path / "s"
    store = ContextStore(path, codec="float32", flush_every=5)
    store.add_many([f"a{i}" for i in range(5)], [ctx(i) for i in range(5)])
    first = store.version
    store.add_many([f"b{i}" for i in range(5)], [ctx(10 + i) for i in range(5)])
    old = ContextStore(path, version=first)
    assert len(old) == 5 and "b0" not in old and sorted(old) == [f"a{i}" for i in range(5)]
    assert torch.equal(old["a3"].embeddings, ctx(3).embeddings)
    with pytest.raises(StoreError, match="read-only"):
        old.add("c", ctx(99))
    old.refresh()
    assert old.version == first and len(ContextStore(path)) == 10  # a version handle stays where it is
    assert [v["version"] for v in store.versions()][-1] == store.version
    time.sleep(0.05)
    removed = ContextStore(path).cleanup(older_than=timedelta(0))
    assert removed["versions_removed"] >= 1
    with pytest.raises(StoreError, match=f"no version {first}"):
        ContextStore(path, version=first)
    assert len(ContextStore(path)) == 10


def test_a_version_whose_files_cleanup_removed_is_named(tmp_path):
    """Red team r10, r06: a handle pinned to a version whose files compaction replaced and cleanup removed said
    "damaged data files" (reads) and raised pyarrow's ArrowNotImplementedError (len)."""
    path = tmp_path / "s"
    with ContextStore(path, codec="float32", flush_every=10) as store:
        store.add_many([f"k{i}" for i in range(30)], [ctx(i) for i in range(30)])
    version = ContextStore(path).version
    pinned = ContextStore(path, version=version)
    writer = ContextStore(path)
    writer.add("late", ctx(99))
    writer.flush()
    writer.compact()
    time.sleep(0.05)
    writer.cleanup(older_than=timedelta(0))
    with pytest.raises(StoreError, match=f"version {version} cannot be read: data/.* is gone .*cleaned up since"):
        pinned["k3"]
    assert len(pinned) == 30  # counted from the manifest, which is kept


def test_len_with_no_readable_data_file_counts_the_manifest(tmp_path):
    path = tmp_path / "s"
    with ContextStore(path, codec="float32") as store:
        store.add_many(["a", "b"], [ctx(1), ctx(2)])
    for file in (path / "data").iterdir():
        file.unlink()
    assert len(ContextStore(path)) == 2 and not ContextStore(path).verify().ok


def test_a_reader_left_behind_by_compaction_and_cleanup_reads_on(tmp_path):
    """A long-lived reader (a service) holds a version whose files compaction replaced and cleanup removed: its
    reads move to the latest version instead of reporting damage."""
    path = tmp_path / "s"
    writer = ContextStore(path, codec="float32", flush_every=1)
    for i in range(12):
        writer.add(f"k{i}", ctx(i))
    reader = ContextStore(path)
    assert torch.equal(reader["k3"].embeddings, ctx(3).embeddings)
    writer.compact()
    time.sleep(0.05)
    writer.cleanup(older_than=timedelta(0))
    assert torch.equal(reader.get_many(["k5", "k11"])[1].embeddings, ctx(11).embeddings)
    assert "k7" in reader and len(reader) == 12 and reader.verify().ok
