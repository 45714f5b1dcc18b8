"""Persisted tar indexes: the members of a layer, keyed by the content key of its tar stream.

A layer's index is written once, in one transaction, after it has been fully parsed; so a
second listing of the same layer, by any process, needs no blob request. Names are stored as
the raw bytes of the tar (UTF-8 with surrogate escapes undone), so any name round-trips.
"""

from __future__ import annotations

from kitfs.cache.store import ChunkStore
from kitfs.format.tar import TarMember


def load_members(store: ChunkStore, key: str) -> list[TarMember] | None:
    """The stored members of ``key``, or None if it has not been indexed."""
    row = store.conn.execute(
        "SELECT member_count, error FROM layer_indexes WHERE key = ?", (key,)
    ).fetchone()
    if row is None:
        return None
    count, _ = row
    rows = store.conn.execute(
        "SELECT name, typeflag, mode, size, data_offset FROM members WHERE key = ? ORDER BY seq",
        (key,),
    ).fetchall()
    if len(rows) != count:
        return None  # never happens with the single transaction; treat as not indexed
    return [
        TarMember(name=bytes(name).decode("utf-8", "surrogateescape"), typeflag=bytes(typeflag),
                  mode=mode, size=size, data_offset=data_offset, header_offset=-1)
        for name, typeflag, mode, size, data_offset in rows
    ]


def store_members(store: ChunkStore, key: str, members: list[TarMember]) -> None:
    """Persist a layer's index in one transaction; skipped (the caller keeps its index in
    memory) while another process keeps the database locked or its disk is full."""
    with store.optional_write(f"the index of {key}") as writable:
        if not writable:
            return
        conn = store.conn
        conn.execute("DELETE FROM members WHERE key = ?", (key,))
        conn.executemany(
            "INSERT INTO members (key, seq, name, typeflag, mode, size, data_offset) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(key, seq, m.name.encode("utf-8", "surrogateescape"), m.typeflag, m.mode, m.size, m.data_offset)
             for seq, m in enumerate(members)],
        )
        conn.execute(
            "INSERT OR REPLACE INTO layer_indexes (key, member_count, error) VALUES (?, ?, NULL)",
            (key, len(members)),
        )
