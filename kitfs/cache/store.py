"""The content-addressed chunk cache shared by every kitfs process on the machine.

Layout of a cache directory (created 0700; files 0600)::

    kitfs.db                                  SQLite, WAL (see kitfs.cache.schema)
    lock                                      flock: file and row changes across processes
    chunks/<algo>/<hex[:2]>/<hex>/<idx>       one file per cached chunk of a content key (whole,
                                              or the pieces a partial chunk holds)
    checkpoints/<algo>/<hex[:2]>/<hex>        the checkpoint index of a gzip blob (by its digest)
    tmp/                                      chunk and index files being written

Invariants (what a ``kill -9`` at any instant cannot break):

- A ``chunks`` row is inserted only after its file has been completely written and renamed
  into place, and a row is deleted before its file is unlinked. So a row never points at a
  file that was never complete; a file without a row is an orphan that ``gc`` removes.
- A partial chunk (a lone random read fetches only the 128 KiB pieces it touches, see
  ``kitfs.cache.identity``) is written in place: under the cache lock, its pieces are
  written into the chunk's file (created empty when no row lists it) and only then marked
  present in its row (``present``, a bitmap of pieces). A piece is never marked before its
  bytes are written; a whole chunk put later replaces the file (rename) and the row.
- Every chunk row carries an xxh3_64 checksum per 64 KiB block. Every read checks the blocks
  it touches; a mismatch (bit rot, a truncated file after power loss, someone editing files)
  drops the chunk and reports a miss, and the reader fetches it again. That is why chunk files
  are not fsynced: the checksum, not the write order on disk, decides what is good.
- Eviction (LRU by ``last_access``) runs before a chunk's file is put in place, under the same
  lock, making room for it: the chunks on disk never exceed the quota. It skips chunks pinned
  by this process's in-flight reads; when pins kept the cache over its quota, the last unpin
  evicts again, so the quota holds once reads are over. Other processes' readers are safe too: they read
  through an open file descriptor, or see a miss and refetch.
- Across processes, "put a chunk's file in place and insert its row" and "delete rows and
  unlink their files" (eviction, dropping a bad chunk, purge, ``gc``, ``clear``) each run
  under an exclusive ``flock`` on ``lock`` in the cache directory; otherwise one process could
  unlink the file another has just put back and recorded. ``kill -9`` releases the lock.
- Checkpoint indexes (kitfs.format.gzindex) follow the same rules as chunks: file first, then
  row; row removed before file; xxh3 per 64 KiB block checked on every read (a damaged index is
  dropped and the read reports none); counted in the quota and evicted least recently used,
  but only once no chunk is left to evict (an index is a small fraction of its layer and makes
  every evicted chunk of it cheap to rebuild).
- A full disk is not an error: ``put`` returns False and logs a warning, and the caller serves
  the bytes it already holds without caching them.
- Neither is a database another program keeps locked, nor ``kitfs.db`` deleted under a
  running process: see ``kitfs.cache.database``, which owns the connection.

The API is synchronous and fast (SQLite and local files); the reader calls it inline from the
trio thread, as s3ql does. Nothing here knows about registries or trio.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import shutil
import sqlite3
import struct
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import xxhash

from kitfs.cache.database import (
    CacheDatabase,
    DatabaseFullError,
    DatabaseLockedError,
)
from kitfs.cache.identity import PIECE_SIZE_BYTES, ids_of_pieces, piece_count, piece_ids
from kitfs.errors import CacheError

log = logging.getLogger(__name__)

BLOCK_SIZE_BYTES = 64 * 1024  # checksum granularity: a 4 KiB read checks at most 2 blocks
_SUM = struct.Struct("<Q")  # one block's xxh3 in a row's ``xxh3`` column
_DIRECT_ALIGN_BYTES = 4096  # O_DIRECT: buffer address, file offset and length multiples of it
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How many chunk reads to remember before writing their access times to the database.
_ACCESS_FLUSH_EVERY = 256
_ROWS_KEPT = 4096  # chunk rows remembered by read(): 16 GiB of 4 MiB chunks, ~2.5 MiB


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
    checkpoint_indexes: int


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
            self.database = CacheDatabase(directory)
        except (OSError, sqlite3.Error) as exc:
            raise CacheError(f"cannot open the cache in {directory}: {exc}") from exc
        self.database.when_reopened(self._record_again)
        self._registered: dict[str, tuple[int, int]] = {}  # key -> (size, chunk size) asked
        self._pins: Counter[tuple[str, int]] = Counter()
        self._over_quota = False  # the last eviction stopped short because of pins
        self._dropped = 0  # chunks found damaged and dropped (``verify_chunks`` counts them)
        self._touched: dict[tuple[str, int], float] = {}
        # (length, xxh3 sums, present pieces) of chunks read lately: a chunk's row never changes while it is
        # cached (content-addressed), so a FUSE read of a cached chunk costs no query. A chunk
        # another process removed meanwhile shows up as a missing file, as before.
        self._rows: OrderedDict[tuple[str, int], tuple[int, bytes, bytes | None]] = OrderedDict()
        # chunk files are written with O_DIRECT where the file system takes it (see _write_all)
        self._direct_writes: bool | None = None  # not known yet

    def close(self) -> None:
        self._flush_access_times()
        self.database.close()

    def check_database(self) -> None:
        """See ``CacheDatabase.check_database``."""
        self.database.check_database()

    def _record_again(self) -> None:
        """What this process recorded in a database deleted under it, in the new one."""
        self._touched.clear()
        for key, (size, chunk_size_bytes) in self._registered.items():
            self.register_blob(key, size, chunk_size_bytes)

    # --- blobs --------------------------------------------------------------------------------

    def register_blob(self, key: str, size: int, chunk_size_bytes: int) -> BlobState:
        """Make sure ``key`` has a row; returns its state (an existing chunk size wins).
        While the database cannot be written, a state that is not recorded."""
        self._registered.setdefault(key, (size, chunk_size_bytes))
        with self.optional_write(f"blob {key}") as writable:
            if writable:
                self.database.execute(
                    "INSERT OR IGNORE INTO blobs (key, size, chunk_size) VALUES (?, ?, ?)",
                    (key, size, chunk_size_bytes),
                )
        state = self.blob_state(key)
        return state if state is not None else BlobState(size, chunk_size_bytes, 0, None)

    def blob_state(self, key: str) -> BlobState | None:
        row = self.database.execute(
            "SELECT size, chunk_size, verified, failure FROM blobs WHERE key = ?", (key,)
        ).fetchone()
        return BlobState(*row) if row else None

    def mark_verified(self, key: str, chunk_ids: Iterable[tuple[int, bytes]]) -> None:
        """Record that ``key``'s content matched its digest, with each chunk's piece
        identities (``kitfs.cache.identity.piece_ids``)."""
        with self.optional_write(f"the verification of {key}") as writable:
            if writable:
                self.database.execute("UPDATE blobs SET verified = 1, failure = NULL WHERE key = ?",
                              (key,))
                self.database.executemany(
                    "INSERT OR REPLACE INTO chunk_ids (key, idx, blake3) VALUES (?, ?, ?)",
                    [(key, idx, ids) for idx, ids in chunk_ids],
                )

    def mark_stream_verified(self, key: str, size: int) -> None:
        """Record a decompressed stream's size once it and its blob matched their digests."""
        with self.optional_write(f"the verification of {key}") as writable:
            if writable:
                self.database.execute("UPDATE blobs SET size = ?, verified = 1 WHERE key = ?",
                              (size, key))

    def mark_failed(self, key: str, reason: str) -> None:
        """Record a digest mismatch and drop every cached chunk of ``key`` and its tar index,
        which was read from those bytes (while the database is locked, only logged: the
        caller's process remembers the failure)."""
        if self.database.writes_paused():
            log.warning("cache: the failure of %s is not recorded: the database is locked", key)
            return
        try:
            self.purge_chunks(key)
            self.database.execute("DELETE FROM layer_indexes WHERE key = ?", (key,))
            self.database.execute("UPDATE blobs SET verified = -1, failure = ? WHERE key = ?",
                          (reason, key))
        except DatabaseLockedError as exc:
            self.database.pause_writes(f"the failure of {key}", exc)

    def chunk_ids(self, key: str, idx: int) -> bytes | None:
        """The piece identities a verified blob's chunk ``idx`` had, or None."""
        row = self.database.execute(
            "SELECT blake3 FROM chunk_ids WHERE key = ? AND idx = ?", (key, idx)
        ).fetchone()
        return bytes(row[0]) if row else None

    def purge_chunks(self, key: str) -> None:
        with self.database.lock():
            rows = self.database.execute("SELECT idx FROM chunks WHERE key = ?", (key,)).fetchall()
            self.database.execute("DELETE FROM chunks WHERE key = ?", (key,))
            for (idx,) in rows:
                self._unlink(key, idx)

    # --- chunks -------------------------------------------------------------------------------

    def chunk_path(self, key: str, idx: int) -> Path:
        algo_hex = key.replace(":", "/")
        head, _, hex_ = algo_hex.rpartition("/")
        return self.directory / "chunks" / head / hex_[:2] / hex_ / str(idx)

    def cached_chunk_count(self, key: str) -> int:
        """Whole chunks of ``key`` in the cache (partial ones do not count)."""
        return int(self.database.execute("SELECT COUNT(*) FROM chunks WHERE key = ? AND present IS NULL",
                                 (key,)).fetchone()[0])

    def cached_chunks(self, key: str) -> set[int]:
        """The whole chunks of ``key`` in the cache."""
        rows = self.database.execute("SELECT idx FROM chunks WHERE key = ? AND present IS NULL",
                             (key,)).fetchall()
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
        return self.database.conn

    def has_chunk(self, key: str, idx: int) -> bool:
        """Whether chunk ``idx`` of ``key`` is cached whole."""
        return self.database.execute(
            "SELECT 1 FROM chunks WHERE key = ? AND idx = ? AND present IS NULL", (key, idx)
        ).fetchone() is not None

    def pieces_present(self, key: str, idx: int) -> int:
        """Bitmap of the pieces of chunk ``idx`` in the cache (-1: the whole chunk)."""
        row = self.database.execute("SELECT present FROM chunks WHERE key = ? AND idx = ?",
                            (key, idx)).fetchone()
        if row is None:
            return 0
        return -1 if row[0] is None else int.from_bytes(row[0], "little")

    def read(self, key: str, idx: int, offset: int, length: int) -> bytes | memoryview | None:
        """Bytes ``[offset, offset+length)`` of chunk ``idx``, checked; None on a miss (also
        when the chunk is partial and lacks a piece the range touches).

        A chunk whose file is missing, short, or fails its checksum is dropped (and logged),
        and the read is a miss. A chunk another process evicts meanwhile is a plain miss.
        """
        row = self._rows.get((key, idx))
        if row is not None and row[2] is not None and not _has_pieces(row[2], offset, length):
            row = None  # another process may have added the pieces since: ask again
        if row is None:
            row = self.database.execute(
                "SELECT length, xxh3, present FROM chunks WHERE key = ? AND idx = ?", (key, idx)
            ).fetchone()
            if row is None:
                return None
            self._rows[(key, idx)] = row
            if len(self._rows) > _ROWS_KEPT:
                self._rows.popitem(last=False)
            if row[2] is not None and not _has_pieces(row[2], offset, length):
                return None
        try:
            data = _read_checked(self.chunk_path(key, idx), row[0], row[1], offset, length)
        except FileNotFoundError:
            self._rows.pop((key, idx), None)
            if self.has_chunk(key, idx) and not self.chunk_path(key, idx).exists():
                self._drop_bad_chunk(key, idx, "its file is missing")
            return None
        except _Damaged as exc:
            self._drop_bad_chunk(key, idx, str(exc))
            return None
        self._touch(key, idx)
        return data

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
                if self._direct_writes is None:
                    self._direct_writes = _direct_writes_work(tmp.parent)
                _write_all(fd, memoryview(data), self._direct_writes)
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
        self._rows.pop((key, idx), None)
        return self._place(
            prepared, self.chunk_path(key, idx), f"chunk {idx} of {key}",
            ("INSERT OR REPLACE INTO chunks (key, idx, length, xxh3, last_access, present, "
             "stored) VALUES (?, ?, ?, ?, ?, NULL, ?)",
             (key, idx, prepared.length, prepared.sums, time.time(), prepared.length)),
            ("SELECT 1 FROM chunks WHERE key = ? AND idx = ? AND present IS NULL", (key, idx)),
            keep=(key, idx))

    def put_pieces(self, key: str, idx: int, chunk_length: int, offset: int,
                   data: bytes | bytearray | memoryview) -> bool:
        """Add pieces to a partial chunk (``offset`` on a piece boundary; ``data`` whole
        pieces, the chunk's last one may be short): written into the chunk's file, then
        marked present, under the cache lock and after making room under the quota. A chunk
        already cached whole is left as it is. False (logged) when the disk is full or the
        database locked."""
        first = offset // PIECE_SIZE_BYTES
        count = piece_count(len(data))
        if offset % PIECE_SIZE_BYTES or (len(data) % PIECE_SIZE_BYTES
                                         and offset + len(data) != chunk_length):
            raise ValueError(f"pieces {offset}+{len(data)} are not whole pieces")
        self.database.check_database()
        if self.database.writes_paused():
            return False
        self._rows.pop((key, idx), None)
        sums = block_checksums(data)
        path = self.chunk_path(key, idx)
        what = f"pieces of chunk {idx} of {key}"
        victims: list[tuple[str, int, int]] = []
        indexes: list[tuple[str, int]] = []
        try:
            with self.database.lock():
                row = self.database.execute("SELECT length, xxh3, present FROM chunks WHERE key = ? "
                                    "AND idx = ?", (key, idx)).fetchone()
                if row is not None and row[2] is None:
                    return True  # cached whole meanwhile
                pieces = piece_count(chunk_length)
                if row is None or row[0] != chunk_length:  # a new file: no stale bytes in it
                    blocks = -(-chunk_length // BLOCK_SIZE_BYTES)
                    present, all_sums, flags = 0, bytearray(8 * blocks), os.O_TRUNC
                else:
                    present, all_sums, flags = int.from_bytes(row[2], "little"), bytearray(row[1]), 0
                present |= ((1 << count) - 1) << first
                at = offset // BLOCK_SIZE_BYTES * 8
                all_sums[at : at + len(sums)] = sums
                stored = sum(min(PIECE_SIZE_BYTES, chunk_length - p * PIECE_SIZE_BYTES)
                             for p in range(pieces) if present >> p & 1)
                if self.quota_bytes is not None:
                    self._flush_access_times()
                    victims, indexes = self._evict_locked(self.quota_bytes - stored,
                                                          keep=(key, idx))
                _make_dirs_0700(path.parent, self.directory)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600)
                try:
                    view = memoryview(data)
                    written = 0
                    while written < len(view):
                        written += os.pwrite(fd, view[written:], offset + written)
                finally:
                    os.close(fd)
                whole = present == (1 << pieces) - 1
                self.database.execute(
                    "INSERT OR REPLACE INTO chunks (key, idx, length, xxh3, last_access, "
                    "present, stored) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key, idx, chunk_length, bytes(all_sums), time.time(),
                     None if whole else present.to_bytes(-(-pieces // 8), "little"), stored))
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                self.database.warn_full(str(exc))
                return False
            raise CacheError(f"cannot write {what}: {exc}") from exc
        except DatabaseFullError as exc:
            self.database.warn_full(str(exc))
            return False
        except DatabaseLockedError as exc:
            self.database.pause_writes(what, exc)
            return False
        finally:
            _log_evicted(victims, indexes, self.quota_bytes)
        return True

    def _place(self, prepared: PreparedChunk, path: Path, what: str,
               insert: tuple[str, tuple[object, ...]], listed: tuple[str, tuple[object, ...]],
               keep: tuple[str, int] | None = None) -> bool:
        """Move a prepared file (a chunk, a checkpoint index) to ``path`` and record it with
        ``insert``, after making room for it under the quota, all under the cache lock; False
        (logged) when the disk is full or the database locked. ``listed`` finds a row that
        already lists the file; ``keep`` is a chunk being replaced, never evicted for it."""
        if prepared.tmp is None:
            self.database.warn_full(prepared.full_reason)
            return False
        self.database.check_database()
        if self.database.writes_paused():
            self.discard(prepared)
            return False
        victims: list[tuple[str, int, int]] = []
        indexes: list[tuple[str, int]] = []
        try:
            with self.database.lock():
                if self.quota_bytes is not None:  # make room first: never over the quota
                    self._flush_access_times()
                    victims, indexes = self._evict_locked(self.quota_bytes - prepared.length,
                                                          keep=keep)
                _make_dirs_0700(path.parent, self.directory)
                os.replace(prepared.tmp, path)
                try:
                    self.database.execute(*insert)
                except CacheError:
                    # Not recorded: the file is an orphan unless a row already lists it (then
                    # it holds the same bytes: the name is the content's). No other process
                    # can record it meanwhile: we hold the lock.
                    if not self.database.execute(*listed).fetchone():
                        _unlink_quietly(path)
                    raise
        except OSError as exc:
            _unlink_quietly(prepared.tmp)
            if exc.errno in _FULL_ERRNOS:
                self.database.warn_full(str(exc))
                return False
            raise CacheError(f"cannot write {what}: {exc}") from exc
        except DatabaseFullError as exc:
            _unlink_quietly(prepared.tmp)
            self.database.warn_full(str(exc))
            return False
        except DatabaseLockedError as exc:
            self.database.pause_writes(what, exc)
            return False
        finally:
            _log_evicted(victims, indexes, self.quota_bytes)
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
        """Bytes of chunk files and checkpoint index files (what the quota counts)."""
        row = self.database.execute(
            "SELECT (SELECT COALESCE(SUM(stored), 0) FROM chunks) + "
            "(SELECT COALESCE(SUM(length), 0) FROM checkpoints)").fetchone()
        return int(row[0])

    def evict(self, target_bytes: int) -> int:
        """Evict least-recently-used unpinned chunks until at most ``target_bytes`` are used,
        then, if that is not enough, checkpoint indexes. Returns the bytes freed.
        """
        self._flush_access_times()
        if self.database.writes_paused():
            self._over_quota = True  # evict once writes resume
            return 0
        try:
            with self.database.lock():
                victims, indexes = self._evict_locked(target_bytes)
        except DatabaseLockedError as exc:
            self._over_quota = True
            self.database.pause_writes("eviction", exc)
            return 0
        _log_evicted(victims, indexes, target_bytes)
        return sum(length for *_, length in victims) + sum(length for _, length in indexes)

    def _evict_locked(self, target_bytes: int, keep: tuple[str, int] | None = None
                      ) -> tuple[list[tuple[str, int, int]], list[tuple[str, int]]]:
        """``evict``'s work, with the cache lock held: the chunks (key, idx, length) and then,
        if that was not enough, the checkpoint indexes (blob, length) removed. ``keep`` is a
        chunk about to be replaced in place, never a victim."""
        used = self.used_bytes()
        if keep is not None:  # a chunk being replaced frees what its file held
            row = self.database.execute("SELECT stored FROM chunks WHERE key = ? AND idx = ?",
                                keep).fetchone()
            used -= row[0] if row else 0
        if used <= target_bytes:
            self._over_quota = False
            return [], []
        freed = 0
        victims: list[tuple[str, int, int]] = []
        rows = self.database.execute("SELECT key, idx, stored FROM chunks ORDER BY last_access").fetchall()
        for key, idx, length in rows:
            if used - freed <= target_bytes:
                break
            if (key, idx) in self._pins or (key, idx) == keep:
                continue
            victims.append((key, idx, length))
            freed += length
        indexes: list[tuple[str, int]] = []
        if used - freed > target_bytes:
            for blob, length in self.database.execute(
                    "SELECT blob, length FROM checkpoints ORDER BY last_access").fetchall():
                if used - freed <= target_bytes:
                    break
                indexes.append((blob, length))
                freed += length
        self._over_quota = used - freed > target_bytes
        with self.database.transaction():
            self.database.executemany("DELETE FROM chunks WHERE key = ? AND idx = ?",
                              [(key, idx) for key, idx, _ in victims])
            self.database.executemany("DELETE FROM checkpoints WHERE blob = ?",
                              [(blob,) for blob, _ in indexes])
        for key, idx, _ in victims:
            self._unlink(key, idx)
        for blob, _ in indexes:
            _unlink_quietly(self.checkpoints_path(blob))
        return victims, indexes

    # --- checkpoint indexes of gzip blobs ----------------------------------------------------

    def checkpoints_path(self, blob: str) -> Path:
        algo, _, hex_ = blob.partition(":")
        return self.directory / "checkpoints" / algo / hex_[:2] / hex_

    def put_checkpoints(self, blob: str, content_key: str, data: bytes | bytearray) -> bool:
        """Store the checkpoint index of gzip blob ``blob`` (whose decompressed stream is
        ``content_key``): written to ``tmp/``, renamed into place, then recorded, as a chunk
        is, after making room for it under the quota. Returns False (and logs) when the disk is
        full or the database locked."""
        prepared = self.prepare(data)
        placed = self._place(
            prepared, self.checkpoints_path(blob), f"the checkpoint index of {blob}",
            ("INSERT OR REPLACE INTO checkpoints (blob, content_key, length, xxh3, last_access) "
             "VALUES (?, ?, ?, ?, ?)", (blob, content_key, prepared.length, prepared.sums,
                                        time.time())),
            ("SELECT 1 FROM checkpoints WHERE blob = ?", (blob,)))
        if placed and self.quota_bytes is not None:
            self.evict(self.quota_bytes)  # an index larger than the room left is evicted itself
        return placed

    def has_checkpoints(self, blob: str) -> bool:
        return self.database.execute(
            "SELECT 1 FROM checkpoints WHERE blob = ?", (blob,)).fetchone() is not None

    def read_checkpoints(self, blob: str, offset: int, length: int) -> bytes | None:
        """Bytes ``[offset, offset+length)`` of ``blob``'s checkpoint index, checked; None when
        there is none, or it is damaged (then it is dropped and logged, as a chunk is)."""
        row = self.database.execute(
            "SELECT length, xxh3 FROM checkpoints WHERE blob = ?", (blob,)).fetchone()
        if row is None:
            return None
        try:
            data = bytes(_read_checked(self.checkpoints_path(blob), row[0], row[1], offset,
                                       length))
        except FileNotFoundError:
            if self.has_checkpoints(blob) and not self.checkpoints_path(blob).exists():
                self.drop_checkpoints(blob, "its file is missing")
            return None
        except _Damaged as exc:
            self.drop_checkpoints(blob, str(exc))
            return None
        self.database.execute("UPDATE checkpoints SET last_access = ? WHERE blob = ?", (time.time(), blob))
        return data

    def drop_checkpoints(self, blob: str, why: str) -> None:
        """Forget a damaged or unusable checkpoint index (logged)."""
        log.warning("cache: dropping the checkpoint index of %s: %s", blob, why)
        self._dropped += 1
        with self.database.lock():
            self.database.execute("DELETE FROM checkpoints WHERE blob = ?", (blob,))
            _unlink_quietly(self.checkpoints_path(blob))

    # --- maintenance ----------------------------------------------------------------------

    def statistics(self) -> CacheStatistics:
        one = self.database.execute
        return CacheStatistics(
            directory=str(self.directory),
            quota_bytes=self.quota_bytes,
            used_bytes=self.used_bytes(),
            chunk_count=one("SELECT COUNT(*) FROM chunks WHERE present IS NULL").fetchone()[0],
            blob_count=one("SELECT COUNT(*) FROM blobs").fetchone()[0],
            verified_blobs=one("SELECT COUNT(*) FROM blobs WHERE verified = 1").fetchone()[0],
            failed_blobs=one("SELECT COUNT(*) FROM blobs WHERE verified = -1").fetchone()[0],
            indexed_layers=one("SELECT COUNT(*) FROM layer_indexes").fetchone()[0],
            checkpoint_indexes=one("SELECT COUNT(*) FROM checkpoints").fetchone()[0],
        )

    def verify_chunks(self) -> tuple[int, int]:
        """Check every chunk's checksums (and piece identities where known: each piece a
        partial chunk holds), and every checkpoint index's checksums. Returns (good,
        dropped), counting both.

        A file that another process evicts while this runs is neither good nor dropped.
        """
        good = 0
        dropped_before = self._dropped
        rows = self.database.execute("SELECT key, idx, length, present FROM chunks").fetchall()
        for key, idx, length, present in rows:
            mask = int.from_bytes(present, "little") if present is not None else -1
            expected = self.chunk_ids(key, idx)
            bad = gone = False
            for piece in range(piece_count(length)):
                if not mask >> piece & 1:
                    continue
                at = piece * PIECE_SIZE_BYTES
                data = self.read(key, idx, at, PIECE_SIZE_BYTES)
                if data is None:
                    gone = True  # dropped (counted) or gone
                    break
                if expected and piece_ids(data) != ids_of_pieces(expected, piece, 1):
                    bad = True
                    break
            if bad:
                self._drop_bad_chunk(key, idx, "a piece differs from the verified one")
            elif not gone:
                good += 1
        for blob, length in self.database.execute("SELECT blob, length FROM checkpoints").fetchall():
            if self.read_checkpoints(blob, 0, length) is not None:
                good += 1
        return good, self._dropped - dropped_before

    def collect_garbage(self) -> int:
        """Remove orphan chunk files and stale temporary files; evict to the quota.

        Returns the number of files removed.
        """
        removed = 0
        with self.database.lock():  # no chunk is put (file, then row) while we look for orphans
            known = {
                str(self.chunk_path(key, idx))
                for key, idx in self.database.execute("SELECT key, idx FROM chunks").fetchall()
            }
            known |= {str(self.checkpoints_path(blob))
                      for (blob,) in self.database.execute("SELECT blob FROM checkpoints").fetchall()}
            for path in [*_walk_files(self.directory / "chunks"),
                         *_walk_files(self.directory / "checkpoints")]:
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
        """Drop everything: chunks, verification records, tar and checkpoint indexes,
        documents."""
        with self.database.lock():
            with self.database.transaction():
                for table in ("chunks", "chunk_ids", "blobs", "documents", "layer_indexes",
                              "checkpoints"):
                    self.database.execute(f"DELETE FROM {table}")
            self._rows.clear()
            shutil.rmtree(self.directory / "chunks", ignore_errors=True)
            shutil.rmtree(self.directory / "checkpoints", ignore_errors=True)
            (self.directory / "chunks").mkdir(mode=0o700, exist_ok=True)

    # --- documents (manifests and configs) ------------------------------------------------

    def get_document(self, digest: str) -> bytes | None:
        row = self.database.execute("SELECT data FROM documents WHERE digest = ?", (digest,)).fetchone()
        return bytes(row[0]) if row else None

    def put_document(self, digest: str, data: bytes) -> None:
        """Store a manifest or config the caller has checked against ``digest``."""
        with self.optional_write(f"document {digest}") as writable:
            if writable:
                self.database.execute("INSERT OR IGNORE INTO documents (digest, data) VALUES (?, ?)",
                              (digest, data))

    def optional_write(self, what: str) -> AbstractContextManager[bool]:
        """See ``CacheDatabase.optional_write``."""
        return self.database.optional_write(what)

    # --- internals ------------------------------------------------------------------------

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
            with self.optional_write("chunk access times") as writable:
                if writable:
                    self.database.executemany(
                        "UPDATE chunks SET last_access = ? WHERE key = ? AND idx = ?", rows
                    )
        except CacheError as exc:  # access times are a hint; never fail a read for them
            log.warning("could not record chunk access times: %s", exc)

    def _drop_bad_chunk(self, key: str, idx: int, why: str) -> None:
        log.warning("cache: dropping chunk %d of %s: %s", idx, key, why)
        self._dropped += 1
        if self.database.writes_paused():
            return  # its row stays until writes resume; every read checks it again
        try:
            with self.database.lock():
                self.database.execute("DELETE FROM chunks WHERE key = ? AND idx = ?", (key, idx))
                self._unlink(key, idx)
        except DatabaseLockedError as exc:
            self.database.pause_writes(f"dropping chunk {idx} of {key}", exc)

    def _unlink(self, key: str, idx: int) -> None:
        self._rows.pop((key, idx), None)
        _unlink_quietly(self.chunk_path(key, idx))

def _log_evicted(victims: list[tuple[str, int, int]], indexes: list[tuple[str, int]],
                 target_bytes: int | None) -> None:
    if victims or indexes:
        log.info("evicted %d chunks and %d checkpoint indexes (%d bytes) to stay under %d bytes",
                 len(victims), len(indexes),
                 sum(length for *_, length in victims) + sum(length for _, length in indexes),
                 target_bytes)


class _Damaged(Exception):
    """A cached file that is short, unreadable, or fails its checksums (the message says how)."""


def _read_checked(path: Path, file_length: int, sums: bytes, offset: int,
                  length: int) -> bytes | memoryview:
    """Bytes ``[offset, offset+length)`` of a cached file of ``file_length`` bytes, each 64 KiB
    block they touch checked against ``sums`` (a view of the blocks read when the range does
    not start and end on blocks: no copy).

    Raises:
        FileNotFoundError: the file is not there.
        _Damaged: it could not be read, is short, or a block fails its checksum.
    """
    end = min(offset + length, file_length)
    if offset >= end:
        return b""
    first_block = offset // BLOCK_SIZE_BYTES
    last_block = (end - 1) // BLOCK_SIZE_BYTES
    start = first_block * BLOCK_SIZE_BYTES
    stop = min((last_block + 1) * BLOCK_SIZE_BYTES, file_length)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, stop - start, start)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _Damaged(f"reading it failed: {exc}") from exc
    if len(data) != stop - start:
        raise _Damaged("its file is shorter than recorded")
    view = memoryview(data)  # slices of a view copy nothing
    for block in range(first_block, last_block + 1):
        at = (block - first_block) * BLOCK_SIZE_BYTES
        expected = _SUM.unpack_from(sums, block * 8)[0]
        if xxhash.xxh3_64_intdigest(view[at : at + BLOCK_SIZE_BYTES]) != expected:
            raise _Damaged(f"block {block} fails its xxh3 checksum")
    if offset == start and end == stop:
        return data
    return view[offset - start : end - start]


def _direct_writes_work(directory: Path) -> bool:
    """Whether files in ``directory`` take O_DIRECT writes (tmpfs does not), tried once."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = directory / f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}-direct"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
        try:
            with mmap.mmap(-1, _DIRECT_ALIGN_BYTES) as page:  # page-aligned
                os.write(fd, page)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
    finally:
        _unlink_quietly(probe)


def _write_all(fd: int, view: memoryview, direct: bool) -> None:
    """Write ``view`` to the new file ``fd``: with ``direct``, its whole 4 KiB blocks with
    O_DIRECT (the kernel takes them only from a page-aligned buffer: the reader receives
    chunks into anonymous mmaps; from any other it refuses at once, and the write goes through
    the page cache), then the rest through the page cache.

    Why O_DIRECT: a chunk's bytes are already on their way into the kernel's page cache of the
    FUSE file that reads them; writing them through the page cache again made a second copy in
    memory and cost the most CPU of any step of a cold read here (3.4 s per GiB right after the
    page cache was dropped, 0.44 s once warm), where O_DIRECT costs 0.1 s per GiB."""
    done = 0
    aligned = len(view) // _DIRECT_ALIGN_BYTES * _DIRECT_ALIGN_BYTES
    if direct and aligned:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
            while done < aligned:
                done += os.write(fd, view[done:aligned])
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not an aligned buffer
                raise
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    while done < len(view):
        done += os.write(fd, view[done:])


def _has_pieces(present: bytes, offset: int, length: int) -> bool:
    """Whether a partial chunk's ``present`` bitmap holds every piece ``[offset,
    offset+length)`` touches."""
    mask = int.from_bytes(present, "little")
    first = offset // PIECE_SIZE_BYTES
    last = (offset + max(length, 1) - 1) // PIECE_SIZE_BYTES
    wanted = ((1 << (last - first + 1)) - 1) << first
    return mask & wanted == wanted


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
