"""Checkpoint index files of gzip blobs (``kitfs.format.gzindex``) and their rows (table
``checkpoints``).

Invariant (what a ``kill -9`` at any instant cannot break; the others are listed in
``kitfs.cache.store``):

- Checkpoint indexes follow the same rules as chunks (``kitfs.cache.chunks``): file first, then
  row; row removed before file; xxh3 per 64 KiB block checked on every read (a damaged index is
  dropped and the read reports none); counted in the quota and evicted least recently used,
  but only once no chunk is left to evict (an index is a small fraction of its layer and makes
  every evicted chunk of it cheap to rebuild). ``ChunkFiles`` writes, places and evicts them
  with the chunks, under the same lock and quota.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from kitfs.cache.chunks import ChunkFiles
from kitfs.cache.database import CacheDatabase
from kitfs.cache.files import Damaged, checkpoints_path, read_checked, unlink_quietly

log = logging.getLogger("kitfs.cache.store")  # the store's log lines, as before the split


class CheckpointIndexes:
    """The checkpoint indexes of a cache directory. See the module docstring."""

    def __init__(self, directory: Path, db: CacheDatabase, chunks: ChunkFiles) -> None:
        self.directory = directory
        self._db = db
        self._chunks = chunks

    def checkpoints_path(self, blob: str) -> Path:
        return checkpoints_path(self.directory, blob)

    def put_checkpoints(self, blob: str, content_key: str, data: bytes | bytearray) -> bool:
        """Store the checkpoint index of gzip blob ``blob`` (whose decompressed stream is
        ``content_key``): written to ``tmp/``, renamed into place, then recorded, as a chunk
        is, after making room for it under the quota. Returns False (and logs) when the disk is
        full or the database locked."""
        prepared = self._chunks.prepare(data)
        placed = self._chunks.place(
            prepared, self.checkpoints_path(blob), f"the checkpoint index of {blob}",
            ("INSERT OR REPLACE INTO checkpoints (blob, content_key, length, xxh3, last_access) "
             "VALUES (?, ?, ?, ?, ?)", (blob, content_key, prepared.length, prepared.sums,
                                        time.time())),
            ("SELECT 1 FROM checkpoints WHERE blob = ?", (blob,)))
        quota_bytes = self._chunks.quota.quota_bytes
        if placed and quota_bytes is not None:
            self._chunks.quota.evict(quota_bytes)  # an index larger than the room left is evicted itself
        return placed

    def has_checkpoints(self, blob: str) -> bool:
        return self._db.execute(
            "SELECT 1 FROM checkpoints WHERE blob = ?", (blob,)).fetchone() is not None

    def read_checkpoints(self, blob: str, offset: int, length: int) -> bytes | None:
        """Bytes ``[offset, offset+length)`` of ``blob``'s checkpoint index, checked; None when
        there is none, or it is damaged (then it is dropped and logged, as a chunk is)."""
        row = self._db.execute(
            "SELECT length, xxh3 FROM checkpoints WHERE blob = ?", (blob,)).fetchone()
        if row is None:
            return None
        try:
            data = bytes(read_checked(self.checkpoints_path(blob), row[0], row[1], offset,
                                      length))
        except FileNotFoundError:
            if self.has_checkpoints(blob) and not self.checkpoints_path(blob).exists():
                self.drop_checkpoints(blob, "its file is missing")
            return None
        except Damaged as exc:
            self.drop_checkpoints(blob, str(exc))
            return None
        self._db.execute("UPDATE checkpoints SET last_access = ? WHERE blob = ?",
                         (time.time(), blob))
        return data

    def drop_checkpoints(self, blob: str, why: str) -> None:
        """Forget a damaged or unusable checkpoint index (logged)."""
        log.warning("cache: dropping the checkpoint index of %s: %s", blob, why)
        self._chunks.dropped += 1
        with self._db.lock():
            self._db.execute("DELETE FROM checkpoints WHERE blob = ?", (blob,))
            unlink_quietly(self.checkpoints_path(blob))
