"""Chunks of gzip layers made again from the checkpoints their first pass kept.

Owns ``ChunkRemaker``: the checkpoint tables of the gzip layers a ``DecompressedStreams``
(``kitfs.core.compressed``) has decompressed (kept in the cache by the first pass, read back
once), the remaking of an evicted chunk from the checkpoint before it (``remake``: only the
compressed bytes between the checkpoints around the chunk are fetched, the chunk made is
checked against the piece identities the verified first pass kept, concurrent calls for one
chunk share one fetch), and the compressed spans of the last chunks made again (consecutive
chunks' spans overlap). A checkpoint index that fails its checks is dropped, and the layer is
then decompressed from the start again, which makes a new one. (indexed_gzip is driven by
``kitfs.core.gunzip``.)
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

from kitfs.cache.identity import piece_ids
from kitfs.cache.store import ChunkStore, PreparedChunk
from kitfs.core import gunzip
from kitfs.core.content import ChunkBuffer, Content
from kitfs.core.flight import Flights
from kitfs.errors import FormatError, IntegrityError
from kitfs.format import gzindex
from kitfs.format.ranges import chunk_span

log = logging.getLogger("kitfs.core.reader")  # the reader's log lines, as before the split

# The compressed spans of the last chunks of gzip layers made again from checkpoints are kept
# (each at most three checkpoint spacings): the next chunk's span starts inside the last one.
KEPT_SPANS = 2


class ChunkRemaker:
    """Gzip chunks made again from checkpoints, for one ``DecompressedStreams``."""

    def __init__(self, store: ChunkStore, *, chunk_size: Callable[[Content], int],
                 remember: Callable[[str, int, ChunkBuffer], None],
                 recent: OrderedDict[tuple[str, int], ChunkBuffer]) -> None:
        self.store = store
        self._chunk_size = chunk_size  # a content's chunk size in the cache
        self._remember = remember  # put a chunk made into the reader's memory
        self._recent = recent  # the reader's chunks just fetched or made (read only here)
        self._remaking: Flights[tuple[str, int]] = Flights()  # chunks being made again
        self._checkpoint_tables: dict[str, gzindex.CheckpointTable] = {}  # by gzip blob digest
        self._spans: OrderedDict[str, tuple[int, bytes]] = OrderedDict()  # see _compressed_span

    def keep_checkpoints(self, content: Content, result: gunzip.PassResult) -> None:
        """Keep the checkpoint index a first pass made (in the cache, and its table here)."""
        blob = str(content.blob_digest)
        table = gzindex.parse_table(result.index)
        if self.store.put_checkpoints(blob, content.key, result.index):
            self._checkpoint_tables[blob] = table
        log.info("layer %s decompressed and verified (%d bytes); %d checkpoints kept (%d bytes)",
                 content.blob_digest, result.size_bytes, len(table.points), len(result.index))

    async def remake(self, content: Content, idx: int) -> ChunkBuffer | None:
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
                return trio.from_thread.run(fetch_bytes, content, offset, length)

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
            data += await fetch_bytes(content, fetch_from, end - fetch_from)
        self._spans[blob] = (start, data)
        self._spans.move_to_end(blob)
        while len(self._spans) > KEPT_SPANS:
            self._spans.popitem(last=False)
        return data

    def _remake_plan(self, content: Content, idx: int) -> RemakePlan | None:
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
        return RemakePlan(span.start, span.length, expected, first_byte, end_byte,
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
        """Forget a layer's checkpoints, here and in the cache."""
        blob = str(content.blob_digest)
        self._checkpoint_tables.pop(blob, None)
        self.store.drop_checkpoints(blob, f"{why}; decompressing the layer from the start")


@dataclass(frozen=True)
class RemakePlan:
    """How to make one chunk of a gzip layer again (see ``ChunkRemaker.remake``)."""

    start: int  # the chunk's decompressed bytes: [start, start + length)
    length: int
    ids: bytes  # the piece identities the verified first pass saw
    first_byte: int  # the compressed bytes to fetch: [first_byte, end_byte)
    end_byte: int
    spacing: int
    index: bytes  # the checkpoints around the chunk (kitfs.format.gzindex.subset)


def _remake_in_thread(store: ChunkStore, span: gunzip.SpanBlob,
                      plan: RemakePlan) -> tuple[bytes, PreparedChunk | None]:
    """Decompress a chunk from its checkpoint, hash it, and write its cache file if it is the
    verified one (worker thread)."""
    data = gunzip.remake(span, plan.spacing, plan.index, plan.start, plan.length)
    return data, store.prepare(data) if piece_ids(data) == plan.ids else None


async def fetch_bytes(content: Content, offset: int, length: int) -> bytes:
    """Compressed bytes ``[offset, offset+length)`` of a layer, from its registry."""
    buffer = bytearray(length)
    await content.registry.fetch_range(content.repository, content.blob_digest,
                                       content.blob_size, offset, memoryview(buffer))
    return bytes(buffer)
