"""Persisted tar indexes (table ``layer_indexes``): the members of a layer, keyed by the content
key of its tar stream.

A layer's index is written once, as one row, after it has been fully parsed; so a second
listing of the same layer, by any process, needs no blob request. The row holds the members
column by column, zstd-compressed: a header (format, member count, length of the names), the
names as one JSON array, then one byte per typeflag and the modes (uint32), sizes and data
offsets (int64) as little-endian arrays. 100,000 members pack into well under a megabyte; the
number columns load with one ``frombytes`` each where JSON number lists took most of the load
time (a row per member, before that, took a second to write and half a second to read).
Names are JSON strings with ``\\udcXX`` escapes for bytes that are not UTF-8 (surrogate
escapes), so any name round-trips. A row that does not decode, or of another format, is
treated as "not indexed" (the layer is parsed again).
"""

from __future__ import annotations

import json
import logging
import struct
import sys
from array import array
from itertools import repeat

import zstandard

from kitfs.cache.database import CacheDatabase
from kitfs.format.tar import TarMember

log = logging.getLogger(__name__)

PACKED_FORMAT = 2
ZSTD_LEVEL = 3
_HEADER = struct.Struct("<BII")  # format, member count, bytes of the names' JSON
_TYPEFLAGS = [bytes([value]) for value in range(256)]  # one shared bytes object per typeflag


def _little_endian(values: array[int]) -> bytes:
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


def _column(data: bytes, start: int, typecode: str, count: int) -> tuple[list[int], int]:
    values = array(typecode)
    end = start + values.itemsize * count
    values.frombytes(data[start:end])
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist(), end


class MemberColumns:
    """What an index keeps of each member, column by column, as the members are parsed: the
    TarMember tuples of a batch can go once the tree has them (100,000 members: ~13 MB less
    held while the rest of the layer is read, and packing reads the columns as they are)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.typeflags = bytearray()
        self.modes = array("I")
        self.sizes = array("q")
        self.offsets = array("q")

    def __len__(self) -> int:
        return len(self.names)

    def extend(self, members: list[TarMember]) -> None:
        self.names += [m.name for m in members]
        self.typeflags += b"".join(m.typeflag or b"\0" for m in members)
        self.modes.extend([m.mode for m in members])
        self.sizes.extend([m.size for m in members])
        self.offsets.extend([m.data_offset for m in members])

    def pack(self) -> bytes:
        """The columns, zstd-compressed (pure: bytes out)."""
        names = json.dumps(self.names).encode()
        document = b"".join((
            _HEADER.pack(PACKED_FORMAT, len(self.names), len(names)),
            names,
            self.typeflags,
            _little_endian(array("I", self.modes)),
            _little_endian(array("q", self.sizes)),
            _little_endian(array("q", self.offsets)),
        ))
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(document)


def pack_members(members: list[TarMember]) -> bytes:
    """The members, column by column, zstd-compressed (pure: bytes out)."""
    columns = MemberColumns()
    columns.extend(members)
    return columns.pack()


def unpack_members(packed: bytes, count: int) -> list[TarMember]:
    """The members ``pack_members`` packed; ``ValueError`` if they do not decode to ``count``."""
    try:
        document = zstandard.ZstdDecompressor().decompress(packed)
        packed_format, packed_count, names_length = _HEADER.unpack_from(document)
        if packed_format != PACKED_FORMAT:
            raise ValueError("unknown format")
        if packed_count != count:
            raise ValueError(f"holds other than {count} members")
        names_end = _HEADER.size + names_length
        names = json.loads(document[_HEADER.size : names_end])
    except (zstandard.ZstdError, struct.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot decode: {exc}") from exc
    typeflags_end = names_end + count
    if (not isinstance(names, list) or len(names) != count
            or not all(isinstance(name, str) for name in names)
            or len(document) != typeflags_end + count * (4 + 8 + 8)):
        raise ValueError(f"does not hold {count} members")
    typeflags = [_TYPEFLAGS[value] for value in document[names_end:typeflags_end]]
    modes, end = _column(document, typeflags_end, "I", count)
    sizes, end = _column(document, end, "q", count)
    offsets, _ = _column(document, end, "q", count)
    # TarMember's own constructor is a Python function: tuple.__new__ builds the same tuples
    # (header_offset is not stored: -1; nor linkname and mtime, which the tree never uses)
    rows = zip(names, typeflags, modes, sizes, offsets, repeat(-1), repeat(""), repeat(0))
    return [tuple.__new__(TarMember, row) for row in rows]


def load_members(db: CacheDatabase, key: str) -> list[TarMember] | None:
    """The stored members of ``key``, or None if it has not been indexed."""
    row = db.conn.execute(
        "SELECT member_count, packed FROM layer_indexes WHERE key = ?", (key,)
    ).fetchone()
    if row is None:
        return None
    count, packed = row
    try:
        return unpack_members(bytes(packed), count)
    except ValueError as exc:
        log.warning("cache: the stored index of %s is unreadable (%s); indexing it again", key, exc)
        return None


def store_members(db: CacheDatabase, key: str, count: int, packed: bytes) -> None:
    """Persist a layer's index (``count`` members, ``pack_members``) as one row, unless the
    blob has failed verification (the index was read from its bad bytes: ``mark_failed``
    drops it, and this statement checks the failure itself, so an index stored late cannot
    come back); skipped (the caller keeps its index in memory) while another process keeps
    the database locked or its disk is full."""
    with db.optional_write(f"the index of {key}") as writable:
        if not writable:
            return
        db.conn.execute(
            "INSERT OR REPLACE INTO layer_indexes (key, member_count, packed) SELECT ?, ?, ? "
            "WHERE NOT EXISTS (SELECT 1 FROM blobs WHERE key = ? AND verified = -1)",
            (key, count, packed, key),
        )


def forget_members(db: CacheDatabase, key: str) -> None:
    """Drop the index of ``key`` (its blob failed verification: the index was read from bad
    bytes). Raises ``DatabaseLockedError`` like any write."""
    db.execute("DELETE FROM layer_indexes WHERE key = ?", (key,))
