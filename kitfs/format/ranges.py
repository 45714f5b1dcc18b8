"""Byte-range arithmetic: which fixed-size chunks cover a read, clamped to a blob.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChunkSpan:
    """Chunk ``index`` of a blob: bytes ``[start, end)``."""

    index: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


def chunk_count(blob_size: int, chunk_size_bytes: int) -> int:
    return (blob_size + chunk_size_bytes - 1) // chunk_size_bytes


def chunk_span(index: int, blob_size: int, chunk_size_bytes: int) -> ChunkSpan:
    start = index * chunk_size_bytes
    return ChunkSpan(index, start, min(start + chunk_size_bytes, blob_size))


def chunks_covering(offset: int, length: int, blob_size: int, chunk_size_bytes: int) -> list[ChunkSpan]:
    """The chunks that hold bytes ``[offset, offset+length)``, clamped to the blob.

    An empty or out-of-range request gives no chunks.
    """
    end = min(offset + length, blob_size)
    if length <= 0 or offset >= end or offset < 0:
        return []
    first = offset // chunk_size_bytes
    last = (end - 1) // chunk_size_bytes
    return [chunk_span(i, blob_size, chunk_size_bytes) for i in range(first, last + 1)]
