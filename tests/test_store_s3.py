"""A store on object storage: a local S3 server (moto) that the tests start themselves. Every API and command
that takes a store takes an s3:// URI and storage options; two writer processes race on the same ids while a
reader reads (one row per id, the same for every reader, losers told); failures come out in the user's terms.
"""

from __future__ import annotations

import multiprocessing
import re
import subprocess
import sys
import zlib

import pytest
import torch

from arccompress import CompressedContext, ContextStore, StoreError
from arccompress.store import IdClashError

from .s3_server import free_port, moto_server

SPAWN = multiprocessing.get_context("spawn")
TIMEOUT = 180


def ctx(key: str, writer: int = 0) -> CompressedContext:
    g = torch.Generator().manual_seed(zlib.crc32(f"{key}/{writer}".encode()))
    return CompressedContext(torch.randn(2, 64, generator=g), 16, "enc", 0, 8, text=f"text of {key}",
                             encoder_fingerprint="weights")


@pytest.fixture(scope="module")
def s3():
    with moto_server() as server:
        yield server


def test_a_store_on_s3_does_what_a_local_one_does(s3):
    uri = s3.bucket("basics") + "/wiki-store"
    options = s3.options()
    assert not ContextStore.exists(uri, storage_options=options)
    with ContextStore(uri, codec="float32", storage_options=options, flush_every=4) as store:
        store.add_many([f"k{i}" for i in range(4)], [ctx(f"k{i}") for i in range(4)])
        first = store.version
        store.add_many([f"k{i}" for i in range(4, 10)], [ctx(f"k{i}") for i in range(4, 10)])
    assert ContextStore.exists(uri, storage_options=options)
    back = ContextStore(uri, storage_options=options)
    assert back.path == uri and len(back) == 10 and sorted(back) == sorted(f"k{i}" for i in range(10))
    assert torch.equal(back["k3"].embeddings, ctx("k3").embeddings)
    assert back.find_texts(["text of k5", "no such text"]) == ["k5", None]
    assert back.verify().ok and back.stats()["contexts"] == 10
    assert back.compact()["fragments"] == 1 and len(ContextStore(uri, storage_options=options, version=first)) == 4
    with pytest.raises(IdClashError, match="'k1'"):
        back.append(back.encode(["k1"], [ctx("k1", writer=9)]))


def race(uri: str, options: dict, writer: int, keys: list[str], barrier, results) -> None:
    """A writer process: queue its contexts for `keys`, wait for the other, commit, report."""
    torch.set_num_threads(1)
    store = ContextStore(uri, storage_options=options, flush_every=10_000)
    store.add_many(keys, [ctx(k, writer) for k in keys])
    barrier.wait(TIMEOUT)
    try:
        store.flush()
        results.put((writer, keys, []))
    except IdClashError as e:
        results.put((writer, e.committed, e.ids))


def read_while_written(uri: str, options: dict, keys: list[str], stop, results) -> None:
    """A reader process: read every id it can, again and again, until told to stop; report what each id read."""
    seen: dict[str, bytes] = {}
    changed = []
    store = ContextStore(uri, storage_options=options)
    while not stop.is_set():
        store.refresh()
        present = [k for k in keys if k in store]
        for key, c in zip(present, store.get_many(present)):
            value = c.embeddings.numpy().tobytes()
            if seen.setdefault(key, value) != value:
                changed.append(key)
    results.put(("reader", sorted(seen), changed))


def test_two_writers_race_on_s3_while_a_reader_reads(s3):
    uri = s3.bucket("race") + "/store"
    options = s3.options()
    with ContextStore(uri, codec="float32", storage_options=options) as store:
        store.add("seed", ctx("seed"))
    keys = {0: [f"id-{i}" for i in range(0, 30)], 1: [f"id-{i}" for i in range(15, 45)]}  # 15 ids in common
    barrier, results, stop = SPAWN.Barrier(2), SPAWN.Queue(), SPAWN.Event()
    everything = sorted({k for ks in keys.values() for k in ks})
    reader = SPAWN.Process(target=read_while_written, args=(uri, options, everything, stop, results))
    writers = [SPAWN.Process(target=race, args=(uri, options, w, keys[w], barrier, results)) for w in (0, 1)]
    for p in [reader, *writers]:
        p.start()
    try:
        outcome = {}
        for _ in writers:
            w, committed, lost = results.get(timeout=TIMEOUT)
            outcome[w] = (committed, lost)
        stop.set()
        _, read, changed = results.get(timeout=TIMEOUT)
    finally:
        for p in [reader, *writers]:
            p.join(TIMEOUT)
            if p.is_alive():
                p.kill()
    winners: dict[str, int] = {}
    for w, (committed, lost) in outcome.items():
        assert sorted(committed + lost) == sorted(keys[w])  # told about every id
        for key in committed:
            assert key not in winners, f"{key} committed by both writers"
            winners[key] = w
    assert sorted(winners) == everything
    back = ContextStore(uri, storage_options=options)
    assert len(back) == 46 and back.stats()["duplicates"] == 0
    assert all(torch.equal(back[k].embeddings, ctx(k, w).embeddings) for k, w in winners.items())
    assert changed == []  # no reader ever saw an id change contents
    assert set(read) <= set(everything)


def test_failures_on_s3_in_the_users_terms(s3):
    options = s3.options()
    with pytest.raises(StoreError, match=r"s3://no-such-bucket/store: cannot .*the bucket does not exist"):
        with ContextStore("s3://no-such-bucket/store", codec="float32", storage_options=options) as store:
            store.add("a", ctx("a"))
    nowhere = s3.options(aws_endpoint=f"http://127.0.0.1:{free_port()}", client_max_retries="0")
    with pytest.raises(StoreError, match=r"s3://basics/x: cannot open the store: the endpoint cannot be reached"):
        ContextStore("s3://basics/x", storage_options=nowhere)
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0") as strict:  # a server that checks credentials
        with pytest.raises(StoreError, match=r"cannot .*access denied: check the credentials"):
            ContextStore("s3://any/store", codec="float32", storage_options=strict.options())
    with pytest.raises(StoreError, match="unknown storage scheme 'ftp'"):
        ContextStore("ftp://host/store", codec="float32")


def test_the_store_commands_take_s3_uris(s3):
    uri = s3.bucket("cli") + "/store"
    with ContextStore(uri, codec="float32", storage_options=s3.options(), flush_every=2) as store:
        store.add_many([f"c{i}" for i in range(6)], [ctx(f"c{i}") for i in range(6)])
    flags = [x for k, v in s3.options().items() for x in ("--storage-option", f"{k}={v}")]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "arccompress.cli", *args], capture_output=True, text=True,
                              timeout=TIMEOUT)

    out = cli("store", "verify", uri, *flags)
    assert out.returncode == 0 and "every row reads and matches its checksum" in out.stdout, out.stderr
    out = cli("store", "compact", uri, *flags)
    assert out.returncode == 0 and "-> 1 data files" in out.stdout, out.stderr
    out = cli("info", uri, *flags)
    assert out.returncode == 0 and re.search(r"contexts\s+6\n", out.stdout), out.stdout + out.stderr
    nowhere = ["--storage-option", f"aws_endpoint=http://127.0.0.1:{free_port()}", "--storage-option",
               "client_max_retries=0"]
    out = cli("store", "verify", uri, *flags, *nowhere)  # an endpoint nobody answers: one line, no traceback
    assert out.returncode == 2 and "Traceback" not in out.stderr and "the endpoint cannot be reached" in out.stderr
