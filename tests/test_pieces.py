"""Lone random reads fetch only the 128 KiB pieces they touch, kept as partial chunks.

Properties over the reader with a recording registry (every request asked for is seen),
the cache's partial chunks under eviction and ``kill -9``, and random 4 KiB reads through a
real mount, where the real registry's log is the witness of what was fetched.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from kitfs.cache.identity import PIECE_SIZE_BYTES, piece_ids
from kitfs.cache.store import ChunkStore
from kitfs.core.reader import BlobReader, VerifyMode
from kitfs.demo import Pusher, Registry, tar_layer, with_layer_info
from kitfs.errors import IntegrityError
from tests.mounts import Mounter
from tests.test_reader_properties import SETTINGS, FakeRegistry, blob_of, make_content, run_with_reader

CHUNK = 1 << 20  # 8 pieces
KiB = 1024


def lone_reads(size: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    """4 KiB-ish reads at random offsets past the first piece (a read at 0 starts a stream)."""
    return st.lists(st.tuples(st.integers(PIECE_SIZE_BYTES, size - 1), st.integers(1, 8 * KiB)),
                    min_size=1, max_size=12)


def assert_piece_requests(fake: FakeRegistry, size: int) -> list[int]:
    """Every request is whole pieces inside one chunk, at most two; returns the pieces."""
    pieces: list[int] = []
    for offset, length in fake.requests:
        assert offset % PIECE_SIZE_BYTES == 0, f"request at {offset} is not on a piece"
        assert offset // CHUNK == (offset + length - 1) // CHUNK, "a request crosses chunks"
        assert length <= 2 * PIECE_SIZE_BYTES, f"request {offset}+{length} is more than 2 pieces"
        end = offset + length
        assert length % PIECE_SIZE_BYTES == 0 or end == size or end % CHUNK == 0
        pieces += range(offset // PIECE_SIZE_BYTES, -(-end // PIECE_SIZE_BYTES))
    return pieces


@SETTINGS
@given(data=st.data(), seed=st.integers(0, 2**32), tasks=st.integers(1, 4),
       verify=st.sampled_from([VerifyMode.EVENTUAL, VerifyMode.OFF]))
def test_lone_reads_fetch_only_their_pieces_each_once_even_concurrently(
    data: st.DataObject, seed: int, tasks: int, verify: VerifyMode
) -> None:
    size = data.draw(st.integers(2 * PIECE_SIZE_BYTES, 3 * CHUNK))
    plans = [data.draw(lone_reads(size)) for _ in range(tasks)]
    blob = blob_of(size, seed)
    fake = FakeRegistry(blob, delay_s=0.002, seed=seed)
    content = make_content(fake, blob)
    results: list[tuple[int, int, bytes]] = []

    async def body(reader: BlobReader, store: ChunkStore) -> None:
        async def reader_task(plan: list[tuple[int, int]]) -> None:
            for offset, length in plan:
                results.append((offset, length, bytes(await reader.read(content, offset, length))))

        async with trio.open_nursery() as nursery:
            for plan in plans:
                nursery.start_soon(reader_task, plan)

    run_with_reader(verify, CHUNK, None, body)
    for offset, length, got in results:
        assert got == blob[offset : offset + length]
    pieces = assert_piece_requests(fake, size)
    assert len(pieces) == len(set(pieces)), f"a piece was fetched twice: {sorted(pieces)}"


def test_a_stream_fetches_whole_chunks_and_widens_its_window() -> None:
    """Reads in order from the start fetch whole chunks, and read-ahead grows as the stream
    does: the bytes asked for ahead of the reader widen from one chunk towards the cap, and
    so do the requests (several chunks in one range), each chunk fetched once."""
    size = 24 * CHUNK
    blob = blob_of(size, 3)
    fake = FakeRegistry(blob)
    content = make_content(fake, blob)
    ahead: list[int] = []

    async def body(reader: BlobReader, store: ChunkStore) -> None:
        for offset in range(0, size, 256 * KiB):
            assert await reader.read(content, offset, 256 * KiB, file_end=size) == \
                blob[offset : offset + 256 * KiB]
            requested_end = max(o + n for o, n in fake.requests)
            ahead.append(requested_end - (offset + 256 * KiB))

    # without a digest to keep up with (read-ahead waits while the digest is far behind,
    # which an instant fake registry makes it every time)
    run_with_reader(VerifyMode.OFF, CHUNK, None, body, read_ahead_chunks=8)
    assert all(o % CHUNK == 0 and n % CHUNK == 0 for o, n in fake.requests), fake.requests
    chunks = sorted(i for o, n in fake.requests for i in range(o // CHUNK, (o + n) // CHUNK))
    assert chunks == list(range(size // CHUNK))  # each once
    assert fake.requests[0][1] == CHUNK < max(n for _, n in fake.requests), fake.requests
    assert max(ahead[:4]) < 2 * CHUNK < max(ahead), ahead  # one chunk ahead at first, then more


def test_a_verified_blobs_evicted_piece_is_checked_before_it_is_served(tmp_path: Path) -> None:
    """Once a blob is verified, a piece fetched again after eviction is checked on its own
    (BLAKE3 of the piece): a registry that now forges it is refused; the true piece is
    served, and only that piece is fetched."""
    size = 3 * CHUNK
    blob = blob_of(size, 5)
    fake = FakeRegistry(blob)
    content = make_content(fake, blob)
    store = ChunkStore(tmp_path / "cache")
    offset = CHUNK + 5 * PIECE_SIZE_BYTES + 100

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            reader = BlobReader(store, nursery, VerifyMode.EVENTUAL, CHUNK)
            assert await reader.read(content, 0, size, file_end=size) == blob
            state = store.blob_state(content.key)
            assert state is not None and state.verified == 1
            store.evict(0)
            reader = BlobReader(store, nursery, VerifyMode.EVENTUAL, CHUNK)  # nothing in memory
            fake.served = blob[:offset] + b"X" + blob[offset + 1 :]
            fake.requests.clear()
            with pytest.raises(IntegrityError, match="differ from the verified blob"):
                await reader.read(content, offset, 4 * KiB)
            fake.served = blob
            assert await reader.read(content, offset, 4 * KiB) == blob[offset : offset + 4 * KiB]
            assert fake.requests == [(CHUNK + 5 * PIECE_SIZE_BYTES, PIECE_SIZE_BYTES)] * 2

    try:
        trio.run(main)
    finally:
        store.close()


def test_partial_chunks_count_in_the_quota_and_are_evicted_like_chunks(tmp_path: Path) -> None:
    key = "sha256:" + "ab" * 32
    quota = 3 * PIECE_SIZE_BYTES
    store = ChunkStore(tmp_path / "cache", quota)
    try:
        store.register_blob(key, 4 * CHUNK, CHUNK)
        pieces = {}
        for n, idx in enumerate([0, 1, 2, 3, 0]):
            at = (n % 8) * PIECE_SIZE_BYTES
            data = random.Random(n).randbytes(PIECE_SIZE_BYTES)
            assert store.put_pieces(key, idx, CHUNK, at, data)
            pieces[(idx, at)] = data
            assert store.used_bytes() <= quota
        # the last pieces put are there, the first were evicted; a piece never marked is a miss
        assert store.read(key, 0, 4 * PIECE_SIZE_BYTES, 10) == pieces[(0, 4 * PIECE_SIZE_BYTES)][:10]
        assert store.read(key, 0, 0, 10) is None
        assert store.read(key, 0, 7 * PIECE_SIZE_BYTES, 10) is None
        assert store.cached_chunks(key) == set()  # partial chunks are not whole chunks
        assert store.verify_chunks() == (3, 0)
    finally:
        store.close()


def test_pieces_complete_a_chunk_and_a_whole_chunk_replaces_a_partial_one(tmp_path: Path) -> None:
    key = "sha256:" + "cd" * 32
    length = 2 * PIECE_SIZE_BYTES + 1000  # a short last piece
    data = random.Random(1).randbytes(length)
    store = ChunkStore(tmp_path / "cache")
    try:
        store.register_blob(key, length, length)
        assert store.put_pieces(key, 0, length, 2 * PIECE_SIZE_BYTES, data[2 * PIECE_SIZE_BYTES :])
        assert not store.has_chunk(key, 0)
        assert store.put_pieces(key, 0, length, 0, data[: 2 * PIECE_SIZE_BYTES])
        assert store.has_chunk(key, 0) and store.read(key, 0, 0, length) == data
        assert store.used_bytes() == length
        other = "sha256:" + "ef" * 32
        store.register_blob(other, length, length)
        assert store.put_pieces(other, 0, length, 0, data[:PIECE_SIZE_BYTES])
        assert store.put(other, 0, data)
        assert store.read(other, 0, 0, length) == data and store.used_bytes() == 2 * length
        with pytest.raises(ValueError, match="not whole pieces"):
            store.put_pieces(key, 1, length, 100, data[:PIECE_SIZE_BYTES])
    finally:
        store.close()


_PUT_PIECES_FOREVER = """
import random, sys
from pathlib import Path
from kitfs.cache.store import ChunkStore
store = ChunkStore(Path(sys.argv[1]), int(sys.argv[2]))
key, chunk, piece = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
store.register_blob(key, 8 * chunk, chunk)
blob = random.Random(0).randbytes(8 * chunk)
rng = random.Random()
print("ready", flush=True)
while True:
    at = rng.randrange(8 * chunk // piece) * piece
    store.put_pieces(key, at // chunk, chunk, at % chunk, blob[at : at + piece])
"""


def test_kill_9_while_putting_pieces_never_marks_missing_or_wrong_bytes_present(
    tmp_path: Path,
) -> None:
    """A process putting pieces (under a quota, so it also evicts) is killed with SIGKILL at
    random moments; every piece the cache then says it has holds the right bytes."""
    cache = tmp_path / "cache"
    key = "sha256:" + "77" * 32
    blob = random.Random(0).randbytes(8 * CHUNK)
    for round_ in range(4):
        with subprocess.Popen(
                [sys.executable, "-c", _PUT_PIECES_FOREVER, str(cache), str(3 * CHUNK), key,
                 str(CHUNK), str(PIECE_SIZE_BYTES)], stdout=subprocess.PIPE, text=True) as process:
            try:
                assert process.stdout is not None and process.stdout.readline() == "ready\n"
                time.sleep(0.05 + 0.1 * round_)
            finally:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        store = ChunkStore(cache, 3 * CHUNK)
        try:
            present = 0
            for idx in range(8):
                for at in range(0, CHUNK, PIECE_SIZE_BYTES):
                    got = store.read(key, idx, at, PIECE_SIZE_BYTES)
                    if got is not None:
                        present += 1
                        start = idx * CHUNK + at
                        assert got == blob[start : start + PIECE_SIZE_BYTES], (round_, idx, at)
            assert present > 0 and store.used_bytes() <= 3 * CHUNK
            assert store.verify_chunks()[1] == 0
        finally:
            store.close()


def test_piece_ids_are_per_piece_blake3() -> None:
    data = random.Random(2).randbytes(2 * PIECE_SIZE_BYTES + 5)
    ids = piece_ids(data)
    assert len(ids) == 3 * 32
    assert ids[32:64] == piece_ids(data[PIECE_SIZE_BYTES : 2 * PIECE_SIZE_BYTES])


# --- through a real mount: the registry's log is the witness -----------------------------------


@pytest.fixture(scope="module")
def big_file_kit(registry: Registry, pusher: Pusher) -> tuple[str, bytes]:
    weights = random.Random(9).randbytes(24 << 20)
    layer = tar_layer("model", {"models/big.bin": weights}, "models/big.bin")
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0", "package": {"name": "pieces"},
               "model": {"name": "m", "path": "models/big.bin"}}
    with_layer_info(kitfile, [(kitfile["model"], layer)])
    reference = f"{registry.host}/team/pieces:v1"
    pusher.push_kit(reference, kitfile, [layer])
    return reference, weights


def test_random_4k_reads_on_a_mount_fetch_a_piece_each_not_a_chunk(
    mounter: Mounter, big_file_kit: tuple[str, bytes], registry: Registry
) -> None:
    """Isolated random 4 KiB reads of an uncached file: the registry sends at most 256 KiB
    per read on average (a 4 MiB chunk each before), and the bytes are right."""
    reference, weights = big_file_kit
    mount = mounter.mount(reference)
    path = mount.path / "models/big.bin"
    path.stat()  # index the layer first: its header read is not a random read
    rng = random.Random(4)
    offsets = [rng.randrange(1, len(weights) // 4096) * 4096 for _ in range(20)]
    mark = registry.log_mark()
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in offsets:
            assert os.pread(fd, 4096, offset) == weights[offset : offset + 4096]
    finally:
        os.close(fd)
    fetched = registry.blob_bytes_served(mark)
    assert 0 < fetched <= 20 * 256 * KiB, fetched
