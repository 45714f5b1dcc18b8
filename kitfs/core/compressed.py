"""Decompressed streams of gzip and zstd layers: the first pass, and chunks made again.

Owns ``DecompressedStreams``: one decompression job per compressed layer (``_Job``), which
streams the layer once, stores its decompressed chunks and checks both digests (the blob's
and the config's diffId), waking the reads that wait for it as chunks appear. An evicted
chunk of a verified gzip layer is made again from the checkpoint before it by its
``ChunkRemaker`` (``kitfs.core.remake``), which keeps the checkpoints a first pass made.
(indexed_gzip is driven by ``kitfs.core.gunzip``, zstd frames decoded by
``kitfs.core.unzstd``.) The
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
from kitfs.core.flight import collapse_groups
from kitfs.core.remake import ChunkRemaker, fetch_bytes
from kitfs.errors import FormatError, KitfsError, copy_for_waiter
from kitfs.format.mediatypes import Compression

log = logging.getLogger("kitfs.core.reader")  # the reader's log lines, as before the split

# Compressed layers are fetched in ranges of this size while decompressing.
STREAM_RANGE_BYTES = 8 * 1024 * 1024


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
        self._from_memory_or_cache = lookup
        self._fail = fail
        self._jobs: dict[str, _Job] = {}
        self._remaker = ChunkRemaker(store, chunk_size=chunk_size, remember=remember,
                                     recent=recent)

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
                    whole = await self._remaker.remake(content, idx)
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
        that a chunk evicted later is made again from the checkpoint before it
        (``kitfs.core.remake``)."""
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
                return trio.from_thread.run(fetch_bytes, content, offset, length)

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
            self._remaker.keep_checkpoints(content, result)
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


def _keep_uncached(job: _Job, idx: int, data: bytes, chunk_size_bytes: int) -> None:
    """Keep a chunk the cache could not take (disk full) in the job's memory, up to 64 MiB."""
    job.memory[idx] = data
    while len(job.memory) * chunk_size_bytes > 64 * 1024 * 1024:
        job.memory.pop(next(iter(job.memory)))


def _needed(job: _Job, idx: int) -> bool:
    """Does a read waiting on ``job`` still need chunk ``idx``?"""
    return any(first <= idx <= last for first, last in job.waiting)
