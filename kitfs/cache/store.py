"""The content-addressed chunk cache shared by every kitfs process on the machine.

``ChunkStore`` is what the rest of kitfs uses: one object per cache directory, composing the
code of each part of the cache, and doing itself only what spans them (statistics, ``verify``,
``clear``). Each part states the invariants it keeps (what a ``kill -9`` at any instant cannot
break), where it keeps them:

``kitfs.cache.files``        the directory's layout; files written, and read back checked
                             against their xxh3 sums.
``kitfs.cache.database``     the connection every part shares (``CacheDatabase``), the cache
                             ``flock``; a database locked by another program, or deleted
                             under the process, is not an error.
``kitfs.cache.chunks``       chunk files and rows (``ChunkFiles``): file before row, row
                             before unlink; partial chunks written in place; checksums on every
                             read; the quota, eviction and pins; the cache lock across
                             processes; a full disk is not an error.
``kitfs.cache.checkpoints``  checkpoint indexes of gzip blobs: the chunks' rules, evicted last.
``kitfs.cache.blobs``        blob sizes, verification states and the pieces' identities.
``kitfs.cache.documents``    verified manifests and configs; the digest each tag last
                             resolved to.
``kitfs.cache.pins``         the keys pinned references keep out of eviction.
``kitfs.cache.index``        the parsed tar index of each layer.
``kitfs.cache.schema``       the tables and their migrations.

The API is synchronous and fast (SQLite and local files); the reader calls it inline from the
trio thread, as s3ql does. Nothing here knows about registries or trio.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from kitfs.cache.blobs import BlobRecords, BlobState
from kitfs.cache.checkpoints import CheckpointIndexes
from kitfs.cache.chunks import ChunkFiles
from kitfs.cache.database import CacheDatabase
from kitfs.cache.documents import Documents
from kitfs.cache.files import PreparedChunk, make_private
from kitfs.cache.identity import PIECE_SIZE_BYTES, ids_of_pieces, piece_count, piece_ids
from kitfs.cache.pins import Pin, Pins
from kitfs.errors import CacheError

__all__ = ["BlobState", "CacheStatistics", "ChunkStore", "Pin", "PreparedChunk"]


@dataclass(frozen=True)
class CacheStatistics:
    directory: str
    quota_bytes: int | None
    used_bytes: int
    pinned_bytes: int
    chunk_count: int
    blob_count: int
    verified_blobs: int
    failed_blobs: int
    indexed_layers: int
    checkpoint_indexes: int


class ChunkStore:
    """A cache directory: chunks, checkpoint indexes, blob records and documents, in SQLite
    and local files. See the module docstring; each method is documented where it is done."""

    def __init__(self, directory: Path, quota_bytes: int | None = None) -> None:
        self.directory = directory
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            make_private(directory)
            (directory / "chunks").mkdir(mode=0o700, exist_ok=True)
            (directory / "tmp").mkdir(mode=0o700, exist_ok=True)
            self.database = CacheDatabase(directory)
        except (OSError, sqlite3.Error) as exc:
            raise CacheError(f"cannot open the cache in {directory}: {exc}") from exc
        # in this order: after a move to a new database, access times are forgotten before
        # the blobs are registered again (see CacheDatabase.when_reopened)
        self.chunks = ChunkFiles(directory, self.database, quota_bytes)
        self.checkpoints = CheckpointIndexes(directory, self.database, self.chunks)
        self.blobs = BlobRecords(self.database, self.chunks)
        self.documents = Documents(self.database)
        self.pins = Pins(self.database)
        try:
            self.pins.check_quota(quota_bytes, directory)
        except BaseException:
            self.database.close()
            raise

    @property
    def quota_bytes(self) -> int | None:
        return self.chunks.quota.quota_bytes

    @property
    def conn(self) -> sqlite3.Connection:
        """The cache database (``CacheDatabase.conn``)."""
        return self.database.conn

    def close(self) -> None:
        self.chunks.flush_access_times()
        self.database.close()

    def check_database(self) -> None:
        self.database.check_database()

    def optional_write(self, what: str) -> AbstractContextManager[bool]:
        return self.database.optional_write(what)

    # --- blobs (BlobRecords) ----------------------------------------------------------------

    def register_blob(self, key: str, size: int, chunk_size_bytes: int) -> BlobState:
        return self.blobs.register_blob(key, size, chunk_size_bytes)

    def blob_state(self, key: str) -> BlobState | None:
        return self.blobs.blob_state(key)

    def mark_verified(self, key: str, chunk_ids: Iterable[tuple[int, bytes]]) -> None:
        self.blobs.mark_verified(key, chunk_ids)

    def mark_stream_verified(self, key: str, size: int) -> None:
        self.blobs.mark_stream_verified(key, size)

    def mark_failed(self, key: str, reason: str) -> None:
        self.blobs.mark_failed(key, reason)

    def chunk_ids(self, key: str, idx: int) -> bytes | None:
        return self.blobs.chunk_ids(key, idx)

    # --- chunks (ChunkFiles) ----------------------------------------------------------------

    def chunk_path(self, key: str, idx: int) -> Path:
        return self.chunks.chunk_path(key, idx)

    def cached_chunk_count(self, key: str) -> int:
        return self.chunks.cached_chunk_count(key)

    def cached_chunks(self, key: str) -> set[int]:
        return self.chunks.cached_chunks(key)

    def advise_will_need(self, key: str, idx: int) -> None:
        self.chunks.advise_will_need(key, idx)

    def has_chunk(self, key: str, idx: int) -> bool:
        return self.chunks.has_chunk(key, idx)

    def pieces_present(self, key: str, idx: int) -> int:
        return self.chunks.pieces_present(key, idx)

    def read(self, key: str, idx: int, offset: int, length: int) -> bytes | memoryview | None:
        return self.chunks.read(key, idx, offset, length)

    def put(self, key: str, idx: int, data: bytes | bytearray | memoryview) -> bool:
        return self.chunks.put(key, idx, data)

    def prepare(self, data: bytes | bytearray | memoryview) -> PreparedChunk:
        return self.chunks.prepare(data)

    def discard(self, prepared: PreparedChunk) -> None:
        self.chunks.discard(prepared)

    def commit(self, key: str, idx: int, prepared: PreparedChunk) -> bool:
        return self.chunks.commit(key, idx, prepared)

    def put_pieces(self, key: str, idx: int, chunk_length: int, offset: int,
                   data: bytes | bytearray | memoryview) -> bool:
        return self.chunks.put_pieces(key, idx, chunk_length, offset, data)

    def purge_chunks(self, key: str) -> None:
        self.chunks.purge_chunks(key)

    def pin(self, key: str, idx: int) -> None:
        self.chunks.quota.pin(key, idx)

    def unpin(self, key: str, idx: int) -> None:
        self.chunks.quota.unpin(key, idx)

    def used_bytes(self) -> int:
        return self.chunks.quota.used_bytes()

    def evict(self, target_bytes: int) -> int:
        return self.chunks.quota.evict(target_bytes)

    def collect_garbage(self) -> int:
        return self.chunks.collect_garbage()

    # --- checkpoint indexes of gzip blobs (CheckpointIndexes) -------------------------------

    def checkpoints_path(self, blob: str) -> Path:
        return self.checkpoints.checkpoints_path(blob)

    def put_checkpoints(self, blob: str, content_key: str, data: bytes | bytearray) -> bool:
        return self.checkpoints.put_checkpoints(blob, content_key, data)

    def has_checkpoints(self, blob: str) -> bool:
        return self.checkpoints.has_checkpoints(blob)

    def read_checkpoints(self, blob: str, offset: int, length: int) -> bytes | None:
        return self.checkpoints.read_checkpoints(blob, offset, length)

    def drop_checkpoints(self, blob: str, why: str) -> None:
        self.checkpoints.drop_checkpoints(blob, why)

    # --- documents: manifests and configs (Documents) ---------------------------------------

    def get_document(self, digest: str) -> bytes | None:
        return self.documents.get_document(digest)

    def put_document(self, digest: str, data: bytes) -> None:
        self.documents.put_document(digest, data)

    def remember_tag(self, reference: str, digest: str) -> None:
        self.documents.remember_tag(reference, digest)

    def last_resolved(self, reference: str) -> tuple[str, float] | None:
        return self.documents.last_resolved(reference)

    # --- what spans the tables ----------------------------------------------------------------

    def statistics(self) -> CacheStatistics:
        one = self.database.execute
        return CacheStatistics(
            directory=str(self.directory),
            quota_bytes=self.quota_bytes,
            used_bytes=self.used_bytes(),
            pinned_bytes=self.pins.pinned_bytes(),
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
        dropped_before = self.chunks.dropped
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
                self.chunks.drop_bad_chunk(key, idx, "a piece differs from the verified one")
            elif not gone:
                good += 1
        for blob, length in self.database.execute("SELECT blob, length FROM checkpoints").fetchall():
            if self.read_checkpoints(blob, 0, length) is not None:
                good += 1
        return good, self.chunks.dropped - dropped_before

    def clear(self) -> None:
        """Drop everything: chunks, verification records, tar and checkpoint indexes,
        documents, pins and remembered tags."""
        with self.database.lock():
            with self.database.transaction():
                for table in ("chunks", "chunk_ids", "blobs", "documents", "layer_indexes",
                              "checkpoints", "pins", "tags"):
                    self.database.execute(f"DELETE FROM {table}")
            self.chunks.remove_all_files()
