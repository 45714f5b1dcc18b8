"""Verified manifests and configs, by digest (table ``documents``): a second mount of the same
ModelKit, by any process, reads them from here instead of the registry. The caller checks a
document against its digest before it stores it; a document is never evicted."""

from __future__ import annotations

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
