"""One HTTP connection and its receives (``kitfs.remote.http`` speaks HTTP over it), and what
a request's outcome is made of: ``Response`` (status, headers, body), ``Progress`` (how far
it got) and ``TransportError`` (it failed on the wire).

Large bodies are received off the trio thread (``Connection.receive_in_thread``). A body of a
known length, at least ``THREAD_RECEIVE_MIN_BYTES`` long, over plain TCP, is received by a
worker thread on a blocking duplicate of the connection's socket with ``recv_into(...,
MSG_WAITALL)``: a few system calls per body, with the GIL released, so the trio thread (which
also answers FUSE requests) only starts and ends it. ``SO_RCVTIMEO`` bounds each of those
receives to ``io_timeout_s``, as ``trio.fail_after`` does for the others (a receive that got
some bytes returns them when its time is up, so a body that stops half-way is given up within
two io timeouts). Cancelling the request (the caller's deadline included) shuts the socket down,
which wakes the receive at once; the cancellation is delivered only when the thread has ended,
so no thread writes into a caller's buffer after ``request`` has returned or raised, and a
connection whose receive was cut short is closed, never reused. TLS connections, chunked bodies
and small bodies stay on the trio thread.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import outcome
import trio

RECV_SIZE_BYTES = 256 * 1024
# A body at least this long is received by a worker thread. Measured (2 cores shared with the
# registry; CPU seconds per GiB fetched in ranges, trio thread / whole process): 4 MiB ranges
# 0.65-0.8 / 0.65-0.8 on the trio thread, 0.15-0.25 / 0.45-0.55 in a thread; 1 MiB 1.1-1.3 /
# 1.1-1.3 against 0.6-0.7 / 1.0-1.1; at 256-512 KiB the hand-off costs the process 0.2-0.5 s
# more than it saves the trio thread (0.1-0.3 s).
THREAD_RECEIVE_MIN_BYTES = 1024 * 1024


_T = TypeVar("_T")


class TransportError(Exception):
    """The request failed on the wire. ``timed_out`` says whether it was a timeout;
    ``permanent`` that trying again cannot help (the server's TLS certificate is not trusted);
    ``response`` is the answer's head when the failure came after it (a short body)."""

    def __init__(self, message: str, timed_out: bool = False, permanent: bool = False,
                 response: Response | None = None) -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.permanent = permanent
        self.response = response


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes = b""
    body_length: int = 0  # bytes of body read into the caller's buffer

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)


@dataclass
class Progress:
    """How far one request got, for the caller's message when its deadline cuts it short."""

    stage: str = ""  # what the request is doing, until its answer's head has arrived
    status: int | None = None  # the response's status, once its head has arrived
    bytes_received: int = 0  # on the connection, head and body


@dataclass
class Connection:
    """One keep-alive connection: its stream, what was received and not consumed yet
    (``buffer``), whether it may be reused, and the request's ``Progress``."""

    stream: trio.abc.Stream
    sock: trio.socket.SocketType | None  # set for plain TCP: used for recv_into
    buffer: bytearray = field(default_factory=bytearray)
    reusable: bool = True
    progress: Progress | None = None  # of the request using the connection
    # A stdlib socket on a duplicate of ``sock``'s descriptor, for worker threads; made on the
    # first threaded receive, closed with the connection.
    thread_socket: socket.socket | None = None

    def blocking_socket(self, io_timeout_s: float) -> socket.socket:
        """The socket for a worker thread, switched to blocking mode (restore it with
        ``setblocking(False)`` before trio uses the connection again). O_NONBLOCK belongs to
        the open file description, which the duplicate shares with trio's socket."""
        assert self.sock is not None
        if self.thread_socket is None:
            self.thread_socket = socket.socket(fileno=os.dup(self.sock.fileno()))
            # (0 would mean no timeout at all)
            seconds, microseconds = divmod(max(1, round(io_timeout_s * 1_000_000)), 1_000_000)
            self.thread_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                          struct.pack("ll", seconds, microseconds))
        self.thread_socket.setblocking(True)
        return self.thread_socket

    async def recv_some(self, max_bytes: int = RECV_SIZE_BYTES) -> bytes:
        data = await self.stream.receive_some(max_bytes)
        if not data:
            raise TransportError("connection closed by the server")
        if self.progress is not None:
            self.progress.bytes_received += len(data)
        return bytes(data)

    async def recv_into(self, view: memoryview) -> int:
        if self.sock is not None:
            count: int = await self.sock.recv_into(view)
        else:
            data = await self.stream.receive_some(len(view))
            count = len(data)
            view[:count] = data
        if count == 0:
            raise TransportError("connection closed by the server in the middle of a body")
        if self.progress is not None:
            self.progress.bytes_received += count
        return count

    async def receive_in_thread(self, view: memoryview, io_timeout_s: float) -> None:
        """Fill ``view`` from the connection in a worker thread (see the module docstring).
        Cancelled, it shuts the connection down (the caller closes it) and waits for the
        thread to end before the cancellation goes on."""
        sock = self.blocking_socket(io_timeout_s)
        progress = self.progress

        def receive() -> None:
            filled = 0
            while filled < len(view):
                try:
                    count = sock.recv_into(view[filled:], 0, socket.MSG_WAITALL)
                except BlockingIOError:  # SO_RCVTIMEO: nothing arrived in io_timeout_s
                    raise TransportError(f"no body bytes arrived for {io_timeout_s:g} s",
                                         timed_out=True) from None
                if count == 0:
                    raise TransportError("connection closed by the server in the middle of a body")
                filled += count
                if progress is not None:
                    progress.bytes_received += count

        def wake() -> None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # not connected any more: the receive has returned already
                pass

        try:
            await run_in_thread(receive, wake)
        finally:
            sock.setblocking(False)  # trio's again (only reused after a complete receive)


async def run_in_thread(work: Callable[[], _T], wake: Callable[[], None]) -> _T:
    """``work()`` in a worker thread; its result or exception. Cancelled, ``wake()`` is called
    (it must make ``work`` return soon) and the cancellation is raised once ``work`` has
    returned: nothing ``work`` touches is in use after this returns or raises."""
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()
    raise_cancel: Callable[[], object] | None = None

    def report(result: outcome.Outcome[_T]) -> None:  # in the trio thread
        if raise_cancel is not None:
            trio.lowlevel.reschedule(task, outcome.capture(raise_cancel))
        else:
            trio.lowlevel.reschedule(task, result)

    def abort(cancel: Callable[[], object]) -> trio.lowlevel.Abort:
        nonlocal raise_cancel
        raise_cancel = cancel
        wake()
        return trio.lowlevel.Abort.FAILED  # rescheduled by report, once the thread has ended

    trio.lowlevel.start_thread_soon(work, lambda result: token.run_sync_soon(report, result),
                                    name="kitfs http receive")
    result: _T = await trio.lowlevel.wait_task_rescheduled(abort)
    return result


async def close_quietly(conn: Connection) -> None:
    """Close the connection (and its thread socket), within a second, whatever happens."""
    if conn.thread_socket is not None:
        conn.thread_socket.close()  # the duplicate descriptor only; the stream closes the socket
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await conn.stream.aclose()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            pass
