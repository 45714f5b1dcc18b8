"""The verification frontier: which blobs are verified, failed, or not yet, and getting there.

Owns ``Verifier``: per blob, the running digest of its chunks fed in order as they arrive
(``_Frontier``: a cold sequential read is verified as its last chunk lands), the decision
to fetch the rest of a nearly complete blob and check it (eventual mode), the whole-blob
check (strict mode, ``kitfs cache verify``; single-flight per blob), what this process
knows verified or failed, how often it asks the cache whether another process found a blob
failing, and ``fail``: a mismatch purges the blob, records the failure in the cache and
raises ``IntegrityError``. ``VerifyState`` names the cache's ``verified`` column (0 not yet,
1 verified, -1 failed; the database keeps those values). The ``BlobReader`` owns one and hands
it the cache, its chunk size per content, a way to fetch a chunk's bytes (its single-flight
read path), a look into its chunk memory and a way to drop a blob from that memory.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import trio

from kitfs.cache.identity import piece_ids
from kitfs.cache.store import BlobState, ChunkStore
from kitfs.core.content import ChunkBuffer, Content
from kitfs.core.flight import Flights, collapse_groups
from kitfs.errors import IntegrityError
from kitfs.format.ranges import chunk_count, chunk_span

log = logging.getLogger("kitfs.core.reader")  # the reader's log lines, as before the split

# "Nearly complete": when a read reaches the end of a file and at most this much (or a quarter)
# of its blob is missing, fetch the rest and verify before answering.
NEARLY_COMPLETE_BYTES = 16 * 1024 * 1024
# How often a reader asks the cache whether another process found a blob failing its digest.
FAILED_CHECK_INTERVAL_S = 1.0
# Chunks fetched ahead of their blob's frontier (out of order, or faster than it hashes) whose
# bytes the frontiers keep, all blobs together, so that they hash them from memory rather than
# read them back from the cache file (written with O_DIRECT: a read from the disk, on the trio
# thread). Beyond that, the chunk furthest ahead of its own blob's frontier lets go first.
KEPT_FOR_FRONTIER = 16
# The frontier hashes up to this many consecutive chunks in memory in one hand-off to a worker
# thread (each hand-off waits for the trio thread, which serves FUSE reads meanwhile).
FEED_BATCH_CHUNKS = 8


class VerifyState(enum.Enum):
    """A blob's verification state, as the cache records it (``BlobState.verified``)."""

    NOT_YET = 0
    VERIFIED = 1
    FAILED = -1

    @classmethod
    def of(cls, state: BlobState | None) -> VerifyState | None:
        """The state of a blob the cache knows (None when it does not know the blob)."""
        return None if state is None else cls(state.verified)


@dataclass
class _Frontier:
    """The digest of a blob's chunks 0..next-1, fed in order as they arrive, so that the
    blob is verified about when its last chunk lands, without reading it all back."""

    hasher: Any
    next: int = 0
    per_chunk: list[tuple[int, bytes]] = field(default_factory=list)  # piece identities
    read_back: int = 0  # chunks it read back from their cache files (it fell behind)
    lock: trio.Lock = field(default_factory=trio.Lock)



class Verifier:
    """Verification of the blobs one ``BlobReader`` reads."""

    def __init__(
        self,
        store: ChunkStore,
        *,
        chunk_size: Callable[[Content], int],
        fetch_slice: Callable[[Content, int, int, int], Awaitable[bytes | memoryview]],
        in_memory: Callable[[str, int], ChunkBuffer | None],
        forget_memory: Callable[[str], None],
    ) -> None:
        self.store = store
        self._chunk_size = chunk_size
        self._fetch_slice = fetch_slice  # bytes [start, start+length) of a chunk, fetched if need be
        self._in_memory = in_memory  # a whole chunk the reader holds (no copy), or None
        self._forget_memory = forget_memory
        self._frontiers: dict[str, _Frontier] = {}
        self.verified: set[str] = set()  # keys known verified (a verified blob stays so)
        self.failed: set[str] = set()  # keys this reader found failing their digest
        self._not_failed_until: dict[str, float] = {}  # key -> monotonic time to ask again
        # chunks just fetched that the frontier has yet to pass: their piece identities (not
        # computed twice) and, for the nearest ones, their bytes (not read back from the cache)
        self._fetched: dict[tuple[str, int], tuple[bytes, ChunkBuffer | None]] = {}
        self._verifying: Flights[str] = Flights()
        self._advanced = trio.Event()  # set (and replaced) whenever a frontier moves

    def note_fetched(self, key: str, idx: int, ids: bytes, data: ChunkBuffer) -> None:
        """Keep what the frontier needs of chunk ``idx``, just fetched, if it has yet to pass
        it: the piece identities computed (so it is not hashed twice) and, for at most
        ``KEPT_FOR_FRONTIER`` chunks of all blobs, the bytes (so they are not read back from the cache)."""
        frontier = self._frontiers.get(key)
        if key in self.verified or (frontier is not None and frontier.next > idx):
            return
        self._fetched[(key, idx)] = (ids, data)
        holding = [entry for entry, (_, kept) in self._fetched.items() if kept is not None]
        if len(holding) > KEPT_FOR_FRONTIER:  # let go of the bytes of the one furthest ahead
            furthest = max(holding, key=lambda entry: entry[1] - self._next_needed(entry[0]))
            self._fetched[furthest] = (self._fetched[furthest][0], None)

    def _next_needed(self, key: str) -> int:
        frontier = self._frontiers.get(key)
        return frontier.next if frontier is not None else 0

    def frontier_at(self, key: str) -> int | None:
        """The next chunk the digest of ``key`` needs, or None (verified, or not started)."""
        frontier = self._frontiers.get(key)
        return frontier.next if frontier is not None else None

    def holds(self, key: str, idx: int) -> bool:
        """Whether chunk ``idx`` waits here for the frontier (fetched ahead of it)."""
        return (key, idx) in self._fetched

    def forget(self, key: str) -> None:
        """Drop what is kept for ``key``: its frontier and the piece identities waiting for it."""
        for entry in [e for e in self._fetched if e[0] == key]:
            del self._fetched[entry]
        self._frontiers.pop(key, None)
        self._wake_waiters()

    def check_not_failed(self, content: Content) -> None:
        """Raise if the blob failed verification, here or in another process (which this asks
        the cache about at most every FAILED_CHECK_INTERVAL_S: not on every read)."""
        now = time.monotonic()
        if content.key not in self.failed and now < self._not_failed_until.get(content.key, 0.0):
            return
        state = self.store.blob_state(content.key)
        if state is None or VerifyState.of(state) is not VerifyState.FAILED:
            self._not_failed_until[content.key] = now + FAILED_CHECK_INTERVAL_S
        else:
            self._not_failed_until.pop(content.key, None)
            raise IntegrityError(
                f"layer {content.blob_digest} failed verification earlier and is not served: "
                f"{state.failure}"
            )

    def still_failed(self, key: str) -> bool:
        state = self.store.blob_state(key)
        if VerifyState.of(state) is VerifyState.FAILED:
            return True
        self.failed.discard(key)  # the failure was cleared (kitfs cache clear)
        return False

    async def maybe_verify(self, content: Content, reaches_file_end: bool) -> None:
        state = VerifyState.of(self.store.blob_state(content.key))
        if state is VerifyState.VERIFIED:
            self.verified.add(content.key)
        if state is not VerifyState.NOT_YET:
            return
        chunk = self._chunk_size(content)
        total = chunk_count(content.blob_size, chunk)
        if self.store.cached_chunk_count(content.key) >= total:
            await self.ensure_verified(content)
            return
        if not reaches_file_end:
            return
        cached = self.store.cached_chunks(content.key)
        missing_bytes = sum(
            chunk_span(i, content.blob_size, chunk).length
            for i in range(total) if i not in cached
        )
        if missing_bytes <= max(NEARLY_COMPLETE_BYTES, content.blob_size // 4):
            await self.ensure_verified(content)

    async def ensure_verified(self, content: Content) -> None:
        """Fetch all missing chunks, hash in order, compare; single-flight per key."""
        key = content.key
        while True:
            if VerifyState.of(self.store.blob_state(key)) is VerifyState.VERIFIED:
                self.verified.add(key)
                return
            self.check_not_failed(content)
            if not self._verifying.busy(key):
                break
            await self._verifying.join(key)
        async with self._verifying.leader(key):
            total = chunk_count(content.blob_size, self._chunk_size(content))
            missing = sorted(set(range(total)) - self.store.cached_chunks(key))
            limiter = trio.CapacityLimiter(4)

            async def fetch(idx: int) -> None:
                async with limiter:
                    await self._fetch_slice(content, idx, 0, 0)

            with collapse_groups():
                async with trio.open_nursery() as nursery:
                    for idx in missing:
                        nursery.start_soon(fetch, idx)
            await self.advance_frontier(content, fetch_missing=True)
            if key not in self.verified:  # the chunks hashed so far were dropped meanwhile
                self.check_not_failed(content)
                self._frontiers.pop(key, None)
                await self.advance_frontier(content, fetch_missing=True)

    async def advance_frontier(self, content: Content, *, fetch_missing: bool) -> None:
        """Feed the blob's digest with its chunks in order, from where it stopped, and check
        it when the last chunk is in. Without ``fetch_missing`` it stops at the first chunk
        not in memory or the cache (it runs after each fetch: a cold sequential read is
        verified as its last chunk lands); with it, missing chunks are fetched (through the
        single-flight path), which ``ensure_verified`` uses to finish the job."""
        key = content.key
        frontier = self._frontiers.get(key)
        if frontier is None:
            frontier = self._frontiers[key] = _Frontier(content.blob_digest.hasher())
        if frontier.lock.locked() and not fetch_missing:
            return  # another task is advancing it; it will find this chunk too
        async with frontier.lock:
            if self._frontiers.get(key) is not frontier:
                return  # purged or restarted meanwhile
            chunk = self._chunk_size(content)
            total = chunk_count(content.blob_size, chunk)
            while frontier.next < total:
                batch = self._next_in_memory(key, frontier.next, total)
                if not batch:  # the next chunk is not in memory: the cache, or a fetch
                    length = chunk_span(frontier.next, content.blob_size, chunk).length
                    data = self.store.read(key, frontier.next, 0, length)
                    if data is not None:
                        frontier.read_back += 1
                    elif not fetch_missing:
                        return
                    else:
                        data = await self._fetch_slice(content, frontier.next, 0, length)
                    known = self._fetched.pop((key, frontier.next), (None, None))[0]
                    batch = [(data, known)]
                ids = await trio.to_thread.run_sync(_feed, frontier.hasher, batch)
                if self._frontiers.get(key) is not frontier:
                    return  # the blob failed or was purged meanwhile
                for chunk_ids in ids:
                    # a chunk hashed from memory may have been noted meanwhile (its store
                    # finished while the frontier hashed it): nothing is kept for it any more
                    self._fetched.pop((key, frontier.next), None)
                    frontier.per_chunk.append((frontier.next, chunk_ids))
                    frontier.next += 1
                self._wake_waiters()
            del self._frontiers[key]
            actual = frontier.hasher.hexdigest()
            if actual != content.blob_digest.hex:
                self.fail(content, f"content is {content.blob_digest.algorithm}:{actual}, "
                                    f"expected {content.blob_digest}")
            self.store.mark_verified(key, frontier.per_chunk)
            self.verified.add(key)
            self._wake_waiters()
            log.info("layer %s verified (%d bytes; %d of %d chunks hashed from the cache files)",
                     content.blob_digest, content.blob_size, frontier.read_back, total)

    def _next_in_memory(self, key: str, first: int,
                        total: int) -> list[tuple[bytes | ChunkBuffer, bytes | None]]:
        """Chunks ``first``, ``first + 1``, … of ``key`` while they are in memory (kept for
        the frontier, or held by the reader), at most ``FEED_BATCH_CHUNKS``, each with the
        piece identities its fetch computed: hashed in one hand-off to a worker thread."""
        batch: list[tuple[bytes | ChunkBuffer, bytes | None]] = []
        for idx in range(first, min(first + FEED_BATCH_CHUNKS, total)):
            known, data = self._fetched.get((key, idx), (None, None))
            if data is None:
                data = self._in_memory(key, idx)
            if data is None:
                break
            self._fetched.pop((key, idx), None)
            batch.append((data, known))
        return batch

    def _wake_waiters(self) -> None:
        self._advanced.set()
        self._advanced = trio.Event()

    def behind(self, key: str, idx: int, at_least: int, below: float,
               on_its_way: Callable[[int], bool]) -> bool:
        """Whether the blob's digest is ``at_least`` or more (and fewer than ``below``) chunks
        behind chunk ``idx``, and on its way: the chunk it needs next is kept here or
        ``on_its_way`` (in memory, in flight, or cached: it will read it back). A digest
        waiting for a chunk nobody fetches (a reader that skipped it) holds nothing back."""
        at = self.frontier_at(key)
        return (at is not None and at_least <= idx - at < below
                and (self.holds(key, at) or on_its_way(at)))

    async def wait_until_near(self, key: str, idx: int, on_its_way: Callable[[int], bool],
                              kick: Callable[[], None], timeout_s: float) -> None:
        """Flow control for a fetch of chunk ``idx``: while the blob's digest is between
        ``KEPT_FOR_FRONTIER`` and twice that many chunks behind it, and on its way
        (``behind``), wait for it to come nearer, at most ``timeout_s``. A chunk fetched
        further ahead than the frontier keeps bytes for would be read back from its cache
        file to be hashed (from the disk, on the trio thread); a fetch far ahead of the
        frontier is not its stream's and does not wait. ``kick`` starts the frontier when
        nothing else will (no fetch is landing)."""
        with trio.move_on_after(timeout_s):
            while self.behind(key, idx, KEPT_FOR_FRONTIER, 2 * KEPT_FOR_FRONTIER, on_its_way):
                advanced = self._advanced
                kick()
                await advanced.wait()
            return
        log.debug("fetch of chunk %d of %s went ahead of its digest after %.1f s", idx, key,
                  timeout_s)

    def fail(self, content: Content, reason: str) -> NoReturn:
        """Record that ``content`` failed its digest (logged; purged; in the cache) and raise."""
        log.error("layer %s failed verification: %s; purged from the cache",
                  content.blob_digest, reason)
        self._forget_memory(content.key)
        self.forget(content.key)
        self.failed.add(content.key)
        self.store.mark_failed(content.key, reason)
        raise IntegrityError(f"layer {content.blob_digest} failed verification: {reason}")


def _feed(hasher: Any, batch: list[tuple[bytes | ChunkBuffer, bytes | None]]) -> list[bytes]:
    """Add consecutive chunks to the blob's running digest; return each one's piece
    identities (kept, so a chunk fetched again later is checked on its own), computed unless
    the fetch already did. Runs in a worker thread: hashlib and blake3 release the GIL for
    large buffers."""
    ids = []
    for data, known_ids in batch:
        hasher.update(data)
        ids.append(known_ids or piece_ids(data))
    return ids

