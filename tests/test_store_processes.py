"""Writers in separate processes racing on one store, released together by a barrier; one killed mid-commit.

Every id ends up stored once, by the writer told so; the others are told which ids they lost (IdClashError);
no writer is left wedged, and a writer killed with -9 in the middle of its commit stops no one.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import zlib

import pytest
import torch

from arccompress import CompressedContext, ContextStore
from arccompress.store import IdClashError

SPAWN = multiprocessing.get_context("spawn")
WRITERS = 3
TIMEOUT = 120  # seconds any wait may take on a loaded 2-core machine


def ctx(key: str, writer: int) -> CompressedContext:
    """The context writer `writer` stores under `key` (writers differ: a stored row says who won)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{key}/{writer}".encode()))
    return CompressedContext(torch.randn(2, 64, generator=g), 16, "enc", 0, 8, text=f"text of {key}",
                             encoder_fingerprint="weights")


def race(path: str, writer: int, barrier, tasks, results) -> None:
    """A writer process: for each task, queue its ids, wait for the others, commit; report what happened."""
    torch.set_num_threads(1)
    while (task := tasks.get()) is not None:
        name, keys, how = task
        store = ContextStore(path, flush_every=5 if how == "steady" else 10_000)
        contexts = [ctx(k, writer) for k in keys]
        if how == "steady":  # no race: small batches, one commit every 5 contexts
            for key, c in zip(keys, contexts):
                store.add(key, c)
            store.close()
            results.put((name, writer, keys, []))
        elif how == "writer":  # a FragmentWriter, as a Ray write task holds
            rows, sink = store.encode(keys, contexts), store.fragment_writer()
            barrier.wait(TIMEOUT)
            try:
                r = sink.commit(rows)
                results.put((name, writer, r.committed, []))
            except IdClashError as e:
                results.put((name, writer, e.committed, e.ids))
        else:  # a ContextStore's queue: add_many, flush, then more work to show it is not wedged
            store.add_many(keys, contexts)
            barrier.wait(TIMEOUT)
            try:
                store.flush()
                outcome = (name, writer, keys, [])
            except IdClashError as e:
                outcome = (name, writer, e.committed, e.ids)
            store.add(f"{name}-after-{writer}", ctx(f"{name}-after-{writer}", writer))  # it goes on
            store.close()
            results.put(outcome)


@pytest.fixture(scope="module")
def writers(tmp_path_factory):
    path = tmp_path_factory.mktemp("race") / "s"
    with ContextStore(path, codec="float32") as store:
        store.add("seed", ctx("seed", 0))
    barrier, results = SPAWN.Barrier(WRITERS), SPAWN.Queue()
    tasks = [SPAWN.Queue() for _ in range(WRITERS)]
    procs = [SPAWN.Process(target=race, args=(str(path), w, barrier, tasks[w], results)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    yield path, tasks, results
    for q in tasks:
        q.put(None)
    for p in procs:
        p.join(TIMEOUT)
        if p.is_alive():
            p.kill()


def run(writers, name: str, keys_of, how: str) -> dict[int, tuple[list[str], list[str]]]:
    path, tasks, results = writers
    for w, q in enumerate(tasks):
        q.put((name, keys_of(w), how))
    got = [results.get(timeout=TIMEOUT) for _ in range(WRITERS)]
    assert {g[0] for g in got} == {name}
    return {w: (committed, refused) for _, w, committed, refused in got}


def check(path, name: str, how: str, outcome, all_keys: set[str]) -> None:
    """Every id once, holding the vectors of the writer told it committed it; the others told they lost it."""
    store = ContextStore(path)
    assert store.stats()["duplicates"] == 0
    winners: dict[str, int] = {}
    for w, (committed, refused) in outcome.items():
        for key in committed:
            assert key not in winners, f"{key} committed by writers {winners[key]} and {w}"
            winners[key] = w
    assert set(winners) == all_keys
    for w, (committed, refused) in outcome.items():
        assert all(winners[key] != w for key in refused)
    for key, w in winners.items():
        assert torch.equal(store[key].embeddings, ctx(key, w).embeddings), key
    if how == "store":
        assert all(f"{name}-after-{w}" in store for w in range(WRITERS))


@pytest.mark.parametrize("how", ["writer", "store"])
def test_same_ids_same_order(writers, how):
    keys = [f"same-{how}-{i}" for i in range(30)]
    outcome = run(writers, f"same-{how}", lambda w: keys, how)
    assert sorted(len(c) for c, _ in outcome.values()) == [0, 0, 30]  # one writer wins the whole batch
    assert all(sorted(r) == sorted(keys) for c, r in outcome.values() if not c)
    check(writers[0], f"same-{how}", how, outcome, set(keys))


@pytest.mark.parametrize("how", ["writer", "store"])
def test_overlapping_ids(writers, how):
    def keys_of(w):  # writer w: ids 10w .. 10w + 19: each overlaps its neighbours by 10
        return [f"overlap-{how}-{i}" for i in range(10 * w, 10 * w + 20)]

    outcome = run(writers, f"overlap-{how}", keys_of, how)
    every = {k for w in range(WRITERS) for k in keys_of(w)}
    check(writers[0], f"overlap-{how}", how, outcome, every)
    for w, (committed, refused) in outcome.items():
        assert sorted(committed + refused) == sorted(keys_of(w))  # told about each of its ids


def test_disjoint_ids(writers):
    outcome = run(writers, "disjoint", lambda w: [f"disjoint-{w}-{i}" for i in range(25)], "store")
    assert all(len(c) == 25 and not r for c, r in outcome.values())
    check(writers[0], "disjoint", "store", outcome, {f"disjoint-{w}-{i}" for w in range(WRITERS) for i in range(25)})


def stuck_in_commit(path: str, where: str, ready) -> None:
    """A writer that stops in the middle of its commit (until killed): after writing its data files, before the
    version that lists them ("written"), or after that version, before looking again ("committed")."""
    import lance

    from arccompress.store import writer as commits

    def hang(*args, **kwargs):
        ready.set()
        time.sleep(TIMEOUT)

    if where == "written":
        lance.LanceDataset.commit = staticmethod(hang)
    else:
        commits.StoreTable.at = hang
    store = ContextStore(path)
    store.add_many([f"victim-{where}-{i}" for i in range(10)], [ctx(f"victim-{where}-{i}", 9) for i in range(10)])
    store.flush()


@pytest.mark.parametrize("where", ["written", "committed"])
def test_kill_9_in_the_middle_of_a_commit(writers, where):
    """No lock to be held: the other writers go on while the victim hangs, and after its kill -9 its rows are
    either in no version (killed before its version) or all committed (killed after): nothing half, nothing lost."""
    path, tasks, results = writers
    ready = SPAWN.Event()
    victim = SPAWN.Process(target=stuck_in_commit, args=(str(path), where, ready))
    victim.start()
    try:
        assert ready.wait(TIMEOUT)  # the victim's data files are written
        for w, q in enumerate(tasks):
            q.put((f"steady-{where}", [f"steady-{where}-{w}-{i}" for i in range(20)], "steady"))
        assert sorted(results.get(timeout=TIMEOUT)[1] for _ in tasks) == [0, 1, 2]  # nobody waits for the victim
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(TIMEOUT)
    finally:
        if victim.is_alive():
            victim.kill()
    store = ContextStore(path)
    assert all(f"steady-{where}-{w}-{i}" in store for w in range(WRITERS) for i in range(20))
    victims = [k for k in store if k.startswith(f"victim-{where}")]
    assert len(victims) == (0 if where == "written" else 10) and store.stats()["duplicates"] == 0
    assert all(torch.equal(store[k].embeddings, ctx(k, 9).embeddings) for k in victims)
