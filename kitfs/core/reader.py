"""BlobReader: byte ranges of layer content, through the cache, fetched lazily, verified.

The only place where the registry client and the chunk cache meet.

Content
    A ``Content`` is a stream of bytes kitfs can read at any offset: either a blob exactly as
    the registry stores it (uncompressed tar and raw layers), or the decompressed stream of a
    gzip/zstd layer. Both are cut into fixed-size chunks (``chunk_size_bytes``) stored under a
    content key (the blob digest; for decompressed streams "gunzip:" or "unzstd:" and the
    digest of the compressed blob, never the diffId a config claims).

Tasks and shared state (all on the one trio thread; no locks)
    ``_inflight`` (``kitfs.core.flight.Flights``) holds the chunks being fetched. A reader
    that finds a chunk missing either becomes its fetcher (leads the flight: fetches, stores,
    and the flight ends however the fetch ends) or joins the flight and then looks in the cache
    again: so concurrent readers never fetch the same bytes twice (single-flight). A fetched
    chunk answers its read at once; its hashing, its cache file and the digest frontier follow
    in a background task (``_store_fetched``), the chunk held in memory meanwhile. A
    decompression job per compressed layer streams the layer once and wakes readers as chunks
    appear (``kitfs.core.compressed``, which the reader delegates compressed content to).
    No ``await`` sits between a cache lookup and the decision it feeds, except where the code
    re-checks after it.

Verification (see the README's "Verification" section, which tests quote)
    ``off``      never check a blob digest (benchmarks only).
    ``eventual`` bytes are served as they arrive; a blob whose chunks are all cached is
                 hashed in order and checked against its digest; a read that reaches the end
                 of a file whose layer is then fully cached, or nearly so (at most
                 ``NEARLY_COMPLETE_BYTES`` or a quarter of the blob missing), first fetches
                 the rest and checks the digest, so a full read of a tampered file fails.
    ``strict``   a blob is fetched whole and checked before its first byte is returned.
    (``kitfs.core.verify`` owns the frontier and these decisions.)
    A mismatch purges the blob's chunks, records the failure in the cache (every later read of
    it fails with ``IntegrityError``, EIO under FUSE) and is logged. Once a blob is verified,
    the BLAKE3 of each 128 KiB piece of each chunk is kept (``kitfs.cache.identity``), so a
    chunk or piece evicted and fetched again is checked on its own before it is served. Each
    byte fetched is hashed once with SHA-256 (the blob digest, in order) and once with BLAKE3.

Fetch sizes
    A read that belongs to a sequential stream (or is large, or builds an index) fetches whole
    chunks, with read-ahead as the stream grows (``kitfs.core.readahead``). A lone read
    elsewhere (random access) fetches only the 128 KiB pieces it touches, kept as a partial
    chunk; concurrent readers of the same pieces share one fetch (``_pieces_inflight``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from kitfs.cache.identity import PIECE_SIZE_BYTES, ids_of_pieces, piece_ids
from kitfs.cache.store import ChunkStore, PreparedChunk
from kitfs.core.compressed import DecompressedStreams
from kitfs.core.content import ChunkBuffer, Content, VerifyMode
from kitfs.core.flight import BackgroundTasks, Flights, collapse_groups
from kitfs.core.memory import BufferPool, ChunkMemory
from kitfs.core.readahead import MAX_PREFETCH_CHUNKS, ReadAhead
from kitfs.core.verify import Verifier
from kitfs.errors import IntegrityError, KitfsError
from kitfs.format.mediatypes import Compression
from kitfs.format.ranges import chunk_span, chunks_covering

__all__ = ["DEFAULT_CHUNK_SIZE_BYTES", "BlobReader", "Content", "ReaderStatistics", "VerifyMode",
           "collapse_groups"]

log = logging.getLogger(__name__)

# 4 MiB chunks: a registry round trip costs about as much for 1 MiB as for 4 KiB on loopback
# (5-7 ms), so small chunks waste round trips; 4 MiB keeps a 4 KiB read's cost under the
# 8 MiB budget while large reads stay near wire speed. See benchmarks/README.md.
DEFAULT_CHUNK_SIZE_BYTES = 4 * 1024 * 1024
# A fetch too far ahead of its blob's digest waits this long at most for the digest to catch
# up (Verifier.wait_until_near): flow control, not a condition of the read.
FRONTIER_WAIT_S = 1.0
@dataclass
class ReaderStatistics:
    """Chunk accesses answered from the cache (hits) and by a registry fetch (misses, whether
    this access fetched the chunk or waited for another access's fetch)."""

    chunk_hits: int = 0
    chunk_misses: int = 0

    @property
    def hit_ratio(self) -> float | None:
        total = self.chunk_hits + self.chunk_misses
        return self.chunk_hits / total if total else None


class BlobReader:
    """Reads content ranges. One per process; needs a nursery for decompression jobs."""

    def __init__(
        self,
        store: ChunkStore,
        nursery: trio.Nursery,
        verify: VerifyMode = VerifyMode.EVENTUAL,
        chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES,
        read_ahead_chunks: int = MAX_PREFETCH_CHUNKS,
    ) -> None:
        self.store = store
        self.verify = verify
        self.chunk_size_bytes = chunk_size_bytes
        self._nursery = nursery
        self._inflight: Flights[tuple[str, int]] = Flights()  # chunks being fetched
        # pieces being fetched for lone reads: (key, chunk index, piece index) -> done
        self._pieces_inflight: Flights[tuple[str, int, int]] = Flights()
        self.stats = ReaderStatistics()
        self._chunk_sizes: dict[str, int] = {}  # per content key, as recorded in the cache
        # chunks just fetched, read, or on their way to the cache, and the buffers they are
        # received into (kitfs.core.memory)
        self._memory = ChunkMemory()
        self._buffers = BufferPool(chunk_size_bytes)
        self._seen: set[str] = set()  # keys read at least once by this reader
        self._stores = BackgroundTasks()  # chunks being stored behind the reads they served
        self._verifier = Verifier(
            store, chunk_size=self._chunk_size, fetch_slice=self._chunk_slice,
            in_memory=self._memory.whole, forget_memory=self._memory.forget)
        self._ahead = ReadAhead(store, nursery, self._memory, self._inflight, self._verifier,
                                chunk_size=self._chunk_size, fetch_chunks=self._fetch_chunks,
                                window_chunks=read_ahead_chunks)
        self._decompressed = DecompressedStreams(
            store, nursery, chunk_size_bytes=chunk_size_bytes, register=self._register,
            chunk_size=self._chunk_size, lookup=self._from_memory_or_cache,
            remember=self._memory.remember, recent=self._memory.recent, fail=self._verifier.fail)

    # --- public -------------------------------------------------------------------------------

    async def size(self, content: Content) -> int:
        """The content's size; for a compressed layer this decompresses it (once, cached)."""
        if content.compression is Compression.NONE:
            return content.blob_size
        return await self._decompressed.size(content)

    async def read(self, content: Content, offset: int, length: int, *,
                   file_end: int | None = None, file_start: int = 0,
                   read_ahead: bool = True) -> bytes | memoryview:
        """Bytes ``[offset, offset+length)`` of ``content`` (short at the end of the content);
        a range within one chunk held in memory comes as a view of it, without a copy.

        Args:
            file_end: where the file being read ends in the content; a read that reaches it
                may trigger completion and verification (eventual mode).
            file_start: where that file starts (used to judge "nearly complete").
            read_ahead: whether this read may start or continue a sequential stream (index
                building says no: it jumps from header to header and reads its own windows).

        Raises:
            IntegrityError: the content failed verification, now or before.
            RemoteError, RemoteTimeoutError, AuthError: the registry failed.
        """
        if content.key not in self._verifier.verified:
            self._verifier.check_not_failed(content)
        if content.compression is not Compression.NONE:
            chunk = self._chunk_size(content)
            if self.verify is VerifyMode.STRICT:
                await self.size(content)
                self._verifier.check_not_failed(content)
            return await self._decompressed.read(content, chunk, offset, length)
        size = content.blob_size
        chunk = self._chunk_size(content)
        if self.verify is VerifyMode.STRICT and content.key not in self._verifier.verified:
            await self._verifier.ensure_verified(content)
        spans = chunks_covering(offset, length, size, chunk)
        # Index building (no read_ahead) and large reads fetch whole chunks; so do reads of a
        # sequential stream. A lone read elsewhere fetches just the pieces it touches.
        whole = not read_ahead or length >= chunk // 2
        if spans and read_ahead:
            end = min(size, file_end) if file_end is not None else size
            whole = self._ahead.on_read(content, offset, length, spans[-1].index, end) or whole
        misses_before = self.stats.chunk_misses
        pieces = await self._get_chunks(content, [s.index for s in spans], offset, length, whole)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if self.verify is VerifyMode.EVENTUAL and content.key not in self._verifier.verified:
            reaches_end = file_end is not None and offset + length >= file_end
            # The completeness check costs a query: make it when it can have changed (this read
            # fetched, or reaches a file's end) and on the first read of the content here.
            first_read = content.key not in self._seen
            self._seen.add(content.key)
            if reaches_end or first_read or self.stats.chunk_misses != misses_before:
                await self._verifier.maybe_verify(content, reaches_end)
        return data

    def prefetch(self, content: Content, offset: int, length: int) -> None:
        """Start fetching the chunks of ``[offset, offset+length)`` in the background (index
        building asks for its next window while it parses the current one)."""
        self._ahead.prefetch(content, offset, length)

    async def settle(self) -> None:
        """Wait until every chunk fetched so far is hashed, stored and fed to its digest
        frontier (``_store_fetched``); the session does this before it closes."""
        await self._stores.settle()

    async def verify_now(self, content: Content) -> None:
        """Fetch whatever is missing of ``content`` and check its digest (``cache verify``)."""
        if content.compression is Compression.NONE:
            self._register(content)
            await self._verifier.ensure_verified(content)
        else:
            await self.size(content)
            self._verifier.check_not_failed(content)

    # --- uncompressed content -------------------------------------------------------------

    def _register(self, content: Content) -> int:
        """Make sure the cache knows ``content``; returns its chunk size there: the size the
        content was first cached with wins, whatever this reader's ``chunk_size_bytes``."""
        size = content.blob_size if content.compression is Compression.NONE else -1
        state = self.store.register_blob(content.key, size, self.chunk_size_bytes)
        self._chunk_sizes[content.key] = state.chunk_size
        return state.chunk_size

    def _chunk_size(self, content: Content) -> int:
        known = self._chunk_sizes.get(content.key)
        return known if known is not None else self._register(content)

    async def _get_chunks(self, content: Content, indexes: list[int], offset: int,
                          length: int, whole: bool = True) -> list[bytes | memoryview]:
        """The bytes of ``[offset, offset+length)`` that fall in each chunk of ``indexes``
        (missing chunks fetched whole, or only the pieces the range touches)."""
        results: list[bytes | memoryview] = [b""] * len(indexes)
        chunk = self._chunk_size(content)

        async def one(position: int, idx: int) -> None:
            span = chunk_span(idx, content.blob_size, chunk)
            start = max(offset, span.start) - span.start
            end = min(offset + length, span.end) - span.start
            results[position] = await self._chunk_slice(content, idx, start, end - start, whole)

        if len(indexes) == 1:
            await one(0, indexes[0])
        else:
            with collapse_groups():
                async with trio.open_nursery() as nursery:
                    for position, idx in enumerate(indexes):
                        nursery.start_soon(one, position, idx)
        return results

    async def _chunk_slice(self, content: Content, idx: int, start: int, length: int,
                           whole: bool = True) -> bytes | memoryview:
        """Bytes ``[start, start+length)`` of chunk ``idx``: from memory or the cache, else
        fetched (single-flight) whole, or, unless ``whole``, just the pieces they touch."""
        key = content.key
        self.store.pin(key, idx)
        try:
            data: bytes | memoryview | None = self._memory.view(key, idx, start, length)
            if data is None and (key, idx) not in self._inflight:  # in flight: not cached yet
                data = self.store.read(key, idx, start, length)
            if data is not None:
                self.stats.chunk_hits += 1
                return data
            self.stats.chunk_misses += 1
            if not whole and length:  # pieces that would make up the whole chunk: fetch it
                span_length = chunk_span(idx, content.blob_size, self._chunk_size(content)).length
                last_piece_end = ((start + length - 1) // PIECE_SIZE_BYTES + 1) * PIECE_SIZE_BYTES
                whole = start < PIECE_SIZE_BYTES and last_piece_end >= span_length
            while True:
                busy = (key, idx) in self._inflight
                if not busy and not whole and length:
                    data = await self._fetch_pieces(content, idx, start, length)
                    if data is not None:
                        return data
                    continue  # waited for another reader's pieces, which did not come
                if not busy:
                    buffer = await self._fetch_chunk(content, idx)
                    return memoryview(buffer)[start : start + length]
                await self._inflight.join((key, idx))
                data = self._from_memory_or_cache(key, idx, start, length)
                if data is not None:
                    return data
                if (key, idx) not in self._inflight:
                    # the fetcher failed or the disk is full: fetch ourselves
                    buffer = await self._fetch_chunk(content, idx)
                    return memoryview(buffer)[start : start + length]
        finally:
            self.store.unpin(key, idx)

    async def _fetch_pieces(self, content: Content, idx: int, start: int,
                            length: int) -> bytes | memoryview | None:
        """Fetch the pieces of chunk ``idx`` that ``[start, start+length)`` touches, in one
        range, check them against the verified blob's piece identities if it has them, keep
        them as a partial chunk, and return the bytes asked for. When some of those pieces
        are already being fetched, wait for that instead and return what the cache then has
        (None if it has not: the caller tries again)."""
        key = content.key
        first, last = start // PIECE_SIZE_BYTES, (start + length - 1) // PIECE_SIZE_BYTES
        present = self.store.pieces_present(key, idx)  # fetch none of those again
        while first < last and present >> first & 1:
            first += 1
        while last > first and present >> last & 1:
            last -= 1
        wanted = [(key, idx, piece) for piece in range(first, last + 1)]
        busy = [entry for entry in wanted if entry in self._pieces_inflight]
        if busy:
            for entry in busy:
                await self._pieces_inflight.join(entry)
            return self._from_memory_or_cache(key, idx, start, length)
        with self._pieces_inflight.leading(wanted):
            span = chunk_span(idx, content.blob_size, self._chunk_size(content))
            at = first * PIECE_SIZE_BYTES
            buffer = bytearray(min((last + 1) * PIECE_SIZE_BYTES, span.length) - at)
            await content.registry.fetch_range(content.repository, content.blob_digest,
                                               content.blob_size, span.start + at,
                                               memoryview(buffer))
            expected = self.store.chunk_ids(key, idx) if self.verify is not VerifyMode.OFF else None
            if expected is not None and piece_ids(buffer) != ids_of_pieces(expected, first,
                                                                           last - first + 1):
                reason = (f"pieces {first}-{last} of chunk {idx} from the registry differ from "
                          "the verified blob's (BLAKE3)")
                log.error("layer %s: %s", content.blob_digest, reason)
                raise IntegrityError(f"layer {content.blob_digest}: {reason}")
            try:
                self.store.put_pieces(key, idx, span.length, at, buffer)
            except KitfsError as exc:  # served uncached; a later read fetches them again
                log.warning("layer %s: pieces of chunk %d not cached: %s", content.blob_digest,
                            idx, exc)
            if at <= start and start + length <= at + len(buffer):
                return memoryview(buffer)[start - at : start - at + length].tobytes()
            # the rest was cached already (or another reader's, now done): all from the cache
            return self._from_memory_or_cache(key, idx, start, length)

    def _from_memory_or_cache(self, key: str, idx: int, start: int,
                              length: int) -> bytes | memoryview | None:
        data = self._memory.view(key, idx, start, length)
        return data if data is not None else self.store.read(key, idx, start, length)

    async def _fetch_chunk(self, content: Content, idx: int) -> ChunkBuffer:
        return (await self._fetch_chunks(content, idx, 1))[0]

    async def _fetch_chunks(self, content: Content, first: int, count: int) -> list[ChunkBuffer]:
        """Fetch chunks ``first`` .. ``first + count - 1`` in one range (none of them may be in
        flight) and hand each to ``_accept``."""
        key = content.key
        chunk = self._chunk_size(content)
        spans = [chunk_span(i, content.blob_size, chunk) for i in range(first, first + count)]
        with self._inflight.leading([(key, span.index) for span in spans]):
            if self.verify is not VerifyMode.OFF and key not in self._verifier.verified:
                await self._verifier.wait_until_near(
                    key, spans[-1].index, lambda at: self._ahead.on_its_way(key, at),
                    lambda: self._nursery.start_soon(self._advance_frontier, content),
                    FRONTIER_WAIT_S)
            # a buffer per chunk (a chunk kept in memory keeps no other alive), page-aligned so
            # that the cache writes it with O_DIRECT (no copy); one range fills them in turn
            buffers = tuple(self._buffers.take(span.length) for span in spans)
            await content.registry.fetch_range(content.repository, content.blob_digest,
                                               content.blob_size, spans[0].start, buffers)
            return [await self._accept(content, span.index, buffer)
                    for span, buffer in zip(spans, buffers, strict=True)]

    async def _accept(self, content: Content, idx: int, buffer: ChunkBuffer) -> ChunkBuffer:
        """A chunk just fetched: served at once and stored behind the reads, or, for a
        verified blob, checked against its piece identities first."""
        key = content.key
        hashing = self.verify is not VerifyMode.OFF
        expected = self.store.chunk_ids(key, idx) if hashing else None
        if expected is None:
            # Nothing to check the chunk against before serving it (eventual mode serves
            # bytes as they arrive): answer now, hash and store it behind the read.
            self._memory.begin_storing(key, idx, buffer)
            self._stores.start_soon(self._nursery, self._store_fetched, content, idx, buffer,
                                    hashing, name=f"store chunk {idx}")
            return buffer
        # A chunk of a verified blob, fetched again: checked before a byte of it is served.
        prepared, actual = await trio.to_thread.run_sync(_prepare, self.store, buffer, True)
        if actual != expected:
            self.store.discard(prepared)
            reason = (f"chunk {idx} from the registry differs from the verified blob's "
                      "(BLAKE3 of its pieces)")
            log.error("layer %s: %s", content.blob_digest, reason)
            raise IntegrityError(f"layer {content.blob_digest}: {reason}")
        self._memory.remember(key, idx, buffer)
        self.store.commit(key, idx, prepared)
        return buffer

    async def _store_fetched(self, content: Content, idx: int, buffer: ChunkBuffer,
                             hashing: bool) -> None:
        """A fetched chunk's slow half, after the read it served: its piece identities
        (BLAKE3), its xxh3 sums and its file (in a worker thread, so the trio thread goes on
        serving reads), its row in the cache, then the blob's digest frontier. Until it is
        stored, memory answers for it."""
        key = content.key
        try:
            prepared, actual = await trio.to_thread.run_sync(_prepare, self.store, buffer, hashing)
            if actual is not None:  # for the frontier: no second hash
                self._verifier.note_fetched(key, idx, actual, buffer)
            self._memory.remember(key, idx, buffer)
            if key in self._verifier.failed and self._verifier.still_failed(key):
                # the blob failed verification while this chunk was on its way: keep nothing
                self.store.discard(prepared)
                self._memory.forget(key)
                self._verifier.forget(key)
                return
            self.store.commit(key, idx, prepared)
        except KitfsError as exc:  # the chunk stays uncached; a later read fetches it again
            log.warning("layer %s: chunk %d not cached: %s", content.blob_digest, idx, exc)
            return
        except Exception:  # a bug: never let it end the session's nursery (and the mount)
            log.exception("layer %s: storing chunk %d failed unexpectedly", content.blob_digest, idx)
            return
        finally:
            self._memory.end_storing(key, idx, buffer)
        if hashing and key not in self._verifier.verified:
            await self._advance_frontier(content)

    async def _advance_frontier(self, content: Content) -> None:
        """Hash what has arrived of the blob, in order (a failed digest is logged by the
        verifier and reported by every later read; it never ends the session's nursery)."""
        try:
            await self._verifier.advance_frontier(content, fetch_missing=False)
        except IntegrityError:
            pass
        except KitfsError as exc:
            log.warning("layer %s: digest frontier stopped: %s", content.blob_digest, exc)


def _prepare(store: ChunkStore, data: ChunkBuffer,
             hashing: bool) -> tuple[PreparedChunk, bytes | None]:
    """A fetched chunk's piece identities (when verifying) and its cache file (worker thread)."""
    ids = piece_ids(data) if hashing else None
    return store.prepare(data), ids
