"""Corpus jobs: sources, bad rows, resuming, `datasets` workers, and Ray Data on a local cluster."""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from arccompress import ContextStore, compress_corpus
from arccompress.corpus import EncodeBatch

ROWS = [(f"p{i}", f"Passage {i} talks about item {i % 13} and a little more. " * (1 + i % 5)) for i in range(2000)]


def stored_rows(path) -> pa.Table:
    """Every stored row of a store, sorted by id (what two jobs must agree on, byte for byte)."""
    files = sorted((path / "data").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f).replace_schema_metadata(None) for f in files]).sort_by("id")


@contextmanager
def one_thread():
    """torch on one thread, as each Ray actor on a 2-CPU cluster: float results depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_process(tiny_dir, tmp_path_factory):
    """The reference run: one process, one thread, pq codes."""
    path = tmp_path_factory.mktemp("local") / "store"
    with one_thread():
        summary = compress_corpus(ROWS, path, encoder=tiny_dir / "hub", codec="pq", train_size=2048, batch_size=128)
    return path, summary


def test_local_job_stores_every_row_once(single_process, tiny_dir):
    path, summary = single_process
    assert summary.texts == 2000 and summary.already_stored == 0 and summary.tokens > 0 and summary.bytes_written > 0
    assert "2000 texts" in str(summary) and "tokens/s" in str(summary)
    store = ContextStore(path)
    assert sorted(store) == sorted(k for k, _ in ROWS) and store.stats()["duplicates"] == 0
    assert store.manifest["codec"]["trained_on_vectors"] == 2048


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "list", "datasets"])
def test_sources_and_resuming(kind, tiny_dir, tmp_path):
    rows = ROWS[:40]
    if kind == "jsonl":
        source = tmp_path / "rows.jsonl"
        source.write_text("".join(json.dumps({"id": k, "text": t}) + "\n" for k, t in rows))
    elif kind == "parquet":
        source = tmp_path / "rows.parquet"
        pq.write_table(pa.table({"id": [k for k, _ in rows], "text": [t for _, t in rows]}), source)
    elif kind == "datasets":
        from datasets import Dataset

        source = Dataset.from_dict({"id": [k for k, _ in rows], "text": [t for _, t in rows]})
    else:
        source = rows
    path = tmp_path / "store"
    first = compress_corpus(source if kind != "list" else rows[:25], path, encoder=tiny_dir / "hub", batch_size=8)
    assert first.texts == (25 if kind == "list" else 40)
    again = compress_corpus(source if kind != "list" else rows, path, encoder=tiny_dir / "hub", batch_size=8)
    assert again.already_stored == first.texts and again.texts == 40 - first.texts
    assert len(ContextStore(path)) == 40


def test_bad_rows_raise_before_anything_or_are_skipped(tiny_dir, tmp_path):
    source = tmp_path / "rows.jsonl"
    lines = [json.dumps({"id": f"r{i}", "text": f"text {i}"}) for i in range(10)]
    lines[3] = json.dumps({"text": "no id here"})
    lines[5] = json.dumps({"id": "r5", "text": "   "})
    lines[7] = json.dumps({"id": "r1", "text": "a second r1"})
    lines.insert(8, "[1, 2]")
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"rows.jsonl:4: no id"):
        compress_corpus(source, tmp_path / "s", encoder=tiny_dir / "hub")
    assert not (tmp_path / "s").exists()  # nothing compressed, nothing written
    summary = compress_corpus(source, tmp_path / "s", encoder=tiny_dir / "hub", on_bad_row="skip")
    problems = [str(b) for b in summary.bad_rows]
    assert any("rows.jsonl:4: no id" in p for p in problems)
    assert any("rows.jsonl:6 (id 'r5'): the text is empty" in p for p in problems)
    assert any("rows.jsonl:8 (id 'r1'): duplicate id (also at" in p for p in problems)
    assert any("rows.jsonl:9: a JSON list" in p for p in problems)
    # r1 is ambiguous (two texts): neither is stored
    assert sorted(ContextStore(tmp_path / "s")) == ["r0", "r2", "r4", "r6", "r8", "r9"]
    with pytest.raises(ValueError, match="lone surrogate"):
        compress_corpus([("a", "ok"), ("b", "bad \udc80")], tmp_path / "t", encoder=tiny_dir / "hub")


def test_datasets_map_with_rank(single_process, tiny_dir, tmp_path):
    """The plain multi-GPU recipe: `datasets.map(EncodeBatch(...), batched=True, with_rank=True, num_proc=n)`,
    then the rows appended to the store: the same bytes as the corpus job."""
    from datasets import Dataset

    reference, _ = single_process
    path = tmp_path / "store"
    # the store must exist first: same codebook as the reference run (a copy of its codec file and manifest)
    path.mkdir()
    for f in reference.iterdir():
        if f.is_file():
            (path / f.name).write_bytes(f.read_bytes())
    ds = Dataset.from_dict({"id": [k for k, _ in ROWS[:256]], "text": [t for _, t in ROWS[:256]]})
    encoder = EncodeBatch(path, encoder=tiny_dir / "hub", num_threads=1)
    rows = ds.map(encoder, batched=True, batch_size=128, with_rank=True, num_proc=2, remove_columns=["id", "text"])
    store = ContextStore(path)
    for shard in range(2):
        store.append(rows.shard(2, shard, contiguous=True).with_format("arrow")[:], check_ids=True)
    mine = stored_rows(path)
    theirs = stored_rows(reference).filter(pa.compute.is_in(stored_rows(reference)["id"], mine["id"]))
    assert mine.num_rows == 256 and mine.equals(theirs)


# ----------------------------------------------------------------------------- Ray Data


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'arccompress[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_job_stores_the_same_bytes_as_one_process(ray_cluster, single_process, tiny_dir, tmp_path):
    reference, _ = single_process
    path = tmp_path / "ray-store"
    with one_thread():  # the driver trains the codebook: on one thread, as the reference run did
        summary = compress_corpus(ROWS, path, encoder=tiny_dir / "hub", codec="pq", train_size=2048, batch_size=128,
                                  engine="ray", num_workers=2)
    assert summary.engine == "ray" and summary.texts == 2000 and summary.tokens > 0
    store = ContextStore(path)
    assert len(store) == 2000 and store.stats()["duplicates"] == 0
    assert (path / store.manifest["codec_file"]).read_bytes() == \
        (reference / ContextStore(reference).manifest["codec_file"]).read_bytes()  # the same codebook
    assert stored_rows(path).equals(stored_rows(reference))  # ids, counts and codes, byte for byte


def test_ray_job_survives_a_killed_actor(ray_cluster, single_process, tiny_dir, tmp_path):
    """SIGKILL one encoder actor in the middle: Ray restarts it and retries its task; every id is stored once."""
    import psutil

    reference, _ = single_process
    path = tmp_path / "ray-store"
    killed = []

    def kill_one_actor():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            data = path / "data"
            if data.is_dir() and len(list(data.glob("*.parquet"))) >= 2:  # the job is under way
                for proc in psutil.process_iter(["cmdline"]):  # Ray titles actor processes ray::<class>...
                    if "MapBatches(EncodeBatch)" in " ".join(proc.info["cmdline"] or []):
                        os.kill(proc.pid, 9)
                        killed.append(proc.pid)
                        return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_actor, daemon=True)
    killer.start()
    with one_thread():
        summary = compress_corpus(ROWS, path, encoder=tiny_dir / "hub", codec="pq", train_size=2048, batch_size=64,
                                  engine="ray", num_workers=2)
    killer.join()
    assert killed, "no actor was killed: the job ended before the test could act"
    store = ContextStore(path)
    assert sorted(store) == sorted(k for k, _ in ROWS) and store.stats()["duplicates"] == 0
    assert summary.texts == 2000
    mine, theirs = stored_rows(path), stored_rows(reference)
    assert mine.column("id").equals(theirs.column("id"))
    # a restarted actor computes in its own batches of 64: the vectors agree to float rounding (1e-5), so the
    # pq codes agree except where a vector sits on a boundary between two centroids
    same = sum(a == b for a, b in zip(mine.column("codes").to_pylist(), theirs.column("codes").to_pylist()))
    assert same >= 0.99 * 2000


def test_ray_reads_the_store(ray_cluster, single_process):
    import ray

    reference, _ = single_process
    ds = ray.data.read_parquet(str(reference / "data"))
    assert ds.count() == 2000 and {"id", "codes", "num_tokens"} <= set(ds.schema().names)
