"""Checkpoints in gzip layers, through the real CLI and registry (README "Laziness" and
"Verification"): after the first pass, a chunk evicted from the cache is made again from the
checkpoint before it, fetching only the compressed bytes between two checkpoints, in a new
process too (the index persists in the cache); a damaged index falls back to decompressing
from the start with the right bytes; ``cache clear`` removes indexes and the quota counts
them; a chunk made again is checked against the sha256 the verified first pass kept; and
concurrent reads of one evicted chunk share one fetch (the registry's own log is the witness).
"""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from kitfs.cache.store import ChunkStore
from kitfs.core.reader import DEFAULT_CHUNK_SIZE_BYTES, BlobReader, Content, VerifyMode
from kitfs.demo import Entry, Layer, Pusher, Registry, push_entries, tar_layer
from kitfs.format.digest import Digest
from kitfs.format.mediatypes import Compression
from kitfs.remote.registry import RegistryClient, RegistryConfig

CHUNK = DEFAULT_CHUNK_SIZE_BYTES  # the CLI's chunk size, and the checkpoint spacing
MIB = 1024 * 1024
# A checkpoint span: from the checkpoint at or before a chunk to the one at or after its end,
# at most a spacing either side of the chunk; these layers barely compress (gzip stores
# random blocks with 5 bytes of framing per 64 KiB), so compressed bytes ~ decompressed ones.
SPAN_BOUND = 3 * CHUNK + 64 * 1024


def low_compressibility(size: int, seed: int) -> bytes:
    """Random bytes with a quarter of plain text mixed in, in 64 KiB blocks (seeded)."""
    rng = random.Random(seed)
    text = b"".join(b"line %d of a text file that gzip compresses well\n" % i for i in range(1400))
    blocks = [text[:65536] if rng.random() < 0.25 else rng.randbytes(65536)
              for _ in range(size // 65536 + 1)]
    return b"".join(blocks)[:size]


@dataclass(frozen=True)
class GzipKit:
    reference: str
    layer: Layer
    files: dict[str, bytes]

    @property
    def diff_id(self) -> str:
        assert self.layer.diff_id is not None
        return self.layer.diff_id

    @property
    def content_key(self) -> str:
        """Where the cache keeps the decompressed stream: by the compressed blob's digest."""
        return f"gunzip:{self.layer.digest}"


def push_gzip_kit(registry: Registry, pusher: Pusher, name: str, files: dict[str, bytes]) -> GzipKit:
    layer = tar_layer("dataset", files, "data", "gzip")
    reference = f"{registry.host}/gzip/{name}:v1"
    push_entries(pusher, reference, [Entry("datasets", {"name": name, "path": "data"}, layer)],
                 package={"name": name})
    return GzipKit(reference, layer, files)


@pytest.fixture(scope="module")
def kit(registry: Registry, pusher: Pusher) -> GzipKit:
    """~46 MiB of tar in a gzip layer: a big file, then a small one in the last chunk."""
    files = {"data/big.bin": low_compressibility(46 * MIB + 1234, 1),
             "data/tail.txt": b"the end of the layer\n" * 200}
    return push_gzip_kit(registry, pusher, "mixed", files)


def stats(kitfs: Any) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(kitfs("cache", "stats", "--json").text)
    return result


def evict_decompressed_chunks(cache_dir: Path, kit: GzipKit) -> None:
    """Drop every cached chunk of the layer's decompressed stream (what a quota does over time)."""
    store = ChunkStore(cache_dir)
    try:
        store.purge_chunks(kit.content_key)
        assert store.cached_chunks(kit.content_key) == set()
    finally:
        store.close()


def index_file(cache_dir: Path, kit: GzipKit) -> Path:
    algo, hex_ = kit.layer.digest.split(":")
    path = cache_dir / "checkpoints" / algo / hex_[:2] / hex_
    assert path.is_file(), path
    return path


def test_after_eviction_a_small_read_near_the_end_costs_one_checkpoint_span(
        kitfs: Any, registry: Registry, kit: GzipKit, cache_dir: Path) -> None:
    mark = registry.log_mark()
    assert kitfs("cat", kit.reference, "data/big.bin").stdout == kit.files["data/big.bin"]
    assert registry.blob_bytes_served(mark) >= len(kit.layer.data)  # the first pass: all of it
    assert stats(kitfs)["checkpoint_indexes"] == 1
    evict_decompressed_chunks(cache_dir, kit)

    # a new process on the same cache: the checkpoints come from the cache
    mark = registry.log_mark()
    assert kitfs("cat", kit.reference, "data/tail.txt").stdout == kit.files["data/tail.txt"]
    served = registry.blob_bytes_served(mark)
    assert 0 < served <= SPAN_BOUND, served
    assert served < len(kit.layer.data) // 3, (served, len(kit.layer.data))
    # and the chunk made again is in the cache: reading it again fetches nothing
    mark = registry.log_mark()
    assert kitfs("cat", kit.reference, "data/tail.txt").stdout == kit.files["data/tail.txt"]
    assert registry.blob_bytes_served(mark) == 0


def test_a_damaged_index_falls_back_to_decompressing_from_the_start(
        kitfs: Any, registry: Registry, kit: GzipKit, cache_dir: Path) -> None:
    kitfs("cat", kit.reference, "data/tail.txt")  # the first pass
    evict_decompressed_chunks(cache_dir, kit)
    path = index_file(cache_dir, kit)
    damaged = bytearray(path.read_bytes())
    damaged[10] ^= 0xFF  # in the header, which every use of the index reads
    path.write_bytes(bytes(damaged))

    mark = registry.log_mark()
    result = kitfs("cat", kit.reference, "data/tail.txt")
    assert result.stdout == kit.files["data/tail.txt"]
    assert registry.blob_bytes_served(mark) >= len(kit.layer.data)  # decompressed from the start
    warnings = [line for line in result.stderr.splitlines() if "checkpoint index" in line]
    assert len(warnings) == 1 and "xxh3" in warnings[0], result.stderr
    # the fallback made a good index again: the next eviction costs a span again
    assert stats(kitfs)["checkpoint_indexes"] == 1
    evict_decompressed_chunks(cache_dir, kit)
    mark = registry.log_mark()
    assert kitfs("cat", kit.reference, "data/tail.txt").stdout == kit.files["data/tail.txt"]
    assert registry.blob_bytes_served(mark) <= SPAN_BOUND


def test_a_truncated_index_file_is_dropped_and_the_bytes_stay_right(
        kitfs: Any, registry: Registry, kit: GzipKit, cache_dir: Path) -> None:
    kitfs("cat", kit.reference, "data/tail.txt")
    evict_decompressed_chunks(cache_dir, kit)
    path = index_file(cache_dir, kit)
    path.write_bytes(path.read_bytes()[:100])
    result = kitfs("cat", kit.reference, "data/big.bin")
    assert result.stdout == kit.files["data/big.bin"]
    assert "shorter than recorded" in result.stderr, result.stderr


def test_the_quota_counts_indexes_and_cache_clear_removes_them(
        kitfs: Any, kit: GzipKit, cache_dir: Path) -> None:
    kitfs("cat", kit.reference, "data/tail.txt")
    evict_decompressed_chunks(cache_dir, kit)
    size = index_file(cache_dir, kit).stat().st_size
    after = stats(kitfs)
    assert after["chunk_count"] == 0 and after["checkpoint_indexes"] == 1
    assert after["used_bytes"] == size > 0
    # a checkpoint per 4 MiB chunk, each 32 KiB of window and 18 bytes of table
    checkpoints = len(kit.files["data/big.bin"]) // CHUNK
    assert checkpoints * 32 * 1024 <= size <= (checkpoints + 3) * (32 * 1024 + 18) + 35, size
    assert "0 dropped" in kitfs("cache", "verify").text
    # a quota smaller than the index evicts it too (after every chunk)
    kitfs("cache", "gc", "--cache-size", str(size - 1))
    assert stats(kitfs)["used_bytes"] == 0
    assert not (cache_dir / "checkpoints").exists() or not any(
        p.is_file() for p in (cache_dir / "checkpoints").rglob("*"))

    kitfs("cat", kit.reference, "data/tail.txt")
    assert stats(kitfs)["checkpoint_indexes"] == 1
    kitfs("cache", "clear")
    cleared = stats(kitfs)
    assert cleared["checkpoint_indexes"] == 0 and cleared["used_bytes"] == 0
    assert not any(p.is_file() for p in (cache_dir / "checkpoints").rglob("*"))


def test_under_a_small_quota_a_whole_read_after_eviction_costs_about_one_pass(
        kitfs: Any, registry: Registry, kit: GzipKit) -> None:
    """The quota evicts chunks as the first pass stores them, and the index only after every
    chunk, so it survives. Reading the whole file again makes each chunk from its checkpoint;
    consecutive chunks' spans overlap, and the overlap comes from memory, so the registry
    serves about the compressed layer once, not a span per chunk."""
    quota = ["--cache-size", "10M"]
    assert kitfs("cat", *quota, kit.reference, "data/tail.txt").stdout == kit.files["data/tail.txt"]
    after = stats(kitfs)
    assert after["used_bytes"] <= 10 * MIB and after["checkpoint_indexes"] == 1
    mark = registry.log_mark()
    head = kitfs("cat", *quota, kit.reference, "data/big.bin").stdout
    assert head == kit.files["data/big.bin"]
    assert registry.blob_bytes_served(mark) <= len(kit.layer.data) + SPAN_BOUND
    assert stats(kitfs)["used_bytes"] <= 10 * MIB


def test_a_chunk_made_again_is_checked_against_the_verified_one(
        kitfs: Any, registry: Registry, pusher: Pusher, cache_dir: Path) -> None:
    """The registry serves a tampered blob after the layer was verified: the chunk made from
    its checkpoint differs from the one the first pass saw, and the read fails (exit 65, EIO
    under FUSE) with a log line naming the layer; nothing wrong is returned or cached."""
    files = {"data/random.bin": random.Random(7).randbytes(13 * MIB)}
    kit = push_gzip_kit(registry, pusher, "tampered", files)
    kitfs("cat", kit.reference, "data/random.bin")
    evict_decompressed_chunks(cache_dir, kit)
    blob = registry.blob_file(kit.layer.digest)
    genuine = blob.read_bytes()
    tampered = bytearray(genuine)
    tampered[len(genuine) - 1024 * 1024] ^= 0x01  # inside a stored block of the last chunk
    blob.write_bytes(bytes(tampered))
    try:
        result = kitfs("cat", kit.reference, "data/random.bin", check=False)
    finally:
        blob.write_bytes(genuine)
    assert result.returncode == 65, result.stderr
    assert result.stdout == files["data/random.bin"][: len(result.stdout)]
    assert len(result.stdout) < len(files["data/random.bin"])
    assert "made again from a checkpoint" in result.stderr and kit.layer.digest in result.stderr
    # the registry healthy again, the same read succeeds from the checkpoint
    mark = registry.log_mark()
    assert kitfs("cat", kit.reference, "data/random.bin").stdout == files["data/random.bin"]
    assert registry.blob_bytes_served(mark) < len(kit.layer.data)


async def test_concurrent_reads_of_one_evicted_chunk_share_one_fetch(
        registry: Registry, kit: GzipKit, tmp_path: Path) -> None:
    repository = kit.reference.split("/", 1)[1].split(":")[0]
    raw_size = None
    async with RegistryClient(registry.host, RegistryConfig(plain_http=True)) as client:
        content = Content(registry=client, repository=repository,
                          blob_digest=Digest.parse(kit.layer.digest),
                          blob_size=len(kit.layer.data), compression=Compression.GZIP,
                          diff_id=Digest.parse(kit.diff_id))
        store = ChunkStore(tmp_path / "cache")
        try:
            async with trio.open_nursery() as nursery:
                raw_size = await BlobReader(store, nursery, VerifyMode.EVENTUAL).size(content)
            store.purge_chunks(kit.content_key)

            mark = registry.log_mark()
            results: dict[int, bytes] = {}
            offset = 5 * CHUNK + 1000  # inside chunk 5

            async def read(n: int, reader: BlobReader) -> None:
                results[n] = bytes(await reader.read(content, offset + n * 4096, 4096))

            async with trio.open_nursery() as nursery:
                reader = BlobReader(store, nursery, VerifyMode.EVENTUAL)
                for n in range(4):
                    nursery.start_soon(read, n, reader)
        finally:
            store.close()
    assert raw_size is not None and raw_size > 6 * CHUNK
    tar_offset = _offset_in_tar(kit, "data/big.bin")
    big = kit.files["data/big.bin"]
    for n, data in results.items():
        at = offset + n * 4096 - tar_offset
        assert data == big[at : at + 4096]
    blob_gets = [r for r in registry.requests(mark) if r[0] == "GET" and "/blobs/" in r[1]]
    assert len(blob_gets) == 1, blob_gets
    assert 0 < blob_gets[0][2] <= SPAN_BOUND


def _offset_in_tar(kit: GzipKit, name: str) -> int:
    """Where ``name``'s bytes start in the layer's tar."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(kit.layer.data))) as tar:
        return int(tar.getmember(name).offset_data)
