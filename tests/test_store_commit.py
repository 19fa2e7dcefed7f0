"""The store's commit protocol in one process: one row per id, the first committed; losers told; retries counted;
all or nothing per call; ids of any size and any text.

Two ContextStore objects on one folder are two writers (no lock anywhere: each commits a version of its own);
tests/test_store_processes.py races real processes, tests/test_store_s3.py writers on an object store.
"""

from __future__ import annotations

import pickle
import threading

import lance
import pyarrow as pa
import pytest
import torch

from arccompress import CompressedContext, ContextStore, StoreError
from arccompress.store import CommitResult, IdClashError, writer

WIDTH = 64


def ctx(seed: int, text: str | None = None, rows: int = 3) -> CompressedContext:
    g = torch.Generator().manual_seed(seed)
    return CompressedContext(torch.randn(rows, WIDTH, generator=g), 8 * rows, "enc", 0, 8,
                             text=f"text {seed}" if text is None else text, encoder_fingerprint="weights")


def new_store(path, **kwargs) -> ContextStore:
    """A decoder-space store (no compressor needed), created."""
    with ContextStore(path, codec="float32", **kwargs) as store:
        store.add("seed", ctx(0))
    return ContextStore(path, **kwargs)


def raw_rows(path) -> int:
    """Rows in the Lance dataset, shadowed ones included."""
    return lance.dataset(path).count_rows()


def same(store, key, seed) -> bool:
    return torch.equal(store[key].embeddings, ctx(seed).embeddings)


# ----------------------------------------------------------------------------- ids


def test_ids_of_any_text_and_size(tmp_path):
    """Ids are filter values, never SQL: quotes, backslashes, NUL, LIKE's wildcards, a 1 MB id, 20,000 ids."""
    odd = ["a'b", 'a"b', "a\\b", "a\0b", "%", "_", "a%", "' OR '1'='1", "x" * 1_000_000, "🧭", " "]
    store = new_store(tmp_path / "s", flush_every=5000)
    store.add_many(odd, [ctx(i) for i in range(len(odd))])
    many = [f"many-{i}" for i in range(20_000)]
    store.add_many(many, [ctx(0, rows=1)] * len(many))
    store.close()
    back = ContextStore(tmp_path / "s")
    assert len(back) == 1 + len(odd) + len(many) and set(back) == {"seed", *odd, *many}
    for i, key in enumerate(odd):
        assert key in back and same(back, key, i), key[:20]
    assert "a" not in back and "a'" not in back and "x" * 999_999 not in back
    assert len(back.get_many(many)) == 20_000
    with pytest.raises(KeyError, match=r"'nope'"):
        back.get_many(["a'b", "nope"])


# ----------------------------------------------------------------------------- two writers, one id


def test_second_writer_of_the_same_ids_never_replaces(tmp_path):
    path = tmp_path / "s"
    first, second = new_store(path), ContextStore(path)
    ids = ["x", "y", "z"]
    first.add_many(ids, [ctx(1), ctx(2), ctx(3)])
    second.add_many(ids, [ctx(4), ctx(5), ctx(6)])  # queued before the first commits: the commit decides
    first.flush()
    version = ContextStore(path).version
    with pytest.raises(IdClashError, match="'x', 'y', 'z'") as e:
        second.flush()
    assert (e.value.ids, e.value.committed, e.value.same_text) == (ids, [], [])
    back = ContextStore(path)
    assert back.version == version and raw_rows(path) == 4  # nothing written, no version made
    assert [same(back, k, s) for k, s in zip(ids, (1, 2, 3))] == [True] * 3
    # the same rows again (a retried task) count as written
    third = ContextStore(path)
    third.add_many(["w"], [ctx(7)])
    result = third.append(third.encode(ids, [ctx(1), ctx(2), ctx(3)]))
    assert result == CommitResult([], ids, None)
    third.close()
    assert sorted(ContextStore(path)) == ["seed", "w", "x", "y", "z"]


def test_overlapping_batches_store_each_id_once_and_the_loser_goes_on(tmp_path):
    path = tmp_path / "s"
    a, b = new_store(path, flush_every=100), ContextStore(path, flush_every=100)
    a.add_many(["p", "q", "r"], [ctx(1), ctx(2), ctx(3, text="shared text")])
    b.add_many(["r", "s", "t"], [ctx(4, text="shared text"), ctx(5), ctx(6)])
    a.flush()
    with pytest.raises(IdClashError, match="'r'.*same text.*2 other contexts were committed") as e:
        b.flush()
    assert (e.value.ids, e.value.same_text, e.value.committed) == (["r"], ["r"], ["s", "t"])
    assert len(b) == 6 and "r" in b  # the refused id left b's queue; the store holds a's
    b.add("u", ctx(7))  # later flushes work
    b.close()
    back = ContextStore(path)
    assert sorted(back) == ["p", "q", "r", "s", "seed", "t", "u"] and back.stats()["duplicates"] == 0
    assert same(back, "r", 3) and same(back, "s", 5)


def test_a_commit_that_another_writer_overtakes_learns_it_lost(tmp_path, monkeypatch):
    """The race the lock used to close: B commits the same ids between A's look and A's commit. Lance puts A's
    version after B's; A looks again, finds its rows shadowed (B's commit came first), deletes them and says so:
    refused for other contents, written for identical ones. Every reader reads B's rows, before and after."""
    path = tmp_path / "s"
    a, b = new_store(path), ContextStore(path)
    real = writer.write_rows

    def b_commits_first(location, rows):
        written = real(location, rows)
        if not b_committed:
            b_committed.append(True)
            b.add_many(["k1", "k2", "k3"], [ctx(1), ctx(9), ctx(3)])  # k1 and k3 identical to A's, k2 not
            b.flush()
        return written

    b_committed: list[bool] = []
    monkeypatch.setattr(writer, "write_rows", b_commits_first)
    a.add_many(["k1", "k2", "k3", "k4"], [ctx(1), ctx(2), ctx(3), ctx(4)])
    with pytest.raises(IdClashError, match="'k2'.*1 other contexts were committed \\(2 already stored identically\\)") \
            as e:
        a.flush()
    assert (e.value.ids, e.value.committed) == (["k2"], ["k4"])
    back = ContextStore(path)
    assert sorted(back) == ["k1", "k2", "k3", "k4", "seed"] and len(back) == 5
    assert same(back, "k2", 9) and same(back, "k4", 4)
    assert raw_rows(path) == 5 and back.stats()["duplicates"] == 0  # A deleted its shadowed rows


def test_shadowed_rows_left_by_a_writer_that_died_are_never_read(tmp_path, monkeypatch):
    """A writer that lost a race and died before deleting its rows: they stay in the dataset, shadowed: not read,
    not counted, not listed; compaction drops them."""
    path = tmp_path / "s"
    a, b = new_store(path), ContextStore(path)
    real = writer.write_rows

    def b_commits_first(location, rows):
        written = real(location, rows)
        monkeypatch.setattr(writer, "write_rows", real)
        b.add_many(["k1", "k2"], [ctx(1), ctx(2)])
        b.flush()
        return written

    monkeypatch.setattr(writer, "write_rows", b_commits_first)
    monkeypatch.setattr(writer, "delete_rows", lambda *args: False)  # dies before deleting
    a.add_many(["k1", "k2", "k3"], [ctx(11), ctx(12), ctx(13)])
    with pytest.raises(IdClashError):
        a.flush()
    back = ContextStore(path)
    assert raw_rows(path) == 6 and len(back) == 4 and sorted(back) == ["k1", "k2", "k3", "seed"]
    assert back.stats()["duplicates"] == 2 and same(back, "k1", 1) and same(back, "k2", 2)
    assert back.compact()["shadowed_rows_dropped"] == 2
    assert raw_rows(path) == 4 and same(ContextStore(path), "k1", 1) and ContextStore(path).stats()["duplicates"] == 0


def test_rows_a_foreign_writer_appended_repeat_ids_and_the_first_wins(tmp_path):
    """Rows appended with Lance alone (no store code: no look first) that repeat stored ids, and a data file
    holding an id twice: each id reads its first row in the dataset's order."""
    path = tmp_path / "s"
    store = new_store(path)
    store.append(store.encode(["a", "b"], [ctx(1), ctx(2)]))
    rows = store.encode(["b", "c", "c2"], [ctx(3), ctx(4), ctx(5)])
    twice = pa.concat_tables([store.encode(["d"], [ctx(6)]), store.encode(["d"], [ctx(7)])])
    lance.write_dataset(pa.concat_tables([rows, twice]), path, mode="append")
    back = ContextStore(path)
    assert sorted(back) == ["a", "b", "c", "c2", "d", "seed"] and len(back) == 6
    assert back.stats()["duplicates"] == 2 and same(back, "b", 2) and same(back, "d", 6)
    assert [c.num_tokens for c in back.get_many(["b", "d", "b"])] == [24, 24, 24]


# ----------------------------------------------------------------------------- all or nothing per call


def test_a_clash_inside_add_many_leaves_nothing_of_the_call_queued(tmp_path):
    """add_many commits every flush_every contexts: a commit that meets another writer's id raises, and the
    call's contexts that were not committed leave the queue (issue 25: no half-queued batch); the call, retried
    without the refused id, stores the rest (the committed ones count as written)."""
    path = tmp_path / "s"
    a, b = new_store(path, flush_every=3), ContextStore(path, flush_every=3)
    b.add_many(["k1", "k2"], [ctx(1), ctx(2)])
    a.add("k2", ctx(9))
    a.flush()
    with pytest.raises(IdClashError, match="3 contexts of this call were not queued") as e:
        b.add_many(["k3", "k4", "k5", "k6"], [ctx(3), ctx(4), ctx(5), ctx(6)])
    assert e.value.ids == ["k2"] and e.value.committed == ["k1", "k3"]
    assert sorted(b) == ["k1", "k2", "k3", "seed"]  # k4-k6 are not waiting in b's queue
    b.add_many(["k3", "k4", "k5", "k6"], [ctx(3), ctx(4), ctx(5), ctx(6)])  # the retry: k3 counts as written
    b.close()
    assert sorted(ContextStore(path)) == ["k1", "k2", "k3", "k4", "k5", "k6", "seed"]
    assert same(ContextStore(path), "k2", 9)


def test_a_failing_flush_inside_add_many_leaves_the_call_retryable(tmp_path, monkeypatch):
    """The second of three commits of one add_many fails (a disk error): the first one's contexts are stored,
    the rest leave the queue, earlier calls' queued contexts stay, and the same call again succeeds."""
    path = tmp_path / "s"
    store = new_store(path, flush_every=4)
    store.add("early", ctx(50))  # queued by an earlier call
    real, calls = writer.write_rows, []

    def fails_once(location, rows):
        calls.append(rows.num_rows)
        if len(calls) == 2:
            raise StoreError("disk error")
        return real(location, rows)

    monkeypatch.setattr(writer, "write_rows", fails_once)
    keys = [f"k{i}" for i in range(9)]
    with pytest.raises(StoreError, match="disk error"):
        store.add_many(keys, [ctx(i) for i in range(9)])
    assert sorted(ContextStore(path)) == ["early", "k0", "k1", "k2", "seed"]
    assert list(store._queue) == []  # nothing of the failed call is queued (early was committed with k0-k2)
    store.add_many(keys, [ctx(i) for i in range(9)])
    store.close()
    back = ContextStore(path)
    assert sorted(back) == sorted(["early", "seed", *keys]) and raw_rows(path) == 11
    assert all(same(back, k, i) for i, k in enumerate(keys))


def test_adding_an_id_stored_with_other_contents_is_refused_before_queueing(tmp_path):
    path = tmp_path / "s"
    a, b = new_store(path), ContextStore(path)
    a.add("m", ctx(1))
    a.flush()
    with pytest.raises(IdClashError, match="already in the store.*'m'.*nothing was queued"):
        b.add_many(["n", "m"], [ctx(2), ctx(3)])
    assert "n" not in b
    b.add_many(["n", "m"], [ctx(2), ctx(1)])  # the same contents: counts as written
    b.close()
    assert sorted(ContextStore(path)) == ["m", "n", "seed"] and raw_rows(path) == 3


def test_append_refuses_other_rows_for_stored_ids(tmp_path):
    path = tmp_path / "s"
    store = new_store(path)
    store.append(store.encode(["a", "b"], [ctx(1), ctx(2)]))
    with pytest.raises(IdClashError, match="'b'") as e:
        store.append(store.encode(["b", "c"], [ctx(3), ctx(4)]))
    assert e.value.committed == ["c"]
    result = store.append(store.encode(["a", "d"], [ctx(1), ctx(5)]))  # "a": the same row, a retried task
    assert result.committed == ["d"] and result.identical == ["a"] and result.version == store.version
    back = ContextStore(path)
    assert sorted(back) == ["a", "b", "c", "d", "seed"] and same(back, "b", 2)
    rows = store.encode(["e"], [ctx(6)])
    codes = rows.column("codes").to_pylist()
    bad = rows.set_column(6, "codes", pa.array([codes[0][:-1] + bytes([codes[0][-1] ^ 1])], pa.binary()))
    with pytest.raises(StoreError, match="row 'e': its checksum"):
        store.append(bad)
    with pytest.raises(StoreError, match="columns"):
        store.append(rows.drop_columns(["checksum"]))
    with pytest.raises(StoreError, match="ids given twice: 'e'"):
        store.append(pa.concat_tables([rows, rows]))


# ----------------------------------------------------------------------------- write tasks and a committer


def test_fragment_writer_is_a_light_picklable_handle(tmp_path):
    path = tmp_path / "s"
    store = new_store(path)
    handle = store.fragment_writer()
    assert set(vars(handle)) == {"location", "rules"} and len(pickle.dumps(handle)) < 1000
    copy = pickle.loads(pickle.dumps(handle))
    assert copy.commit(store.encode(["f1", "f2"], [ctx(1), ctx(2)])).committed == ["f1", "f2"]
    with pytest.raises(IdClashError) as e:
        copy.commit(store.encode(["f2", "f3"], [ctx(9), ctx(3)]))
    assert e.value.ids == ["f2"] and e.value.committed == ["f3"]
    back = pickle.loads(pickle.dumps(e.value))  # as a Ray task's error reaches the driver
    assert (str(back), back.ids, back.committed, back.same_text) == (str(e.value), ["f2"], ["f3"], [])
    assert copy.commit(store.encode(["f3"], [ctx(3)])).identical == ["f3"]
    assert sorted(ContextStore(path)) == ["f1", "f2", "f3", "seed"]
    with pytest.raises(StoreError, match="no store yet"):
        ContextStore(tmp_path / "new", codec="float32").fragment_writer()


def test_written_parts_are_committed_once_with_duplicate_ids_across_them(tmp_path):
    """What a Ray job's driver does: write tasks write data files (invisible), the driver commits them all in
    one version. An id in two parts is stored by the first part's row: the second counts as written if
    identical, else is refused, naming it; nothing is committed by a part written but never committed."""
    path = tmp_path / "s"
    store = new_store(path)
    handle = pickle.loads(pickle.dumps(store.fragment_writer()))
    p1 = handle.write(store.encode(["a", "b", "c"], [ctx(1), ctx(2), ctx(3)]))
    p2 = handle.write(store.encode(["c", "d"], [ctx(3), ctx(4)]))  # "c" again, identical
    p3 = handle.write(store.encode(["b", "e"], [ctx(20), ctx(5)]))  # "b" again, other contents
    orphan = handle.write(store.encode(["z"], [ctx(26)]))  # a task whose part never reaches the committer
    assert pickle.loads(pickle.dumps(p1)).ids == ["a", "b", "c"] and "z" not in ContextStore(path)
    before = ContextStore(path).version
    with pytest.raises(IdClashError, match="'b'") as e:
        handle.commit_written([p1, p2, p3])
    assert e.value.ids == ["b"] and sorted(e.value.committed) == ["a", "b", "c", "d", "e"]
    back = ContextStore(path)
    assert sorted(back) == ["a", "b", "c", "d", "e", "seed"] and same(back, "b", 2) and same(back, "c", 3)
    assert raw_rows(path) == 6 and back.stats()["duplicates"] == 0 and "z" not in back
    assert before + 1 <= back.version <= before + 3  # the append, and the deletion of the shadowed rows
    assert handle.commit_written([p1]).identical == ["a", "b", "c"]  # committed again: written already
    assert orphan.ids == ["z"]


# ----------------------------------------------------------------------------- threads, each with its own handle


def test_threads_with_their_own_handles_store_each_id_once(tmp_path, monkeypatch):
    """On NFS, flock is emulated per process, so two threads of one process were both "inside" the old lock and an
    id was stored twice. The commit takes no lock now: flock and link are made to fail here, and 4 threads with
    4 handles race on the same 40 ids, released together: one winner per id, the others told."""
    import fcntl
    import os

    def refused(*args, **kwargs):
        raise AssertionError("the store took a file lock or a hard link")

    monkeypatch.setattr(fcntl, "flock", refused)
    monkeypatch.setattr(os, "link", refused)
    path = tmp_path / "s"
    new_store(path)
    keys = [f"t{i}" for i in range(40)]
    barrier, outcome = threading.Barrier(4), {}

    def race(w: int) -> None:
        store = ContextStore(path, flush_every=1000)
        store.add_many(keys, [ctx(100 * w + i) for i in range(40)])
        barrier.wait(60)
        try:
            store.flush()
            outcome[w] = (keys, [])
        except IdClashError as e:
            outcome[w] = (e.committed, e.ids)

    threads = [threading.Thread(target=race, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(outcome) == 4
    winners: dict[str, int] = {}
    for w, (committed, lost) in outcome.items():
        assert sorted(committed + lost) == sorted(keys)  # told about every id
        for key in committed:
            assert key not in winners, f"{key} committed twice"
            winners[key] = w
    back = ContextStore(path)
    assert set(winners) == set(keys) and len(back) == 41 and back.stats()["duplicates"] == 0
    assert all(same(back, key, 100 * w + int(key[1:])) for key, w in winners.items())
