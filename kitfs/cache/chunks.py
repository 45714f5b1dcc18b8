"""Chunk files and their rows (table ``chunks``), and the quota all cached files share.

``ChunkFiles`` writes (``prepare``/``commit``, ``put``, ``put_pieces``), reads (checked) and
drops chunks; it keeps the cache under its quota through ``quota`` (``kitfs.cache.eviction``:
eviction, read pins), places checkpoint index files for ``kitfs.cache.checkpoints`` (same
rules, same quota) and removes orphans (``gc``).

Invariants (what a ``kill -9`` at any instant cannot break; the others are listed in
``kitfs.cache.store``):

- A ``chunks`` row is inserted only after its file has been completely written and renamed
  into place, and a row is deleted before its file is unlinked. So a row never points at a
  file that was never complete; a file without a row is an orphan that ``gc`` removes.
- A partial chunk (a lone random read fetches only the 128 KiB pieces it touches, see
  ``kitfs.cache.identity``) is written in place: under the cache lock, its pieces are
  written into the chunk's file (created empty when no row lists it) and only then marked
  present in its row (``present``, a bitmap of pieces). A piece is never marked before its
  bytes are written; a whole chunk put later replaces the file (rename) and the row.
- Every chunk row carries an xxh3_64 checksum per 64 KiB block. Every read checks the blocks
  it touches (``kitfs.cache.files.read_checked``); a mismatch (bit rot, a truncated file after
  power loss, someone editing files) drops the chunk and reports a miss, and the reader
  fetches it again. That is why chunk files are not fsynced: the checksum, not the write order
  on disk, decides what is good.
- Eviction (LRU by ``last_access``) runs before a chunk's file is put in place, under the same
  lock, making room for it: the chunks on disk never exceed the quota. It skips chunks pinned
  by this process's in-flight reads; when pins kept the cache over its quota, the last unpin
  evicts again, so the quota holds once reads are over. Other processes' readers are safe too: they read
  through an open file descriptor, or see a miss and refetch. Checkpoint indexes are evicted
  only once no chunk is left to evict (see ``kitfs.cache.checkpoints``). Chunks and
  checkpoints of keys pinned in the ``pins`` table (``kitfs pull --pin``, see
  ``kitfs.cache.pins``) are never evicted; they count in the quota.
- Across processes, "put a chunk's file in place and insert its row" and "delete rows and
  unlink their files" (eviction, dropping a bad chunk, purge, ``gc``, ``clear``) each run
  under an exclusive ``flock`` on ``lock`` in the cache directory; otherwise one process could
  unlink the file another has just put back and recorded. ``kill -9`` releases the lock.
- A full disk is not an error: ``put`` returns False and logs a warning, and the caller serves
  the bytes it already holds without caching them.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from kitfs.cache.database import CacheDatabase, DatabaseFullError, DatabaseLockedError
from kitfs.cache.eviction import Quota, Room
from kitfs.cache.files import (
    BLOCK_SIZE_BYTES,
    FULL_ERRNOS,
    Damaged,
    PreparedChunk,
    block_checksums,
    checkpoints_path,
    chunk_path,
    direct_writes_work,
    make_dirs_0700,
    read_checked,
    unlink_quietly,
    walk_files,
    write_all,
)
from kitfs.cache.identity import PIECE_SIZE_BYTES, piece_count
from kitfs.errors import CacheError

log = logging.getLogger("kitfs.cache.store")  # the store's log lines, as before the split

# How many chunk reads to remember before writing their access times to the database.
_ACCESS_FLUSH_EVERY = 256
_ROWS_KEPT = 4096  # chunk rows remembered by read(): 16 GiB of 4 MiB chunks, ~2.5 MiB


class ChunkFiles:
    """The chunks of a cache directory, on disk and in ``db``. See the module docstring."""

    def __init__(self, directory: Path, db: CacheDatabase, quota_bytes: int | None) -> None:
        self.directory = directory
        self._db = db
        self.quota = Quota(directory, db, quota_bytes, self._unlink, self.flush_access_times)
        self.dropped = 0  # chunks and indexes found damaged and dropped (verify counts them)
        self._touched: dict[tuple[str, int], float] = {}
        # (length, xxh3 sums, present pieces) of chunks read lately: a chunk's row never changes while it is
        # cached (content-addressed), so a FUSE read of a cached chunk costs no query. A chunk
        # another process removed meanwhile shows up as a missing file, as before.
        self._rows: OrderedDict[tuple[str, int], tuple[int, bytes, bytes | None]] = OrderedDict()
        # chunk files are written with O_DIRECT where the file system takes it (see write_all)
        self._direct_writes: bool | None = None  # not known yet
        db.when_reopened(self._touched.clear)  # access times of rows the new database lacks

    # --- chunks -------------------------------------------------------------------------------

    def chunk_path(self, key: str, idx: int) -> Path:
        return chunk_path(self.directory, key, idx)

    def cached_chunk_count(self, key: str) -> int:
        """Whole chunks of ``key`` in the cache (partial ones do not count)."""
        return int(self._db.execute("SELECT COUNT(*) FROM chunks WHERE key = ? AND present IS NULL",
                                    (key,)).fetchone()[0])

    def cached_chunks(self, key: str) -> set[int]:
        """The whole chunks of ``key`` in the cache."""
        rows = self._db.execute("SELECT idx FROM chunks WHERE key = ? AND present IS NULL",
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

    def has_chunk(self, key: str, idx: int) -> bool:
        """Whether chunk ``idx`` of ``key`` is cached whole."""
        return self._db.execute(
            "SELECT 1 FROM chunks WHERE key = ? AND idx = ? AND present IS NULL", (key, idx)
        ).fetchone() is not None

    def pieces_present(self, key: str, idx: int) -> int:
        """Bitmap of the pieces of chunk ``idx`` in the cache (-1: the whole chunk)."""
        row = self._db.execute("SELECT present FROM chunks WHERE key = ? AND idx = ?",
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
            row = self._db.execute(
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
            data = read_checked(self.chunk_path(key, idx), row[0], row[1], offset, length)
        except FileNotFoundError:
            self._rows.pop((key, idx), None)
            if self.has_chunk(key, idx) and not self.chunk_path(key, idx).exists():
                self.drop_bad_chunk(key, idx, "its file is missing")
            return None
        except Damaged as exc:
            self.drop_bad_chunk(key, idx, str(exc))
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
                    self._direct_writes = direct_writes_work(tmp.parent)
                write_all(fd, memoryview(data), self._direct_writes)
            finally:
                os.close(fd)
        except OSError as exc:
            unlink_quietly(tmp)
            if exc.errno in FULL_ERRNOS:
                return PreparedChunk(None, len(data), sums, str(exc))
            raise CacheError(f"cannot write a chunk to {tmp.parent}: {exc}") from exc
        return PreparedChunk(tmp, len(data), sums)

    def discard(self, prepared: PreparedChunk) -> None:
        """Drop a prepared chunk that must not be recorded after all."""
        if prepared.tmp is not None:
            unlink_quietly(prepared.tmp)

    def commit(self, key: str, idx: int, prepared: PreparedChunk) -> bool:
        """Move a prepared chunk into place and record it; False (logged once) if the disk
        was full."""
        self._rows.pop((key, idx), None)
        return self.place(
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
        self._db.check_database()
        if self._db.writes_paused():
            return False
        self._rows.pop((key, idx), None)
        sums = block_checksums(data)
        path = self.chunk_path(key, idx)
        what = f"pieces of chunk {idx} of {key}"

        def write(room: Room) -> None:
            row = self._db.execute("SELECT length, xxh3, present FROM chunks WHERE key = ? "
                                   "AND idx = ?", (key, idx)).fetchone()
            if row is not None and row[2] is None:
                return  # cached whole meanwhile
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
            self.quota.make_room(room, stored, keep=(key, idx))
            make_dirs_0700(path.parent, self.directory)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600)
            try:
                view = memoryview(data)
                written = 0
                while written < len(view):
                    written += os.pwrite(fd, view[written:], offset + written)
            finally:
                os.close(fd)
            whole = present == (1 << pieces) - 1
            self._db.execute(
                "INSERT OR REPLACE INTO chunks (key, idx, length, xxh3, last_access, "
                "present, stored) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, idx, chunk_length, bytes(all_sums), time.time(),
                 None if whole else present.to_bytes(-(-pieces // 8), "little"), stored))

        return self._write_locked(what, write)

    def place(self, prepared: PreparedChunk, path: Path, what: str,
               insert: tuple[str, tuple[object, ...]], listed: tuple[str, tuple[object, ...]],
               keep: tuple[str, int] | None = None) -> bool:
        """Move a prepared file (a chunk, a checkpoint index) to ``path`` and record it with
        ``insert``, after making room for it under the quota, all under the cache lock; False
        (logged) when the disk is full or the database locked. ``listed`` finds a row that
        already lists the file; ``keep`` is a chunk being replaced, never evicted for it."""
        if prepared.tmp is None:
            self._db.warn_full(prepared.full_reason)
            return False
        self._db.check_database()
        if self._db.writes_paused():
            self.discard(prepared)
            return False
        tmp = prepared.tmp

        def write(room: Room) -> None:
            self.quota.make_room(room, prepared.length, keep=keep)  # never over the quota
            make_dirs_0700(path.parent, self.directory)
            os.replace(tmp, path)
            try:
                self._db.execute(*insert)
            except CacheError:
                # Not recorded: the file is an orphan unless a row already lists it (then it
                # holds the same bytes: the name is the content's). No other process can
                # record it meanwhile: we hold the lock.
                if not self._db.execute(*listed).fetchone():
                    unlink_quietly(path)
                raise

        return self._write_locked(what, write, on_failure=lambda: unlink_quietly(tmp))

    def _write_locked(self, what: str, write: Callable[[Room], None],
                      on_failure: Callable[[], None] = lambda: None) -> bool:
        """Run ``write`` under the cache lock: a full disk or database is False (warned once),
        as is a locked database (writes paused); ``on_failure`` cleans up after either. What
        ``write`` evicted to make room is logged whatever happens."""
        room = Room()
        try:
            with self._db.lock():
                write(room)
        except OSError as exc:
            on_failure()
            if exc.errno in FULL_ERRNOS:
                self._db.warn_full(str(exc))
                return False
            raise CacheError(f"cannot write {what}: {exc}") from exc
        except DatabaseFullError as exc:
            on_failure()
            self._db.warn_full(str(exc))
            return False
        except DatabaseLockedError as exc:
            self._db.pause_writes(what, exc)
            return False
        finally:
            self.quota.record(room, self.quota.quota_bytes)
        return True

    def purge_chunks(self, key: str) -> None:
        with self._db.lock():
            rows = self._db.execute("SELECT idx FROM chunks WHERE key = ?", (key,)).fetchall()
            self._db.execute("DELETE FROM chunks WHERE key = ?", (key,))
            for (idx,) in rows:
                self._unlink(key, idx)

    # --- files that no row lists ----------------------------------------------------------

    def collect_garbage(self) -> int:
        """Remove orphan chunk files and stale temporary files; evict to the quota.

        Returns the number of files removed.
        """
        removed = 0
        with self._db.lock():  # no chunk is put (file, then row) while we look for orphans
            known = {
                str(self.chunk_path(key, idx))
                for key, idx in self._db.execute("SELECT key, idx FROM chunks").fetchall()
            }
            known |= {str(checkpoints_path(self.directory, blob))
                      for (blob,) in self._db.execute("SELECT blob FROM checkpoints").fetchall()}
            for path in [*walk_files(self.directory / "chunks"),
                         *walk_files(self.directory / "checkpoints")]:
                if str(path) not in known:
                    unlink_quietly(path)
                    removed += 1
        horizon = time.time() - 3600  # a tmp file older than an hour belongs to a dead writer
        for path in walk_files(self.directory / "tmp"):
            try:
                if path.stat().st_mtime < horizon:
                    unlink_quietly(path)
                    removed += 1
            except FileNotFoundError:
                pass
        if self.quota.quota_bytes is not None:
            self.quota.evict(self.quota.quota_bytes)
        return removed

    def remove_all_files(self) -> None:
        """Remove every chunk and checkpoint index file (``clear``, with the cache lock held
        and the rows deleted)."""
        self._rows.clear()
        shutil.rmtree(self.directory / "chunks", ignore_errors=True)
        shutil.rmtree(self.directory / "checkpoints", ignore_errors=True)
        (self.directory / "chunks").mkdir(mode=0o700, exist_ok=True)

    # --- internals ------------------------------------------------------------------------

    def _touch(self, key: str, idx: int) -> None:
        self._touched[(key, idx)] = time.time()
        if len(self._touched) >= _ACCESS_FLUSH_EVERY:
            self.flush_access_times()

    def flush_access_times(self) -> None:
        if not self._touched:
            return
        rows = [(t, key, idx) for (key, idx), t in self._touched.items()]
        self._touched.clear()
        try:
            with self._db.optional_write("chunk access times") as writable:
                if writable:
                    self._db.executemany(
                        "UPDATE chunks SET last_access = ? WHERE key = ? AND idx = ?", rows
                    )
        except CacheError as exc:  # access times are a hint; never fail a read for them
            log.warning("could not record chunk access times: %s", exc)

    def drop_bad_chunk(self, key: str, idx: int, why: str) -> None:
        log.warning("cache: dropping chunk %d of %s: %s", idx, key, why)
        self.dropped += 1
        if self._db.writes_paused():
            return  # its row stays until writes resume; every read checks it again
        try:
            with self._db.lock():
                self._db.execute("DELETE FROM chunks WHERE key = ? AND idx = ?", (key, idx))
                self._unlink(key, idx)
        except DatabaseLockedError as exc:
            self._db.pause_writes(f"dropping chunk {idx} of {key}", exc)

    def _unlink(self, key: str, idx: int) -> None:
        self._rows.pop((key, idx), None)
        unlink_quietly(self.chunk_path(key, idx))


def _has_pieces(present: bytes, offset: int, length: int) -> bool:
    """Whether a partial chunk's ``present`` bitmap holds every piece ``[offset,
    offset+length)`` touches."""
    mask = int.from_bytes(present, "little")
    first = offset // PIECE_SIZE_BYTES
    last = (offset + max(length, 1) - 1) // PIECE_SIZE_BYTES
    wanted = ((1 << (last - first + 1)) - 1) << first
    return mask & wanted == wanted


