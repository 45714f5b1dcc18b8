"""Single-flight and task-group helpers shared by the read path.

Owns ``Flights``: work in progress keyed by any hashable (a chunk, a blob's verification),
so that concurrent tasks wanting the same thing start it once and the others wait for it;
``BackgroundTasks``, work started behind a reply that a session waits for before it closes;
and ``collapse_groups``, which turns a nursery's exception group back into the one
``KitfsError`` callers expect. Everything runs on the one trio thread: no locks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Generic, TypeVar

import trio

from kitfs.errors import unwrap_group

K = TypeVar("K", bound=Hashable)


class Flights(Generic[K]):
    """Work in flight, by key. The leader runs ``async with flights.leader(key)`` (or
    ``leader_of(keys)`` for several keys at once); the others find ``busy(key)`` true and
    ``await flights.join(key)``, which returns when the leader is done, whether it succeeded
    or not (the waiter then looks again at what the leader left, e.g. in the cache)."""

    def __init__(self) -> None:
        self._events: dict[K, trio.Event] = {}

    def busy(self, key: K) -> bool:
        return key in self._events

    def __contains__(self, key: object) -> bool:
        return key in self._events

    async def join(self, key: K) -> None:
        """Wait for the flight of ``key`` to end (at once if there is none)."""
        event = self._events.get(key)
        if event is not None:
            await event.wait()

    @asynccontextmanager
    async def leader(self, key: K) -> AsyncIterator[None]:
        """Lead the flight of ``key``: it is busy until the block ends, however it ends."""
        with self.leading([key]):
            yield

    @contextmanager
    def leading(self, keys: Iterable[K]) -> Iterator[None]:
        """Lead one flight for all of ``keys`` (none of them may be busy)."""
        keys = list(keys)
        done = trio.Event()
        for key in keys:
            assert key not in self._events, key
            self._events[key] = done
        try:
            yield
        finally:
            for key in keys:
                del self._events[key]
            done.set()



class BackgroundTasks:
    """Tasks started in a nursery behind the reply they followed (a chunk's store, a layer
    index's), counted from the moment they are started, so that ``settle`` can wait until
    every one started so far has finished (the session does before it closes)."""

    def __init__(self) -> None:
        self._running = 0
        self._idle = trio.Event()
        self._idle.set()

    def start_soon(self, nursery: trio.Nursery, fn: Callable[..., Awaitable[Any]], *args: Any,
                   name: str) -> None:
        if not self._running:
            self._idle = trio.Event()
        self._running += 1
        nursery.start_soon(self._run, fn, args, name=name)

    async def _run(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()

    async def settle(self) -> None:
        """Wait until no task started here is running."""
        while self._running:
            await self._idle.wait()


@contextmanager
def collapse_groups() -> Iterator[None]:
    """Re-raise the first ``KitfsError`` of a nursery's exception group as itself."""
    try:
        yield
    except BaseExceptionGroup as group:
        inner = unwrap_group(group)
        if inner is group:
            raise
        raise inner from None
