"""The cache database one ``ChunkStore`` shares among the code of its tables.

``CacheDatabase`` owns the SQLite connection (tables and migrations: ``kitfs.cache.schema``),
the cache directory's ``flock``, and what a write does when the database is not there for it:
the error mapping (``DatabaseLockedError``, ``DatabaseFullError``), the pause of every write
while another program keeps the database locked, ``optional_write`` for the records the cache
can do without, and the move to a new database when ``kitfs.db`` is deleted under the process.
It knows no table: the chunk, checkpoint, blob, document and tar index code each run their own
queries through it.

Invariants (what a ``kill -9`` at any instant cannot break; the others are listed in
``kitfs.cache.store``):

- A database another program keeps locked is not an error: a write waits at most
  ``BUSY_WAIT_S`` for the lock (kitfs's own transactions take milliseconds), then is abandoned,
  and for ``BUSY_BACKOFF_S`` this process records nothing (chunks are served uncached, indexes
  and verification results kept in memory) rather than make every read wait. Reads of the
  database are not blocked by a writer (WAL).
- ``kitfs.db`` deleted (or replaced) under a running process: SQLite would go on with the
  deleted file, and its journal files (``-wal``, ``-shm``) would keep every other process
  out of the directory ("disk I/O error"). ``check_database`` (on every chunk put and every
  second in a daemon) notices, lets go of the deleted database, removes its journal from the
  directory (processes still holding it keep their unlinked copies) and opens the directory's
  database (a new, empty one, or one another process made meanwhile): the chunk files the
  deleted one listed are orphans for ``gc``. Should that open fail, this process keeps its
  records in a private in-memory database and tries again at the next check.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from kitfs.cache.schema import (
    DATABASE_NAME,
    cache_lock,
    discard_stale_journal,
    open_database,
    private_database,
)
from kitfs.errors import CacheError

log = logging.getLogger("kitfs.cache.store")  # the store's log lines, as before the split

# How long a write waits for another process's write lock on the database, and how long
# writes are then skipped (a daemon answers every request on one thread: it must not wait
# BUSY_WAIT_S per chunk while another program holds the database).
BUSY_WAIT_S = 2.0
BUSY_BACKOFF_S = 5.0
# How often ``check_database`` looks whether kitfs.db is still the file this process opened.
DATABASE_CHECK_INTERVAL_S = 1.0


class DatabaseLockedError(CacheError):
    """Another process held the cache database's write lock for longer than ``BUSY_WAIT_S``."""


class DatabaseFullError(CacheError):
    """The cache database could not grow: its file system is full."""


class CacheDatabase:
    """The connection to a cache directory's ``kitfs.db``. See the module docstring.

    Raises ``OSError`` or ``sqlite3.Error`` when the database cannot be opened (the store
    reports them as ``CacheError``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._conn = self._open_shared()
        self._database_inode: int | None = _inode(directory / DATABASE_NAME)  # None: private
        self._next_database_check = time.monotonic() + DATABASE_CHECK_INTERVAL_S
        self._warned_private = False
        self._warned_full = False
        self._writes_paused_until = 0.0  # time.monotonic(): see pause_writes
        self._reopened: list[Callable[[], None]] = []

    @property
    def conn(self) -> sqlite3.Connection:
        """The connection (for ``kitfs.cache.index``; the tables' own queries use it too).
        It changes when ``check_database`` moves to a new database: never keep it."""
        return self._conn

    def close(self) -> None:
        self._conn.close()

    def _open_shared(self) -> sqlite3.Connection:
        conn = open_database(self.directory)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_WAIT_S * 1000)}")
        return conn

    def when_reopened(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the order given) once ``check_database`` has moved to the
        directory's database: what the process recorded in the old one is to record again."""
        self._reopened.append(callback)

    def check_database(self) -> None:
        """Move to the directory's database if ``kitfs.db`` was deleted or replaced under this
        process (see the module docstring); at most once per ``DATABASE_CHECK_INTERVAL_S``."""
        now = time.monotonic()
        if now < self._next_database_check:
            return
        self._next_database_check = now + DATABASE_CHECK_INTERVAL_S
        path = self.directory / DATABASE_NAME
        if self._database_inode is not None:
            if _inode(path) == self._database_inode:
                return
            log.warning("cache: %s was deleted or replaced under this process; moving to the "
                        "one now in the directory (the chunk files the old one listed are "
                        "orphans until kitfs cache gc)", path)
            self._conn.close()  # SQLite leaves the journal of a deleted database alone
            self._conn = private_database()
            self._database_inode = None
        try:
            discard_stale_journal(self.directory)
            conn = self._open_shared()
        except (OSError, sqlite3.Error) as exc:
            if not self._warned_private:  # once: it is tried again every check
                self._warned_private = True
                log.warning("cache: cannot open %s yet (%s): another process may still hold "
                            "the deleted database; this process keeps its cache records to "
                            "itself meanwhile", path, exc)
            return
        self._warned_private = False
        self._conn.close()
        self._conn = conn
        self._database_inode = _inode(path)
        for callback in self._reopened:
            callback()
        log.info("cache: now using the database %s", path)

    # --- queries ------------------------------------------------------------------------------

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        """``sqlite3`` errors raised as ``CacheError`` (``DatabaseLockedError``,
        ``DatabaseFullError`` for those two)."""
        try:
            return self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise _cache_error(exc) from exc

    def executemany(self, sql: str, rows: Sequence[tuple[object, ...]]) -> None:
        try:
            self._conn.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise _cache_error(exc) from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._rollback()
            raise
        self.execute("COMMIT")

    @contextmanager
    def optional_write(self, what: str) -> Iterator[bool]:
        """One transaction for a record the cache can do without (an index, a document, a
        verification result, access times): ``with store.optional_write("x") as writable:``
        and write only if ``writable``. A locked database or a full disk rolls it back and
        is logged, never raised (a read must not fail for the cache alone); other database
        errors are raised as ``CacheError``."""
        writable = False
        if not self.writes_paused():
            try:
                self.execute("BEGIN IMMEDIATE")
                writable = True
            except CacheError as exc:
                if not self._absorb(what, exc):
                    raise
        if not writable:
            yield False
            return
        try:
            yield True
            self.execute("COMMIT")
        except (sqlite3.Error, CacheError) as exc:
            self._rollback()
            if self._absorb(what, exc):
                return
            if isinstance(exc, sqlite3.Error):
                raise _cache_error(exc) from exc
            raise
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("cache: rolling back failed: %s", exc)

    # --- a locked database, a full disk ---------------------------------------------------------

    def writes_paused(self) -> bool:
        return time.monotonic() < self._writes_paused_until

    def pause_writes(self, what: str, exc: Exception) -> None:
        """Another process holds the database: record nothing for ``BUSY_BACKOFF_S``."""
        self._writes_paused_until = time.monotonic() + BUSY_BACKOFF_S
        log.warning("cache: %s not recorded (%s); for %g s this process records nothing in "
                    "the cache and serves reads from the registry and memory", what, exc,
                    BUSY_BACKOFF_S)

    def _absorb(self, what: str, exc: sqlite3.Error | CacheError) -> bool:
        """Log a locked database or a full disk met by an optional write; False otherwise."""
        error = _cache_error(exc) if isinstance(exc, sqlite3.Error) else exc
        if isinstance(error, DatabaseLockedError):
            self.pause_writes(what, error)
            return True
        if isinstance(error, DatabaseFullError):
            self.warn_full(str(error))
            return True
        return False

    def warn_full(self, detail: str) -> None:
        """Log (once per process) that the cache's disk is full."""
        if not self._warned_full:
            self._warned_full = True
            log.warning("cache %s is full (%s): serving reads without caching them",
                        self.directory, detail)

    def lock(self) -> AbstractContextManager[None]:
        """The cache directory's exclusive ``flock`` (``kitfs.cache.schema.cache_lock``)."""
        return cache_lock(self.directory)


def _cache_error(exc: sqlite3.Error) -> CacheError:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary result code
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in str(exc):
        return DatabaseLockedError(f"cache database is locked by another process: {exc}")
    if code == sqlite3.SQLITE_FULL or "full" in str(exc):
        return DatabaseFullError(f"cache database is full: {exc}")
    return CacheError(f"cache database error: {exc}")


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
