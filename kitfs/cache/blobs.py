"""What the cache knows of each content key (table ``blobs``: size, chunk size, verification
state) and the piece identities of a verified blob's chunks (table ``chunk_ids``, see
``kitfs.cache.identity``).

A blob's records are kept as long as the cache: they are not files, so eviction leaves them
(a chunk fetched again after eviction is checked against ``chunk_ids``). Records are optional
writes (``CacheDatabase.optional_write``): while the database is locked, the caller's process
keeps what it knows in memory. A failed verification also drops what was read from the blob's
bytes: its chunks (``kitfs.cache.chunks``) and its tar index (``kitfs.cache.index``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from kitfs.cache.chunks import ChunkFiles
from kitfs.cache.database import CacheDatabase, DatabaseLockedError
from kitfs.cache.index import forget_members

log = logging.getLogger("kitfs.cache.store")  # the store's log lines, as before the split


@dataclass(frozen=True)
class BlobState:
    size: int
    chunk_size: int
    verified: int  # 0 not yet, 1 ok, -1 mismatch
    failure: str | None


class BlobRecords:
    """The ``blobs`` and ``chunk_ids`` rows of a cache. See the module docstring."""

    def __init__(self, db: CacheDatabase, chunks: ChunkFiles) -> None:
        self._db = db
        self._chunks = chunks
        self._registered: dict[str, tuple[int, int]] = {}  # key -> (size, chunk size) asked
        db.when_reopened(self._register_again)

    def _register_again(self) -> None:
        """Every blob this process registered, in the database it moved to."""
        for key, (size, chunk_size_bytes) in self._registered.items():
            self.register_blob(key, size, chunk_size_bytes)

    def register_blob(self, key: str, size: int, chunk_size_bytes: int) -> BlobState:
        """Make sure ``key`` has a row; returns its state (an existing chunk size wins).
        While the database cannot be written, a state that is not recorded."""
        self._registered.setdefault(key, (size, chunk_size_bytes))
        with self._db.optional_write(f"blob {key}") as writable:
            if writable:
                self._db.execute(
                    "INSERT OR IGNORE INTO blobs (key, size, chunk_size) VALUES (?, ?, ?)",
                    (key, size, chunk_size_bytes),
                )
        state = self.blob_state(key)
        return state if state is not None else BlobState(size, chunk_size_bytes, 0, None)

    def blob_state(self, key: str) -> BlobState | None:
        row = self._db.execute(
            "SELECT size, chunk_size, verified, failure FROM blobs WHERE key = ?", (key,)
        ).fetchone()
        return BlobState(*row) if row else None

    def mark_verified(self, key: str, chunk_ids: Iterable[tuple[int, bytes]]) -> None:
        """Record that ``key``'s content matched its digest, with each chunk's piece
        identities (``kitfs.cache.identity.piece_ids``)."""
        with self._db.optional_write(f"the verification of {key}") as writable:
            if writable:
                self._db.execute("UPDATE blobs SET verified = 1, failure = NULL WHERE key = ?",
                                 (key,))
                self._db.executemany(
                    "INSERT OR REPLACE INTO chunk_ids (key, idx, blake3) VALUES (?, ?, ?)",
                    [(key, idx, ids) for idx, ids in chunk_ids],
                )

    def mark_stream_verified(self, key: str, size: int) -> None:
        """Record a decompressed stream's size once it and its blob matched their digests."""
        with self._db.optional_write(f"the verification of {key}") as writable:
            if writable:
                self._db.execute("UPDATE blobs SET size = ?, verified = 1 WHERE key = ?",
                                 (size, key))

    def mark_failed(self, key: str, reason: str) -> None:
        """Record a digest mismatch and drop every cached chunk of ``key`` and its tar index,
        which was read from those bytes (while the database is locked, only logged: the
        caller's process remembers the failure)."""
        if self._db.writes_paused():
            log.warning("cache: the failure of %s is not recorded: the database is locked", key)
            return
        try:
            self._chunks.purge_chunks(key)
            forget_members(self._db, key)
            self._db.execute("UPDATE blobs SET verified = -1, failure = ? WHERE key = ?",
                             (reason, key))
        except DatabaseLockedError as exc:
            self._db.pause_writes(f"the failure of {key}", exc)

    def chunk_ids(self, key: str, idx: int) -> bytes | None:
        """The piece identities a verified blob's chunk ``idx`` had, or None."""
        row = self._db.execute(
            "SELECT blake3 FROM chunk_ids WHERE key = ? AND idx = ?", (key, idx)
        ).fetchone()
        return bytes(row[0]) if row else None
