"""Verified manifests and configs, by digest (table ``documents``): a second mount of the same
ModelKit, by any process, reads them from here instead of the registry. The caller checks a
document against its digest before it stores it; a document is never evicted.

Also the digest each tag last resolved to (table ``tags``), which a kit opened by tag uses
when the registry cannot be reached (or ``--offline`` forbids asking it).
"""

from __future__ import annotations

import time

from kitfs.cache.database import CacheDatabase


class Documents:
    """The ``documents`` rows of a cache."""

    def __init__(self, db: CacheDatabase) -> None:
        self._db = db

    def get_document(self, digest: str) -> bytes | None:
        row = self._db.execute("SELECT data FROM documents WHERE digest = ?", (digest,)).fetchone()
        return bytes(row[0]) if row else None

    def put_document(self, digest: str, data: bytes) -> None:
        """Store a manifest or config the caller has checked against ``digest``."""
        with self._db.optional_write(f"document {digest}") as writable:
            if writable:
                self._db.execute("INSERT OR IGNORE INTO documents (digest, data) VALUES (?, ?)",
                                 (digest, data))

    def remember_tag(self, reference: str, digest: str) -> None:
        """Record that ``reference`` (``registry/repo:tag``) resolved to ``digest`` just now."""
        with self._db.optional_write(f"the digest of {reference}") as writable:
            if writable:
                self._db.execute("INSERT OR REPLACE INTO tags (reference, digest, resolved_at) "
                                 "VALUES (?, ?, ?)", (reference, digest, time.time()))

    def last_resolved(self, reference: str) -> tuple[str, float] | None:
        """The digest ``reference`` last resolved to, and when (seconds since the epoch)."""
        row = self._db.execute("SELECT digest, resolved_at FROM tags WHERE reference = ?",
                               (reference,)).fetchone()
        return (str(row[0]), float(row[1])) if row else None
