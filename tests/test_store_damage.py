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
from arccompress.store import maintenance

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
    file and its ids, repair makes a version without it and says which ids to compute again."""
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
    with pytest.raises(StoreError, match=f"'id-35' (are|may be) in damaged data files: data/{victim.name}"):
        store["id-35"]
    with pytest.raises(StoreError, match=victim.name):
        store.get_many(["id-0", "id-35"])
    readable = [k for k in (f"id-{i}" for i in range(100)) if k not in lost]
    if indexed:  # the index says where each id is: every other id reads
        assert len(store.get_many(readable)) == 90 and torch.equal(store["id-99"].embeddings, ctx(99).embeddings)
    else:  # ids of files before the damaged one read; later ones may be shadowed by a row in it: refused
        assert torch.equal(store["id-0"].embeddings, ctx(0).embeddings)
    report = store.verify()
    assert not report.ok and report.rows == 90 and [d.file for d in report.damaged] == [f"data/{victim.name}"]
    damage = report.damaged[0]
    assert "unreadable" in damage.error and damage.rows == 10
    assert damage.ids == (lost if indexed else None)  # the id index remembers what the file held
    repaired = store.repair(report)
    assert repaired["ids"] == (lost if indexed else []) and repaired["unknown_rows"] == (0 if indexed else 10)
    after = ContextStore(path)
    assert len(after) == 90 and sorted(after) == sorted(readable) and after.verify().ok
    assert "id-35" not in after and len(after.get_many(readable)) == 90
    after.add_many(lost, [ctx(int(k[3:])) for k in lost])  # what a resumed corpus job does: the lost ids again
    after.close()
    assert len(ContextStore(path)) == 100 and torch.equal(ContextStore(path)["id-35"].embeddings, ctx(35).embeddings)


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
