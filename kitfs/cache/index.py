"""Persisted tar indexes: the members of a layer, keyed by the content key of its tar stream.

A layer's index is written once, as one row, after it has been fully parsed; so a second
listing of the same layer, by any process, needs no blob request. The row holds the members
as zstd-compressed JSON, one array per field (names, typeflags, modes, sizes, data offsets):
100,000 members pack into well under a megabyte and load in tens of milliseconds, where a
row per member took a second to write and half a second to read back. Names are JSON strings
with ``\\udcXX`` escapes for bytes that are not UTF-8 (surrogate escapes), so any name
round-trips. A row that does not decode is treated as "not indexed" (the layer is parsed again).
"""

from __future__ import annotations

import json
import logging

import zstandard

from kitfs.cache.store import ChunkStore
from kitfs.format.tar import TarMember

log = logging.getLogger(__name__)

PACKED_FORMAT = 1
ZSTD_LEVEL = 3


def pack_members(members: list[TarMember]) -> bytes:
    """The members as zstd-compressed JSON (pure: bytes out)."""
    document = {
        "format": PACKED_FORMAT,
        "names": [m.name for m in members],
        "typeflags": b"".join(m.typeflag or b"\0" for m in members).decode("latin-1"),
        "modes": [m.mode for m in members],
        "sizes": [m.size for m in members],
        "offsets": [m.data_offset for m in members],
    }
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(json.dumps(document).encode())


def unpack_members(packed: bytes, count: int) -> list[TarMember]:
    """The members ``pack_members`` packed; ``ValueError`` if they do not decode to ``count``."""
    try:
        document = json.loads(zstandard.ZstdDecompressor().decompress(packed))
    except (zstandard.ZstdError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot decode: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != PACKED_FORMAT:
        raise ValueError("unknown format")
    fields = (document["names"], document["typeflags"], document["modes"], document["sizes"],
              document["offsets"])
    if any(len(field) != count for field in fields):
        raise ValueError(f"holds other than {count} members")
    return [
        TarMember(name=name, typeflag=typeflag.encode("latin-1"), mode=mode, size=size,
                  data_offset=data_offset, header_offset=-1)
        for name, typeflag, mode, size, data_offset in zip(*fields, strict=True)
    ]


def load_members(store: ChunkStore, key: str) -> list[TarMember] | None:
    """The stored members of ``key``, or None if it has not been indexed."""
    row = store.conn.execute(
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


def store_members(store: ChunkStore, key: str, members: list[TarMember]) -> None:
    """Persist a layer's index as one row; skipped (the caller keeps its index in memory)
    while another process keeps the database locked or its disk is full."""
    with store.optional_write(f"the index of {key}") as writable:
        if not writable:
            return
        store.conn.execute(
            "INSERT OR REPLACE INTO layer_indexes (key, member_count, packed) VALUES (?, ?, ?)",
            (key, len(members), pack_members(members)),
        )
