"""The chunks a ``BlobReader`` holds in memory, and how many it may fetch ahead of its readers.

Owns ``ChunkMemory``: three kinds of chunk bytes, all views of the buffers bodies were
received into (never written once fetched, so a view is as good as a copy):

``storing``
    chunks fetched and already answering reads, on their way to the cache (hashing, their
    file, their row); dropped once stored.
``recent``
    chunks just fetched or read, least recently used first: the reads that follow the one that
    fetched a chunk (the kernel asks for 1 MiB at a time) find it here rather than in the
    cache file, and so does the digest frontier. ``RECENT_CHUNKS`` of them are kept, plus the
    ones fetched ahead and not read yet.
``unread`` (a mark on recent or storing chunks)
    chunks read-ahead fetched for a stream that has yet to read them. Memory lets go of them
    last: with several streams at once, a plain LRU of 12 dropped each stream's read-ahead
    before the stream got there (4 readers of 4 files read ~40% of their chunks back from the
    cache file, checksums and all, on the trio thread). Read-ahead for all streams together
    stays within ``AHEAD_BUDGET_CHUNKS`` unread chunks (``ahead_room``), so memory stays
    bounded however many files are read at once; a mark older than ``UNREAD_EXPIRY_S`` (the
    stream stopped reading) is dropped so an abandoned stream does not hold the budget.

Owns ``BufferPool`` too: the page-aligned buffers chunks are received into, reused once
nothing refers to them any more, because a fresh anonymous mapping costs a page fault and a
zeroed page for each 4 KiB the body fills (0.5 CPU s per GiB received here, against 0.33 into
a buffer used before).
"""

from __future__ import annotations

import mmap
import sys
import time
from collections import OrderedDict
from collections.abc import Callable

from kitfs.core.content import ChunkBuffer

# Chunks kept once read (the kernel reads a 4 MiB chunk as four 1 MiB requests, a little
# out of order; several streams each have one being read). Chunks read ahead are kept apart.
RECENT_CHUNKS = 4
# Chunks fetched ahead and not read yet, all streams together: one stream's whole window (8)
# twice over; with 4 streams each keeps about 4 ahead (16 MiB of 4 MiB chunks), which covers a
# loopback round trip many times over. 64 MiB of read-ahead at most, plus RECENT_CHUNKS.
AHEAD_BUDGET_CHUNKS = 16
# A chunk fetched ahead that nobody read for this long was read ahead for a stream that stopped.
UNREAD_EXPIRY_S = 10.0

Entry = tuple[str, int]  # (content key, chunk index)


class ChunkMemory:
    """Chunks in memory, by (content key, chunk index). Trio thread only: no locks."""

    def __init__(self, recent_chunks: int = RECENT_CHUNKS,
                 ahead_budget_chunks: int = AHEAD_BUDGET_CHUNKS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.recent_chunks = recent_chunks
        self.ahead_budget_chunks = ahead_budget_chunks
        self.recent: OrderedDict[Entry, ChunkBuffer] = OrderedDict()
        self.storing: dict[Entry, ChunkBuffer] = {}
        self._unread: dict[Entry, float] = {}  # entry -> monotonic time read-ahead asked for it

    def __contains__(self, entry: Entry) -> bool:
        return entry in self.recent or entry in self.storing

    def view(self, key: str, idx: int, start: int, length: int) -> memoryview | None:
        """Bytes ``[start, start+length)`` of chunk ``idx`` if it is in memory, as a view; a
        read, so the chunk is no longer unread and becomes the most recently used."""
        entry = (key, idx)
        kept = self.recent.get(entry)
        if kept is not None:
            self.recent.move_to_end(entry)
        else:
            kept = self.storing.get(entry)
            if kept is None:
                return None
        self._unread.pop(entry, None)
        return memoryview(kept)[start : start + length]

    def whole(self, key: str, idx: int) -> ChunkBuffer | None:
        """Chunk ``idx`` as held (no copy), or None; not a read (the digest frontier uses it)."""
        return self.recent.get((key, idx)) or self.storing.get((key, idx))

    def remember(self, key: str, idx: int, data: ChunkBuffer) -> None:
        """Keep a chunk just fetched or made, letting go of the least recently used read ones
        beyond ``recent_chunks``; unread ones only beyond ``recent_chunks`` plus the budget."""
        entry = (key, idx)
        self.recent[entry] = data
        self.recent.move_to_end(entry)
        if len(self.recent) <= self.recent_chunks:
            return
        self._expire()
        unread = sum(1 for e in self.recent if e in self._unread)
        while len(self.recent) - unread > self.recent_chunks:
            victim = next(e for e in self.recent if e not in self._unread)
            del self.recent[victim]
        while len(self.recent) > self.recent_chunks + self.ahead_budget_chunks:
            victim, _ = self.recent.popitem(last=False)
            self._unread.pop(victim, None)

    def begin_storing(self, key: str, idx: int, data: ChunkBuffer) -> None:
        self.storing[(key, idx)] = data

    def end_storing(self, key: str, idx: int, data: ChunkBuffer) -> None:
        if self.storing.get((key, idx)) is data:
            del self.storing[(key, idx)]

    def expect(self, entries: list[Entry]) -> None:
        """Mark chunks read-ahead is about to fetch as unread (kept until read or expired)."""
        now = self._clock()
        for entry in entries:
            self._unread[entry] = now

    def unexpect(self, entries: list[Entry]) -> None:
        """Read-ahead did not fetch these after all (a read did, or the fetch failed)."""
        for entry in entries:
            self._unread.pop(entry, None)

    def read_ahead_room(self) -> int:
        """How many more chunks read-ahead may ask for now (all streams together)."""
        self._expire()
        return self.ahead_budget_chunks - len(self._unread)

    def forget(self, key: str) -> None:
        """Drop ``key``'s chunks (the blob failed its digest)."""
        for entry in [e for e in self.recent if e[0] == key]:
            del self.recent[entry]
        for entry in [e for e in self.storing if e[0] == key]:
            del self.storing[entry]
        for entry in [e for e in self._unread if e[0] == key]:
            del self._unread[entry]

    def _expire(self) -> None:
        if not self._unread:
            return
        too_old = self._clock() - UNREAD_EXPIRY_S
        for entry in [e for e, t in self._unread.items() if t < too_old]:
            del self._unread[entry]


# Buffers kept for reuse: about what one stream holds at once (RECENT_CHUNKS read, its
# read-ahead window of 8, a few on their way to the cache or waiting for the digest); more
# streams at once take fresh ones beyond that. Once used they stay resident: 80 MiB.
POOLED_BUFFERS = RECENT_CHUNKS + 16


class BufferPool:
    """Page-aligned (anonymous ``mmap``) buffers of ``size_bytes``, handed out as views and
    reused once no view of them is left anywhere (memory let go of the chunk, the read that
    served it answered): a buffer is free when the pool holds the only reference to it.
    Buffers of another size, and any beyond ``max_buffers`` in use at once, are fresh
    mappings that go away with their last view. Trio thread only."""

    def __init__(self, size_bytes: int, max_buffers: int = POOLED_BUFFERS) -> None:
        self.size_bytes = size_bytes
        self.max_buffers = max_buffers
        self._buffers: list[mmap.mmap] = []
        self.reused = 0  # for tests: how many takes found a free buffer

    def take(self, length: int) -> memoryview:
        """A view of ``length`` bytes at the start of a free buffer (contents undefined)."""
        if length <= self.size_bytes:
            for buffer in self._buffers:
                # referents: the list, this loop's name, getrefcount's argument; a view
                # anywhere (a slice of one included) adds one
                if sys.getrefcount(buffer) == 3:
                    self.reused += 1
                    return memoryview(buffer)[:length]
            if len(self._buffers) < self.max_buffers:
                buffer = _anonymous(self.size_bytes)
                self._buffers.append(buffer)
                return memoryview(buffer)[:length]
        return memoryview(_anonymous(length))


def _anonymous(length: int) -> mmap.mmap:
    return mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
