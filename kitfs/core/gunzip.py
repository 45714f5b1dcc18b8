"""gzip layers through indexed_gzip: one pass that decompresses a layer and leaves checkpoints
behind, and the making of one chunk again from the checkpoint before it.

Both run in a worker thread (``trio.to_thread``): indexed_gzip decompresses without the GIL
and reads the compressed blob through a Python file object, whose ``read`` gets its bytes
from the trio thread through callbacks the reader passes in (``trio.from_thread.run``). A
callback's exception (a registry failure, a cancellation) cannot cross indexed_gzip's C code
as itself, so the file objects keep it and these functions raise it once the library gives up.

The first pass (``first_pass``)
    reads the blob strictly in order from ``SequentialBlob``, which hashes each byte once as
    it arrives: indexed_gzip starts every read again from the checkpoint before it, so it
    seeks back, and those bytes come from the recent ones kept in memory. Checkpoints are
    made about every ``spacing`` decompressed bytes (one per chunk); a checkpoint costs its
    32 KiB window in the index. indexed_gzip takes a stream that stops inside deflate data
    for a short stream, so the end is checked here again (``_check_end``).

Making a chunk again (``remake``)
    needs the compressed bytes from the checkpoint at or before the chunk to the one at or
    after its end (``SpanBlob``), and an index holding just those two checkpoints
    (``kitfs.format.gzindex.subset``). The caller checks the chunk against the sha256 the
    verified first pass kept.

``ChunkPipe`` hands the first pass's chunks to the thread that hashes and writes them.
"""

from __future__ import annotations

import io
import queue
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import indexed_gzip

from kitfs.errors import FormatError, KitfsError
from kitfs.format import gzindex

# indexed_gzip decompresses each read from the checkpoint before it, so larger reads make it
# decompress less twice: 16 MiB (four chunks) per read.
PASS_READ_BYTES = 16 * 1024 * 1024
# Compressed bytes indexed_gzip reads from its file object at a time.
READ_BUFFER_BYTES = 1024 * 1024
REMAKE_READ_BUFFER_BYTES = 256 * 1024
# Library errors: ZranError and CrcError are OSErrors, NotCoveredError a ValueError.
_LIBRARY_ERRORS = (OSError, ValueError, zlib.error)


class _BlobFile(io.RawIOBase):
    """A read-only, seekable view of a compressed blob for indexed_gzip (worker thread)."""

    def __init__(self, size_bytes: int) -> None:
        super().__init__()
        self.size_bytes = size_bytes
        self.position = 0
        self.error: BaseException | None = None  # what a callback raised, kept for the caller

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size_bytes}[whence]
        self.position = max(0, base + offset)
        return self.position

    def read(self, size: int = -1) -> bytes:
        end = self.size_bytes if size < 0 else min(self.position + size, self.size_bytes)
        if self.position >= end:
            return b""
        try:
            data = self._bytes(self.position, end)
        except BaseException as exc:
            self.error = exc
            raise
        self.position = end
        return data

    def _bytes(self, start: int, end: int) -> bytes:
        raise NotImplementedError

    def raise_kept_error(self) -> None:
        """Re-raise what a callback raised, if anything did."""
        if self.error is not None:
            raise self.error


class SequentialBlob(_BlobFile):
    """The whole blob, its bytes arriving in order from ``next_piece`` and hashed once each
    into ``hasher``. The last ``keep_bytes`` stay in memory for indexed_gzip's seeks back
    (``first_pass`` sets it); older ones are fetched again with ``fetch(offset, length)``
    (none are, as ``first_pass`` sets ``keep_bytes``)."""

    def __init__(self, size_bytes: int, next_piece: Callable[[], bytes | bytearray],
                 fetch: Callable[[int, int], bytes], hasher: Any) -> None:
        super().__init__(size_bytes)
        self._next_piece = next_piece
        self._fetch = fetch
        self.hasher = hasher
        self.keep_bytes = 0
        self._pieces: deque[tuple[int, bytes | bytearray]] = deque()  # contiguous, in order
        self.arrived = 0  # bytes received and hashed

    def _receive(self) -> None:
        piece = self._next_piece()
        if not piece:
            raise FormatError(f"the blob ended after {self.arrived} of {self.size_bytes} bytes")
        self.hasher.update(piece)
        self._pieces.append((self.arrived, piece))
        self.arrived += len(piece)
        while self._pieces and self._pieces[0][0] + len(self._pieces[0][1]) <= (
                self.arrived - self.keep_bytes):
            self._pieces.popleft()

    def drain(self) -> None:
        """Receive (and hash) whatever indexed_gzip did not read."""
        try:
            while self.arrived < self.size_bytes:
                self._receive()
        except BaseException as exc:
            self.error = exc
            raise

    def _bytes(self, start: int, end: int) -> bytes:
        while self.arrived < end:
            self._receive()
        kept_from = self._pieces[0][0] if self._pieces else self.arrived
        if start < kept_from:
            head = self._fetch(start, min(end, kept_from) - start)
            return head if start + len(head) >= end else head + self._bytes(start + len(head), end)
        out = []
        for piece_start, piece in self._pieces:
            lo = max(start, piece_start)
            hi = min(end, piece_start + len(piece))
            if lo < hi:
                out.append(memoryview(piece)[lo - piece_start : hi - piece_start])
        return b"".join(out)

    def pread(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the blob (from memory, or fetched again)."""
        try:
            return self._bytes(start, end)
        except BaseException as exc:
            self.error = exc
            raise


class SpanBlob(_BlobFile):
    """Bytes ``[start, start + len(data))`` of the blob; a read outside them fetches what it
    needs with ``fetch(offset, length)`` (counted in ``extra_bytes``)."""

    def __init__(self, size_bytes: int, start: int, data: bytes | bytearray,
                 fetch: Callable[[int, int], bytes]) -> None:
        super().__init__(size_bytes)
        self.start = start
        self.data = data
        self._fetch = fetch
        self.extra_bytes = 0

    def _bytes(self, start: int, end: int) -> bytes:
        stop = self.start + len(self.data)
        if self.start <= start < stop:
            return bytes(memoryview(self.data)[start - self.start : min(end, stop) - self.start])
        length = min(end - start, READ_BUFFER_BYTES)
        self.extra_bytes += length
        return self._fetch(start, length)


@dataclass(frozen=True)
class PassResult:
    size_bytes: int  # decompressed
    index: bytes  # the checkpoint index (kitfs.format.gzindex)


def first_pass(blob: SequentialBlob, chunk_size_bytes: int,
               deliver: Callable[[int, bytes], None]) -> PassResult:
    """Decompress the whole gzip stream once; hand each chunk to ``deliver(index, bytes)`` as
    it is made; return the size and the checkpoint index (a checkpoint every chunk or so).
    Every byte of the blob goes through ``blob.hasher``, in order, once, also when the stream
    turns out malformed: the caller can then tell a malformed layer from bytes that are not
    the layer's. Worker thread.

    Raises:
        FormatError: not gzip, corrupt (a member's CRC or size is wrong) or truncated.
        Whatever ``blob``'s or ``deliver``'s callbacks raised (registry failures...).
    """
    try:
        return _first_pass(blob, chunk_size_bytes, deliver)
    except FormatError:
        if blob.error is None:
            blob.drain()
        raise


def _first_pass(blob: SequentialBlob, chunk_size_bytes: int,
                deliver: Callable[[int, bytes], None]) -> PassResult:
    spacing = chunk_size_bytes
    per_read = max(1, PASS_READ_BYTES // chunk_size_bytes) * chunk_size_bytes
    # seeks back reach the checkpoint before a read: at most a read and two spacings back
    blob.keep_bytes = per_read + 2 * spacing + 2 * READ_BUFFER_BYTES
    produced = 0
    try:
        with indexed_gzip.IndexedGzipFile(fileobj=blob, spacing=spacing,
                                          readbuf_size=READ_BUFFER_BYTES,
                                          buffer_size=64 * 1024) as buffered:
            # the unbuffered file: its read() reports a CRC mismatch as CrcError, where the
            # buffered reader's readinto() only complains of an "invalid length"
            gz = buffered.raw
            idx = 0
            while True:
                data = _read(gz, per_read)
                view = memoryview(data)
                for start in range(0, len(data), chunk_size_bytes):
                    deliver(idx, bytes(view[start : start + chunk_size_bytes]))
                    idx += 1
                produced += len(data)
                if len(data) < per_read:
                    break
            if produced:
                gz.seek(produced - 1)  # carry the checkpoints on to the end of the stream
            exported = io.BytesIO()
            gz.export_index(fileobj=exported)
        index = exported.getvalue()
        _check_end(blob, gzindex.parse_table(index), produced)
        blob.drain()
    except KitfsError:
        raise
    except _LIBRARY_ERRORS as exc:
        blob.raise_kept_error()
        raise FormatError(f"cannot decompress the gzip stream: {exc}") from exc
    blob.raise_kept_error()
    return PassResult(produced, index)


def remake(blob: SpanBlob, spacing: int, index: bytes, start: int, length: int) -> bytes:
    """Decompressed bytes ``[start, start+length)``, from ``index`` (a subset holding the
    checkpoint at or before ``start``) and the compressed bytes after it. Worker thread.

    Raises:
        FormatError: indexed_gzip could not decompress from that checkpoint.
        Whatever ``blob``'s fetch raised.
    """
    try:
        with indexed_gzip.IndexedGzipFile(fileobj=blob, spacing=spacing,
                                          readbuf_size=REMAKE_READ_BUFFER_BYTES,
                                          buffer_size=64 * 1024) as buffered:
            gz = buffered.raw
            gz.import_index(fileobj=io.BytesIO(index))
            gz.seek(start)
            data = _read(gz, length)
    except KitfsError:
        raise
    except _LIBRARY_ERRORS as exc:
        blob.raise_kept_error()
        raise FormatError(f"cannot decompress from the checkpoint: {exc}") from exc
    blob.raise_kept_error()
    if len(data) != length:
        raise FormatError(f"decompressing from the checkpoint gave {len(data)} of {length} bytes")
    return data


def _read(gz: Any, length: int) -> bytes:
    """Up to ``length`` decompressed bytes: fewer only where the stream ends."""
    data = gz.read(length)
    while len(data) < length:
        more = gz.read(length - len(data))
        if not more:
            break
        data += more
    return bytes(data)


def _check_end(blob: SequentialBlob, table: gzindex.CheckpointTable, size_bytes: int) -> None:
    """Raise ``FormatError`` unless the gzip stream really ends where indexed_gzip stopped.

    indexed_gzip takes a stream cut inside deflate data for a short stream (one cut in a
    member's 8-byte trailer it does report), and skips anything after the last member. The
    quick check: the blob ends (before any zero padding) with the trailer of the last member,
    whose size (mod 2**32) is known from the checkpoint at its start. When that does not hold
    (a cut stream, something after the last member, or a member without a checkpoint at its
    start), zlib decompresses the whole blob again to decide (``_check_whole_stream``).
    """
    starts = [p.uncompressed_offset for p in table.points if p.window_at is None]
    last_member_size = size_bytes - (starts[-1] if starts else 0)
    expected = (last_member_size & 0xFFFFFFFF).to_bytes(4, "little")
    tail = blob.pread(max(0, blob.size_bytes - 64 * 1024), blob.size_bytes)
    padding = len(tail) - len(tail.rstrip(b"\0"))
    for padded in range(padding + 1):  # the size field itself may end in zero bytes
        end = len(tail) - padded
        if end >= 8 and tail[end - 4 : end] == expected:
            return
    _check_whole_stream(blob)


def _check_whole_stream(blob: SequentialBlob) -> None:
    """Decompress the whole blob with zlib, member after member, output discarded: a
    ``FormatError`` if it is cut short or holds anything but zero bytes after its last member.
    Fetches the blob again (the rare path of ``_check_end``)."""
    inflater = zlib.decompressobj(wbits=31)
    in_member = False  # bytes of the current member were seen
    in_padding = False  # zero bytes after a member were seen
    step = READ_BUFFER_BYTES  # output is discarded as it comes, a step at a time
    try:
        for at in range(0, blob.size_bytes, step):
            pending = blob.pread(at, min(at + step, blob.size_bytes))
            while pending:
                if in_padding or (not in_member and not pending.strip(b"\0")):
                    if pending.strip(b"\0"):
                        raise FormatError("gzip stream has data after its zero padding")
                    in_padding = True
                    break
                in_member = True
                inflater.decompress(pending, step)
                if inflater.eof:
                    pending = inflater.unused_data
                    inflater = zlib.decompressobj(wbits=31)
                    in_member = False
                else:
                    pending = inflater.unconsumed_tail
        while in_member and not inflater.eof and inflater.decompress(b"", step):
            pass  # output zlib still held back
    except zlib.error as exc:
        raise FormatError(f"gzip stream is corrupt: {exc}") from exc
    if in_member and not inflater.eof:
        raise FormatError("gzip stream is truncated")


class ChunkPipe:
    """Chunks from the thread that decompresses a layer to the one that hashes and writes
    them, in order, at most two in between, so the two share a first pass's work. When the
    writing side fails, the decompressing side stops at its next chunk."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None

    def put(self, idx: int, data: bytes) -> None:
        if self.error is not None:
            raise WriterFailed from self.error
        self._queue.put((idx, data))

    def close(self) -> None:
        """No more chunks (the decompressing side is done, or failed)."""
        self._queue.put(None)

    def drain(self, handle: Callable[[int, bytes], None]) -> None:
        """Hand each chunk to ``handle`` until ``close``; raise what it raised, if anything
        (chunks after a failure are taken and dropped, so the other side never blocks)."""
        while (item := self._queue.get()) is not None:
            if self.error is None:
                try:
                    handle(*item)
                except BaseException as exc:
                    self.error = exc
        if self.error is not None:
            raise self.error


class WriterFailed(Exception):
    """The decompressing side stops: the writing side failed (and reports why)."""
