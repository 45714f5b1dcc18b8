"""Sequential read-ahead: which reads make a stream, how far ahead of it chunks are fetched,
and the background tasks that fetch them.

Owns ``ReadAhead``, which a ``BlobReader`` consults on every read that may start or continue
a stream (``on_read``) and which index building asks to fetch its next window (``prefetch``).
It fetches through the reader's own single-flight path (``fetch_chunks``: the chunks of one
range, none of them in flight), never a chunk that is in memory, in flight or cached whole;
what it fetches is marked in ``ChunkMemory`` as read ahead (kept until read) and stays within
the budget all streams share there. It holds back while the blob's digest, hashed in order on
one core, is ``MAX_UNHASHED_CHUNKS`` behind. All on the trio thread.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from kitfs.cache.store import ChunkStore
from kitfs.core.content import ChunkBuffer, Content
from kitfs.core.flight import Flights
from kitfs.core.memory import ChunkMemory
from kitfs.core.verify import Verifier
from kitfs.errors import KitfsError
from kitfs.format.mediatypes import Compression
from kitfs.format.ranges import chunks_covering

log = logging.getLogger("kitfs.core.reader")  # the reader's log lines, as before the split

# Sequential read-ahead (as mountpoint-s3's prefetcher): a read that continues a stream (starts
# within STREAM_SLACK_BYTES of where an earlier read of the same content ended; the kernel's
# own read-ahead reorders a little) keeps chunks fetched ahead of it in parallel, a quarter as many
# bytes as the stream has read, up to MAX_PREFETCH_CHUNKS; any other read starts a new stream
# with no read-ahead (see ReadAhead.on_read). A stream that did not start at offset 0 is
# taken as sequential once its earlier reads asked for SEQUENTIAL_AFTER_BYTES: random readers
# whose reads happen to land near each other (or on the same spot) stay random.
STREAM_SLACK_BYTES = 2 * 1024 * 1024
SEQUENTIAL_AFTER_BYTES = 256 * 1024
MAX_PREFETCH_CHUNKS = 8
# Read-ahead asks for several chunks in one range once the window is wide enough (half the
# window, at most this many): the registry spends about 4.6 ms of CPU per request here, on
# the cores kitfs shares with it (1.84 s per GiB in 4 MiB ranges, 1.10 in 16 MiB ranges).
MAX_RUN_CHUNKS = 4
# Read-ahead waits while the blob's digest (hashed in order, on one core) is this many chunks
# behind what was fetched: fetching further only made chunks the digest then had to read
# back from the cache, on the trio thread. Reads themselves never wait for it.
MAX_UNHASHED_CHUNKS = 8
MAX_STREAMS_PER_CONTENT = 4


@dataclass
class _Stream:
    start: int  # where the stream began
    next_offset: int  # where its last read ended
    read_bytes: int  # what its reads asked for, in all
    ahead: int = -1  # the last chunk index read-ahead has considered



class ReadAhead:
    """Streams per content and the chunks being read ahead for them."""

    def __init__(
        self,
        store: ChunkStore,
        nursery: trio.Nursery,
        memory: ChunkMemory,
        inflight: Flights[tuple[str, int]],
        verifier: Verifier,
        *,
        chunk_size: Callable[[Content], int],
        fetch_chunks: Callable[[Content, int, int], Awaitable[list[ChunkBuffer]]],
        window_chunks: int = MAX_PREFETCH_CHUNKS,
    ) -> None:
        self.store = store
        self.read_ahead_chunks = window_chunks  # 0: fetch only what reads cover
        self._nursery = nursery
        self._memory = memory
        self._inflight = inflight
        self._verifier = verifier
        self._chunk_size = chunk_size
        self._fetch_chunks = fetch_chunks
        self._streams: dict[str, list[_Stream]] = {}
        self._prefetching: set[tuple[str, int]] = set()

    def on_read(self, content: Content, offset: int, length: int, last_idx: int,
                end: int) -> bool:
        """Detect sequential streams and keep chunks fetched ahead of them, never past ``end``
        (the end of the file being read): a stream that has read N bytes in order has
        N/4 ahead of it (at least one chunk, at most ``read_ahead_chunks``), so the bytes
        fetched and never read stay a fraction of those read. Returns whether the read
        belongs to a stream (then it fetches whole chunks); a random reader never starts
        read-ahead."""
        key = content.key
        chunk = self._chunk_size(content)
        streams = self._streams.setdefault(key, [])
        stream = next((st for st in streams
                       if abs(offset - st.next_offset) <= STREAM_SLACK_BYTES), None)
        if stream is None:
            stream = _Stream(offset, offset + length, 0)
            streams.append(stream)
            del streams[:-MAX_STREAMS_PER_CONTENT]
        earlier_bytes = stream.read_bytes
        stream.read_bytes += length
        stream.next_offset = max(stream.next_offset, offset + length)
        if stream.start != 0 and earlier_bytes < SEQUENTIAL_AFTER_BYTES:
            return False  # a read somewhere: no read-ahead until it proves sequential
        consumed = stream.next_offset - stream.start
        window = min(max(1, consumed // (4 * chunk)), self.read_ahead_chunks)
        run = min(max(1, window // 2), MAX_RUN_CHUNKS)
        last = (end - 1) // chunk
        if self._digest_is_behind(key, stream.ahead):
            return True  # fetch no further until the digest catches up
        # chunks up to stream.ahead were dealt with by earlier reads of this stream; the
        # window is topped up a run at a time, so each request asks for ``run`` chunks, as far
        # as the read-ahead budget all streams share allows (kitfs.core.memory)
        stream.ahead = max(stream.ahead, last_idx)
        room = self._memory.read_ahead_room()
        while stream.ahead < last and last_idx + window - stream.ahead >= run and room > 0:
            first = stream.ahead + 1
            stream.ahead = min(stream.ahead + min(run, room), last)
            room -= self._start_prefetch(content, first, stream.ahead - first + 1)
        return True

    def _digest_is_behind(self, key: str, ahead: int) -> bool:
        """Whether the blob's digest is ``MAX_UNHASHED_CHUNKS`` or more behind chunk ``ahead``
        and on its way (``Verifier.behind``)."""
        return self._verifier.behind(key, ahead, MAX_UNHASHED_CHUNKS, math.inf,
                                     lambda at: self.on_its_way(key, at))

    def prefetch(self, content: Content, offset: int, length: int) -> None:
        """Start fetching the chunks of ``[offset, offset+length)`` in the background."""
        if content.compression is not Compression.NONE:
            return
        spans = chunks_covering(offset, length, content.blob_size, self._chunk_size(content))
        if spans:
            self._start_prefetch(content, spans[0].index, len(spans))

    def _start_prefetch(self, content: Content, first: int, count: int) -> int:
        """Fetch, in the background, those of chunks ``first`` .. ``first + count - 1`` that
        are not in memory, in flight or cached: each run of consecutive ones in one range.
        Returns how many it asked for (each held in memory until read, or expired)."""
        runs: list[list[int]] = []
        for idx in range(first, first + count):
            entry = (content.key, idx)
            if entry in self._prefetching or self._held(entry):
                continue
            if self.store.has_chunk(content.key, idx):
                # cached: have the kernel read its file ahead, so the read finds it in memory
                self.store.advise_will_need(content.key, idx)
                continue
            if runs and runs[-1][-1] == idx - 1:
                runs[-1].append(idx)
            else:
                runs.append([idx])
        for run in runs:
            entries = [(content.key, idx) for idx in run]
            self._prefetching.update(entries)
            self._memory.expect(entries)
            self._nursery.start_soon(self._prefetch, content, run, name=f"prefetch {run[0]}")
        return sum(len(run) for run in runs)

    def _held(self, entry: tuple[str, int]) -> bool:
        """The chunk is in flight or in memory."""
        return entry in self._inflight or entry in self._memory

    def on_its_way(self, key: str, idx: int) -> bool:
        """Chunk ``idx`` is in memory, in flight or cached whole."""
        return self._held((key, idx)) or self.store.has_chunk(key, idx)

    async def _prefetch(self, content: Content, run: list[int]) -> None:
        key = content.key
        fetched: set[int] = set()
        try:
            # what a read fetched, or started to, before this task ran is left out
            todo = [idx for idx in run if not self.on_its_way(key, idx)]
            while todo:
                count = next((n for n, idx in enumerate(todo) if idx != todo[0] + n), len(todo))
                await self._fetch_chunks(content, todo[0], count)
                fetched.update(range(todo[0], todo[0] + count))
                todo = [idx for idx in todo[count:] if not self.on_its_way(key, idx)]
        except KitfsError as exc:  # the read that needs it will try again and report
            log.debug("prefetch of chunks %d-%d of %s failed: %s", run[0], run[-1],
                      content.blob_digest, exc)
        except Exception:  # a bug: never let it end the session's nursery (and the mount)
            log.exception("prefetch of chunks %d-%d of %s failed unexpectedly", run[0], run[-1],
                          content.blob_digest)
        finally:
            self._prefetching.difference_update((key, idx) for idx in run)
            # not fetched here (a read fetched it, it was cached, or the fetch failed): not
            # held for the stream either
            self._memory.unexpect([(key, idx) for idx in run
                                   if idx not in fetched and (key, idx) not in self._memory])

