"""The environment's failures, met as issue 25 met them: a fork while a writer commits, a handle opened before the
store existed, a read-only folder, a file system without hard links, the descriptor limit, too few pq vectors.
Each comes out as one error in the user's terms (a StoreError naming the store and the cause), or not at all.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from arccompress import CompressedContext, ContextStore, InputError, StoreError

TIMEOUT = 120


def ctx(seed: int) -> CompressedContext:
    g = torch.Generator().manual_seed(seed)
    return CompressedContext(torch.randn(2, 64, generator=g), 16, "enc", 0, 8, text=f"text {seed}",
                             encoder_fingerprint="weights")


def python(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a script in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=os.environ | (env or {}))


def spawned_writer(path: str, key: str) -> None:
    """A writer process started with spawn, while the parent commits."""
    with ContextStore(path) as store:
        store.add(key, ctx(200))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_fork_while_a_writer_commits(tmp_path):
    """The old lock was held by a thread when the process forked: the child kept it, the other writers blocked and
    the child deadlocked on itself. There is no lock now: a thread commits in a loop while the process forks four
    times and never waits. Lance's own threads do not survive a fork either, so a forked child that uses the
    store (its inherited handle or a new one) gets a StoreError saying to spawn, at once, instead of hanging; a
    process started with spawn writes beside the parent."""
    import multiprocessing

    path = tmp_path / "s"
    store = ContextStore(path, codec="float32", flush_every=1)
    store.add("seed", ctx(0))
    stop, written = threading.Event(), []

    def keep_committing() -> None:
        i = 0
        while not stop.is_set():
            store.add(f"parent-{i}", ctx(i))
            written.append(f"parent-{i}")
            i += 1

    writer = threading.Thread(target=keep_committing)
    writer.start()
    children = []
    try:
        while len(written) < 3:
            time.sleep(0.01)
        for k in range(4):
            pid = os.fork()
            if pid == 0:  # the child: its inherited handle, then a new one; it leaves at once
                refused = 0
                for use in (lambda: store.add(f"child-{k}", ctx(k)), lambda: len(ContextStore(path))):
                    try:
                        use()
                    except StoreError as e:
                        refused += "forked from one that had opened a store" in str(e) and "spawn" in str(e)
                    except BaseException:
                        pass
                os._exit(0 if refused == 2 else 1)
            children.append(pid)
        deadline = time.monotonic() + TIMEOUT
        for pid in children:
            while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
                assert time.monotonic() < deadline, "a forked child is stuck"
                time.sleep(0.05)
            assert os.waitstatus_to_exitcode(status[1]) == 0
        spawned = multiprocessing.get_context("spawn").Process(target=spawned_writer, args=(str(path), "spawned"))
        spawned.start()
        spawned.join(TIMEOUT)
        assert spawned.exitcode == 0
        before = len(written)
        time.sleep(0.5)
        assert len(written) > before  # the parent's writer was never blocked
    finally:
        stop.set()
        writer.join(TIMEOUT)
        for pid in children:
            try:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    back = ContextStore(path)
    assert set(back) == {"seed", "spawned", *written} and back.stats()["duplicates"] == 0


def test_a_handle_opened_before_the_store_existed_sees_it(tmp_path):
    """A reader (a service) started before the corpus job created the store: refresh(), a lookup of a missing id,
    and get_many all look again and find it."""
    path = tmp_path / "s"
    early = ContextStore(path, codec="float32")
    assert len(early) == 0 and "a" not in early and early.manifest is None
    with ContextStore(path, codec="float32") as writer:
        writer.add_many(["a", "b"], [ctx(1), ctx(2)])
    assert "a" in early  # a miss looks again
    assert torch.equal(early.get_many(["b"])[0].embeddings, ctx(2).embeddings)
    late = ContextStore(tmp_path / "t", codec="float32")
    with ContextStore(tmp_path / "t", codec="float32") as writer:
        writer.add("c", ctx(3))
    late.refresh()
    assert late.manifest is not None and list(late) == ["c"] and late.version == ContextStore(tmp_path / "t").version
    with ContextStore(tmp_path / "t", codec="float32") as writer:  # and new rows, as they come
        writer.add("d", ctx(4))
    assert len(late) == 2 and torch.equal(late["d"].embeddings, ctx(4).embeddings)


def test_descriptors_stay_bounded_and_close_releases_them(tmp_path):
    """The old reader kept up to 256 files open, after close() too. 300 data files read one by one: the process
    holds no more descriptors than before; close() lets go of the dataset; a later call opens it again."""
    from arccompress.store import maintenance

    path = tmp_path / "s"
    with pytest.MonkeyPatch.context() as m:  # 300 data files: no automatic merging
        m.setattr(maintenance, "AUTO_COMPACT_FRAGMENTS", 10**9)
        store = ContextStore(path, codec="float32", flush_every=1)
        store.add_many([f"k{i}" for i in range(300)], [ctx(i) for i in range(300)])
        store.close()
    assert ContextStore(path).stats()["fragments"] == 300
    fds = lambda: len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0  # noqa: E731
    before = fds()
    reader = ContextStore(path)
    for i in range(300):
        reader[f"k{i}"]
    assert fds() <= before + 16
    reader.close()
    assert fds() <= before + 2
    assert torch.equal(reader["k7"].embeddings, ctx(7).embeddings)  # opened again


def test_too_many_open_files_is_named(tmp_path):
    """With the descriptor limit reached, a read is one StoreError naming the store and the cause (not a raw
    OSError, not a "damaged file")."""
    path = tmp_path / "s"
    with ContextStore(path, codec="float32", flush_every=2) as store:
        store.add_many([f"k{i}" for i in range(10)], [ctx(i) for i in range(10)])
    out = python("""
        import os, resource, sys
        from arccompress import ContextStore, StoreError
        store = ContextStore(sys.argv[1])
        store["k1"]
        store.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (3, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        try:
            print(ContextStore(sys.argv[1])["k7"].num_tokens)
        except StoreError as e:
            print("StoreError:", e)
    """, str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"StoreError: {path}: cannot" in out.stdout and "too many open files" in out.stdout
    assert "damaged" not in out.stdout


READ_ONLY = """
    import sys, torch
    from arccompress import CompressedContext, ContextStore, StoreError
    store = ContextStore(sys.argv[1])
    print("read", len(store), store["a"].num_tokens)
    for what in ("add", "new"):
        try:
            if what == "add":
                store.add("c", CompressedContext(torch.ones(2, 64), 16, "enc", 0, 8, encoder_fingerprint="weights"))
                store.flush()
            else:
                inner = ContextStore(sys.argv[1] + "/inner", codec="float32")
                inner.add("x", CompressedContext(torch.ones(2, 64), 16, "enc", 0, 8))
                inner.flush()
        except StoreError as e:
            print("StoreError:", e)
"""


def read_only(path: Path) -> subprocess.CompletedProcess:
    """READ_ONLY run on a store this process may not write: a read-only bind mount of it (as root, which ignores
    permissions), else its folders and files made read-only."""
    if os.geteuid() != 0:
        for folder, _, files in os.walk(path):
            os.chmod(folder, 0o555)
            for f in files:
                os.chmod(Path(folder) / f, 0o444)
        return python(READ_ONLY, str(path))
    unshare = shutil.which("unshare")
    mounted = f"mount --bind {path} {path} && mount -o remount,bind,ro {path} {path}"
    if unshare is None or subprocess.run([unshare, "-m", "sh", "-c", mounted], capture_output=True).returncode:
        pytest.skip("running as root without the right to make a read-only mount: no way to refuse this process writes")
    script = textwrap.dedent(READ_ONLY)
    return subprocess.run([unshare, "-m", "sh", "-c", f'{mounted} && exec "$0" -c "$1" "$2"', sys.executable, script,
                           str(path)], capture_output=True, text=True, timeout=TIMEOUT)


def test_a_read_only_folder_reads_and_refuses_writes_in_words(tmp_path):
    """A store on a folder this process may not write (a read-only mount, another user's files): it opens and
    reads; a write is one StoreError naming the store and the cause; nothing is left half-written."""
    path = tmp_path / "s"
    with ContextStore(path, codec="float32") as store:
        store.add_many(["a", "b"], [ctx(1), ctx(2)])
    out = read_only(path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "read 2 16"
    cause = "(permission denied|the file system is read-only)"
    assert re.match(f"StoreError: {path}: cannot write data files: {cause}", lines[1]), lines[1]
    assert re.match(f"StoreError: {path}/inner: cannot create the store: {cause}", lines[2]), lines[2]
    assert len(ContextStore(path)) == 2


NO_LINKS = """#include <errno.h>
int linkat(int a, const char *b, int c, const char *d, int e) { errno = EPERM; return -1; }
"""


def test_a_file_system_without_hard_links_is_named(tmp_path):
    """Lance commits a version on a local disk by linking it into place (put-if-absent); on a file system that
    refuses hard links (some FUSE and SMB mounts), emulated here by a libc without linkat, creating or adding
    to a store is one StoreError saying so and what to use instead."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the libc shim that emulates a file system without hard links")
    (tmp_path / "nolink.c").write_text(NO_LINKS)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "nolink.so"), str(tmp_path / "nolink.c")],
                   check=True, timeout=TIMEOUT)
    with ContextStore(tmp_path / "s", codec="float32") as store:
        store.add("a", ctx(1))
    out = python("""
        import sys, torch
        from arccompress import CompressedContext, ContextStore, StoreError
        print("read", ContextStore(sys.argv[1] + "/s")["a"].num_tokens)
        for name in ("s", "new"):
            try:
                with ContextStore(sys.argv[1] + "/" + name, codec="float32") as store:
                    store.add("b", CompressedContext(torch.ones(2, 64), 16, "enc", 0, 8, encoder_fingerprint="weights"))
            except StoreError as e:
                print("StoreError:", e)
    """, str(tmp_path), env={"LD_PRELOAD": str(tmp_path / "nolink.so")})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "read 16" and len(lines) == 3
    assert lines[1].startswith(f"StoreError: {tmp_path}/s: cannot commit: the file system refuses hard links")
    assert lines[2].startswith(f"StoreError: {tmp_path}/new: cannot create the store: the file system refuses hard")
    assert "object store URI" in lines[1] and "b" not in ContextStore(tmp_path / "s")


def test_pq_with_too_few_training_vectors_names_the_minimum(tmp_path, tiny_dir):
    """faiss's own RuntimeError leaked for a train_size below 256: the setting is an InputError naming the minimum
    when the store is opened; too few vectors at the first flush one too, and nothing is written or lost."""
    from arccompress import Compressor

    comp = Compressor.from_pretrained(tiny_dir / "hub")
    with pytest.raises(InputError, match="train_size must be at least 256 for the pq codec.*not 100"):
        ContextStore(tmp_path / "s", compressor=comp, codec="pq", train_size=100)
    store = ContextStore(tmp_path / "s", compressor=comp, codec="pq", flush_every=1000)
    store.add_texts([f"t{i}" for i in range(100)], [f"a short text {i}" for i in range(100)])
    with pytest.raises(InputError, match=r"needs at least 256 training vectors, got \d+"):
        store.flush()
    assert len(store) == 100 and not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- arguments, sizes


def test_get_many_names_a_bad_id_or_device(tmp_path):
    """Red team p58: a None or int id, an unknown device, CUDA on a machine without it came out as TypeError,
    pyarrow's ArrowTypeError, RuntimeError and AssertionError."""
    from arccompress.errors import InputTypeError

    with ContextStore(tmp_path / "s", codec="float32") as store:
        store.add("a", ctx(1))
    store = ContextStore(tmp_path / "s")
    with pytest.raises(InputTypeError, match="NoneType .*position 1"):
        store.get_many(["a", None])
    with pytest.raises(InputTypeError, match="int .*position 0"):
        store.get_many([5])
    with pytest.raises(InputError, match="device='nope' is not a torch device"):
        store.get_many(["a"], device="nope")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            store.get_many(["a"], device="cuda")
    assert torch.equal(store.get_many(["a"], device="cpu")[0].embeddings, ctx(1).embeddings)


def test_a_repeated_id_in_a_large_add_many_is_named_by_position(tmp_path):
    """Red team p51: the check counted each id in the whole list (minutes at 100,000 ids) and named no position."""
    keys = [f"k{i}" for i in range(100_000)] + ["k7"]
    store = ContextStore(tmp_path / "s", codec="float32")
    with pytest.raises(InputError, match="'k7' is given twice: at positions 7 and 100000"):
        store.add_many(keys, [ctx(1)] * len(keys))
    assert len(store) == 0


def test_a_pq_store_waiting_for_training_vectors_counts_them_without_gathering(tmp_path, monkeypatch):
    """Red team p52: past flush_every, each context added to a pq store still waiting for train_size vectors
    gathered the whole queue to count it (quadratic). Now the queue counts; it is gathered once, to train."""
    from arccompress.store.writer import Queue

    gathered = []
    real = Queue.vectors
    monkeypatch.setattr(Queue, "vectors", lambda self: gathered.append(1) or real(self))
    store = ContextStore(tmp_path / "s", codec="decoder-pq", bits_per_dim=1.0, flush_every=4, train_size=300)
    for i in range(149):  # 2 vectors each: 298, short of 300
        store.add(f"k{i}", ctx(i))
    assert not gathered and store.version is None
    store.add("k149", ctx(149))
    assert gathered == [1] and store.version is not None and len(store) == 150
