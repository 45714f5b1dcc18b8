"""Pins in the cache (kitfs.cache.pins and the eviction in kitfs.cache.chunks): pinned keys'
chunks and gzip checkpoints are never evicted, still count in the quota, and a quota smaller
than the pins is refused; the m005 migration keeps an older cache's contents."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from kitfs.cache import schema
from kitfs.cache.store import ChunkStore
from kitfs.errors import UsageError

MiB = 1024 * 1024
A, B, C = "sha256:" + "a" * 64, "sha256:" + "b" * 64, "sha256:" + "c" * 64


def fill(store: ChunkStore, key: str, chunks: int) -> None:
    for idx in range(chunks):
        assert store.put(key, idx, os.urandom(MiB))


def cached(store: ChunkStore, key: str) -> set[int]:
    return store.cached_chunks(key)


def test_pinned_chunks_are_never_evicted_and_count_in_the_quota(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "cache", quota_bytes=6 * MiB)
    fill(store, A, 3)  # the oldest: LRU would take these first
    store.pins.add("reg/a:v1", "sha256:" + "1" * 64, [A])
    fill(store, B, 6)  # 9 MiB put through a 6 MiB quota
    assert cached(store, A) == {0, 1, 2}
    assert len(cached(store, B)) == 3  # what the quota left once the pins are counted
    assert store.used_bytes() <= 6 * MiB
    assert store.statistics().pinned_bytes == 3 * MiB
    store.evict(0)  # gc's eviction too
    assert cached(store, A) == {0, 1, 2} and cached(store, B) == set()
    store.pins.remove("reg/a:v1")
    store.evict(0)
    assert cached(store, A) == set()
    store.close()


def test_a_key_stays_pinned_while_any_reference_pins_it(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "cache", quota_bytes=4 * MiB)
    fill(store, A, 2)
    store.pins.add("reg/a:v1", "sha256:" + "1" * 64, [A])
    assert store.pins.add("reg/a:v2", "sha256:" + "2" * 64, [A, C]) == [A, C]
    assert store.pins.add("reg/a:v2", "sha256:" + "2" * 64, [A]) == []  # nothing new
    store.pins.remove("reg/a:v1")
    store.evict(0)
    assert cached(store, A) == {0, 1}
    assert [(p.reference, p.keys, p.stored_bytes) for p in store.pins.all()] == [
        ("reg/a:v2", (A, C), 2 * MiB)]
    assert store.pins.pinned_bytes(excluding_reference="reg/a:v2") == 0
    store.close()


def test_pinned_checkpoints_are_kept_too(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "cache", quota_bytes=3 * MiB)
    assert store.put_checkpoints(A, "gunzip:" + A, os.urandom(MiB))
    assert store.put_checkpoints(B, "gunzip:" + B, os.urandom(MiB))
    store.pins.add("reg/a:v1", "sha256:" + "1" * 64, [A, "gunzip:" + A])
    store.evict(0)
    assert store.has_checkpoints(A) and not store.has_checkpoints(B)
    assert store.pins.pinned_bytes() == MiB
    store.close()


def test_a_quota_smaller_than_the_pins_is_refused(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "cache")
    fill(store, A, 3)
    store.pins.add("reg/a:v1", "sha256:" + "1" * 64, [A])
    store.close()
    with pytest.raises(UsageError) as caught:
        ChunkStore(tmp_path / "cache", quota_bytes=2 * MiB)
    assert str(caught.value) == (
        f"--cache-size {2 * MiB} bytes is smaller than the {3 * MiB} bytes pinned in the cache "
        f"{tmp_path / 'cache'} (kitfs cache pins lists them, kitfs cache unpin REF releases one)")
    ChunkStore(tmp_path / "cache", quota_bytes=3 * MiB).close()  # exactly the pins: fine
    ChunkStore(tmp_path / "cache").close()  # no quota: fine


def test_clear_drops_the_pins(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "cache")
    fill(store, A, 1)
    store.pins.add("reg/a:v1", "sha256:" + "1" * 64, [A])
    store.clear()
    assert store.pins.all() == [] and store.statistics().pinned_bytes == 0
    store.close()


def test_a_cache_made_before_pins_is_migrated_with_its_chunks(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    store = ChunkStore(cache)
    fill(store, A, 2)
    store.close()
    conn = sqlite3.connect(cache / schema.DATABASE_NAME)  # as kitfs left it before m005
    conn.execute("DROP TABLE pins")
    conn.execute("DROP TABLE tags")
    conn.execute("DELETE FROM _sqlite_migrations WHERE name = 'm005_pins_and_tags'")
    conn.commit()
    conn.close()
    store = ChunkStore(cache, quota_bytes=4 * MiB)
    assert cached(store, A) == {0, 1}
    assert store.pins.all() == []
    store.pins.add("reg/a:v1", "sha256:" + "1" * 64, [A])
    assert store.statistics().pinned_bytes == 2 * MiB
    store.close()
