"""Pins (table ``pins``): the content keys a reference keeps out of LRU eviction
(``kitfs pull --pin``), and the quota check they need.

A pin is a (reference, key) row: the chunks of ``key`` (a blob digest, or the content key of
a decompressed stream) and the gzip checkpoints of a blob digest ``key`` are never evicted
while any reference pins that key (``kitfs.cache.chunks`` skips them); they still count in
the quota. A chunk that fails its checksums, or a blob that fails its digest, is dropped all
the same: a pin keeps bytes, never bad ones. Pins are explicit user state: writing them is
not optional (a locked database is an error here, not a pause).

``pinned_bytes`` is what the pinned keys' chunk and checkpoint files hold now; a quota smaller
than that is refused (``check_quota``), so the pins always fit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kitfs.cache.database import CacheDatabase
from kitfs.errors import UsageError

_PINNED_BYTES = """SELECT
    (SELECT COALESCE(SUM(stored), 0) FROM chunks WHERE key IN (SELECT key FROM pins {where}))
  + (SELECT COALESCE(SUM(length), 0) FROM checkpoints
     WHERE blob IN (SELECT key FROM pins {where}))"""


@dataclass(frozen=True)
class Pin:
    """One pinned reference: the manifest digest it was pulled at, its keys, and the bytes
    their files hold in the cache now."""

    reference: str
    digest: str
    keys: tuple[str, ...]
    stored_bytes: int

    @property
    def layer_count(self) -> int:
        """The layers pinned: keys that are blob digests (a compressed layer also pins the
        key of its decompressed stream, ``gunzip:…`` or ``unzstd:…``)."""
        return sum(1 for key in self.keys if key.partition(":")[0] not in ("gunzip", "unzstd"))


class Pins:
    """The ``pins`` rows of a cache. See the module docstring."""

    def __init__(self, db: CacheDatabase) -> None:
        self._db = db

    def add(self, reference: str, digest: str, keys: Iterable[str]) -> list[str]:
        """Pin ``keys`` for ``reference`` (pulled at manifest ``digest``); returns the keys
        this reference did not pin before (what undoing a failed pull removes)."""
        keys = list(dict.fromkeys(keys))
        with self._db.transaction():
            had = {key for (key,) in self._db.execute(
                "SELECT key FROM pins WHERE reference = ?", (reference,)).fetchall()}
            self._db.executemany(
                "INSERT INTO pins (reference, key, digest) VALUES (?, ?, ?) "
                "ON CONFLICT (reference, key) DO UPDATE SET digest = excluded.digest",
                [(reference, key, digest) for key in keys])
        return [key for key in keys if key not in had]

    def remove(self, reference: str, keys: Iterable[str] | None = None) -> int:
        """Unpin ``keys`` (all of them when None) of ``reference``; returns the rows removed."""
        with self._db.transaction():
            if keys is None:
                cursor = self._db.execute("DELETE FROM pins WHERE reference = ?", (reference,))
                return cursor.rowcount
            removed = 0
            for key in keys:
                removed += self._db.execute("DELETE FROM pins WHERE reference = ? AND key = ?",
                                            (reference, key)).rowcount
            return removed

    def all(self) -> list[Pin]:
        """Every pinned reference, by reference."""
        rows = self._db.execute(
            "SELECT reference, digest, key FROM pins ORDER BY reference, rowid").fetchall()
        grouped: dict[str, tuple[str, list[str]]] = {}
        for reference, digest, key in rows:
            grouped.setdefault(reference, (digest, []))[1].append(key)
        return [Pin(reference, digest, tuple(keys),
                    self._stored(_PINNED_BYTES.format(where="WHERE reference = ?"),
                                 (reference, reference)))
                for reference, (digest, keys) in grouped.items()]

    def pinned_keys(self) -> set[str]:
        return {key for (key,) in self._db.execute("SELECT DISTINCT key FROM pins").fetchall()}

    def pinned_bytes(self, excluding_reference: str | None = None) -> int:
        """Bytes the chunk and checkpoint files of pinned keys hold (each key counted once);
        with ``excluding_reference``, only the keys some other reference pins."""
        if excluding_reference is None:
            return self._stored(_PINNED_BYTES.format(where=""), ())
        where = "WHERE reference != ?"
        return self._stored(_PINNED_BYTES.format(where=where),
                            (excluding_reference, excluding_reference))

    def check_quota(self, quota_bytes: int | None, directory: object) -> None:
        """Refuse a quota smaller than what the pins hold.

        Raises:
            UsageError: naming both sizes and how to release pins.
        """
        if quota_bytes is None:
            return
        pinned = self.pinned_bytes()
        if pinned > quota_bytes:
            raise UsageError(
                f"--cache-size {quota_bytes} bytes is smaller than the {pinned} bytes pinned in "
                f"the cache {directory} (kitfs cache pins lists them, kitfs cache unpin REF "
                "releases one)")

    def _stored(self, sql: str, params: tuple[object, ...]) -> int:
        return int(self._db.execute(sql, params).fetchone()[0])
