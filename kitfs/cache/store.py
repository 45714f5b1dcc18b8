"""The content-addressed chunk cache shared by every kitfs process on the machine.

Layout of a cache directory (created 0700; files 0600)::

    kitfs.db                                  SQLite, WAL (see kitfs.cache.schema)
    lock                                      flock: file and row changes across processes
    chunks/<algo>/<hex[:2]>/<hex>/<idx>       one file per cached chunk of a content key
    tmp/                                      chunk files being written

Invariants (what a ``kill -9`` at any instant cannot break):

- A ``chunks`` row is inserted only after its file has been completely written and renamed
  into place, and a row is deleted before its file is unlinked. So a row never points at a
  file that was never complete; a file without a row is an orphan that ``gc`` removes.
- Every chunk row carries an xxh3_64 checksum per 64 KiB block. Every read checks the blocks
  it touches; a mismatch (bit rot, a truncated file after power loss, someone editing files)
  drops the chunk and reports a miss, and the reader fetches it again. That is why chunk files
  are not fsynced: the checksum, not the write order on disk, decides what is good.
- Eviction (LRU by ``last_access``, down to the quota) skips chunks pinned by this process's
  in-flight reads; when pins kept the cache over its quota, the last unpin evicts again, so
  the quota holds once reads are over. Other processes' readers are safe too: they read
  through an open file descriptor, or see a miss and refetch.
- Across processes, "put a chunk's file in place and insert its row" and "delete rows and
  unlink their files" (eviction, dropping a bad chunk, purge, ``gc``, ``clear``) each run
  under an exclusive ``flock`` on ``lock`` in the cache directory; otherwise one process could
  unlink the file another has just put back and recorded. ``kill -9`` releases the lock.
- A full disk is not an error: ``put`` returns False and logs a warning, and the caller serves
  the bytes it already holds without caching them.

The API is synchronous and fast (SQLite and local files); the reader calls it inline from the
trio thread, as s3ql does. Nothing here knows about registries or trio.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import xxhash

from kitfs.cache.schema import cache_lock, open_database
from kitfs.errors import CacheError

log = logging.getLogger(__name__)

BLOCK_SIZE_BYTES = 64 * 1024  # checksum granularity: a 4 KiB read checks at most 2 blocks
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How many chunk reads to remember before writing their access times to the database.
_ACCESS_FLUSH_EVERY = 256


@dataclass(frozen=True)
class BlobState:
    size: int
    chunk_size: int
    verified: int  # 0 not yet, 1 ok, -1 mismatch
    failure: str | None


@dataclass(frozen=True)
class CacheStatistics:
    directory: str
    quota_bytes: int | None
    used_bytes: int
    chunk_count: int
    blob_count: int
    verified_blobs: int
    failed_blobs: int
    indexed_layers: int


@dataclass(frozen=True)
class PreparedChunk:
    """A chunk written to a temporary file by ``ChunkStore.prepare``, not yet recorded.
    ``tmp`` is None when the disk was full (``full_reason`` says how)."""

    tmp: Path | None
    length: int
    sums: bytes
    full_reason: str = ""


def block_checksums(data: bytes | bytearray | memoryview) -> bytes:
    """xxh3_64 of every 64 KiB block of ``data``, packed little-endian."""
    view = memoryview(data)
    return b"".join(
        xxhash.xxh3_64_digest(view[i : i + BLOCK_SIZE_BYTES])[::-1]
        for i in range(0, len(view), BLOCK_SIZE_BYTES)
    ) if len(view) else b""


def default_cache_dir() -> Path:
    """``$KITFS_CACHE_DIR``, else /var/cache/kitfs for root, else ``$XDG_CACHE_HOME/kitfs``."""
    if env := os.environ.get("KITFS_CACHE_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/kitfs")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kitfs"


class ChunkStore:
    """Chunks of content on local disk, tracked in SQLite. See the module docstring."""

    def __init__(self, directory: Path, quota_bytes: int | None = None) -> None:
        self.directory = directory
        self.quota_bytes = quota_bytes
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            _make_private(directory)
            (directory / "chunks").mkdir(mode=0o700, exist_ok=True)
            (directory / "tmp").mkdir(mode=0o700, exist_ok=True)
            self._conn = open_database(directory)
        except (OSError, sqlite3.Error) as exc:
            raise CacheError(f"cannot open the cache in {directory}: {exc}") from exc
        self._pins: Counter[tuple[str, int]] = Counter()
        self._over_quota = False  # the last eviction stopped short because of pins
        self._dropped = 0  # chunks found damaged and dropped (``verify_chunks`` counts them)
        self._touched: dict[tuple[str, int], float] = {}
        self._warned_full = False

    def close(self) -> None:
        self._flush_access_times()
        self._conn.close()

    # --- blobs --------------------------------------------------------------------------------

    def register_blob(self, key: str, size: int, chunk_size_bytes: int) -> BlobState:
        """Make sure ``key`` has a row; returns its state (an existing chunk size wins)."""
        self._execute(
            "INSERT OR IGNORE INTO blobs (key, size, chunk_size) VALUES (?, ?, ?)",
            (key, size, chunk_size_bytes),
        )
        state = self.blob_state(key)
        assert state is not None
        return state

    def blob_state(self, key: str) -> BlobState | None:
        row = self._execute(
            "SELECT size, chunk_size, verified, failure FROM blobs WHERE key = ?", (key,)
        ).fetchone()
        return BlobState(*row) if row else None

    def mark_verified(self, key: str, chunk_sha256: Iterable[tuple[int, str]]) -> None:
        """Record that ``key``'s content matched its digest, with each chunk's sha256."""
        with self._transaction():
            self._execute("UPDATE blobs SET verified = 1, failure = NULL WHERE key = ?", (key,))
            self._conn.executemany(
                "INSERT OR REPLACE INTO chunk_digests (key, idx, sha256) VALUES (?, ?, ?)",
                [(key, idx, digest) for idx, digest in chunk_sha256],
            )

    def mark_failed(self, key: str, reason: str) -> None:
        """Record a digest mismatch and drop every cached chunk of ``key``."""
        self.purge_chunks(key)
        self._execute("UPDATE blobs SET verified = -1, failure = ? WHERE key = ?", (reason, key))

    def chunk_sha256(self, key: str, idx: int) -> str | None:
        row = self._execute(
            "SELECT sha256 FROM chunk_digests WHERE key = ? AND idx = ?", (key, idx)
        ).fetchone()
        return row[0] if row else None

    def purge_chunks(self, key: str) -> None:
        with self._lock():
            rows = self._execute("SELECT idx FROM chunks WHERE key = ?", (key,)).fetchall()
            self._execute("DELETE FROM chunks WHERE key = ?", (key,))
            for (idx,) in rows:
                self._unlink(key, idx)

    # --- chunks -------------------------------------------------------------------------------

    def chunk_path(self, key: str, idx: int) -> Path:
        algo_hex = key.replace(":", "/")
        head, _, hex_ = algo_hex.rpartition("/")
        return self.directory / "chunks" / head / hex_[:2] / hex_ / str(idx)

    def cached_chunks(self, key: str) -> set[int]:
        rows = self._execute("SELECT idx FROM chunks WHERE key = ?", (key,)).fetchall()
        return {idx for (idx,) in rows}

    def advise_will_need(self, key: str, idx: int) -> None:
        """Ask the kernel to read a cached chunk's file into the page cache, in the background."""
        try:
            fd = os.open(self.chunk_path(key, idx), os.O_RDONLY)
        except OSError:
            return  # gone meanwhile: the read will miss and fetch
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    @property
    def conn(self) -> sqlite3.Connection:
        """The cache database (for ``kitfs.cache.index``; the store's own queries use it too)."""
        return self._conn

    def has_chunk(self, key: str, idx: int) -> bool:
        return self._execute(
            "SELECT 1 FROM chunks WHERE key = ? AND idx = ?", (key, idx)
        ).fetchone() is not None

    def read(self, key: str, idx: int, offset: int, length: int) -> bytes | None:
        """Bytes ``[offset, offset+length)`` of chunk ``idx``, checked; None on a miss.

        A chunk whose file is missing, short, or fails its checksum is dropped (and logged),
        and the read is a miss. A chunk another process evicts meanwhile is a plain miss.
        """
        row = self._execute(
            "SELECT length, xxh3 FROM chunks WHERE key = ? AND idx = ?", (key, idx)
        ).fetchone()
        if row is None:
            return None
        chunk_length, sums = row
        end = min(offset + length, chunk_length)
        if offset >= end:
            return b""
        first_block = offset // BLOCK_SIZE_BYTES
        last_block = (end - 1) // BLOCK_SIZE_BYTES
        start = first_block * BLOCK_SIZE_BYTES
        stop = min((last_block + 1) * BLOCK_SIZE_BYTES, chunk_length)
        try:
            fd = os.open(self.chunk_path(key, idx), os.O_RDONLY)
            try:
                data = os.pread(fd, stop - start, start)
            finally:
                os.close(fd)
        except FileNotFoundError:
            if self.has_chunk(key, idx) and not self.chunk_path(key, idx).exists():
                self._drop_bad_chunk(key, idx, "its file is missing")
            return None
        except OSError as exc:
            self._drop_bad_chunk(key, idx, f"reading it failed: {exc}")
            return None
        if len(data) != stop - start:
            self._drop_bad_chunk(key, idx, "its file is shorter than recorded")
            return None
        view = memoryview(data)  # slices of a view copy nothing
        for block in range(first_block, last_block + 1):
            at = (block - first_block) * BLOCK_SIZE_BYTES
            piece = view[at : at + BLOCK_SIZE_BYTES]
            if xxhash.xxh3_64_digest(piece)[::-1] != sums[block * 8 : block * 8 + 8]:
                self._drop_bad_chunk(key, idx, f"block {block} fails its xxh3 checksum")
                return None
        self._touch(key, idx)
        return data[offset - start : end - start]

    def put(self, key: str, idx: int, data: bytes | bytearray | memoryview) -> bool:
        """Store a chunk; returns False (and logs once) when the disk is full."""
        return self.commit(key, idx, self.prepare(data))

    def prepare(self, data: bytes | bytearray | memoryview) -> PreparedChunk:
        """Checksum a chunk and write it to a temporary file: the slow half of ``put``.

        Touches no SQLite and no shared state, so it may run in a worker thread while the
        trio thread goes on (the reader does that); ``commit`` then records it.
        """
        sums = block_checksums(data)
        tmp = self.directory / "tmp" / f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except OSError as exc:
            _unlink_quietly(tmp)
            if exc.errno in _FULL_ERRNOS:
                return PreparedChunk(None, len(data), sums, str(exc))
            raise CacheError(f"cannot write a chunk to {tmp.parent}: {exc}") from exc
        return PreparedChunk(tmp, len(data), sums)

    def discard(self, prepared: PreparedChunk) -> None:
        """Drop a prepared chunk that must not be recorded after all."""
        if prepared.tmp is not None:
            _unlink_quietly(prepared.tmp)

    def commit(self, key: str, idx: int, prepared: PreparedChunk) -> bool:
        """Move a prepared chunk into place and record it; False (logged once) if the disk
        was full."""
        if prepared.tmp is None:
            self._warn_full(prepared.full_reason)
            return False
        path = self.chunk_path(key, idx)
        try:
            with self._lock():
                _make_dirs_0700(path.parent, self.directory)
                os.replace(prepared.tmp, path)
                self._execute(
                    "INSERT OR REPLACE INTO chunks (key, idx, length, xxh3, last_access) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (key, idx, prepared.length, prepared.sums, time.time()),
                )
        except OSError as exc:
            _unlink_quietly(prepared.tmp)
            if exc.errno in _FULL_ERRNOS:
                self._warn_full(str(exc))
                return False
            raise CacheError(f"cannot write chunk {idx} of {key}: {exc}") from exc
        except CacheError as exc:
            _unlink_quietly(prepared.tmp)
            if "full" in str(exc):
                self._warn_full(str(exc))
                return False
            raise
        if self.quota_bytes is not None:
            self.evict(self.quota_bytes)
        return True

    # --- pins and eviction ----------------------------------------------------------------

    def pin(self, key: str, idx: int) -> None:
        self._pins[(key, idx)] += 1

    def unpin(self, key: str, idx: int) -> None:
        self._pins[(key, idx)] -= 1
        if self._pins[(key, idx)] <= 0:
            del self._pins[(key, idx)]
            if self._over_quota and self.quota_bytes is not None:
                self.evict(self.quota_bytes)

    def used_bytes(self) -> int:
        row = self._execute("SELECT COALESCE(SUM(length), 0) FROM chunks").fetchone()
        return int(row[0])

    def evict(self, target_bytes: int) -> int:
        """Evict least-recently-used unpinned chunks until at most ``target_bytes`` are used.

        Returns the bytes freed.
        """
        self._flush_access_times()
        with self._lock():
            used = self.used_bytes()
            if used <= target_bytes:
                self._over_quota = False
                return 0
            freed = 0
            victims: list[tuple[str, int]] = []
            rows = self._execute(
                "SELECT key, idx, length FROM chunks ORDER BY last_access").fetchall()
            for key, idx, length in rows:
                if used - freed <= target_bytes:
                    break
                if (key, idx) in self._pins:
                    continue
                victims.append((key, idx))
                freed += length
            self._over_quota = used - freed > target_bytes
            with self._transaction():
                self._conn.executemany("DELETE FROM chunks WHERE key = ? AND idx = ?", victims)
            for key, idx in victims:
                self._unlink(key, idx)
        if victims:
            log.info("evicted %d chunks (%d bytes) to stay under %d bytes", len(victims), freed,
                     target_bytes)
        return freed

    # --- maintenance ----------------------------------------------------------------------

    def statistics(self) -> CacheStatistics:
        one = self._execute
        return CacheStatistics(
            directory=str(self.directory),
            quota_bytes=self.quota_bytes,
            used_bytes=self.used_bytes(),
            chunk_count=one("SELECT COUNT(*) FROM chunks").fetchone()[0],
            blob_count=one("SELECT COUNT(*) FROM blobs").fetchone()[0],
            verified_blobs=one("SELECT COUNT(*) FROM blobs WHERE verified = 1").fetchone()[0],
            failed_blobs=one("SELECT COUNT(*) FROM blobs WHERE verified = -1").fetchone()[0],
            indexed_layers=one("SELECT COUNT(*) FROM layer_indexes").fetchone()[0],
        )

    def verify_chunks(self) -> tuple[int, int]:
        """Check every chunk's checksums (and sha256 where known). Returns (good, dropped).

        A chunk that another process evicts while this runs is neither good nor dropped.
        """
        good = 0
        dropped_before = self._dropped
        rows = self._execute("SELECT key, idx, length FROM chunks").fetchall()
        for key, idx, length in rows:
            data = self.read(key, idx, 0, length)
            if data is None:
                continue  # dropped (counted) or gone
            expected = self.chunk_sha256(key, idx)
            if expected and hashlib.sha256(data).hexdigest() != expected:
                self._drop_bad_chunk(key, idx, "its sha256 differs from the verified one")
            else:
                good += 1
        return good, self._dropped - dropped_before

    def collect_garbage(self) -> int:
        """Remove orphan chunk files and stale temporary files; evict to the quota.

        Returns the number of files removed.
        """
        removed = 0
        with self._lock():  # no chunk is put (file, then row) while we look for orphans
            known = {
                str(self.chunk_path(key, idx))
                for key, idx in self._execute("SELECT key, idx FROM chunks").fetchall()
            }
            for path in _walk_files(self.directory / "chunks"):
                if str(path) not in known:
                    _unlink_quietly(path)
                    removed += 1
        horizon = time.time() - 3600  # a tmp file older than an hour belongs to a dead writer
        for path in _walk_files(self.directory / "tmp"):
            try:
                if path.stat().st_mtime < horizon:
                    _unlink_quietly(path)
                    removed += 1
            except FileNotFoundError:
                pass
        if self.quota_bytes is not None:
            self.evict(self.quota_bytes)
        return removed

    def clear(self) -> None:
        """Drop everything: chunks, verification records, indexes, documents."""
        with self._lock():
            with self._transaction():
                for table in ("chunks", "chunk_digests", "blobs", "documents", "members",
                              "layer_indexes"):
                    self._execute(f"DELETE FROM {table}")
            shutil.rmtree(self.directory / "chunks", ignore_errors=True)
            (self.directory / "chunks").mkdir(mode=0o700, exist_ok=True)

    # --- documents (manifests and configs) ------------------------------------------------

    def get_document(self, digest: str) -> bytes | None:
        row = self._execute("SELECT data FROM documents WHERE digest = ?", (digest,)).fetchone()
        return bytes(row[0]) if row else None

    def put_document(self, digest: str, data: bytes) -> None:
        """Store a manifest or config the caller has checked against ``digest``."""
        try:
            self._execute("INSERT OR IGNORE INTO documents (digest, data) VALUES (?, ?)",
                          (digest, data))
        except CacheError as exc:
            self._warn_full(str(exc))

    # --- internals ------------------------------------------------------------------------

    def _execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            if "full" in str(exc):
                raise CacheError(f"cache database is full: {exc}") from exc
            raise CacheError(f"cache database error: {exc}") from exc

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn)

    def _lock(self) -> AbstractContextManager[None]:
        return cache_lock(self.directory)

    def _touch(self, key: str, idx: int) -> None:
        self._touched[(key, idx)] = time.time()
        if len(self._touched) >= _ACCESS_FLUSH_EVERY:
            self._flush_access_times()

    def _flush_access_times(self) -> None:
        if not self._touched:
            return
        rows = [(t, key, idx) for (key, idx), t in self._touched.items()]
        self._touched.clear()
        try:
            with self._transaction():
                self._conn.executemany(
                    "UPDATE chunks SET last_access = ? WHERE key = ? AND idx = ?", rows
                )
        except sqlite3.Error as exc:  # access times are a hint; never fail a read for them
            log.warning("could not record chunk access times: %s", exc)

    def _drop_bad_chunk(self, key: str, idx: int, why: str) -> None:
        log.warning("cache: dropping chunk %d of %s: %s", idx, key, why)
        self._dropped += 1
        with self._lock():
            self._execute("DELETE FROM chunks WHERE key = ? AND idx = ?", (key, idx))
            self._unlink(key, idx)

    def _unlink(self, key: str, idx: int) -> None:
        _unlink_quietly(self.chunk_path(key, idx))

    def _warn_full(self, detail: str) -> None:
        if not self._warned_full:
            self._warned_full = True
            log.warning("cache %s is full (%s): serving reads without caching them",
                        self.directory, detail)


class _Transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._conn.execute("ROLLBACK" if exc_type else "COMMIT")


def _make_private(directory: Path) -> None:
    """Make an existing cache directory 0700 (it holds what the user's credentials fetched).

    A looser one (made by hand, or by an older kitfs) is tightened, with a warning; one this
    user cannot chmod (another user's) is refused: kitfs would share it with its owner.
    """
    mode = directory.stat().st_mode & 0o777
    if mode & 0o077 == 0:
        return
    try:
        directory.chmod(0o700)
    except PermissionError:
        raise CacheError(f"the cache directory {directory} is {mode:04o} and not yours to make "
                         "0700; use your own (--cache-dir)") from None
    log.warning("cache directory %s was %04o, now 0700", directory, mode)


def _make_dirs_0700(path: Path, root: Path) -> None:
    """``mkdir -p`` under ``root`` with every new directory 0700 (``Path.mkdir(parents=True)``
    gives the parents the default mode)."""
    missing = []
    while not path.exists() and path != root:
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:  # another process made it meanwhile
            pass


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            yield Path(dirpath) / name
