"""ChunkMemory: what the reader keeps in memory while several streams read ahead at once."""

from __future__ import annotations

from kitfs.core import memory
from kitfs.core.memory import BufferPool, ChunkMemory


def chunk(i: int) -> bytearray:
    return bytearray([i % 256]) * 16


def test_chunks_fetched_ahead_outlive_chunks_already_read() -> None:
    mem = ChunkMemory(recent_chunks=4, ahead_budget_chunks=8)
    for i in range(4):  # four chunks fetched by reads, and read
        mem.remember("a", i, chunk(i))
        assert mem.view("a", i, 0, 1) is not None
    mem.expect([("b", 0), ("b", 1), ("b", 2)])  # read-ahead for another stream
    for i in range(3):
        mem.remember("b", i, chunk(i))
    mem.remember("a", 4, chunk(4))
    # the read-ahead chunks stay; the oldest read ones went
    assert all(("b", i) in mem for i in range(3))
    assert ("a", 4) in mem
    assert [i for i in range(5) if ("a", i) in mem] == [1, 2, 3, 4]
    # once read, they are ordinary recent chunks again
    for i in range(3):
        view = mem.view("b", i, 0, 2)
        assert view is not None and bytes(view) == bytes([i, i])
    for i in range(5, 9):
        mem.remember("a", i, chunk(i))
    assert len(mem.recent) == 4  # all read now: back to recent_chunks


def test_read_ahead_shares_one_budget_and_gets_it_back_as_chunks_are_read() -> None:
    mem = ChunkMemory(recent_chunks=2, ahead_budget_chunks=5)
    assert mem.read_ahead_room() == 5
    mem.expect([("a", 1), ("a", 2), ("a", 3)])
    mem.expect([("b", 1), ("b", 2)])
    assert mem.read_ahead_room() == 0
    for entry in [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2)]:
        mem.remember(*entry, chunk(entry[1]))
    assert len(mem.recent) == 5  # all unread: none let go
    mem.view("a", 1, 0, 1)
    assert mem.read_ahead_room() == 1
    mem.unexpect([("b", 2)])  # fetched by a read instead
    assert mem.read_ahead_room() == 2


def test_an_abandoned_stream_gives_its_budget_back() -> None:
    now = [100.0]
    mem = ChunkMemory(recent_chunks=1, ahead_budget_chunks=2, clock=lambda: now[0])
    mem.expect([("a", 1), ("a", 2)])
    mem.remember("a", 1, chunk(1))
    mem.remember("a", 2, chunk(2))
    assert mem.read_ahead_room() == 0
    now[0] += memory.UNREAD_EXPIRY_S + 1
    assert mem.read_ahead_room() == 2
    mem.remember("b", 0, chunk(0))
    assert len(mem.recent) == 1


def test_a_blob_that_failed_is_forgotten_whole() -> None:
    mem = ChunkMemory()
    mem.expect([("a", 0)])
    mem.remember("a", 0, chunk(0))
    mem.begin_storing("a", 1, chunk(1))
    mem.remember("b", 0, chunk(0))
    mem.forget("a")
    assert ("a", 0) not in mem and ("a", 1) not in mem and ("b", 0) in mem
    assert mem.read_ahead_room() == memory.AHEAD_BUDGET_CHUNKS


def test_a_buffer_is_reused_only_once_no_view_of_it_is_left() -> None:
    pool = BufferPool(4096, max_buffers=2)
    first = pool.take(4096)
    first[:3] = b"abc"
    kept = first[1:2]  # a slice held elsewhere (memory, a reply) keeps it busy
    del first
    second = pool.take(4096)
    second[:3] = b"xyz"
    third = pool.take(100)  # over max_buffers in use: a fresh mapping
    assert bytes(kept) == b"b" and pool.reused == 0
    assert len(third) == 100
    del kept
    again = pool.take(1000)  # the first buffer, free now
    assert pool.reused == 1 and len(again) == 1000
    assert bytes(second[:3]) == b"xyz"
    too_big = pool.take(8192)  # not the pool's size: a fresh mapping of its own
    assert len(too_big) == 8192 and pool.reused == 1
