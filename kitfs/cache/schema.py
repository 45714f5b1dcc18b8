"""The cache database: tables, migrations and connection settings.

One SQLite file, ``kitfs.db``, in the cache directory, opened in WAL mode so that several
processes (mounts, ``kitfs cat``, ``kitfs cache gc``) share it safely. Tables:

``blobs``         one row per content key: size, verification state, why it failed.
``chunks``        one row per chunk file on disk; a row exists only after its file does. A
                  chunk may be partial (``present``: which 128 KiB pieces its file holds).
``chunk_ids``     per-chunk identity recorded once the whole blob verified (the BLAKE3 of
                  each 128 KiB piece); survives eviction, so a piece or chunk fetched again
                  is checked on its own.
``documents``     verified manifests and configs, by digest.
``layer_indexes`` the parsed tar index of a layer, by content key: one packed row per layer
                  (a row per member cost more than parsing the tar; see ``kitfs.cache.index``).
``checkpoints``   one row per gzip checkpoint index file on disk (by compressed blob digest);
                  like a chunk row, it exists only after its file does.
``pins``          the content keys each pinned reference keeps out of eviction
                  (``kitfs pull --pin``; see ``kitfs.cache.pins``).
``tags``          the manifest digest each tag last resolved to (offline mounts by tag).

Content keys are digests (``sha256:…``) for blobs as the registry stores them, and
``gunzip:sha256:…`` / ``unzstd:sha256:…`` for the decompressed stream of a compressed layer
whose diffId is unknown (when it is known, the diffId is the key).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DATABASE_NAME = "kitfs.db"
LOCK_NAME = "lock"
BUSY_TIMEOUT_MS = 30_000
MIGRATION_SET = "kitfs-cache"


def m001_initial(db: Any) -> None:
    db.execute("""CREATE TABLE IF NOT EXISTS blobs (
        key TEXT PRIMARY KEY,         -- content key (digest, or decompressed-stream key)
        size INTEGER NOT NULL,        -- bytes of content
        chunk_size INTEGER NOT NULL,  -- bytes per chunk for this key
        verified INTEGER NOT NULL DEFAULT 0,  -- 0 not yet, 1 digest matched, -1 mismatch
        failure TEXT                  -- why verification failed
    )""")
    db.execute("""CREATE TABLE IF NOT EXISTS chunks (
        key TEXT NOT NULL,
        idx INTEGER NOT NULL,         -- chunk number: bytes [idx*chunk_size, ...)
        length INTEGER NOT NULL,      -- bytes in the chunk file
        xxh3 BLOB NOT NULL,           -- xxh3_64 of each 64 KiB block, 8 bytes each, little-endian
        last_access REAL NOT NULL,    -- for LRU eviction
        PRIMARY KEY (key, idx)
    )""")
    db.execute("CREATE INDEX IF NOT EXISTS chunks_lru ON chunks(last_access)")
    db.execute("""CREATE TABLE IF NOT EXISTS chunk_digests (
        key TEXT NOT NULL,
        idx INTEGER NOT NULL,
        sha256 TEXT NOT NULL,         -- hex sha256 of the chunk, known good
        PRIMARY KEY (key, idx)
    )""")
    db.execute("""CREATE TABLE IF NOT EXISTS documents (
        digest TEXT PRIMARY KEY,      -- manifest or config digest (checked before insert)
        data BLOB NOT NULL
    )""")
    db.execute("""CREATE TABLE IF NOT EXISTS layer_indexes (
        key TEXT PRIMARY KEY,         -- content key of the (uncompressed) tar stream
        member_count INTEGER NOT NULL,
        error TEXT                    -- reserved
    )""")
    db.execute("""CREATE TABLE IF NOT EXISTS members (
        key TEXT NOT NULL,
        seq INTEGER NOT NULL,         -- order in the tar
        name BLOB NOT NULL,           -- raw tar name bytes
        typeflag BLOB NOT NULL,
        mode INTEGER NOT NULL,
        size INTEGER NOT NULL,
        data_offset INTEGER NOT NULL,
        PRIMARY KEY (key, seq)
    )""")


def m002_packed_layer_indexes(db: Any) -> None:
    """A layer's members in one zstd-compressed row instead of one row each; the old indexes
    are dropped (a layer is indexed again on its next use)."""
    db.execute("DROP TABLE IF EXISTS members")
    db.execute("DROP TABLE IF EXISTS layer_indexes")
    db.execute("""CREATE TABLE layer_indexes (
        key TEXT PRIMARY KEY,         -- content key of the (uncompressed) tar stream
        member_count INTEGER NOT NULL,
        packed BLOB NOT NULL          -- zstd(JSON) of the members, see kitfs.cache.index
    )""")


def m003_checkpoints(db: Any) -> None:
    db.execute("""CREATE TABLE IF NOT EXISTS checkpoints (
        blob TEXT PRIMARY KEY,        -- digest of the gzip blob the checkpoints point into
        content_key TEXT NOT NULL,    -- the decompressed stream they rebuild chunks of
        length INTEGER NOT NULL,      -- bytes in the index file
        xxh3 BLOB NOT NULL,           -- xxh3_64 of each 64 KiB block, as for chunks
        last_access REAL NOT NULL     -- evicted least recently used, after every chunk
    )""")


@contextmanager
def cache_lock(cache_dir: Path) -> Iterator[None]:
    """Hold the cache directory's exclusive ``flock`` (released by the kernel on ``kill -9``)."""
    fd = os.open(cache_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def m004_pieces(db: Any) -> None:
    """Partial chunks and BLAKE3 piece identities.

    ``chunks.present`` is NULL for a whole chunk, else a bitmap (little-endian) of the 128 KiB
    pieces its file holds; ``chunks.stored`` is the bytes its file holds (what the quota
    counts). The per-chunk sha256 of ``chunk_digests`` gives way to ``chunk_ids``, a BLAKE3
    digest per piece (one cryptographic pass on the hot path instead of two, and a lone piece
    fetched again can be checked on its own). Blobs verified under the old scheme lose their
    per-chunk identities, so they are marked unverified: they are verified again as they are
    read (never served on the strength of a record that can no longer check a refetch)."""
    db.execute("ALTER TABLE chunks ADD COLUMN present BLOB")
    db.execute("ALTER TABLE chunks ADD COLUMN stored INTEGER NOT NULL DEFAULT 0")
    db.execute("UPDATE chunks SET stored = length")
    db.execute("DROP TABLE IF EXISTS chunk_digests")
    db.execute("""CREATE TABLE IF NOT EXISTS chunk_ids (
        key TEXT NOT NULL,
        idx INTEGER NOT NULL,
        blake3 BLOB NOT NULL,         -- 32-byte BLAKE3 of each 128 KiB piece, concatenated
        PRIMARY KEY (key, idx)
    )""")
    db.execute("UPDATE blobs SET verified = 0 WHERE verified = 1")


def m005_pins_and_tags(db: Any) -> None:
    """Pins (``kitfs pull --pin``): the content keys a reference keeps out of eviction; and
    the digest each tag last resolved to (what a mount by tag uses when the registry cannot
    be reached)."""
    db.execute("""CREATE TABLE IF NOT EXISTS pins (
        reference TEXT NOT NULL,      -- as pulled: registry/repo:tag or registry/repo@digest
        key TEXT NOT NULL,            -- a content key or blob digest whose chunks (or gzip
                                      -- checkpoints) are never evicted
        digest TEXT NOT NULL,         -- the manifest digest the pull resolved the reference to
        PRIMARY KEY (reference, key)
    )""")
    db.execute("CREATE INDEX IF NOT EXISTS pins_key ON pins(key)")
    db.execute("""CREATE TABLE IF NOT EXISTS tags (
        reference TEXT PRIMARY KEY,   -- registry/repo:tag
        digest TEXT NOT NULL,         -- the manifest digest it resolved to last
        resolved_at REAL NOT NULL     -- when (seconds since the epoch)
    )""")


# In order; each is applied once per cache, recorded in sqlite-utils' _sqlite_migrations table.
MIGRATIONS = (m001_initial, m002_packed_layer_indexes, m003_checkpoints, m004_pieces,
              m005_pins_and_tags)


def _pending(conn: sqlite3.Connection) -> bool:
    """Whether a migration is missing, asked with plain SQL: importing sqlite-utils costs
    tens of MiB when pandas is installed (it imports pandas), so a daemon does it only when
    there is something to migrate."""
    table = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                         "name = '_sqlite_migrations'").fetchone()
    if table is None:
        return True
    done = {row[0] for row in conn.execute(
        "SELECT name FROM _sqlite_migrations WHERE migration_set = ?", (MIGRATION_SET,))}
    return any(m.__name__ not in done for m in MIGRATIONS)


def _migrate(conn: sqlite3.Connection) -> None:
    with _without_optional_imports("pandas", "numpy"):
        import sqlite_utils
        from sqlite_utils.migrations import Migrations

    migrations = Migrations(MIGRATION_SET)
    for migration in MIGRATIONS:
        migrations()(migration)
    try:  # idempotent statements; a process without the lock may have raced us
        migrations.apply(sqlite_utils.Database(conn))
    except sqlite3.IntegrityError:
        pass  # it recorded the same migration first


@contextmanager
def _without_optional_imports(*names: str) -> Iterator[None]:
    """Make ``import name`` fail inside the block (for modules not already imported).

    sqlite-utils imports pandas and numpy whenever they are installed, for DataFrame column
    types kitfs never uses; in a mount daemon creating a cache that cost ~85 MiB of memory.
    """
    blocked = [name for name in names if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        yield
    finally:
        for name in blocked:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]


def open_database(cache_dir: Path) -> sqlite3.Connection:
    """Open (and create or migrate) the cache database in ``cache_dir``.

    Switching a new database to WAL and migrating it take the cache lock: two processes doing
    either at once would otherwise fail with "database is locked" (a deferred transaction
    cannot wait for a writer).
    """
    path = cache_dir / DATABASE_NAME
    with cache_lock(cache_dir):
        # Created 0600 before SQLite opens it: SQLite gives the -wal and -shm files the mode of
        # the database file (it would create that 0644).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        for companion in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            try:
                if companion.stat().st_mode & 0o077:
                    companion.chmod(0o600)  # an older kitfs made them 0644
            except FileNotFoundError:
                pass  # none yet, or SQLite removed it as another process's last connection closed
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            if _pending(conn):
                _migrate(conn)
        except BaseException:
            conn.close()
            raise
    return conn


def discard_stale_journal(cache_dir: Path) -> None:
    """Remove the ``-wal`` and ``-shm`` files left by a database that was deleted (or by a
    failed attempt to create one: an empty file), so that the next open starts a new journal
    instead of joining the one that processes still holding the deleted database share.
    Those keep their own (now unlinked) files. Under the cache lock, which every kitfs
    process holds while it creates a database."""
    path = cache_dir / DATABASE_NAME
    with cache_lock(cache_dir):
        try:
            if path.stat().st_size > 0:
                return  # a live database: its journal is its own
        except FileNotFoundError:
            pass
        for suffix in ("-wal", "-shm"):
            try:
                (cache_dir / (DATABASE_NAME + suffix)).unlink()
            except FileNotFoundError:
                pass


def private_database() -> sqlite3.Connection:
    """An in-memory database with the cache's tables, for a process that cannot open the
    directory's database for a while (``CacheDatabase.check_database``)."""
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    for migration in MIGRATIONS:
        migration(conn)
    return conn
