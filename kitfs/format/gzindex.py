"""Checkpoint indexes of gzip streams, in the file format indexed_gzip exports (``GZIDX``).

A checkpoint is a place in a gzip stream where decompression can start without the bytes
before it: the compressed offset (and bit) of a deflate block boundary, the decompressed
offset it corresponds to, and the 32 KiB of decompressed data before it (the "window"
deflate may refer back into). A checkpoint at the start of a gzip member needs no window.

indexed_gzip (zran.c, format version 1) writes, in the machine's byte order::

    "GZIDX" version:u8 flags:u8 compressed_size:u64 uncompressed_size:u64
    spacing:u32 window_size:u32 count:u32
    count x (compressed_offset:u64 uncompressed_offset:u64 bits:u8 has_window:u8)
    one window_size window per checkpoint that has one, in order

kitfs keeps that file in the cache and reads only what it needs of it: the header and the
table (``parse_header``, ``parse_table``), then the windows of the checkpoints around one
chunk, from which ``subset`` makes a small index that indexed_gzip can import.

Pure: bytes in, values out.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass

from kitfs.errors import FormatError

MAGIC = b"GZIDX"
VERSION = 1
_HEADER = struct.Struct("=5sBBQQIII")
_POINT = struct.Struct("=QQBB")
HEADER_BYTES = _HEADER.size  # 35
POINT_BYTES = _POINT.size  # 18


@dataclass(frozen=True)
class Checkpoint:
    """Where decompression can start: ``compressed_offset`` is the first whole byte; when
    ``bits`` is not 0, the stream starts that many bits earlier, in the byte before."""

    compressed_offset: int
    uncompressed_offset: int
    bits: int
    window_at: int | None  # offset of its window in the index file; None: needs none

    @property
    def first_byte(self) -> int:
        """The first compressed byte decompressing from here reads."""
        return self.compressed_offset - 1 if self.bits else self.compressed_offset


@dataclass(frozen=True)
class Header:
    compressed_size: int
    uncompressed_size: int
    spacing: int
    window_size: int
    count: int

    @property
    def table_bytes(self) -> int:
        """Bytes of the header and the checkpoint table (what ``parse_table`` needs)."""
        return HEADER_BYTES + self.count * POINT_BYTES


@dataclass(frozen=True)
class CheckpointTable:
    header: Header
    points: tuple[Checkpoint, ...]

    def around(self, start: int, end: int) -> tuple[Checkpoint, Checkpoint | None]:
        """The last checkpoint at or before decompressed offset ``start``, and the first at or
        after ``end`` (None when the stream ends first): decompressing ``[start, end)`` needs
        only the compressed bytes between them."""
        if not self.points or self.points[0].uncompressed_offset > start:
            raise FormatError(f"gzip checkpoint index does not cover offset {start}")
        offsets = [p.uncompressed_offset for p in self.points]
        before = self.points[bisect.bisect_right(offsets, start) - 1]
        at = bisect.bisect_left(offsets, end)
        return before, self.points[at] if at < len(self.points) else None


def parse_header(data: bytes) -> Header:
    """The header at the start of an index file (at least ``HEADER_BYTES`` of it).

    Raises:
        FormatError: not a GZIDX file, or a version this parser does not know.
    """
    if len(data) < HEADER_BYTES:
        raise FormatError("gzip checkpoint index is truncated in its header")
    magic, version, _flags, csize, usize, spacing, window, count = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FormatError("not a gzip checkpoint index (no GZIDX magic)")
    if version != VERSION:
        raise FormatError(f"gzip checkpoint index version {version} (only {VERSION} is known)")
    return Header(csize, usize, spacing, window, count)


def parse_table(data: bytes) -> CheckpointTable:
    """The header and every checkpoint of an index file (its first ``table_bytes`` bytes or
    more), each with where its window is in the file.

    Raises:
        FormatError: malformed, or checkpoints out of order or outside the stream.
    """
    header = parse_header(data)
    if len(data) < header.table_bytes:
        raise FormatError("gzip checkpoint index is truncated in its table")
    points = []
    window_at = header.table_bytes
    previous = (0, 0)
    for i in range(header.count):
        compressed, uncompressed, bits, has_window = _POINT.unpack_from(
            data, HEADER_BYTES + i * POINT_BYTES)
        if bits > 7 or has_window > 1 or compressed < previous[0] or uncompressed < previous[1] or (
                compressed > header.compressed_size or uncompressed > header.uncompressed_size):
            raise FormatError(f"gzip checkpoint index: checkpoint {i} is malformed")
        previous = (compressed, uncompressed)
        points.append(Checkpoint(compressed, uncompressed, bits, window_at if has_window else None))
        if has_window:
            window_at += header.window_size
    return CheckpointTable(header, tuple(points))


def subset(table: CheckpointTable, points: list[tuple[Checkpoint, bytes | None]]) -> bytes:
    """An index file holding only ``points`` (each with its window, or None), in order, with
    ``table``'s header otherwise: what indexed_gzip imports to decompress from them."""
    header = table.header
    out = [_HEADER.pack(MAGIC, VERSION, 0, header.compressed_size, header.uncompressed_size,
                        header.spacing, header.window_size, len(points))]
    for point, window in points:
        out.append(_POINT.pack(point.compressed_offset, point.uncompressed_offset, point.bits,
                               1 if window is not None else 0))
    for _point, window in points:
        if window is not None:
            if len(window) != header.window_size:
                raise FormatError("gzip checkpoint window has the wrong size")
            out.append(window)
    return b"".join(out)
