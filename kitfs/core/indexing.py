"""Layer indexes: a tar layer's members, from the cache's stored index or by scanning its
headers, and the index stored behind the lookup it answered.

Owns ``LayerIndexer`` (one per ``KitSession``): the header scan reads a layer chunk by chunk
through the ``BlobReader`` (whole chunks, no read-ahead of its own kind) and, while headers
sit close together, has the next chunks fetched in runs ahead of it; it hands members to its
caller in batches as they are parsed (the tree is built meanwhile), with the cyclic garbage
collector paused for the whole scan (``collector_paused``). The index is packed in a worker
thread and stored after the lookup is answered, never for a blob that failed verification.
Strict mode trusts a stored index only once its blob is verified.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from kitfs.cache.index import MemberColumns, load_members, store_members
from kitfs.cache.store import ChunkStore
from kitfs.core.content import Content, VerifyMode
from kitfs.core.flight import BackgroundTasks
from kitfs.core.reader import BlobReader
from kitfs.core.verify import VerifyState
from kitfs.errors import KitfsError
from kitfs.format.tar import TarMember, TarScanner

log = logging.getLogger("kitfs.core.modelkit")  # the session's log lines, as before the split

# Index building reads headers chunk by chunk; while chunks keep holding several headers it has
# the next ones fetched ahead in parallel, doubling up to this many (see LayerIndexer._scan), in
# runs of half as many chunks per Range request, at most MAX_INDEX_RUN_CHUNKS.
MAX_INDEX_AHEAD_CHUNKS = 8
MAX_INDEX_RUN_CHUNKS = 4
# A layer indexed with at least this many members has its objects frozen out of the cyclic
# garbage collector's sight afterwards (see collector_paused).
FREEZE_AFTER_MEMBERS = 10_000


class LayerIndexer:
    """Tar layers' members for one session; the indexes it is storing."""

    def __init__(self, store: ChunkStore, reader: BlobReader, nursery: trio.Nursery,
                 chunk_size_bytes: int) -> None:
        self._store_db = store.database
        self._blob_state = store.blob_state
        self.reader = reader
        self._nursery = nursery
        self._chunk_size_bytes = chunk_size_bytes
        self._stores = BackgroundTasks()  # layer indexes written behind the lookups they answered

    async def members(self, content: Content, add: Callable[[list[TarMember]], None]) -> None:
        """Hand a tar layer's members to ``add``: from the cache index, or by reading its
        headers.

        ``add`` is given them as they come (in order, in batches, the garbage collector
        paused), so the caller's work on them overlaps the fetching of the rest; an exception
        it raises ends the scan. The index read from the headers is stored in the cache after
        this returns (``_store``), not before.
        """
        key = content.key
        with collector_paused():
            cached = load_members(self._store_db, key)
        # another process may have built it from bytes not verified yet: strict mode trusts
        # only the index of a verified blob (and builds its own from verified bytes)
        if (cached is not None and self.reader.verify is VerifyMode.STRICT
                and VerifyState.of(self._blob_state(key)) is not VerifyState.VERIFIED):
            cached = None
        if cached is not None:
            with collector_paused() as pause:
                add(cached)
                pause.freeze = len(cached) >= FREEZE_AFTER_MEMBERS
            return
        size = await self.reader.size(content)
        with collector_paused() as pause:  # the whole scan, not per batch (collector_paused)
            columns = await self._scan(content, size, add)
            pause.freeze = len(columns) >= FREEZE_AFTER_MEMBERS
        self._stores.start_soon(self._nursery, self._store, key, columns,
                                name=f"store index {key}")

    async def _scan(self, content: Content, size: int,
                    add: Callable[[list[TarMember]], None]) -> MemberColumns:
        """Read a tar layer's headers, chunk by chunk, handing each batch to ``add``; what
        the index keeps of them."""
        scanner = TarScanner(size)
        columns = MemberColumns()
        chunk = self._chunk_size_bytes
        last_chunk = (size - 1) // chunk
        window = 0  # chunks kept fetched ahead of the scan
        ahead = -1  # the last chunk asked for ahead of it
        while (want := scanner.wants()) is not None:
            offset, length = want
            here = offset // chunk
            # Headers sit close together here: keep the chunks after this one fetched in
            # parallel while this one is parsed, topped up a run at a time (one Range request
            # per run: the registry's CPU per request is shared with us). The scan asks from
            # the next header on, so after a big file body (which it jumps over) nothing of
            # the body is fetched.
            run = min(max(1, window // 2), MAX_INDEX_RUN_CHUNKS)
            ahead = max(ahead, here)
            while window and ahead < last_chunk and here + window - ahead >= run:
                first, ahead = ahead + 1, min(ahead + run, last_chunk)
                self.reader.prefetch(content, first * chunk, (ahead - first + 1) * chunk)
            # Read to the end of the chunk holding the header (the reader fetches whole chunks
            # anyway), one chunk at a time: memory stays a few chunks, whatever the layer.
            end = min(max(offset + length, (here + 1) * chunk), size)
            data = await self.reader.read(content, offset, end - offset, read_ahead=False)
            found = scanner.feed(data)
            if found:
                add(found)
                columns.extend(found)
            window = min(max(1, 2 * window), MAX_INDEX_AHEAD_CHUNKS) if len(found) > 1 else 0
        return columns

    async def _store(self, key: str, columns: MemberColumns) -> None:
        """Keep a layer's index in the cache, behind the lookup it answered: packed in a
        worker thread, written unless the blob failed verification meanwhile (its index was
        read from bad bytes; ``store_members`` checks that in the same statement)."""
        try:
            packed = await trio.to_thread.run_sync(columns.pack)
            store_members(self._store_db, key, len(columns), packed)
        except KitfsError as exc:  # the layer is indexed again next time
            log.warning("cache: the index of %s is not kept: %s", key, exc)
        except Exception:  # a bug: never let it end the session's nursery (and the mount)
            log.exception("cache: keeping the index of %s failed unexpectedly", key)

    async def settle(self) -> None:
        """Wait until the indexes being stored are."""
        await self._stores.settle()


@dataclass
class _Pause:
    freeze: bool = False  # set by the owner of a pause: gc.freeze when it ends


@contextmanager
def collector_paused() -> Iterator[_Pause]:
    """No cyclic garbage collection meanwhile: indexing a layer of 100,000 files makes several
    objects per file, none in a cycle, and the collections their allocations start go on
    walking the older generations, which hold everything made so far (half the time of
    building the tree went there). A layer's scan keeps it paused from its first chunk to its
    last, across the waits for chunks: paused per chunk, the collections at the end of each
    still walked everything made so far (a tenth of the trio thread's samples in the first
    find over 100,000 files).

    With ``freeze`` set (a layer of ``FREEZE_AFTER_MEMBERS`` or more), what was made is then
    put out of the collector's sight (``gc.freeze``), or the next collections would walk all
    of it once more, twice: the tree lives as long as the mount, and reference counting still
    frees what dies of it; only a reference cycle made during the pause, anywhere in the
    process, would never be collected. A pause inside another (or inside the embedding
    program's own) leaves both to the outer one."""
    pause = _Pause()
    if not gc.isenabled():  # paused already (an outer pause, or the embedding program's choice)
        yield pause
        return
    gc.disable()
    try:
        yield pause
    finally:
        if pause.freeze:
            gc.freeze()
        gc.enable()
