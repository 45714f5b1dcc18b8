"""Decompressed streams of gzip and zstd layers: the first pass, and chunks made again.

Owns ``DecompressedStreams``: one decompression job per compressed layer (``_Job``), which
streams the layer once, stores its decompressed chunks and checks both digests (the blob's
and the config's diffId), waking the reads that wait for it as chunks appear; the gzip
checkpoint tables kept by a first pass, and the remaking of an evicted gzip chunk from the
checkpoint before it (``remake``), checked against the piece identities the first pass kept;
the compressed spans of the last chunks made again. (indexed_gzip is driven by
``kitfs.core.gunzip``, zstd frames decoded by ``kitfs.core.unzstd``.) The
``BlobReader`` owns one and hands it what it shares: the cache, the session nursery, its
chunk memory (``lookup``, ``remember``, ``recent``), how a content is registered in the cache
and what its chunk size is, and its ``fail`` (which records a digest mismatch and raises).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

import trio
import zstandard

from kitfs.cache.identity import piece_ids
from kitfs.cache.store import ChunkStore, PreparedChunk
from kitfs.core import gunzip, unzstd
from kitfs.core.content import ChunkBuffer, Content
from kitfs.core.flight import Flights, collapse_groups
from kitfs.errors import FormatError, IntegrityError, KitfsError, copy_for_waiter
from kitfs.format import gzindex
from kitfs.format.mediatypes import Compression
from kitfs.format.ranges import chunk_span

log = logging.getLogger("kitfs.core.reader")  # the reader's log lines, as before the split

# Compressed layers are fetched in ranges of this size while decompressing.
STREAM_RANGE_BYTES = 8 * 1024 * 1024
# The compressed spans of the last chunks of gzip layers made again from checkpoints are kept
# (each at most three checkpoint spacings): the next chunk's span starts inside the last one.
KEPT_SPANS = 2


@dataclass
class _Job:
    """A running decompression of one compressed layer."""

    done: trio.Event = field(default_factory=trio.Event)
    progress: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    size: int | None = None
    memory: dict[int, bytes] = field(default_factory=dict)  # chunks the cache could not take
    # Chunk ranges [first, last] that waiting reads still need, and copies of those chunks as
    # the stream passes them: under a tight quota the cache may evict a chunk before its
    # reader runs, which would send the reader back to decompress the whole layer again.
    waiting: list[tuple[int, int]] = field(default_factory=list)
    held: dict[int, bytes] = field(default_factory=dict)



class DecompressedStreams:
    """The decompressed streams of compressed layers, for one ``BlobReader``."""

    def __init__(
        self,
        store: ChunkStore,
        nursery: trio.Nursery,
        *,
        chunk_size_bytes: int,
        register: Callable[[Content], int],
        chunk_size: Callable[[Content], int],
        lookup: Callable[[str, int, int, int], bytes | memoryview | None],
        remember: Callable[[str, int, ChunkBuffer], None],
        recent: OrderedDict[tuple[str, int], ChunkBuffer],
        fail: Callable[[Content, str], NoReturn],
    ) -> None:
        self.store = store
        self._nursery = nursery
        self.chunk_size_bytes = chunk_size_bytes
        self._register = register  # make sure the cache knows a content; its chunk size
        self._chunk_size = chunk_size
        self._from_memory_or_cache = lookup
        self._remember = remember
        self._recent = recent  # the reader's chunks just fetched or made (read only here)
        self._fail = fail
        self._remaking: Flights[tuple[str, int]] = Flights()  # chunks being made again
        self._jobs: dict[str, _Job] = {}
        self._checkpoint_tables: dict[str, gzindex.CheckpointTable] = {}  # by gzip blob digest
        self._spans: OrderedDict[str, tuple[int, bytes]] = OrderedDict()  # see _compressed_span

    async def size(self, content: Content) -> int:
        """The decompressed size: from the cache, or by decompressing the layer (once)."""
        state = self.store.blob_state(content.key)
        if state is not None and state.size >= 0:
            return state.size
        job = self._start_job(content)
        await job.done.wait()
        if job.error is not None:
            raise copy_for_waiter(job.error)
        assert job.size is not None
        return job.size

    async def read(self, content: Content, chunk: int, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset+length)`` of the decompressed stream (``chunk``: its chunk
        size in the cache): from memory or the cache, made again from a checkpoint, or from
        the layer's decompression job (started if none runs)."""
        key = content.key
        out = []
        position = offset
        end = offset + length
        registered: list[tuple[_Job, tuple[int, int]]] = []  # this read's entries in waiting
        try:
            while position < end:
                idx, start = divmod(position, chunk)
                want = min(end - position, chunk - start)
                data = self._from_memory_or_cache(key, idx, start, want)
                job = self._jobs.get(key)
                if data is None and job is not None:
                    kept = job.memory.get(idx, job.held.get(idx))
                    if kept is not None:
                        data = kept[start : start + want]
                if data is None and content.compression is Compression.GZIP and (
                        job is None or job.done.is_set()):
                    whole = await self._remake(content, idx)
                    if whole is not None:
                        data = bytes(memoryview(whole)[start : start + want])
                if data is None:
                    state = self.store.blob_state(key)
                    if state is not None and state.size >= 0 and position >= state.size:
                        break  # past the end of the content
                    job = self._start_job(content)
                    if job.done.is_set():
                        if job.error is not None:
                            raise copy_for_waiter(job.error)
                        if job.size is not None and position >= job.size:
                            break
                        self._jobs.pop(key, None)  # cached chunk vanished: decompress again
                        continue
                    if all(j is not job for j, _ in registered):
                        needed = (idx, (end - 1) // chunk)
                        job.waiting.append(needed)
                        registered.append((job, needed))
                    await job.progress.wait()  # woken each time the job stores a chunk
                    if job.done.is_set() and job.error is not None:
                        # the job this read waited for failed: report it (the next read tries
                        # again), rather than start another job at once, and another...
                        raise copy_for_waiter(job.error)
                    continue
                out.append(data)
                position += len(data)
                if len(data) < want:
                    break
        finally:
            for job, needed in registered:
                job.waiting.remove(needed)
                for i in [i for i in job.held if not _needed(job, i)]:
                    del job.held[i]
        return b"".join(out)

    def _start_job(self, content: Content) -> _Job:
        job = self._jobs.get(content.key)
        if job is None or (job.done.is_set() and job.error is not None):
            job = _Job()
            self._jobs[content.key] = job
            first_pass = self._gunzip if content.compression is Compression.GZIP else self._unzstd
            self._nursery.start_soon(first_pass, content, job,
                                     name=f"decompress {content.blob_digest}")
        return job

    async def _gunzip(self, content: Content, job: _Job) -> None:
        """The first pass over a gzip layer (``kitfs.core.gunzip``): indexed_gzip decompresses
        it once in a worker thread while the compressed ranges are fetched here, one ahead; a
        second worker thread hashes and writes each chunk as it is made; then the blob digest
        and the diffId are checked, and each chunk's sha256 and the checkpoints are kept, so
        that a chunk evicted later is made again from the checkpoint before it (``_remake``)."""
        key = content.key
        try:
            chunk = self._register(content)
            diff_hasher = hashlib.sha256()
            chunk_ids: list[tuple[int, bytes]] = []
            send, receive = trio.open_memory_channel[bytearray | KitfsError](1)
            pipe = gunzip.ChunkPipe()

            def next_piece() -> bytes | bytearray:  # decompressing thread
                try:
                    item = trio.from_thread.run(receive.receive)
                except trio.EndOfChannel:
                    return b""
                if isinstance(item, KitfsError):
                    raise item
                return item

            def fetch(offset: int, length: int) -> bytes:  # decompressing thread
                return trio.from_thread.run(self._fetch_bytes, content, offset, length)

            def decompress() -> gunzip.PassResult:  # decompressing thread
                try:
                    return gunzip.first_pass(blob, chunk, pipe.put)
                finally:
                    pipe.close()

            def store(idx: int, data: bytes) -> None:  # hashing and writing thread
                diff_hasher.update(data)
                chunk_ids.append((idx, piece_ids(data)))
                prepared = self.store.prepare(data)
                trio.from_thread.run_sync(self._store_made, key, idx, data, prepared, job)

            blob = gunzip.SequentialBlob(content.blob_size, next_piece, fetch,
                                         content.blob_digest.hasher())
            try:
                with collapse_groups():
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._fetch_in_order, content, send)
                        nursery.start_soon(trio.to_thread.run_sync, pipe.drain, store)
                        result = await trio.to_thread.run_sync(decompress)
            except FormatError:
                if (blob.arrived == content.blob_size
                        and blob.hasher.hexdigest() != content.blob_digest.hex):
                    # not the layer's bytes at all (the layer itself may be fine)
                    self._fail(content, f"compressed content is {blob.hasher.hexdigest()}")
                raise
            if blob.hasher.hexdigest() != content.blob_digest.hex:
                self._fail(content, f"compressed content is {blob.hasher.hexdigest()}")
            if content.diff_id is not None and diff_hasher.hexdigest() != content.diff_id.hex:
                self._fail(content, f"decompressed content is sha256:{diff_hasher.hexdigest()}, "
                                    f"the config's diffId is {content.diff_id}")
            self.store.mark_verified(key, chunk_ids)
            self.store.mark_stream_verified(key, result.size_bytes)
            job.size = result.size_bytes
            self._keep_checkpoints(content, result)
        except KitfsError as exc:
            job.error = exc
        finally:
            job.done.set()
            job.progress.set()

    async def _fetch_in_order(self, content: Content,
                              send: trio.MemorySendChannel[bytearray | KitfsError]) -> None:
        """Fetch a compressed blob in ``STREAM_RANGE_BYTES`` ranges, in order, into ``send``;
        a registry failure goes down the channel too, for the reading side to raise."""
        async with send:
            try:
                for position in range(0, content.blob_size, STREAM_RANGE_BYTES):
                    piece = bytearray(min(STREAM_RANGE_BYTES, content.blob_size - position))
                    await content.registry.fetch_range(content.repository, content.blob_digest,
                                                       content.blob_size, position,
                                                       memoryview(piece))
                    await send.send(piece)
            except KitfsError as exc:
                await send.send(exc)

    async def _fetch_bytes(self, content: Content, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        await content.registry.fetch_range(content.repository, content.blob_digest,
                                           content.blob_size, offset, memoryview(buffer))
        return bytes(buffer)

    def _store_made(self, key: str, idx: int, data: bytes, prepared: PreparedChunk,
                    job: _Job) -> None:
        """Record a chunk the first pass made (its file already written) and wake the
        readers waiting for the job."""
        if _needed(job, idx):
            job.held[idx] = data
        if self.store.has_chunk(key, idx):
            self.store.discard(prepared)
        elif not self.store.commit(key, idx, prepared):
            _keep_uncached(job, idx, data, self.chunk_size_bytes)
        job.progress.set()
        job.progress = trio.Event()

    def _keep_checkpoints(self, content: Content, result: gunzip.PassResult) -> None:
        blob = str(content.blob_digest)
        table = gzindex.parse_table(result.index)
        if self.store.put_checkpoints(blob, content.key, result.index):
            self._checkpoint_tables[blob] = table
        log.info("layer %s decompressed and verified (%d bytes); %d checkpoints kept (%d bytes)",
                 content.blob_digest, result.size_bytes, len(table.points), len(result.index))

    async def _remake(self, content: Content, idx: int) -> ChunkBuffer | None:
        """Chunk ``idx`` of a verified gzip layer, made again from the checkpoint before it:
        only the compressed bytes between the checkpoints around the chunk are fetched, and
        the chunk is checked against the piece identities the first pass kept. Concurrent
        calls for one chunk share one fetch. None when there is no usable checkpoint index (or the layer
        was never verified): the caller then decompresses the layer from the start, which
        makes a new index.

        Raises:
            IntegrityError: the chunk made differs from the verified one (logged).
            RemoteError, RemoteTimeoutError, AuthError: the registry failed.
        """
        key = content.key
        while self._remaking.busy((key, idx)):
            await self._remaking.join((key, idx))
            kept = self._recent.get((key, idx))
            if kept is None:
                cached = self.store.read(key, idx, 0, self._chunk_size(content))
                kept = bytearray(cached) if cached is not None else None
            if kept is not None:
                return kept
        plan = self._remake_plan(content, idx)
        if plan is None:
            return None
        async with self._remaking.leader((key, idx)):
            compressed = await self._compressed_span(content, plan.first_byte, plan.end_byte)

            def fetch(offset: int, length: int) -> bytes:  # worker thread
                return trio.from_thread.run(self._fetch_bytes, content, offset, length)

            span = gunzip.SpanBlob(content.blob_size, plan.first_byte, compressed, fetch)
            try:
                made, prepared = await trio.to_thread.run_sync(
                    _remake_in_thread, self.store, span, plan)
            except FormatError as exc:
                self._drop_checkpoints(content, f"decompressing chunk {idx} from it failed: {exc}")
                return None
            if prepared is None:
                reason = (f"chunk {idx} made again from a checkpoint differs from the verified "
                          "layer's (BLAKE3 of its pieces)")
                log.error("layer %s: %s", content.blob_digest, reason)
                raise IntegrityError(f"layer {content.blob_digest}: {reason}")
            data = bytearray(made)
            self._remember(key, idx, data)
            self.store.commit(key, idx, prepared)
            log.debug("layer %s: chunk %d made again from a checkpoint (%d compressed bytes)",
                      content.blob_digest, idx, len(compressed) + span.extra_bytes)
            return data

    async def _compressed_span(self, content: Content, start: int, end: int) -> bytes:
        """Compressed bytes ``[start, end)`` of a gzip blob. The spans of the last few chunks
        made again are kept, and the part of a span they hold comes from memory: consecutive
        chunks' spans overlap by up to a checkpoint spacing, so a sequential read through an
        evicted layer fetches each compressed byte about once."""
        blob = str(content.blob_digest)
        head: bytes = b""
        kept = self._spans.get(blob)
        if kept is not None and kept[0] <= start < kept[0] + len(kept[1]):
            head = kept[1][start - kept[0] : end - kept[0]]
        fetch_from = start + len(head)
        data = head
        if fetch_from < end:
            data += await self._fetch_bytes(content, fetch_from, end - fetch_from)
        self._spans[blob] = (start, data)
        self._spans.move_to_end(blob)
        while len(self._spans) > KEPT_SPANS:
            self._spans.popitem(last=False)
        return data

    def _remake_plan(self, content: Content, idx: int) -> _RemakePlan | None:
        """What ``_remake`` needs for chunk ``idx``, or None if it cannot make it."""
        state = self.store.blob_state(content.key)
        if state is None or state.verified != 1 or state.size < 0:
            return None
        span = chunk_span(idx, state.size, state.chunk_size)
        expected = self.store.chunk_ids(content.key, idx)
        if span.length <= 0 or expected is None:
            return None
        table = self._checkpoint_table(content, state.size)
        if table is None:
            return None
        blob = str(content.blob_digest)
        try:
            before, after = table.around(span.start, span.end)
            window = None
            if before.window_at is not None:
                window = self.store.read_checkpoints(blob, before.window_at,
                                                     table.header.window_size)
                if window is None:  # damaged: the store dropped it, and said so
                    self._checkpoint_tables.pop(blob, None)
                    return None
            # the checkpoint after the chunk only bounds the seek; decompression never starts
            # there, so it goes without its window
            index = gzindex.subset(table, [(before, window)] + ([(after, None)] if after else []))
        except FormatError as exc:
            self._drop_checkpoints(content, str(exc))
            return None
        # indexed_gzip reads from the stream's very start (its gzip header) for offset 0
        first_byte = 0 if span.start == 0 else before.first_byte
        end_byte = after.compressed_offset if after is not None else content.blob_size
        end_byte = min(max(end_byte, first_byte + 1), content.blob_size)
        return _RemakePlan(span.start, span.length, expected, first_byte, end_byte,
                           table.header.spacing, index)

    def _checkpoint_table(self, content: Content, size: int) -> gzindex.CheckpointTable | None:
        """The checkpoints of a gzip layer (read from the cache once, then kept), or None when
        there are none or they are damaged (the cache drops those, with a log line)."""
        blob = str(content.blob_digest)
        table = self._checkpoint_tables.get(blob)
        if table is not None and self.store.has_checkpoints(blob):
            return table
        self._checkpoint_tables.pop(blob, None)
        if not self.store.has_checkpoints(blob):
            log.info("layer %s: no checkpoint index in the cache; decompressing it from the start",
                     content.blob_digest)
            return None
        head = self.store.read_checkpoints(blob, 0, gzindex.HEADER_BYTES)
        try:
            if head is None:
                return None
            header = gzindex.parse_header(head)
            whole_table = self.store.read_checkpoints(blob, 0, header.table_bytes)
            if whole_table is None:
                return None
            table = gzindex.parse_table(whole_table)
            if (header.compressed_size, header.uncompressed_size) != (content.blob_size, size):
                raise FormatError(f"it maps {header.compressed_size} bytes to "
                                  f"{header.uncompressed_size}, the layer {content.blob_size} to "
                                  f"{size}")
        except FormatError as exc:
            self.store.drop_checkpoints(blob, f"{exc}; decompressing the layer from the start")
            return None
        self._checkpoint_tables[blob] = table
        return table

    def _drop_checkpoints(self, content: Content, why: str) -> None:
        blob = str(content.blob_digest)
        self._checkpoint_tables.pop(blob, None)
        self.store.drop_checkpoints(blob, f"{why}; decompressing the layer from the start")

    async def _unzstd(self, content: Content, job: _Job) -> None:
        """Stream a zstd blob once (generic zstd frames cannot be entered in the middle, so
        an evicted chunk is made again by decompressing from the start); store decompressed
        chunks; verify both digests."""
        key = content.key
        try:
            chunk = self._register(content)
            feed = unzstd.decompressor()
            compressed_hash = content.blob_digest.hasher()
            diff_hasher = hashlib.sha256()
            pending = bytearray()
            idx = 0
            produced = 0
            buffer = bytearray(STREAM_RANGE_BYTES)
            for position in range(0, content.blob_size, STREAM_RANGE_BYTES):
                step = min(STREAM_RANGE_BYTES, content.blob_size - position)
                view = memoryview(buffer)[:step]
                await content.registry.fetch_range(
                    content.repository, content.blob_digest, content.blob_size, position, view
                )
                compressed_hash.update(view)
                output = feed(bytes(view))
                diff_hasher.update(output)
                pending += output
                produced += len(output)
                while len(pending) >= chunk:
                    self._store_decompressed(key, idx, pending[:chunk], job)
                    del pending[:chunk]
                    idx += 1
                job.progress.set()
                job.progress = trio.Event()
            tail = feed(None)
            diff_hasher.update(tail)
            pending += tail
            produced += len(tail)
            while pending:
                self._store_decompressed(key, idx, pending[:chunk], job)
                del pending[:chunk]
                idx += 1
            if compressed_hash.hexdigest() != content.blob_digest.hex:
                self._fail(content, f"compressed content is {compressed_hash.hexdigest()}")
            if content.diff_id is not None and diff_hasher.hexdigest() != content.diff_id.hex:
                self._fail(content, f"decompressed content is sha256:{diff_hasher.hexdigest()}, "
                                    f"the config's diffId is {content.diff_id}")
            self.store.mark_stream_verified(key, produced)
            job.size = produced
        except (KitfsError, zstandard.ZstdError) as exc:
            if isinstance(exc, zstandard.ZstdError):
                exc = FormatError(f"layer {content.blob_digest}: cannot decompress: {exc}")
            job.error = exc
        finally:
            job.done.set()
            job.progress.set()

    def _store_decompressed(self, key: str, idx: int, data: bytes | bytearray, job: _Job) -> None:
        data = bytes(data)
        if _needed(job, idx):
            job.held[idx] = data
        if not self.store.has_chunk(key, idx) and not self.store.put(key, idx, data):
            _keep_uncached(job, idx, data, self.chunk_size_bytes)


@dataclass(frozen=True)
class _RemakePlan:
    """How to make one chunk of a gzip layer again (see ``BlobReader._remake``)."""

    start: int  # the chunk's decompressed bytes: [start, start + length)
    length: int
    ids: bytes  # the piece identities the verified first pass saw
    first_byte: int  # the compressed bytes to fetch: [first_byte, end_byte)
    end_byte: int
    spacing: int
    index: bytes  # the checkpoints around the chunk (kitfs.format.gzindex.subset)


def _remake_in_thread(store: ChunkStore, span: gunzip.SpanBlob,
                      plan: _RemakePlan) -> tuple[bytes, PreparedChunk | None]:
    """Decompress a chunk from its checkpoint, hash it, and write its cache file if it is the
    verified one (worker thread)."""
    data = gunzip.remake(span, plan.spacing, plan.index, plan.start, plan.length)
    return data, store.prepare(data) if piece_ids(data) == plan.ids else None


def _keep_uncached(job: _Job, idx: int, data: bytes, chunk_size_bytes: int) -> None:
    """Keep a chunk the cache could not take (disk full) in the job's memory, up to 64 MiB."""
    job.memory[idx] = data
    while len(job.memory) * chunk_size_bytes > 64 * 1024 * 1024:
        job.memory.pop(next(iter(job.memory)))


def _needed(job: _Job, idx: int) -> bool:
    """Does a read waiting on ``job`` still need chunk ``idx``?"""
    return any(first <= idx <= last for first, last in job.waiting)
