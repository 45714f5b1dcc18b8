"""Properties of the range/chunk logic, through the real BlobReader and ChunkStore.

The registry is an in-memory stand-in (``FakeRegistry``) that serves one blob and records every
range asked of it, so each property can count bytes exactly: reads return the right bytes,
only the chunks covering a read are fetched, each at most once while it stays cached (also
under concurrency: single-flight), a quota holds once the reads are over, and a tampered blob
is never passed off as good (eventual mode fails a full read and every later one; strict mode
returns no byte of it).

Each example gets a fresh cache directory. Examples are few (``max_examples`` <= 50) so the
file runs in seconds.
"""

from __future__ import annotations

import gzip
import itertools
import os
import random
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kitfs.cache.store import ChunkStore
from kitfs.core.reader import BlobReader, Content, VerifyMode
from kitfs.errors import FormatError, IntegrityError
from kitfs.format.digest import Digest
from kitfs.format.mediatypes import Compression
from kitfs.format.ranges import chunk_count, chunk_span, chunks_covering
from kitfs.remote.registry import RegistryClient

CHUNK = 64 * 1024
ODD_CHUNK = 3 * 32 * 1024 + 7  # not a multiple of the 64 KiB checksum block

SETTINGS = settings(max_examples=50, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass
class FakeRegistry:
    """Serves ``served`` for any digest; records each ``(offset, length)`` asked for."""

    served: bytes
    requests: list[tuple[int, int]] = field(default_factory=list)
    delay_s: float = 0.0  # each answer takes up to this long (random, seeded)
    seed: int = 0

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    async def fetch_range(self, repository: str, digest: Digest, blob_size: int, offset: int,
                          into: memoryview | tuple[memoryview, ...]) -> None:
        views = (into,) if isinstance(into, memoryview) else into
        length = sum(len(view) for view in views)
        if length == 0:
            return
        assert blob_size == len(self.served)
        assert offset >= 0 and offset + length <= blob_size, (offset, length, blob_size)
        self.requests.append((offset, length))
        # a checkpoint at least: other readers run meanwhile, in a seeded random order
        await trio.sleep(self._random.random() * self.delay_s)
        for view in views:  # several buffers are filled one after the other
            view[:] = self.served[offset : offset + len(view)]
            offset += len(view)


def make_content(fake: FakeRegistry, genuine: bytes) -> Content:
    """The content of a blob whose digest is that of ``genuine`` (``fake`` may serve other bytes)."""
    return Content(registry=cast(RegistryClient, fake), repository="team/kit",
                   blob_digest=Digest.of(genuine), blob_size=len(genuine),
                   compression=Compression.NONE)


def run_with_reader(
    verify: VerifyMode, chunk: int, quota: int | None,
    body: Callable[[BlobReader, ChunkStore], Awaitable[None]], read_ahead_chunks: int = 0,
) -> None:
    """Run ``body`` with a BlobReader on a fresh cache directory, inside trio.

    Read-ahead is off unless asked: most properties here are about exactly which chunks the
    reads themselves cover; ``test_read_ahead_*`` checks read-ahead on its own."""
    with tempfile.TemporaryDirectory() as tmp:
        store = ChunkStore(Path(tmp) / "cache", quota)
        try:
            async def main() -> None:
                async with trio.open_nursery() as nursery:
                    await body(BlobReader(store, nursery, verify, chunk,
                                          read_ahead_chunks=read_ahead_chunks), store)

            trio.run(main)
        finally:
            store.close()


def chunk_requests(fake: FakeRegistry, size: int, chunk: int) -> list[int]:
    """The chunk index of each request; fails unless every request is exactly one chunk."""
    indexes = []
    for offset, length in fake.requests:
        idx, rest = divmod(offset, chunk)
        assert rest == 0, f"request at {offset} is not chunk-aligned"
        assert length == chunk_span(idx, size, chunk).length, f"request {offset}+{length}"
        indexes.append(idx)
    return indexes


@st.composite
def blob_sizes(draw: st.DrawFn, chunk: int) -> int:
    special = [0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk, 3 * chunk + 1, 5 * chunk - 1]
    return draw(st.one_of(st.sampled_from(special), st.integers(0, 6 * chunk)))


@st.composite
def reads(draw: st.DrawFn, size: int, chunk: int = CHUNK,
          max_reads: int = 8) -> list[tuple[int, int]]:
    """Random (offset, length) pairs, in random order, some past the end or empty; both ends
    often on, or one byte either side of, a chunk boundary."""
    near_boundary = st.integers(0, size // chunk + 1).flatmap(
        lambda k: st.sampled_from([k * chunk - 1, k * chunk, k * chunk + 1]))
    position = st.one_of(st.integers(0, size + 10), near_boundary).map(lambda p: max(p, 0))
    pairs = draw(st.lists(st.tuples(position, position), min_size=1, max_size=max_reads))
    return [(min(a, b), abs(a - b)) for a, b in pairs]


def blob_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# --- sequential reads: right bytes, only needed chunks, each once -------------------------------


@SETTINGS
@given(data=st.data(), chunk=st.sampled_from([CHUNK, ODD_CHUNK]),
       verify=st.sampled_from([VerifyMode.EVENTUAL, VerifyMode.OFF]), seed=st.integers(0, 2**32))
def test_reads_return_the_right_bytes_and_fetch_only_covering_chunks_once(
    data: st.DataObject, chunk: int, verify: VerifyMode, seed: int
) -> None:
    size = data.draw(blob_sizes(chunk))
    plan = data.draw(reads(size, chunk))
    blob = blob_of(size, seed)
    fake = FakeRegistry(blob)
    content = make_content(fake, blob)

    async def body(reader: BlobReader, store: ChunkStore) -> None:
        for offset, length in plan:
            assert await reader.read(content, offset, length) == blob[offset : offset + length]
        # again, now from the cache: no new request
        before = len(fake.requests)
        for offset, length in reversed(plan):
            assert await reader.read(content, offset, length) == blob[offset : offset + length]
        assert len(fake.requests) == before
        await reader.settle()  # chunks are hashed, stored and verified behind the reads
        if verify is VerifyMode.EVENTUAL and set(store.cached_chunks(content.key)) == set(
                range(chunk_count(size, chunk))):
            state = store.blob_state(content.key)
            assert state is not None and state.verified == 1

    run_with_reader(verify, chunk, None, body)
    fetched = chunk_requests(fake, size, chunk)
    needed = {s.index for offset, length in plan for s in chunks_covering(offset, length, size, chunk)}
    assert len(fetched) == len(set(fetched)), f"a chunk was fetched twice: {fetched}"
    assert set(fetched) == needed


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**32))
def test_a_read_that_reaches_the_end_of_a_file_verifies_by_fetching_the_rest_once(
    data: st.DataObject, seed: int
) -> None:
    size = data.draw(st.integers(1, 6 * CHUNK))
    offset = data.draw(st.integers(0, size - 1))
    blob = blob_of(size, seed)
    fake = FakeRegistry(blob)
    content = make_content(fake, blob)

    async def body(reader: BlobReader, store: ChunkStore) -> None:
        got = await reader.read(content, offset, size - offset, file_end=size)
        assert got == blob[offset:]
        state = store.blob_state(content.key)
        assert state is not None and state.verified == 1  # the whole blob is < 16 MiB

    run_with_reader(VerifyMode.EVENTUAL, CHUNK, None, body)
    fetched = chunk_requests(fake, size, CHUNK)
    assert sorted(fetched) == list(range(chunk_count(size, CHUNK)))


# --- concurrency: single-flight ------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**32), tasks=st.integers(2, 6),
       verify=st.sampled_from(list(VerifyMode)))
def test_concurrent_overlapping_reads_fetch_each_chunk_once(
    data: st.DataObject, seed: int, tasks: int, verify: VerifyMode
) -> None:
    size = data.draw(st.integers(1, 6 * CHUNK))
    shared = data.draw(reads(size, max_reads=1))  # every task starts with it: same chunks, same time
    plans = [shared + data.draw(reads(size, max_reads=4)) for _ in range(tasks)]
    blob = blob_of(size, seed)
    fake = FakeRegistry(blob, delay_s=0.002, seed=seed)
    content = make_content(fake, blob)
    results: list[tuple[int, int, bytes]] = []

    async def body(reader: BlobReader, store: ChunkStore) -> None:
        async def reader_task(plan: list[tuple[int, int]]) -> None:
            for offset, length in plan:
                results.append((offset, length, bytes(await reader.read(
                    content, offset, length, file_end=size if offset + length >= size else None))))

        async with trio.open_nursery() as nursery:
            for plan in plans:
                nursery.start_soon(reader_task, plan)

    run_with_reader(verify, CHUNK, None, body)
    for offset, length, got in results:
        assert got == blob[offset : offset + length]
    fetched = chunk_requests(fake, size, CHUNK)
    assert len(fetched) == len(set(fetched)), f"a chunk was fetched twice: {sorted(fetched)}"


# --- quota ---------------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**32), quota_chunks=st.integers(1, 3),
       tasks=st.integers(1, 4), verify=st.sampled_from(list(VerifyMode)))
def test_a_quota_smaller_than_the_blob_holds_once_reads_finish(
    data: st.DataObject, seed: int, quota_chunks: int, tasks: int, verify: VerifyMode
) -> None:
    quota = quota_chunks * CHUNK
    size = data.draw(st.integers(quota + 1, 7 * CHUNK))
    plans = [data.draw(reads(size, max_reads=4)) for _ in range(tasks)]
    blob = blob_of(size, seed)
    fake = FakeRegistry(blob, delay_s=0.002, seed=seed)
    content = make_content(fake, blob)

    async def body(reader: BlobReader, store: ChunkStore) -> None:
        async def reader_task(plan: list[tuple[int, int]]) -> None:
            for offset, length in plan:
                got = await reader.read(content, offset, length,
                                        file_end=size if offset + length >= size else None)
                assert got == blob[offset : offset + length]

        async with trio.open_nursery() as nursery:
            for plan in plans:
                nursery.start_soon(reader_task, plan)
        assert store.used_bytes() <= quota, (store.used_bytes(), quota)
        assert store.verify_chunks()[1] == 0  # nothing marked present is missing or wrong

    run_with_reader(verify, CHUNK, quota, body)
    needed = {s.index for plan in plans for offset, length in plan
              for s in chunks_covering(offset, length, size, CHUNK)}
    if verify is VerifyMode.OFF:  # nothing else may be fetched
        assert set(chunk_requests(fake, size, CHUNK)) <= needed


# --- tampered blobs ------------------------------------------------------------------------------


def tampered(size: int, seed: int, where: int) -> tuple[bytes, bytes]:
    genuine = blob_of(size, seed)
    served = bytearray(genuine)
    served[where % size] ^= 0x01
    return genuine, bytes(served)


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**32), where=st.integers(0, 2**32))
def test_a_full_read_of_a_tampered_blob_fails_in_eventual_mode_and_so_do_later_reads(
    data: st.DataObject, seed: int, where: int
) -> None:
    size = data.draw(blob_sizes(CHUNK).filter(lambda n: n > 0))
    genuine, served = tampered(size, seed, where)
    fake = FakeRegistry(served)
    content = make_content(fake, genuine)
    pieces = data.draw(st.lists(st.integers(0, size), max_size=4, unique=True))
    cuts = sorted({0, size, *pieces})
    spans = list(itertools.pairwise(cuts))
    order = data.draw(st.permutations(spans))
    later = data.draw(reads(size, max_reads=3))

    async def body(reader: BlobReader, store: ChunkStore) -> None:
        async def read_whole_file() -> None:
            for start, end in order:
                await reader.read(content, start, end - start, file_end=size)

        # The file is read whole, in pieces in any order: a piece that reaches its end (the
        # blob is small, so "nearly complete") or completes it fails.
        with pytest.raises(IntegrityError, match="failed verification"):
            await read_whole_file()
        assert store.cached_chunks(content.key) == set()  # purged
        for offset, length in later:
            with pytest.raises(IntegrityError):
                await reader.read(content, offset, length)

    run_with_reader(VerifyMode.EVENTUAL, CHUNK, None, body)


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**32), where=st.integers(0, 2**32),
       tasks=st.integers(1, 4), quota_chunks=st.sampled_from([None, 1, 2]))
def test_strict_mode_never_returns_a_byte_of_a_tampered_blob(
    data: st.DataObject, seed: int, where: int, tasks: int, quota_chunks: int | None
) -> None:
    size = data.draw(st.integers(1, 6 * CHUNK))
    genuine, served = tampered(size, seed, where)
    fake = FakeRegistry(served, delay_s=0.002, seed=seed)
    content = make_content(fake, genuine)
    plans = [data.draw(reads(size, max_reads=3)) for _ in range(tasks)]
    returned: list[bytes] = []

    async def body(reader: BlobReader, store: ChunkStore) -> None:
        async def reader_task(plan: list[tuple[int, int]]) -> None:
            for offset, length in plan:
                try:
                    returned.append(bytes(await reader.read(content, offset, length)))
                except IntegrityError:
                    pass
                else:
                    raise AssertionError(f"strict mode answered {offset}+{length}")

        async with trio.open_nursery() as nursery:
            for plan in plans:
                nursery.start_soon(reader_task, plan)

    run_with_reader(VerifyMode.STRICT, CHUNK, quota_chunks and quota_chunks * CHUNK, body)
    assert returned == []


# --- targeted regressions ------------------------------------------------------------------------


def test_readers_with_different_chunk_sizes_share_one_cache(tmp_path: Path) -> None:
    """A cache written with one chunk size is read right by a reader with another
    (the chunk size recorded for the blob wins), and a good blob is not marked failed."""
    blob = blob_of(5 * CHUNK + 123, 7)
    store = ChunkStore(tmp_path / "cache")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            first = BlobReader(store, nursery, VerifyMode.EVENTUAL, CHUNK, read_ahead_chunks=0)
            content = make_content(FakeRegistry(blob), blob)
            assert await first.read(content, 0, 3 * CHUNK) == blob[: 3 * CHUNK]
            second = BlobReader(store, nursery, VerifyMode.EVENTUAL, 2 * CHUNK + 1000, read_ahead_chunks=0)
            for offset, length in [(CHUNK - 5, 2 * CHUNK), (0, len(blob))]:
                got = await second.read(content, offset, length, file_end=len(blob))
                assert got == blob[offset : offset + length]
            state = store.blob_state(content.key)
            assert state is not None and state.verified == 1

    try:
        trio.run(main)
    finally:
        store.close()


def test_the_quota_holds_once_the_pins_that_kept_chunks_are_released(tmp_path: Path) -> None:
    """Chunks pinned by in-flight reads may push the cache over its quota; once the last pin
    goes, the cache is evicted down to the quota (not only at the next ``put``)."""
    store = ChunkStore(tmp_path / "cache", quota_bytes=CHUNK)
    key = str(Digest.of(b"pinned"))
    try:
        for idx in range(3):
            store.pin(key, idx)
            store.put(key, idx, blob_of(CHUNK, idx))
        assert store.used_bytes() == 3 * CHUNK  # all pinned: nothing could go
        for idx in range(3):
            store.unpin(key, idx)
        assert store.used_bytes() <= CHUNK
    finally:
        store.close()


@dataclass
class GatedRegistry(FakeRegistry):
    """Each request waits until the test opens it (``open_next``), in arrival order."""

    gates: list[tuple[int, trio.Event]] = field(default_factory=list)

    async def fetch_range(self, repository: str, digest: Digest, blob_size: int, offset: int,
                          into: memoryview | tuple[memoryview, ...]) -> None:
        gate = trio.Event()
        self.gates.append((offset, gate))
        await gate.wait()
        await super().fetch_range(repository, digest, blob_size, offset, into)

    async def open_next(self) -> int:
        """Let the oldest waiting request answer; returns its offset."""
        await trio.testing.wait_all_tasks_blocked()
        offset, gate = self.gates.pop(0)
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        return offset


def test_verification_refetches_an_evicted_chunk_through_single_flight(tmp_path: Path) -> None:
    """While a blob is hashed for verification, a chunk that vanished from the cache (evicted
    by another process) and that a reader is fetching right now is not fetched a second time
    by the verification, and nothing breaks when both finish."""
    blob = blob_of(2 * CHUNK, 11)
    fake = GatedRegistry(blob)
    content = make_content(fake, blob)
    store = ChunkStore(tmp_path / "cache")
    other_process = ChunkStore(tmp_path / "cache", quota_bytes=0)

    async def main() -> None:
        with trio.fail_after(10):
            await scenario()

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            reader = BlobReader(store, nursery, VerifyMode.EVENTUAL, CHUNK, read_ahead_chunks=0)
            nursery.start_soon(reader.read, content, CHUNK, 10)
            assert await fake.open_next() == CHUNK
            for _ in range(500):  # the chunk file is written by a worker thread
                if store.has_chunk(content.key, 1):
                    break
                await trio.sleep(0.01)
            nursery.start_soon(reader.verify_now, content)  # fetches chunk 0, then hashes
            await trio.testing.wait_all_tasks_blocked()
            other_process.evict(0)  # chunk 1 is gone from the cache
            reader._memory.recent.clear()  # and from the reader's memory (as if others came since)
            nursery.start_soon(reader.read, content, CHUNK + 5, 10)  # fetching chunk 1 again
            assert await fake.open_next() == 0
            while fake.gates:
                await fake.open_next()
        state = store.blob_state(content.key)
        assert state is not None and state.verified == 1

    try:
        trio.run(main)
    finally:
        store.close()
        other_process.close()
    assert chunk_requests(fake, len(blob), CHUNK) == [1, 0, 1]


def test_a_compressed_layer_is_read_under_a_quota_smaller_than_two_chunks(tmp_path: Path) -> None:
    """The decompression job stores chunk after chunk and the quota evicts each one before the
    waiting reader runs: the reader still gets its bytes (it does not send the job round
    again and again)."""
    plain = blob_of(5 * CHUNK + 99, 3)
    packed = gzip.compress(plain, mtime=0)
    fake = FakeRegistry(packed)
    content = Content(registry=cast(RegistryClient, fake), repository="team/kit",
                      blob_digest=Digest.of(packed), blob_size=len(packed),
                      compression=Compression.GZIP, diff_id=Digest.of(plain))
    store = ChunkStore(tmp_path / "cache", quota_bytes=CHUNK)

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                reader = BlobReader(store, nursery, VerifyMode.EVENTUAL, CHUNK, read_ahead_chunks=0)
                assert await reader.read(content, 0, len(plain)) == plain
                assert await reader.read(content, 2 * CHUNK - 3, 10) == plain[2 * CHUNK - 3 :][:10]

    try:
        trio.run(main)
        assert store.used_bytes() <= CHUNK
    finally:
        store.close()
    assert sum(length for _, length in fake.requests) <= 2 * len(packed)


def gzip_content(fake: FakeRegistry, plain: bytes | None) -> Content:
    """A gzip layer whose digest is that of the bytes ``fake`` serves; with the diffId of
    ``plain`` when given."""
    return Content(registry=cast(RegistryClient, fake), repository="team/kit",
                   blob_digest=Digest.of(fake.served), blob_size=len(fake.served),
                   compression=Compression.GZIP,
                   diff_id=Digest.of(plain) if plain is not None else None)


def test_a_gzip_layer_whose_bytes_fail_their_digest_fails_once_and_for_all(tmp_path: Path) -> None:
    """The first pass finds the blob is not the layer's: the read fails with IntegrityError
    after one pass (it used to start the pass again and again), and so does every later read,
    without another request."""
    plain = blob_of(5 * CHUNK, 4)
    packed = gzip.compress(plain, mtime=0)
    tampered = bytearray(packed)
    tampered[len(packed) // 2] ^= 1
    fake = FakeRegistry(bytes(tampered))
    content = Content(registry=cast(RegistryClient, fake), repository="team/kit",
                      blob_digest=Digest.of(packed), blob_size=len(packed),
                      compression=Compression.GZIP, diff_id=Digest.of(plain))
    store = ChunkStore(tmp_path / "cache")

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                reader = BlobReader(store, nursery, VerifyMode.EVENTUAL, CHUNK, read_ahead_chunks=0)
                with pytest.raises(IntegrityError, match="failed verification"):
                    await reader.read(content, 0, 100)
                served = sum(length for _, length in fake.requests)
                assert served == len(packed)
                with pytest.raises(IntegrityError):
                    await reader.read(content, 3 * CHUNK, 100)
                assert sum(length for _, length in fake.requests) == served

    try:
        trio.run(main)
        assert store.cached_chunks(content.key) == set()
    finally:
        store.close()


@pytest.mark.parametrize(("damage", "message"), [
    (lambda packed: packed[: len(packed) - 5000], "truncated"),
    (lambda packed: packed + b"not gzip", "corrupt"),
    (lambda packed: packed[:-8] + bytes(8), "CRC"),  # the trailer's CRC and size are wrong
])
def test_malformed_gzip_streams_are_refused(tmp_path: Path, damage: Callable[[bytes], bytes],
                                           message: str) -> None:
    """A blob that matches its digest but is not a whole gzip stream (and no diffId to catch
    it): truncated inside deflate data, followed by something other than zero padding, or
    with a wrong trailer, is a FormatError naming what is wrong."""
    plain = blob_of(3 * CHUNK, 5) + b"text " * 20000
    fake = FakeRegistry(damage(gzip.compress(plain, mtime=0)))
    store = ChunkStore(tmp_path / "cache")

    async def main() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                reader = BlobReader(store, nursery, VerifyMode.EVENTUAL, CHUNK, read_ahead_chunks=0)
                with pytest.raises(FormatError, match=message):
                    await reader.size(gzip_content(fake, None))

    try:
        trio.run(main)
    finally:
        store.close()


@st.composite
def gzip_streams(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(plain, packed): one to three gzip members of random or repetitive bytes, some empty,
    at various levels, sometimes followed by zero padding."""
    plain, packed = b"", b""
    for _ in range(draw(st.integers(1, 3))):
        size = draw(st.sampled_from([0, 1, 1000, CHUNK - 1, 3 * CHUNK + 7, 6 * CHUNK]))
        seed = draw(st.integers(0, 2**16))
        member = (blob_of(size, seed) if draw(st.booleans())
                  else (b"row %d of a table\n" % seed * (size // 16 + 1))[:size])
        plain += member
        packed += gzip.compress(member, compresslevel=draw(st.sampled_from([1, 6, 9])), mtime=0)
    return plain, packed + bytes(draw(st.sampled_from([0, 0, 512])))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=gzip_streams(), seed=st.integers(0, 2**16))
def test_evicted_gzip_chunks_are_made_from_checkpoints_with_the_right_bytes(
        stream: tuple[bytes, bytes], seed: int) -> None:
    """After the first pass, with every chunk evicted, reads anywhere (several members, empty
    ones, zero padding) give the right bytes; each chunk made again costs one request of at
    most three checkpoint spacings (a spacing is a chunk), concurrent reads of a chunk one."""
    plain, packed = stream
    fake = FakeRegistry(packed)
    content = gzip_content(fake, plain)
    rng = random.Random(seed)

    async def body(reader: BlobReader, store: ChunkStore) -> None:
        assert await reader.size(content) == len(plain)
        store.purge_chunks(content.key)
        fake.requests.clear()
        chunks = chunk_count(len(plain), CHUNK)
        for idx in rng.sample(range(chunks), min(chunks, 4)):
            offset = idx * CHUNK + rng.randrange(CHUNK)
            results: list[bytes] = []

            async def read(at: int, into: list[bytes]) -> None:
                into.append(bytes(await reader.read(content, at, 3000)))

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(read, offset, results)
            assert results == [plain[offset : offset + 3000]] * 3
        assert all(length <= 3 * CHUNK + 64 * 1024 for _, length in fake.requests), fake.requests
        assert len(fake.requests) <= min(chunks, 4) * 2  # a read may span two chunks

    run_with_reader(VerifyMode.EVENTUAL, CHUNK, None, body)


# --- read-ahead ------------------------------------------------------------------------------


def test_read_ahead_follows_sequential_streams_only_and_never_fetches_twice() -> None:
    chunks = 64
    blob = blob_of(chunks * CHUNK, 5)
    fake = FakeRegistry(blob)
    content = make_content(fake, blob)

    async def body(reader: BlobReader, store: ChunkStore) -> None:
        # a read somewhere in the middle: only its own chunk
        assert await reader.read(content, 40 * CHUNK + 7, 4096) == blob[40 * CHUNK + 7:][:4096]
        await trio.testing.wait_all_tasks_blocked()
        assert chunk_requests(fake, len(blob), CHUNK) == [40]
        # a small read at the start: its chunk and at most one more (the stream may go on)
        assert await reader.read(content, 0, 4096) == blob[:4096]
        await trio.testing.wait_all_tasks_blocked()
        assert set(chunk_requests(fake, len(blob), CHUNK)) <= {40, 0, 1}
        # a whole sequential read in 1/4-chunk pieces: right bytes, every chunk fetched once,
        # and at the end of a file (here: 48 chunks) nothing past it
        piece = CHUNK // 4
        for offset in range(0, 48 * CHUNK, piece):
            data = await reader.read(content, offset, piece, file_end=48 * CHUNK)
            assert data == blob[offset : offset + piece]
        await trio.testing.wait_all_tasks_blocked()
        fetched = chunk_requests(fake, len(blob), CHUNK)
        assert sorted(fetched) == sorted(set(fetched)), "a chunk was fetched twice"
        assert set(fetched) == set(range(48)) | {40}
        assert len(fetched) == 48

    # verification off: in eventual mode reaching the file's end would fetch the (small) rest
    # of the blob to check its digest, which is another rule (tested above)
    run_with_reader(VerifyMode.OFF, CHUNK, None, body, read_ahead_chunks=8)


def test_the_cache_never_holds_more_than_its_quota_even_while_a_chunk_is_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Room is made before a chunk's file is put in place, not after: measured on disk at the
    moment each chunk file appears."""
    quota = 3 * CHUNK
    store = ChunkStore(tmp_path / "cache", quota_bytes=quota)
    on_disk: list[int] = []
    real_replace = os.replace

    def replace_and_measure(src: str | Path, dst: str | Path) -> None:
        real_replace(src, dst)
        chunks = tmp_path / "cache" / "chunks"
        on_disk.append(sum(p.stat().st_size for p in chunks.rglob("*") if p.is_file()))

    monkeypatch.setattr(os, "replace", replace_and_measure)
    try:
        for idx in range(10):
            assert store.put("sha256:" + "ab" * 32, idx, bytes([idx]) * CHUNK)
    finally:
        store.close()
    assert len(on_disk) == 10
    assert max(on_disk) <= quota, on_disk
