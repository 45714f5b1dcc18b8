"""The quota every cached file shares, and eviction: least recently used first (``last_access``).

Owns ``Quota``: the quota, this process's read pins (chunks an in-flight read holds, never
evicted), and eviction, for ``kitfs.cache.chunks.ChunkFiles`` (which calls ``make_room``
under the cache lock before it puts a chunk or a checkpoint index in place, so the files on
disk never exceed the quota). Chunks go first, unpinned and not pinned in the ``pins`` table
(``kitfs pull --pin``, ``kitfs.cache.pins``), oldest access first; checkpoint indexes only
once no chunk is left to evict. When read pins kept the cache over its quota, the last unpin
evicts again, so the quota holds once reads are over. Rows are deleted before their files are
unlinked (``kitfs.cache.chunks``'s invariants); ``evicted_files`` and ``evicted_bytes`` count
what this process evicted (``kitfs metrics``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kitfs.cache.database import CacheDatabase, DatabaseLockedError
from kitfs.cache.files import checkpoints_path, unlink_quietly

log = logging.getLogger("kitfs.cache.store")  # the store's log lines, as before the split


@dataclass
class Room:
    """What a locked write evicted to make room: chunks (key, idx, bytes), indexes (blob, bytes)."""

    victims: list[tuple[str, int, int]] = field(default_factory=list)
    indexes: list[tuple[str, int]] = field(default_factory=list)


class Quota:
    """The quota of a cache directory and its eviction. See the module docstring."""

    def __init__(self, directory: Path, db: CacheDatabase, quota_bytes: int | None,
                 unlink_chunk: Callable[[str, int], None],
                 flush_access_times: Callable[[], None]) -> None:
        self.directory = directory
        self.quota_bytes = quota_bytes
        self._db = db
        self._unlink_chunk = unlink_chunk  # the chunk's file, and what ChunkFiles remembers of it
        self._flush_access_times = flush_access_times  # so that LRU sees the latest reads
        self._pins: Counter[tuple[str, int]] = Counter()
        self._over_quota = False  # the last eviction stopped short because of pins
        self.evicted_files = 0  # chunks and indexes this process evicted (kitfs metrics)
        self.evicted_bytes = 0

    def make_room(self, room: Room, needed_bytes: int, keep: tuple[str, int] | None) -> None:
        """Evict (cache lock held) so that ``needed_bytes`` more fit in the quota; ``keep`` is
        the chunk being replaced (its file's bytes are freed by the replacement)."""
        if self.quota_bytes is not None:
            self._flush_access_times()
            room.victims, room.indexes = self.evict_locked(self.quota_bytes - needed_bytes,
                                                            keep=keep)

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
        row = self._db.execute(
            "SELECT (SELECT COALESCE(SUM(stored), 0) FROM chunks) + "
            "(SELECT COALESCE(SUM(length), 0) FROM checkpoints)").fetchone()
        return int(row[0])

    def evict(self, target_bytes: int) -> int:
        """Evict least-recently-used unpinned chunks until at most ``target_bytes`` are used,
        then, if that is not enough, checkpoint indexes. Returns the bytes freed.
        """
        self._flush_access_times()
        if self._db.writes_paused():
            self._over_quota = True  # evict once writes resume
            return 0
        try:
            with self._db.lock():
                victims, indexes = self.evict_locked(target_bytes)
        except DatabaseLockedError as exc:
            self._over_quota = True
            self._db.pause_writes("eviction", exc)
            return 0
        self.record(Room(victims, indexes), target_bytes)
        return sum(length for *_, length in victims) + sum(length for _, length in indexes)

    def record(self, room: Room, target_bytes: int | None) -> None:
        """Log and count what an eviction removed (``target_bytes``: what it evicted down to)."""
        victims, indexes = room.victims, room.indexes
        if victims or indexes:
            log.info("evicted %d chunks and %d checkpoint indexes (%d bytes) to stay under %d "
                     "bytes", len(victims), len(indexes),
                     sum(length for *_, length in victims) + sum(n for _, n in indexes),
                     target_bytes)
        self.evicted_files += len(victims) + len(indexes)
        self.evicted_bytes += sum(length for *_, length in victims) + sum(n for _, n in indexes)

    def evict_locked(self, target_bytes: int, keep: tuple[str, int] | None = None
                      ) -> tuple[list[tuple[str, int, int]], list[tuple[str, int]]]:
        """``evict``'s work, with the cache lock held: the chunks (key, idx, length) and then,
        if that was not enough, the checkpoint indexes (blob, length) removed. ``keep`` is a
        chunk about to be replaced in place, never a victim."""
        used = self.used_bytes()
        if keep is not None:  # a chunk being replaced frees what its file held
            row = self._db.execute("SELECT stored FROM chunks WHERE key = ? AND idx = ?",
                                   keep).fetchone()
            used -= row[0] if row else 0
        if used <= target_bytes:
            self._over_quota = False
            return [], []
        freed = 0
        victims: list[tuple[str, int, int]] = []
        rows = self._db.execute("SELECT key, idx, stored FROM chunks WHERE key NOT IN "
                                "(SELECT key FROM pins) ORDER BY last_access").fetchall()
        for key, idx, length in rows:
            if used - freed <= target_bytes:
                break
            if (key, idx) in self._pins or (key, idx) == keep:
                continue
            victims.append((key, idx, length))
            freed += length
        indexes: list[tuple[str, int]] = []
        if used - freed > target_bytes:
            for blob, length in self._db.execute(
                    "SELECT blob, length FROM checkpoints WHERE blob NOT IN "
                    "(SELECT key FROM pins) ORDER BY last_access").fetchall():
                if used - freed <= target_bytes:
                    break
                indexes.append((blob, length))
                freed += length
        self._over_quota = used - freed > target_bytes
        with self._db.transaction():
            self._db.executemany("DELETE FROM chunks WHERE key = ? AND idx = ?",
                                 [(key, idx) for key, idx, _ in victims])
            self._db.executemany("DELETE FROM checkpoints WHERE blob = ?",
                                 [(blob,) for blob, _ in indexes])
        for key, idx, _ in victims:
            self._unlink_chunk(key, idx)
        for blob, _ in indexes:
            unlink_quietly(checkpoints_path(self.directory, blob))
        return victims, indexes
