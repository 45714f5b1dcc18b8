"""The verification frontier: what it keeps while a blob's digest is hashed in order, and the
flow control that keeps a stream from fetching further ahead than it keeps bytes for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from kitfs.cache.identity import piece_ids
from kitfs.cache.store import ChunkStore
from kitfs.core import verify
from kitfs.core.content import ChunkBuffer, Content
from kitfs.core.verify import KEPT_FOR_FRONTIER, Verifier
from kitfs.format.digest import Digest
from kitfs.format.mediatypes import Compression

CHUNK = 64 * 1024


def make_verifier(store: ChunkStore, memory: dict[int, bytearray]) -> Verifier:
    async def fetch_slice(content: Content, idx: int, start: int, length: int) -> bytes:
        raise AssertionError("the frontier fetched a chunk")

    return Verifier(store, chunk_size=lambda content: CHUNK, fetch_slice=fetch_slice,
                    in_memory=lambda key, idx: memory.get(idx), forget_memory=lambda key: None)


def content_of(blob: bytes) -> Content:
    return Content(registry=None, repository="team/kit",  # type: ignore[arg-type]
                   blob_digest=Digest.of(blob), blob_size=len(blob),
                   compression=Compression.NONE)


def test_a_chunk_noted_while_the_frontier_hashes_it_is_not_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A chunk's store can finish while the frontier, which took the chunk from memory, is
    # hashing it: what the store then notes for the frontier must not stay behind (it held the
    # chunk's bytes until the daemon exited, and took a place among the KEPT_FOR_FRONTIER).
    blob = bytes(range(256)) * (3 * CHUNK // 256)
    memory = {0: bytearray(blob[:CHUNK])}  # chunk 0 in memory; 1 and 2 nowhere yet
    store = ChunkStore(tmp_path / "cache", None)
    verifier = make_verifier(store, memory)
    content = content_of(blob)
    feed = verify._feed

    def feed_while_noted(hasher: Any,
                         batch: list[tuple[bytes | ChunkBuffer, bytes | None]]) -> list[bytes]:
        trio.from_thread.run_sync(lambda: verifier.note_fetched(
            content.key, 0, piece_ids(memory[0]), memory[0]))
        return feed(hasher, batch)

    monkeypatch.setattr(verify, "_feed", feed_while_noted)
    try:
        trio.run(lambda: verifier.advance_frontier(content, fetch_missing=False))
        assert verifier.frontier_at(content.key) == 1
        assert not verifier.holds(content.key, 0)
    finally:
        store.close()


def test_a_fetch_far_enough_ahead_of_the_frontier_waits_for_it(tmp_path: Path) -> None:
    blob = bytes(range(256)) * ((KEPT_FOR_FRONTIER + 2) * CHUNK // 256)
    memory: dict[int, bytearray] = {}
    store = ChunkStore(tmp_path / "cache", None)
    verifier = make_verifier(store, memory)
    content = content_of(blob)
    key = content.key
    ahead = KEPT_FOR_FRONTIER  # chunk 16, with the frontier at chunk 0

    async def main() -> None:
        await verifier.advance_frontier(content, fetch_missing=False)  # starts it at 0
        assert verifier.frontier_at(key) == 0
        order: list[str] = []

        async def fetch_far_ahead() -> None:
            await verifier.wait_until_near(key, ahead, lambda at: at in memory, lambda: None,
                                           timeout_s=30)
            order.append("fetch")

        await fetch_far_ahead()  # chunk 0 is nowhere: a stalled frontier holds nothing back
        assert order == ["fetch"]
        order.clear()
        memory[0] = bytearray(blob[:CHUNK])  # once it is on its way, the fetch waits for it
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch_far_ahead)
            await trio.testing.wait_all_tasks_blocked()
            assert order == []
            await verifier.advance_frontier(content, fetch_missing=False)  # hashes chunk 0
            await trio.testing.wait_all_tasks_blocked()
            assert order == ["fetch"]
        # a fetch far beyond what the frontier keeps is not its stream's: it never waits
        with trio.fail_after(5):
            await verifier.wait_until_near(key, 1 + 2 * KEPT_FOR_FRONTIER, lambda at: True,
                                           lambda: None, timeout_s=30)

    try:
        trio.run(main)
    finally:
        store.close()
