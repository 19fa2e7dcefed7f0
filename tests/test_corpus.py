"""Corpus jobs: sources, bad rows, resuming, `datasets` workers, and Ray Data on a local cluster: both engines agree
on every row of a hostile corpus, and store the same bytes."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from arccompress import ContextStore, compress_corpus
from arccompress.corpus import EncodeBatch, StoreDatasink
from arccompress.errors import InputError, StoreError
from arccompress.store.format import FIELDS

from .s3_server import moto_server

ROWS = [(f"p{i}", f"Passage {i} talks about item {i % 13} and a little more. " * (1 + i % 5)) for i in range(2000)]


def stored_rows(path, storage_options=None) -> pa.Table:
    """Every stored row of a store, sorted by id (what two jobs must agree on, byte for byte)."""
    store = ContextStore(path, storage_options=storage_options)
    assert store.stats()["duplicates"] == 0
    return store.dataset().to_table(columns=list(FIELDS)).sort_by("id")


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
    assert summary.tokens == store.stats()["tokens"]


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


def test_bad_rows_raise_before_anything_or_are_left_out(tiny_dir, tmp_path):
    source = tmp_path / "rows.jsonl"
    lines = [json.dumps({"id": f"r{i}", "text": f"text {i}"}) for i in range(10)]
    lines[3] = json.dumps({"text": "no id here"})
    lines[5] = json.dumps({"id": "r5", "text": "   "})
    lines[7] = json.dumps({"id": "r1", "text": "a second r1"})
    lines.insert(8, "[1, 2]")
    source.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"rows.jsonl:4: no 'id' field \(nothing was compressed; on_bad_row='skip'"):
        compress_corpus(source, tmp_path / "s", encoder=tiny_dir / "hub")
    assert not (tmp_path / "s").exists()  # nothing compressed, nothing written
    summary = compress_corpus(source, tmp_path / "s", encoder=tiny_dir / "hub", on_bad_row="skip")
    assert [str(b) for b in summary.bad_rows] == [
        f"{source}:2 (id 'r1'): duplicate id (also at {source}:8): every row with this id is left out",
        f"{source}:4: no 'id' field",
        f"{source}:6 (id 'r5'): the text is empty",
        f"{source}:8 (id 'r1'): duplicate id (also at {source}:2): every row with this id is left out",
        f"{source}:9: a JSON list, not an object",
    ]
    # r1 is ambiguous (two texts): neither is stored
    assert sorted(ContextStore(tmp_path / "s")) == ["r0", "r2", "r4", "r6", "r8", "r9"]
    with pytest.raises(ValueError, match="lone surrogate"):
        compress_corpus([("a", "ok"), ("b", "bad \udc80")], tmp_path / "t", encoder=tiny_dir / "hub")


def hostile_source(kind: str, folder: Path):
    """What the issue met: float, bool, int/str-mixed, blank and NUL ids, JSON lines that are not JSON (one cut
    mid-phrase by the old reader), a line that is not UTF-8; in Parquet, a file whose id column is float."""
    good = [{"id": f"h{i}", "text": f"Hostile passage {i} about rivers and hills."} for i in range(12)]
    if kind == "jsonl":
        path = folder / "hostile.jsonl"
        lines = [json.dumps(r).encode() for r in good]
        lines[1] = json.dumps({"id": 2.5, "text": "a float id"}).encode()
        lines[2] = json.dumps({"id": True, "text": "a bool id"}).encode()
        lines[3] = json.dumps({"id": 7, "text": "an int seven"}).encode()
        lines[4] = json.dumps({"id": "7", "text": "a str seven"}).encode()
        lines[5] = json.dumps({"id": "   ", "text": "a blank id"}).encode()
        lines[6] = json.dumps({"id": "nul\x00id", "text": "a NUL in the id is text like any other"}).encode()
        lines[8] = b'{"id": "h8", "text": "a raw\ttab"}'
        lines[9] = b"{oops"
        lines[10] = b'{"id": "h10", "text": "caf\xe9"}'
        lines.append(json.dumps({"id": 11, "text": "an int id alone"}).encode())
        path.write_bytes(b"\n".join(lines) + b"\n")
        return path
    path = folder / "hostile"
    path.mkdir()
    pq.write_table(pa.table({"id": [1.0, 2.5], "text": ["float one", "float two and a half"]}), path / "a.parquet")
    pq.write_table(pa.table({"id": [r["id"] for r in good[:6]] + ["h0", "  "],
                             "text": [r["text"] for r in good[:6]] + ["h0 again", "blank"]}), path / "b.parquet")
    return path


HOSTILE_JSONL_KEPT = ["11", "h0", "h11", "h7", "nul\x00id"]
HOSTILE_PARQUET_KEPT = ["h1", "h2", "h3", "h4", "h5"]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_hostile_corpus_raises_the_same_on_both_engines(kind, tiny_dir, tmp_path):
    source = hostile_source(kind, tmp_path)
    messages = []
    for engine in ("local", "ray"):
        with pytest.raises(InputError) as raised:
            compress_corpus(source, tmp_path / f"s-{engine}", encoder=tiny_dir / "hub", engine=engine)
        messages.append(str(raised.value))
        assert not (tmp_path / f"s-{engine}").exists()
    assert messages[0] == messages[1]
    assert ("hostile.jsonl:2: id 2.5 is a float: ids must be strings or integers" if kind == "jsonl" else
            "a.parquet row 0: id 1.0 is a float: ids must be strings or integers") in messages[0]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_hostile_corpus_is_stored_the_same_by_both_engines(kind, ray_cluster, tiny_dir, tmp_path, monkeypatch):
    from arccompress.compressor import Compressor

    def no_model_on_the_driver(*args, **kwargs):
        raise AssertionError("the Ray driver loaded an encoder")

    source = hostile_source(kind, tmp_path)
    with one_thread():
        summary = compress_corpus(source, tmp_path / "store-local", encoder=tiny_dir / "hub", batch_size=4,
                                  on_bad_row="skip", show_progress=False)
        monkeypatch.setattr(Compressor, "from_pretrained", no_model_on_the_driver)  # Ray workers load their own
        remote = compress_corpus(source, tmp_path / "store-ray", encoder=tiny_dir / "hub", batch_size=4,
                                 on_bad_row="skip", show_progress=False, engine="ray", num_workers=1)
    kept = HOSTILE_JSONL_KEPT if kind == "jsonl" else HOSTILE_PARQUET_KEPT
    assert sorted(ContextStore(tmp_path / "store-local")) == sorted(ContextStore(tmp_path / "store-ray")) == kept
    assert [str(b) for b in summary.bad_rows] == [str(b) for b in remote.bad_rows]
    assert summary.texts == remote.texts == len(kept) and summary.tokens == remote.tokens
    assert stored_rows(tmp_path / "store-local").equals(stored_rows(tmp_path / "store-ray"))
    problems = "\n".join(str(b) for b in summary.bad_rows)
    if kind == "jsonl":
        for needle in ("hostile.jsonl:2: id 2.5 is a float", "hostile.jsonl:3: id True is a bool",
                       "hostile.jsonl:4 (id '7'): duplicate id (also at", "hostile.jsonl:6: the id '   ' is blank",
                       "hostile.jsonl:9: not JSON (Invalid control character at column 28)",
                       "hostile.jsonl:10: not JSON (Expecting property name enclosed in double quotes at column 2)",
                       "hostile.jsonl:11: not valid UTF-8 (byte 0xe9 at column 27)"):
            assert needle in problems
    else:
        assert "a.parquet row 0: id 1.0 is a float" in problems and "a.parquet row 1: id 2.5 is a float" in problems
        assert "b.parquet row 6 (id 'h0'): duplicate id (also at" in problems and "b.parquet row 7: the id '  '" \
            in problems
        # a store refused by the task that opens it on a worker: our one-line error, not Ray's wrapper
        with pytest.raises(StoreError) as raised:
            compress_corpus(source, tmp_path / "store-ray", encoder=tiny_dir / "hub", codec="int8", engine="ray",
                            on_bad_row="skip", show_progress=False, num_workers=1)
        assert type(raised.value).__module__.startswith("arccompress") and "Traceback" not in str(raised.value)
        assert "int8" in str(raised.value)


def test_a_truncated_parquet_file_is_named(tiny_dir, tmp_path):
    good = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["x", "y"]}), good)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:-30])
    for engine in ("local", "ray"):
        for on_bad_row in ("raise", "skip"):
            with pytest.raises(InputError, match=r"cut.parquet: not a readable Parquet file"):
                compress_corpus(cut, tmp_path / "s", encoder=tiny_dir / "hub", engine=engine, on_bad_row=on_bad_row)
    assert not (tmp_path / "s").exists()


DATASETS_RECIPE = """
import sys
import multiprocess
from datasets import Dataset
from arccompress import ContextStore
from arccompress.corpus import EncodeBatch, create_store, load_store

if __name__ == "__main__":
    multiprocess.set_start_method("spawn")  # workers start fresh: a parent's CUDA is never forked
    store_path, encoder, rows = sys.argv[1], sys.argv[2], [tuple(r) for r in __import__("json").loads(sys.argv[3])]
    texts = [t for _, t in rows]
    create_store(load_store(store_path, encoder=encoder, codec="pq", train_size=2048, num_threads=1), texts)
    ds = Dataset.from_dict({"id": [k for k, _ in rows], "text": texts})
    out = ds.map(EncodeBatch(store_path, encoder=encoder, num_threads=1), batched=True, batch_size=128,
                 with_rank=True, num_proc=2, remove_columns=["id", "text"])
    ContextStore(store_path).append(out.with_format("arrow")[:])
    print(len(ContextStore(store_path)))
"""


def test_the_datasets_recipe_with_spawned_workers(single_process, tiny_dir, tmp_path):
    """The README's multi-GPU recipe without Ray: the store created in the parent, then `datasets.map(EncodeBatch,
    with_rank=True, num_proc=n)` in spawned workers (a forked worker cannot use the parent's CUDA): the same bytes
    as the corpus job."""
    reference, _ = single_process
    script = tmp_path / "recipe.py"
    script.write_text(DATASETS_RECIPE)
    # the reference's codebook was trained on the first 2048 vectors: so is this one, from the same texts
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "store"), str(tiny_dir / "hub"),
                          json.dumps(ROWS[:512])], capture_output=True, text=True, timeout=600,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "512"
    mine, theirs = stored_rows(tmp_path / "store"), stored_rows(reference)
    assert mine.equals(theirs.filter(pa.compute.is_in(theirs["id"], mine["id"])))


def test_encode_batch_leaves_cuda_alone_in_the_parent(tiny_dir, monkeypatch):
    """Built and pickled by a parent that forks (datasets, Ray): no CUDA call until a worker loads its encoder."""
    def cuda_touched(*args, **kwargs):
        raise AssertionError("CUDA was touched in the parent")

    for name in ("is_available", "device_count", "init", "_lazy_init", "current_device"):
        monkeypatch.setattr(torch.cuda, name, cuda_touched)
    worker = pickle.loads(pickle.dumps(EncodeBatch(tiny_dir / "store-not-yet", encoder=tiny_dir / "hub")))
    assert worker.store_path.endswith("store-not-yet") and worker._store is None


def test_encode_batch_names_a_bad_row(single_process, tiny_dir):
    reference, _ = single_process
    worker = EncodeBatch(reference, encoder=tiny_dir / "hub")
    with pytest.raises(InputError, match=r"row 1 of the batch: id 2.5 is a float"):
        worker({"id": ["a", 2.5], "text": ["x", "y"]})
    with pytest.raises(InputError, match=r"row 0 of the batch \(id 'a'\): the text is empty"):
        worker({"id": ["a"], "text": [" "]})
    table = worker({"id": [1, "b"], "text": ["one", "two"]})
    assert table.column("id").to_pylist() == ["1", "b"]


def test_the_datasink_counts_a_retried_unit_once_and_refuses_another_text(single_process, tiny_dir, tmp_path):
    """A write task retried (its unit written twice), or whose actor restarted (same texts, codes recomputed): its
    rows count as stored, once. Another text under an id stops the job, naming the id. Nothing is visible before
    the driver commits."""
    import shutil

    reference, _ = single_process
    path = tmp_path / "store"
    shutil.copytree(reference, path)  # a store with the reference's codebook (and its 2000 rows)
    worker = EncodeBatch(path, encoder=tiny_dir / "hub")
    unit = worker.encode(["x", "y"], ["text x", "text y"])
    with one_thread():  # the same text compressed again on one thread: other float rounding, same text hash
        again = worker.encode(["x", "z"], ["text x", "text z"])
    sink = StoreDatasink(path)
    sink.on_write_start()
    results = [sink.write([unit], None), sink.write([unit], None), sink.write([again], None)]
    assert "x" not in ContextStore(path)  # written, not committed
    sink.on_write_complete(SimpleNamespace(write_returns=results))
    assert (sink.rows, sink.tokens) == (3, sum(unit.column("num_tokens").to_pylist()) +
                                        again.column("num_tokens")[1].as_py())
    store = ContextStore(path)
    assert len(store) == 2003 and store.stats()["duplicates"] == 0
    assert torch.equal(store["x"].embeddings, ContextStore(path).get("x").embeddings)
    other = worker.encode(["y"], ["another text for y"])
    sink.on_write_start()
    with pytest.raises(StoreError, match=r"ids already stored with another text: 'y'"):
        sink.on_write_complete(SimpleNamespace(write_returns=[sink.write([other], None)]))
    assert len(ContextStore(path)) == 2003


def test_the_datasink_stores_an_id_repeated_in_one_tasks_blocks_once(single_process, tiny_dir, tmp_path):
    """Red team r07: Ray hands one write task several blocks (`Datasink.min_rows_per_write`) that repeat an id; the
    whole write failed ("ids given twice"), nothing stored. Now the id is stored once, as across tasks."""
    import shutil

    reference, _ = single_process
    path = tmp_path / "store"
    shutil.copytree(reference, path)
    worker = EncodeBatch(path, encoder=tiny_dir / "hub")
    first, second = worker.encode(["a", "dup"], ["text a", "text dup"]), worker.encode(["b", "dup"],
                                                                                      ["text b", "text dup"])
    sink = StoreDatasink(path)
    sink.on_write_start()
    sink.on_write_complete(SimpleNamespace(write_returns=[sink.write([first, second], None)]))
    store = ContextStore(path)
    assert sink.rows == 3 and len(store) == 2003 and store.stats()["duplicates"] == 0 and "dup" in store


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
    summary = compress_corpus(ROWS, path, encoder=tiny_dir / "hub", codec="pq", train_size=2048, batch_size=128,
                              engine="ray", num_workers=2)
    assert summary.engine == "ray" and summary.texts == 2000 and summary.tokens > 0
    store = ContextStore(path)
    assert len(store) == 2000 and store.stats()["duplicates"] == 0
    # the codebook was trained by a Ray task on a worker (one thread there, as in the reference run)
    assert (path / store.manifest["codec_file"]).read_bytes() == \
        (reference / ContextStore(reference).manifest["codec_file"]).read_bytes()
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
            if data.is_dir() and any(data.glob("*.lance")):  # the job is under way: a unit was written
                for proc in psutil.process_iter(["cmdline"]):  # Ray titles actor processes ray::<class>...
                    if "MapBatches(EncodeBatch)" in " ".join(proc.info["cmdline"] or []):
                        os.kill(proc.pid, 9)
                        killed.append(proc.pid)
                        return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_actor, daemon=True)
    killer.start()
    summary = compress_corpus(ROWS, path, encoder=tiny_dir / "hub", codec="pq", train_size=2048, batch_size=32,
                              engine="ray", num_workers=2)
    killer.join()
    assert killed, "no actor was killed: the job ended before the test could act"
    store = ContextStore(path)
    assert sorted(store) == sorted(k for k, _ in ROWS) and store.stats()["duplicates"] == 0
    assert summary.texts == 2000
    mine, theirs = stored_rows(path), stored_rows(reference)
    assert mine.column("id").equals(theirs.column("id"))
    # a restarted actor computes in its own batches of 32: the vectors agree to float rounding (1e-5), so the
    # pq codes agree except where a vector sits on a boundary between two centroids
    same = sum(a == b for a, b in zip(mine.column("codes").to_pylist(), theirs.column("codes").to_pylist()))
    assert same >= 0.99 * 2000


def test_ray_reads_the_store(ray_cluster, single_process):
    import ray

    reference, _ = single_process
    ds = ray.data.read_lance(str(reference))
    assert ds.count() == 2000 and {"id", "codes", "num_tokens"} <= set(ds.schema().names)


def test_gpus_asked_of_a_cluster_without_them_name_the_flag_given(ray_cluster, tiny_dir, tmp_path):
    with pytest.raises(InputError, match=r"num_gpus_per_worker=1 \(--num-gpus-per-worker\), and the Ray cluster has 0 "
                                         r"GPUs") as raised:
        compress_corpus(ROWS[:10], tmp_path / "s", encoder=tiny_dir / "hub", engine="ray", num_gpus_per_worker=1,
                        show_progress=False)
    assert "num_workers" not in str(raised.value)


def test_ray_is_quiet_from_the_command_line(tiny_dir, tmp_path):
    """`compress --engine ray --no-progress` prints Ray's own lines only with --verbose (issue 20: 45 lines)."""
    pytest.importorskip("ray")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Passage {i} about rivers. " * (1 + i % 4)}) + "\n"
                            for i in range(30)))
    out = subprocess.run([sys.executable, "-m", "arccompress.cli", "compress", "--encoder", str(tiny_dir / "hub"),
                          "--jsonl", str(docs), "--store", str(tmp_path / "s"), "--engine", "ray", "--num-workers", "1",
                          "--batch-size", "8", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compressed 30 texts" in out.stdout
    assert len(out.stderr.splitlines()) <= 2, out.stderr


def test_ray_blocks_repeating_ids_store_each_once(ray_cluster, single_process, tiny_dir, tmp_path):
    """StoreDatasink in a pipeline of one's own whose blocks repeat ids: the same text in two blocks is stored once
    and counted once; another text under an id already in an earlier block is refused by name, the rest stored."""
    import shutil

    import ray

    reference, _ = single_process
    path = tmp_path / "store"
    shutil.copytree(reference, path)
    blocks = [pa.table({"id": ["a", "b"], "text": ["text a", "text b"]}),
              pa.table({"id": ["b", "c"], "text": ["text b", "text c"]}),
              pa.table({"id": ["c", "d"], "text": ["text c", "text d"]})]
    ds = ray.data.from_arrow(blocks).map_batches(EncodeBatch, fn_constructor_kwargs=dict(store=str(path),
                                                                                         encoder=str(tiny_dir / "hub")),
                                                 compute=ray.data.ActorPoolStrategy(size=1), batch_size=None,
                                                 batch_format="pyarrow")
    sink = StoreDatasink(path)
    ds.write_datasink(sink, ray_remote_args={"num_cpus": 0})
    store = ContextStore(path)
    assert sink.rows == 4 and len(store) == 2004 and store.stats()["duplicates"] == 0
    assert all(k in store for k in "abcd")
    clash = ray.data.from_arrow([pa.table({"id": ["e"], "text": ["text e"]}),
                                 pa.table({"id": ["e", "f"], "text": ["another e", "text f"]})])
    clash = clash.map_batches(EncodeBatch, fn_constructor_kwargs=dict(store=str(path), encoder=str(tiny_dir / "hub")),
                              compute=ray.data.ActorPoolStrategy(size=1), batch_size=None, batch_format="pyarrow")
    with pytest.raises(Exception, match="ids already stored with another text: 'e'"):
        clash.write_datasink(StoreDatasink(path), ray_remote_args={"num_cpus": 0})
    assert "e" in ContextStore(path) and "f" in ContextStore(path) and len(ContextStore(path)) == 2006


def test_a_corpus_job_onto_s3_on_both_engines(ray_cluster, single_process, tiny_dir):
    """The paper's use case: a corpus compressed on a cluster into object storage. Both engines write to a local
    S3 server; the rows are the local job's, byte for byte."""
    reference, _ = single_process
    rows = ROWS[:256]
    with moto_server() as s3:
        options = s3.options()
        bucket = s3.bucket("corpus")
        with one_thread():
            local = compress_corpus(rows, f"{bucket}/local", encoder=tiny_dir / "hub", codec="pq", train_size=2048,
                                    batch_size=64, storage_options=options, show_progress=False)
        remote = compress_corpus(rows, f"{bucket}/ray", encoder=tiny_dir / "hub", codec="pq", train_size=2048,
                                 batch_size=64, storage_options=options, engine="ray", num_workers=1,
                                 show_progress=False)
        assert local.texts == remote.texts == 256 and local.tokens == remote.tokens
        mine, theirs = stored_rows(f"{bucket}/local", options), stored_rows(f"{bucket}/ray", options)
        assert mine.equals(theirs) and mine.num_rows == 256
        again = compress_corpus(ROWS[:300], f"{bucket}/ray", encoder=tiny_dir / "hub", batch_size=64,
                                storage_options=options, engine="ray", num_workers=1, show_progress=False)
        assert again.already_stored == 256 and again.texts == 44
