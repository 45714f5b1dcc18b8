"""One cache directory shared by several kitfs processes, through the real CLI and registry.

What the README's "The cache" section promises when processes share a cache: concurrent
readers get the right bytes and leave a consistent cache; ``kill -9`` in the middle of a fetch
never leaves a chunk marked present that is missing or wrong; a chunk corrupted at rest is
detected on read and fetched again (the registry's own log shows the refetch); a quota holds
when two processes fill the cache at once. Then the two races these tests found, pinned down
deterministically: processes opening a new cache at once, and a chunk put back while another
process evicts it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

import kitfs.cache.chunks as chunks_module
import kitfs.cache.database as database_module
import kitfs.cache.schema as schema_module
from kitfs.cache.files import unlink_quietly
from kitfs.cache.store import ChunkStore
from kitfs.demo import Pusher, Registry, sample_kit
from tests.kitfs_cli import kitfs_argv

CHUNK = 4 * 1024 * 1024  # the reader's default chunk size, which the CLI uses
WEIGHTS = os.urandom(6 * CHUNK + 12345)  # the model layer spans 7 chunks
BIG_WEIGHTS = os.urandom(64 * 1024 * 1024)
WEIGHTS_PATH = "models/weights.safetensors"


@dataclass(frozen=True)
class Kit:
    reference: str
    model_digest: str  # the layer holding the weights file
    weights: bytes


@pytest.fixture(scope="module")
def kit(registry: Registry, pusher: Pusher) -> Kit:
    reference = f"{registry.host}/procs/sample:v1"
    push = sample_kit(pusher, reference, WEIGHTS)
    return Kit(reference, push.layers[0].digest, WEIGHTS)


@pytest.fixture(scope="module")
def big_kit(registry: Registry, pusher: Pusher) -> Kit:
    reference = f"{registry.host}/procs/big:v1"
    push = sample_kit(pusher, reference, BIG_WEIGHTS)
    return Kit(reference, push.layers[0].digest, BIG_WEIGHTS)


@dataclass
class Cat:
    """A ``kitfs cat`` running in the background, its stdout going to a file."""

    process: subprocess.Popen[bytes]
    out: Path
    err: Path
    files: list[IO[bytes]]

    def wait(self, timeout: float = 120) -> tuple[int, bytes, str]:
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
            for f in self.files:
                f.close()
        return code, self.out.read_bytes(), self.err.read_text()


@pytest.fixture
def start_cat(tmp_path: Path) -> Iterator[Callable[..., Cat]]:
    """Start ``kitfs cat REFERENCE PATH ARGS...``; every process is reaped by PID at the end."""
    started: list[Cat] = []

    def start(reference: str, path: str, *args: str) -> Cat:
        n = len(started)
        out, err = tmp_path / f"cat-{n}.out", tmp_path / f"cat-{n}.err"
        stdout, stderr = open(out, "wb"), open(err, "wb")  # noqa: SIM115 (closed by wait)
        process = subprocess.Popen(kitfs_argv("cat", reference, path, *args),
                                   stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
        cat = Cat(process, out, err, [stdout, stderr])
        started.append(cat)
        return cat

    yield start
    for cat in started:
        if cat.process.poll() is None:
            os.kill(cat.process.pid, signal.SIGKILL)
        cat.process.wait()
        for f in cat.files:
            f.close()


def cache_stats(kitfs: Any, cache_dir: Path) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(
        kitfs("cache", "stats", "--json", "--cache-dir", str(cache_dir)).text)
    return stats


def assert_cache_verifies_clean(kitfs: Any, cache_dir: Path) -> None:
    """``kitfs cache verify``: every chunk marked present is on disk with the right checksums."""
    result = kitfs("cache", "verify", "--cache-dir", str(cache_dir), check=False)
    assert result.returncode == 0, (result.text, result.stderr)
    assert result.text.strip().endswith(", 0 dropped"), result.text
    assert "dropping chunk" not in result.stderr, result.stderr


def chunk_dir(cache_dir: Path, digest: str) -> Path:
    algo, hex_ = digest.split(":")
    return cache_dir / "chunks" / algo / hex_[:2] / hex_


# --- several processes, one cache ---------------------------------------------------------------


def test_two_processes_reading_one_file_at_once_both_get_the_right_bytes(
    kit: Kit, kitfs: Any, start_cat: Callable[..., Cat], tmp_path: Path
) -> None:
    for attempt in range(3):  # each on a new cache: the processes also create it together
        cache_dir = tmp_path / f"cache-{attempt}"
        cats = [start_cat(kit.reference, WEIGHTS_PATH, "--cache-dir", str(cache_dir))
                for _ in range(2)]
        for cat in cats:
            code, out, err = cat.wait()
            assert code == 0, err
            assert out == kit.weights
            assert "Traceback" not in err and "WARNING" not in err, err
        assert_cache_verifies_clean(kitfs, cache_dir)
        stats = cache_stats(kitfs, cache_dir)
        assert stats["failed_blobs"] == 0
        assert stats["verified_blobs"] >= 1
        assert stats["used_bytes"] >= len(kit.weights)


@pytest.mark.parametrize("when", ["first chunk file", "first bytes on stdout"])
def test_kill_9_mid_fetch_never_marks_missing_or_wrong_bytes_present(
    big_kit: Kit, kitfs: Any, start_cat: Callable[..., Cat], cache_dir: Path, when: str
) -> None:
    chunks = chunk_dir(cache_dir, big_kit.model_digest)
    total_chunks = -(-len(big_kit.weights) // CHUNK)
    for round_ in range(3):  # each round resumes from what the killed one left behind
        before = len(list(chunks.glob("*"))) if chunks.exists() else 0
        cat = start_cat(big_kit.reference, WEIGHTS_PATH, "--cache-dir", str(cache_dir))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and cat.process.poll() is None:
            if when == "first chunk file":
                fired = chunks.exists() and len(list(chunks.glob("*"))) > before
            else:
                fired = cat.out.stat().st_size > 0
            if fired:
                break
            time.sleep(0.001)
        assert cat.process.poll() is None, f"round {round_}: cat ended before it could be killed"
        os.kill(cat.process.pid, signal.SIGKILL)
        code, out, _ = cat.wait()
        assert code == -signal.SIGKILL
        assert len(out) < len(big_kit.weights)
        assert_cache_verifies_clean(kitfs, cache_dir)
        assert cache_stats(kitfs, cache_dir)["chunk_count"] < total_chunks + 4, "not mid-fetch"
    assert kitfs("cat", big_kit.reference, WEIGHTS_PATH, "--cache-dir", str(cache_dir)).stdout \
        == big_kit.weights
    assert_cache_verifies_clean(kitfs, cache_dir)
    kitfs("cache", "gc", "--cache-dir", str(cache_dir))  # removes what the kills left in tmp/
    assert_cache_verifies_clean(kitfs, cache_dir)


def test_a_chunk_corrupted_at_rest_is_detected_and_fetched_again(
    kit: Kit, kitfs: Any, cache_dir: Path, registry: Registry
) -> None:
    assert kitfs("cat", kit.reference, WEIGHTS_PATH).stdout == kit.weights
    victim = chunk_dir(cache_dir, kit.model_digest) / "2"
    data = bytearray(victim.read_bytes())
    assert len(data) == CHUNK
    data[CHUNK // 2] ^= 0x40
    victim.write_bytes(bytes(data))

    mark = registry.log_mark()
    result = kitfs("cat", kit.reference, WEIGHTS_PATH)
    assert result.stdout == kit.weights
    assert "dropping chunk 2" in result.stderr and "xxh3" in result.stderr
    # the registry served exactly the one chunk again, nothing else
    assert registry.blob_bytes_served(mark) == CHUNK
    assert_cache_verifies_clean(kitfs, cache_dir)


def test_two_processes_under_one_quota_smaller_than_the_file(
    kit: Kit, kitfs: Any, start_cat: Callable[..., Cat], cache_dir: Path
) -> None:
    quota = 6 * 1024 * 1024
    for round_ in range(2):
        cats = [start_cat(kit.reference, WEIGHTS_PATH, "--cache-dir", str(cache_dir),
                          "--cache-size", "6M") for _ in range(2)]
        for cat in cats:
            code, out, err = cat.wait()
            assert code == 0, err
            assert out == kit.weights, f"round {round_}"
        stats = cache_stats(kitfs, cache_dir)
        assert stats["used_bytes"] <= quota, stats
        assert stats["failed_blobs"] == 0
        assert_cache_verifies_clean(kitfs, cache_dir)


# --- the races, deterministically ---------------------------------------------------------------


_OPEN_AT_ONCE = """
import os, sys, time
from pathlib import Path
from kitfs.cache.store import ChunkStore
ready, go, cache_dir = sys.argv[1:]
Path(ready).touch()
while not os.path.exists(go):
    time.sleep(0.0005)
ChunkStore(Path(cache_dir)).close()
"""


def test_processes_opening_a_new_cache_at_once_all_succeed(tmp_path: Path) -> None:
    """A new cache is created (WAL switch, schema migration) by whichever process comes first;
    the others must wait for it, not fail with "database is locked" (``CacheError``, exit 74).
    Six processes are released at the same instant against a new directory, three times."""
    for attempt in range(3):
        base = tmp_path / f"attempt-{attempt}"
        base.mkdir()
        go = base / "go"
        processes = [
            subprocess.Popen([sys.executable, "-c", _OPEN_AT_ONCE, str(base / f"ready-{n}"),
                              str(go), str(base / "cache")], stderr=subprocess.PIPE)
            for n in range(6)
        ]
        try:
            deadline = time.monotonic() + 60
            while len(list(base.glob("ready-*"))) < len(processes) and time.monotonic() < deadline:
                time.sleep(0.01)
            go.touch()
            errors = [process.communicate(timeout=60)[1] for process in processes]
        finally:  # every process reaped, by PID, before any assertion
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        for process, err in zip(processes, errors, strict=True):
            assert process.returncode == 0, err.decode()


def _remove_by_eviction(store: ChunkStore, key: str) -> None:
    store.evict(0)


def _remove_by_purge(store: ChunkStore, key: str) -> None:
    store.purge_chunks(key)


def _remove_as_corrupt(store: ChunkStore, key: str) -> None:
    path = store.chunk_path(key, 0)
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    assert store.read(key, 0, 0, 10) is None


def _remove_as_orphan(store: ChunkStore, key: str) -> None:
    store.database.execute("DELETE FROM chunks")  # the file is now an orphan, as after a kill -9
    store.collect_garbage()


@pytest.mark.parametrize("remove", [_remove_by_eviction, _remove_by_purge, _remove_as_corrupt,
                                    _remove_as_orphan])
def test_a_chunk_put_back_while_another_process_removes_it_stays_consistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, remove: Callable[[ChunkStore, str], None]
) -> None:
    """Process B removes chunk 0 (row first, then file) while process A puts it back (file
    first, then row). Interleaved, A's new file could be unlinked after A recorded it: a row
    without its file. Each store here is its own "process" (own connection, own lock fd); A
    runs in a thread started at the worst moment: between B's row delete and B's unlink."""
    key = "sha256:" + "ab" * 32
    data = os.urandom(100_000)
    writer = ChunkStore(tmp_path / "cache")  # process A
    remover = ChunkStore(tmp_path / "cache")  # process B
    writer.put(key, 0, data)
    threads: list[threading.Thread] = []
    original = unlink_quietly

    def unlink_after_a_racing_put(path: Path) -> None:
        if path == writer.chunk_path(key, 0) and not threads:
            thread = threading.Thread(target=writer.put, args=(key, 0, data))
            thread.start()
            thread.join(0.5)  # A gets every chance to finish its put now
            threads.append(thread)
        original(path)

    monkeypatch.setattr(chunks_module, "unlink_quietly", unlink_after_a_racing_put)
    try:
        remove(remover, key)
        assert threads, "the removal never unlinked the chunk's file"
        threads[0].join(10)
        assert not threads[0].is_alive()
        monkeypatch.undo()
        # A's put came last, so its chunk is there: recorded, on disk, and right
        assert writer.verify_chunks() == (1, 0)
        assert writer.read(key, 0, 0, len(data)) == data
    finally:
        writer.close()
        remover.close()


def test_cache_verify_does_not_count_chunks_another_process_evicts_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``kitfs cache verify`` next to a reader under a quota: chunks the reader's process
    evicts while verify runs are gone, not damaged; verify must not report them dropped."""
    key = "sha256:" + "cd" * 32
    verifier = ChunkStore(tmp_path / "cache")
    evictor = ChunkStore(tmp_path / "cache")
    try:
        for idx in range(3):
            verifier.put(key, idx, os.urandom(10_000))
        real_read = verifier.read
        calls: list[int] = []

        def read_while_another_process_evicts(key: str, idx: int, offset: int,
                                              length: int) -> bytes | memoryview | None:
            calls.append(idx)
            if len(calls) == 2:
                evictor.evict(0)  # everything goes, the two chunks not yet checked too
            return real_read(key, idx, offset, length)

        monkeypatch.setattr(verifier, "read", read_while_another_process_evicts)
        assert verifier.verify_chunks() == (1, 0)
    finally:
        verifier.close()
        evictor.close()


def test_a_chunk_evicted_between_lookup_and_open_is_a_plain_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader finds the chunk's row, another process evicts the chunk before the reader
    opens its file: a miss (the reader fetches it), not a damaged chunk worth a warning."""
    key = "sha256:" + "ef" * 32
    reader = ChunkStore(tmp_path / "cache")
    evictor = ChunkStore(tmp_path / "cache")
    try:
        reader.put(key, 0, os.urandom(10_000))
        real_open = os.open
        target = str(reader.chunk_path(key, 0))

        def open_after_an_eviction(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if str(path) == target:
                evictor.evict(0)
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_after_an_eviction)
        with caplog.at_level(logging.WARNING, logger="kitfs"):
            assert reader.read(key, 0, 0, 100) is None
        monkeypatch.undo()
        assert "dropping chunk" not in caplog.text
        assert reader.verify_chunks() == (0, 0)
    finally:
        reader.close()
        evictor.close()


def test_creating_a_cache_does_not_import_pandas_or_numpy(tmp_path: Path) -> None:
    """sqlite-utils (used to migrate the cache) imports pandas and numpy when they are installed,
    as they are in the test environment: ~85 MiB more in every daemon that creates a cache."""
    code = ("import sys; from pathlib import Path; from kitfs.cache.store import ChunkStore; "
            f"s = ChunkStore(Path({str(tmp_path / 'cache')!r})); "
            "print(s.conn.execute(\"SELECT COUNT(*) FROM layer_indexes\").fetchone()[0], "
            "'pandas' in sys.modules, 'numpy' in sys.modules); import pandas")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["0", "False", "False"]  # migrated; and pandas still importable


def test_a_process_whose_database_was_deleted_keeps_working_until_it_can_open_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rm kitfs.db`` under a running process, and the new database cannot be opened at the
    first try (as while another process held the deleted one): the store keeps its records
    in memory meanwhile, then moves to the directory's database and records there."""
    key = "sha256:" + "12" * 32
    store = ChunkStore(tmp_path / "cache")
    try:
        store.register_blob(key, 300_000, 100_000)
        store.put(key, 0, b"a" * 100_000)
        (tmp_path / "cache" / "kitfs.db").unlink()
        real_open = schema_module.open_database

        def refused(directory: Path) -> Any:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(database_module, "open_database", refused)
        store.database._next_database_check = 0
        assert store.put(key, 1, b"b" * 100_000)  # recorded in memory only
        assert store.read(key, 1, 0, 3) == b"bbb"
        monkeypatch.setattr(database_module, "open_database", real_open)
        store.database._next_database_check = 0
        assert store.put(key, 2, b"c" * 100_000)
        other = ChunkStore(tmp_path / "cache")  # another process sees the new database
        try:
            assert other.cached_chunks(key) == {2}
            assert other.blob_state(key) == store.blob_state(key)  # registered again
            assert other.verify_chunks() == (1, 0)
        finally:
            other.close()
    finally:
        store.close()
