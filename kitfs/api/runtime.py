"""The Python API's event loop: one background thread running trio, shared by every ``Kit`` and
``KitFileSystem`` of the process; and the one place where core errors become Python errors.

Why a thread. The core (``KitSession``) is trio code, and a synchronous API must work wherever
it is called from: a script, many threads at once, and a thread whose asyncio loop is already
running (a Jupyter cell), where neither ``trio.run`` nor ``asyncio.run`` may be called. So the
core runs on a thread of its own, and a caller hands it a coroutine function
(``TrioToken.run_sync_soon``, which is thread-safe), then blocks on a ``threading.Event`` until
the task is done; the caller's own event loop, if it has one, is never touched. Calls from many
threads run as concurrent tasks of that one loop, so they share one session per set of
options: one cache connection, the registry connections, single-flight fetches.

Sessions. One ``KitSession`` per distinct ``SessionOptions``, opened on first use and kept
until ``shutdown()`` (registered with ``atexit``), each held open by a task of the loop, so
its nursery (decompression jobs) outlives the calls that started them. Closing waits, as the
CLI does, for the chunks already served to be hashed and stored.

Generations. ``shutdown()`` ends a loop, and a child process after ``fork()`` has no copy of
its parent's thread; the next call starts a new loop. Each loop has a generation number; a
call made for an older one raises ``StaleGenerationError`` before it runs, and ``Kit`` opens
its kit again (by its pinned digest: no tag is resolved twice).

Interrupts. A caller interrupted while it waits (Ctrl-C in a notebook) cancels its task and
waits for it to end before the ``KeyboardInterrupt`` goes on.

Errors (the Python boundary, as ``kitfs.mount.filesystem`` is the FUSE one): a ``KitfsError``
becomes an ``OSError`` with the errno its class has on a mount (``kitfs.errors``), which
Python turns into ``FileNotFoundError`` (ENOENT), ``PermissionError`` (EACCES: the registry
refused the credentials) or a plain ``OSError`` (EIO: a failed digest, a refused layer, the
registry failing or not answering in time, the cache unusable); a ``UsageError`` (a bad
reference or option) becomes ``ValueError``. The kitfs error is the new one's ``__cause__``.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import outcome
import trio

from kitfs.core.modelkit import SETTLE_TIMEOUT_S, KitSession, SessionOptions, open_session
from kitfs.errors import KitfsError, UsageError, unwrap_group

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long shutdown() waits for the loop to close its sessions (each waits up to
# SETTLE_TIMEOUT_S for chunks already served to be stored).
SHUTDOWN_TIMEOUT_S = SETTLE_TIMEOUT_S + 5.0
THREAD_NAME = "kitfs-trio"


class StaleGenerationError(Exception):
    """A call was made for a loop that has ended (after ``shutdown()`` or a ``fork()``)."""


def python_error(error: BaseException) -> BaseException:
    """The exception a Python caller sees for ``error`` (see the module docstring)."""
    error = unwrap_group(error)
    if isinstance(error, UsageError):
        mapped: BaseException = ValueError(str(error))
    elif isinstance(error, KitfsError):
        mapped = OSError(error.errno, str(error))  # FileNotFoundError, PermissionError, OSError
    else:
        return error
    mapped.__cause__ = error
    return mapped


def _options_key(options: SessionOptions) -> tuple[Any, ...]:
    """SessionOptions as a dictionary key (its ``select`` is a dict)."""
    return (options.cache_dir.absolute(), options.cache_size_bytes, options.verify,
            options.chunk_size_bytes, tuple(sorted(options.select.items())), options.registry)


@dataclass(eq=False)
class _Call:
    """One call handed to the loop; the caller waits on ``done``."""

    fn: Callable[..., Awaitable[Any]]
    args: tuple[Any, ...]
    generation: int | None
    done: threading.Event = field(default_factory=threading.Event)
    result: outcome.Outcome[Any] | None = None
    scope: trio.CancelScope | None = None
    cancelled: bool = False

    def cancel(self) -> None:  # on the loop's thread
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


_LOOP: trio.lowlevel.RunVar[_Loop] = trio.lowlevel.RunVar("kitfs_api_loop")


class _Loop:
    """One trio run on its own thread: one generation of the runtime."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.pid = os.getpid()
        self._token: trio.lowlevel.TrioToken | None = None
        self.failure: BaseException | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._calls: trio.Nursery | None = None
        self._holders: trio.Nursery | None = None
        self._sessions: dict[tuple[Any, ...], KitSession] = {}
        self._closers: list[trio.Event] = []
        self._session_lock: trio.Lock | None = None
        self.thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)

    def start(self) -> None:
        self.thread.start()
        self._ready.wait()
        if self._token is None:
            raise RuntimeError(f"kitfs: the event loop thread did not start: {self.failure!r}")

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # logged; the next call starts a new loop
            self.failure = exc
            log.exception("kitfs: the Python API's event loop ended with an error")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        _LOOP.set(self)
        self._stop = trio.Event()
        self._session_lock = trio.Lock()
        async with trio.open_nursery() as holders:
            self._holders = holders
            async with trio.open_nursery() as calls:
                self._calls = calls
                self._token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await self._stop.wait()
                calls.cancel_scope.cancel()
            for closer in self._closers:  # every call is over: close the sessions
                closer.set()

    @property
    def token(self) -> trio.lowlevel.TrioToken:
        """For ``run_sync_soon`` from other threads (set once the loop runs)."""
        assert self._token is not None
        return self._token

    # --- on the loop's thread -----------------------------------------------------------------

    def spawn(self, call: _Call) -> None:
        if self._calls is None or self._stop is None or self._stop.is_set():
            call.result = outcome.Error(RuntimeError("kitfs: the event loop is shutting down"))
            call.done.set()
            return
        self._calls.start_soon(self._serve, call)

    async def _serve(self, call: _Call) -> None:
        try:
            if call.generation is not None and call.generation != self.generation:
                raise StaleGenerationError(self.generation)
            with trio.CancelScope() as scope:
                call.scope = scope
                if call.cancelled:
                    scope.cancel()
                call.result = outcome.Value(await call.fn(*call.args))
            if scope.cancelled_caught:
                call.result = outcome.Error(RuntimeError("kitfs: the call was interrupted"))
        except Exception as exc:
            call.result = outcome.Error(exc)
        except BaseException:  # the loop is stopping (trio.Cancelled, maybe in a group)
            call.result = outcome.Error(RuntimeError("kitfs: the event loop stopped during the call"))
            raise
        finally:
            if call.result is None:
                call.result = outcome.Error(RuntimeError("kitfs: the call ended without a result"))
            call.done.set()

    async def session(self, options: SessionOptions) -> KitSession:
        """The loop's session for ``options``, opened on first use."""
        assert self._session_lock is not None and self._holders is not None
        key = _options_key(options)
        async with self._session_lock:
            found = self._sessions.get(key)
            if found is None:
                found = await self._holders.start(self._hold, key, options)
                self._sessions[key] = found
            return found

    async def _hold(self, key: tuple[Any, ...], options: SessionOptions,
                    task_status: trio.TaskStatus[KitSession] = trio.TASK_STATUS_IGNORED) -> None:
        closer = trio.Event()
        self._closers.append(closer)
        started = False
        try:
            async with open_session(options) as session:
                task_status.started(session)
                started = True
                await closer.wait()
        except Exception:
            if not started:
                raise  # the caller of session() gets it (a cache that cannot be opened)
            log.exception("kitfs: a session (cache %s) ended with an error", options.cache_dir)
        finally:
            if started:
                self._sessions.pop(key, None)

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()


class Runtime:
    """The process's loop, started on first use (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: _Loop | None = None
        self._generations = 0

    def _running(self) -> _Loop:
        with self._lock:
            loop = self._loop
            if loop is not None and loop.pid != os.getpid():
                loop = None  # a forked child: the thread is not here
            if loop is None or not loop.thread.is_alive():
                self._generations += 1
                loop = _Loop(self._generations)
                loop.start()
                self._loop = loop
            return loop

    @property
    def generation(self) -> int:
        """The generation of the running loop (started if need be)."""
        return self._running().generation

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any, generation: int | None = None) -> T:
        """Run ``fn(*args)`` on the loop and return its result, from any thread but the loop's.

        Raises:
            StaleGenerationError: ``generation`` is given and is not the running loop's.
            FileNotFoundError, PermissionError, OSError, ValueError: see the module docstring.
        """
        call = _Call(fn, args, generation)
        for attempt in range(2):
            loop = self._running()
            if threading.current_thread() is loop.thread:
                raise RuntimeError("kitfs: a blocking kitfs call was made on kitfs' own event "
                                   "loop thread (from inside a callback?)")
            try:
                loop.token.run_sync_soon(loop.spawn, call)
                break
            except trio.RunFinishedError:  # the loop ended just now
                if generation is not None or attempt:
                    raise StaleGenerationError(loop.generation) from None
        try:
            call.done.wait()
        except BaseException:  # KeyboardInterrupt while waiting: end the task first
            try:
                loop.token.run_sync_soon(call.cancel)
            except trio.RunFinishedError:
                pass
            call.done.wait()
            raise
        result = call.result
        assert result is not None
        if isinstance(result, outcome.Error):
            raise python_error(result.error)
        return result.unwrap()  # type: ignore[no-any-return]

    def in_loop(self) -> _Loop:
        """The loop running the calling task (on the loop's thread only)."""
        return _LOOP.get()

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Close every session and stop the loop; the next call starts a new one."""
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is None or loop.pid != os.getpid():
            return
        if threading.current_thread() is loop.thread:
            raise RuntimeError("kitfs: shutdown() called from kitfs' own event loop thread")
        try:
            loop.token.run_sync_soon(loop.stop)
        except trio.RunFinishedError:
            return
        loop.thread.join(timeout_s)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # it may have been held by another thread at the fork
        self._loop = None


RUNTIME = Runtime()
atexit.register(RUNTIME.shutdown)
os.register_at_fork(after_in_child=RUNTIME._after_fork_in_child)


def shutdown() -> None:
    """Close every session of the Python API (their caches, their connections) and stop its
    event loop thread. Optional: it is done at exit. Later calls start a new loop and open
    their kits again from the cache."""
    RUNTIME.shutdown()
