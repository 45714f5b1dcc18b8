"""A lean HTTP/1.1 client on trio: keep-alive connections and bodies read straight into buffers.

Why not httpx: on this class of machine httpx moves blob bodies at 0.25-0.48 GB/s, because
httpcore reads 64 KiB at a time and h11 copies every piece; a client that ``recv_into``s a
preallocated buffer reaches about 1 GB/s, as fast as curl (see the README's design notes). The
registry protocol needs very little of HTTP: GET and HEAD, Content-Length or chunked bodies,
redirects (followed by the registry client), keep-alive. That is what this module does; nothing
more (no HTTP/2, no cookies, no compression).

Large bodies are received off the trio thread. A body of a known length, at least
``THREAD_RECEIVE_MIN_BYTES`` long, over plain TCP, is received by a worker thread on a blocking
duplicate of the connection's socket with ``recv_into(..., MSG_WAITALL)``: a few system calls
per body, with the GIL released, so the trio thread (which also answers FUSE requests) only
starts and ends it. ``SO_RCVTIMEO`` bounds each of those receives to ``io_timeout_s``, as
``trio.fail_after`` does for the others (a receive that got some bytes returns them when its
time is up, so a body that stops half-way is given up within two io timeouts). Cancelling the
request (the caller's deadline included) shuts the socket down, which wakes the receive at once;
the cancellation is delivered only when the thread has ended, so no thread writes into a
caller's buffer after ``request`` has returned or raised, and a connection whose receive was cut
short is closed, never reused. TLS connections, chunked bodies and small bodies stay on the
trio thread.

This module owns sockets and TLS. It raises ``TransportError`` for anything that went wrong on
the wire (refused, reset, closed early, timed out, malformed response); it has no retries, no
auth and no idea what a registry is: ``kitfs.remote.registry`` decides what to do.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

import outcome
import trio

MAX_HEADER_BYTES = 64 * 1024
ERROR_BODY_BYTES = 64 * 1024  # of an error answer's body, what is read (the rest is dropped)
RECV_SIZE_BYTES = 256 * 1024
# A response head is read this much at a time: what comes with it of the body is received
# (and copied) on the trio thread, so not too much; a 4 KiB range still comes in one piece.
HEAD_RECV_BYTES = 16 * 1024
IDLE_CONNECTIONS_PER_ORIGIN = 8
# A body at least this long is received by a worker thread. Measured (2 cores shared with the
# registry; CPU seconds per GiB fetched in ranges, trio thread / whole process): 4 MiB ranges
# 0.65-0.8 / 0.65-0.8 on the trio thread, 0.15-0.25 / 0.45-0.55 in a thread; 1 MiB 1.1-1.3 /
# 1.1-1.3 against 0.6-0.7 / 1.0-1.1; at 256-512 KiB the hand-off costs the process 0.2-0.5 s
# more than it saves the trio thread (0.1-0.3 s).
THREAD_RECEIVE_MIN_BYTES = 1024 * 1024

_T = TypeVar("_T")
# Where a body goes: one buffer, or several filled one after the other.
Into = memoryview | tuple[memoryview, ...]


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


class BodyTooLargeError(Exception):
    """A successful answer's body is larger than the caller accepts (``max_body_bytes``): the
    registry sent it on purpose, so asking again cannot help. Raised once the size is known
    (Content-Length) or the limit is passed, before the rest is read; the connection is
    dropped. ``size_bytes`` is None for a chunked or unsized body."""

    def __init__(self, size_bytes: int | None, limit_bytes: int) -> None:
        size = f"{size_bytes} bytes" if size_bytes is not None else f"more than {limit_bytes} bytes"
        super().__init__(f"a body of {size}, over the {limit_bytes} allowed")
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes


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
class _Connection:
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


class HttpClient:
    """Keep-alive HTTP/1.1 client. One instance per process is enough.

    Args:
        ssl_context: used for https URLs.
        io_timeout_s: the longest a connect, a send or a single receive may take.
        max_connections: connections open at once, over all origins.
    """

    def __init__(self, ssl_context: ssl.SSLContext, io_timeout_s: float, max_connections: int = 16):
        self._ssl = ssl_context
        self._io_timeout_s = io_timeout_s
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._limiter = trio.CapacityLimiter(max_connections)
        self.connections_opened = 0
        self.thread_receives = 0  # bodies received by a worker thread

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for conn in connections:
                await _close_quietly(conn)
        self._idle.clear()

    async def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        *,
        into: Into | None = None,
        skip_on_200: int = 0,
        max_body_bytes: int = 64 * 1024 * 1024,
        progress: Progress | None = None,
        max_skip_bytes: int | None = None,
    ) -> Response:
        """Send one request and read the response (``progress``, if given, follows it).

        With ``into``, a successful (2xx) body of exactly ``len(into)`` bytes is read into it
        (a longer body is cut there and the connection is dropped, a shorter one is an error);
        ``into`` may be several buffers, filled one after the other (one range for several
        chunks, each in a buffer of its own);
        other bodies are returned in ``Response.body`` up to ``max_body_bytes``. When a Range
        request is answered 200 (the whole blob), ``skip_on_200`` bytes are read and dropped
        first, so ``into`` still receives the bytes that were asked for; unless they are more
        than ``max_skip_bytes``: then the body is left unread (``Response.body_length`` 0) and
        the connection dropped (a cold mirror's whole blob; the caller asks another host).

        Raises:
            TransportError: connect, send or receive failed or timed out; malformed response.
            BodyTooLargeError: a 2xx body (not read into ``into``) over ``max_body_bytes``.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TransportError(f"unsupported URL {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        origin = (parts.scheme, parts.hostname, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rpartition("@")[2]
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host_header}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        request_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

        if progress is not None:
            progress.stage = "waiting for a free connection"
        async with self._limiter:
            for attempt in range(2):
                if progress is not None:
                    progress.stage = "connecting"
                conn, fresh = await self._checkout(origin)
                conn.progress = progress
                try:
                    response = await self._exchange(
                        conn, request_bytes, method, into, skip_on_200, max_body_bytes,
                        max_skip_bytes,
                    )
                except TransportError:
                    await _close_quietly(conn)
                    # A pooled connection the server closed while idle fails at once: retry
                    # once on a fresh connection. A fresh connection failing is the caller's.
                    if fresh or attempt == 1:
                        raise
                    continue
                except BaseException:
                    await _close_quietly(conn)
                    raise
                conn.progress = None
                if not (conn.reusable and self._checkin(origin, conn)):
                    await _close_quietly(conn)
                return response
        raise AssertionError("unreachable")

    async def _checkout(self, origin: tuple[str, str, int]) -> tuple[_Connection, bool]:
        idle = self._idle.get(origin)
        if idle:
            return idle.pop(), False
        scheme, host, port = origin
        tcp: trio.SocketStream | None = None
        connected = False
        try:
            with trio.fail_after(self._io_timeout_s):
                tcp = await trio.open_tcp_stream(host, port)
                tcp.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
                if scheme == "https":
                    tls = trio.SSLStream(tcp, self._ssl, server_hostname=host, https_compatible=True)
                    await tls.do_handshake()
                    conn = _Connection(tls, None)
                else:
                    conn = _Connection(tcp, tcp.socket)
            connected = True
        except trio.TooSlowError:
            raise TransportError(f"connecting to {host}:{port} timed out", timed_out=True) from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
            # trio's SSLStream raises BrokenResourceError (with no message) from the SSLError.
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise TransportError(
                    f"the TLS certificate of {host}:{port} is not trusted: {cause.verify_message}",
                    permanent=True,
                ) from None
            cause = cause or exc
            # trio's "all attempts to connect to … failed" holds each address's error as its cause
            reasons = sorted({os.strerror(e.errno) for e in getattr(cause.__cause__, "exceptions", ())
                              if isinstance(e, OSError) and e.errno})
            why = ", ".join(reasons) or str(cause) or repr(cause)
            raise TransportError(f"cannot connect to {host}:{port}: {why}") from None
        finally:
            if not connected and tcp is not None:
                tcp.socket.close()
        self.connections_opened += 1
        return conn, True

    def _checkin(self, origin: tuple[str, str, int], conn: _Connection) -> bool:
        """Whether the connection went back to the pool (if not, the caller closes it)."""
        idle = self._idle.setdefault(origin, [])
        if len(idle) < IDLE_CONNECTIONS_PER_ORIGIN and not conn.buffer:
            idle.append(conn)
            return True
        return False

    async def _exchange(
        self,
        conn: _Connection,
        request_bytes: bytes,
        method: str,
        into: Into | None,
        skip_on_200: int,
        max_body_bytes: int,
        max_skip_bytes: int | None = None,
    ) -> Response:
        try:
            if conn.progress is not None:
                conn.progress.stage = "sending the request"
            with trio.fail_after(self._io_timeout_s):
                await conn.stream.send_all(request_bytes)
            if conn.progress is not None:
                conn.progress.stage = "waiting for the answer"
            response = await self._read_head(conn)
            await self._read_body(conn, response, method, into, skip_on_200, max_body_bytes,
                                  max_skip_bytes)
            return response
        except trio.TooSlowError:
            raise TransportError("the server did not answer in time", timed_out=True) from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
            raise TransportError(f"connection failed: {exc!r}") from None

    async def _read_head(self, conn: _Connection) -> Response:
        buffer = conn.buffer
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buffer) > MAX_HEADER_BYTES:
                raise TransportError("response headers are too large")
            with trio.fail_after(self._io_timeout_s):
                buffer += await conn.recv_some(HEAD_RECV_BYTES)
        head = bytes(buffer[:end]).decode("latin-1")
        del buffer[: end + 4]
        status_line, *header_lines = head.split("\r\n")
        try:
            version, status_text, *reason = status_line.split(" ", 2)
            status = int(status_text)
        except ValueError:
            raise TransportError(f"malformed status line {status_line!r}") from None
        if not version.startswith("HTTP/1."):
            raise TransportError(f"unsupported protocol {version!r}")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise TransportError(f"malformed header line {line!r}")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        if version == "HTTP/1.0" or "close" in headers.get("connection", "").lower():
            conn.reusable = False
        if conn.progress is not None:
            conn.progress.status = status
        return Response(status, reason[0] if reason else "", headers)

    async def _read_body(
        self,
        conn: _Connection,
        response: Response,
        method: str,
        into: Into | None,
        skip_on_200: int,
        max_body_bytes: int,
        max_skip_bytes: int | None = None,
    ) -> None:
        if method == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200:
            return
        if response.status == 416:  # distribution gives it the blob's length and no body
            conn.reusable = False
            return
        if (into is not None and response.status == 200 and max_skip_bytes is not None
                and skip_on_200 > max_skip_bytes):
            conn.reusable = False  # the body stays unread: the connection is dropped
            return
        chunked = "chunked" in response.headers.get("transfer-encoding", "").lower()
        length_text = response.headers.get("content-length")
        views = (into,) if isinstance(into, memoryview) else into
        total = sum(len(view) for view in views) if views is not None else 0
        if (chunked or length_text is None) and views is not None and 200 <= response.status < 300:
            # A body of unknown length is streamed like a sized one: the bytes before the
            # range (a 200 to a Range request) dropped, then ``into`` filled, the rest unread.
            # (Rare: through one buffer, then copied to several.)
            whole = views[0] if len(views) == 1 else memoryview(bytearray(total))
            sink = _Sink(whole, skip_on_200 if response.status == 200 else 0)
            if chunked:
                await self._read_chunked(conn, max_body_bytes, sink)
            else:
                conn.reusable = False
                await self._read_to_eof(conn, max_body_bytes, sink)
            if sink.filled < total:
                raise TransportError(f"body ended {total - sink.filled} bytes short of the "
                                     f"{total} expected")
            if len(views) > 1:
                at = 0
                for view in views:
                    view[:] = whole[at : at + len(view)]
                    at += len(view)
            response.body_length = total
            return
        try:
            length = int(length_text) if length_text is not None and not chunked else None
        except ValueError:
            raise TransportError(f"bad Content-Length {length_text!r}") from None
        if views is not None and length is not None and 200 <= response.status < 300:
            skip = skip_on_200 if response.status == 200 else 0
            if length < skip + total:
                raise TransportError(f"body of {length} bytes is shorter than the {total} "
                                     "expected", response=response)
            conn.reusable = conn.reusable and skip == 0
            scratch = memoryview(bytearray(min(skip, RECV_SIZE_BYTES * 16) or 1))
            while skip > 0:
                step = min(skip, len(scratch))
                await self._fill(conn, scratch[:step])
                skip -= step
                length -= step
            for view in views:
                await self._fill(conn, view)
            response.body_length = total
            if length > total:
                conn.reusable = False  # the rest is not wanted: drop the connection
            return
        answered = 200 <= response.status < 300
        limit = max_body_bytes if answered else ERROR_BODY_BYTES
        try:
            if chunked:
                response.body = await self._read_chunked(conn, limit)
            elif length is None:
                conn.reusable = False
                response.body = await self._read_to_eof(conn, limit)
            elif length > limit:
                raise BodyTooLargeError(length, limit)
            else:
                body = bytearray(length)
                await self._fill(conn, memoryview(body))
                response.body = bytes(body)
        except BodyTooLargeError:
            conn.reusable = False  # the rest stays unread
            if answered:
                raise
            response.body = b""  # an error page too big to matter: its status is the answer

    async def _fill(self, conn: _Connection, view: memoryview) -> None:
        taken = min(len(conn.buffer), len(view))
        view[:taken] = conn.buffer[:taken]
        del conn.buffer[:taken]
        filled = taken
        if conn.sock is not None and len(view) >= THREAD_RECEIVE_MIN_BYTES and filled < len(view):
            await self._fill_in_thread(conn, view[filled:])
            return
        while filled < len(view):
            with trio.fail_after(self._io_timeout_s):
                filled += await conn.recv_into(view[filled:])

    async def _fill_in_thread(self, conn: _Connection, view: memoryview) -> None:
        """Fill ``view`` from the connection in a worker thread (see the module docstring).
        Cancelled, it shuts the connection down (the caller closes it) and waits for the
        thread to end before the cancellation goes on."""
        sock = conn.blocking_socket(self._io_timeout_s)
        self.thread_receives += 1
        progress, io_timeout_s = conn.progress, self._io_timeout_s

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
            await _run_in_thread(receive, wake)
        finally:
            sock.setblocking(False)  # trio's again (only reused after a complete receive)

    async def _read_chunked(self, conn: _Connection, max_body_bytes: int,
                            sink: _Sink | None = None) -> bytes:
        """The decoded body; with ``sink``, fed to it (no size limit) and b"" returned.
        Stops reading (and drops the connection) once the sink is full."""
        body = bytearray()
        while True:
            if sink is not None and sink.full:
                conn.reusable = False
                return b""
            line = await self._read_line(conn)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise TransportError(f"malformed chunk size {line!r}") from None
            if size == 0:
                while await self._read_line(conn):  # trailers, then the empty line
                    pass
                return bytes(body)
            if sink is None and len(body) + size > max_body_bytes:
                conn.reusable = False
                raise BodyTooLargeError(None, max_body_bytes)
            while size > 0:  # in pieces: a chunk may be a whole blob
                if sink is not None and sink.full:
                    conn.reusable = False
                    return b""
                piece = bytearray(min(size, RECV_SIZE_BYTES))
                await self._fill(conn, memoryview(piece))
                size -= len(piece)
                if sink is not None:
                    sink.feed(piece)
                else:
                    body += piece
            if await self._read_line(conn):
                raise TransportError("chunk not followed by CRLF")

    async def _read_line(self, conn: _Connection) -> bytes:
        while (end := conn.buffer.find(b"\r\n")) < 0:
            if len(conn.buffer) > MAX_HEADER_BYTES:
                raise TransportError("line too long in chunked body")
            with trio.fail_after(self._io_timeout_s):
                conn.buffer += await conn.recv_some()
        line = bytes(conn.buffer[:end])
        del conn.buffer[: end + 2]
        return line

    async def _read_to_eof(self, conn: _Connection, max_body_bytes: int,
                           sink: _Sink | None = None) -> bytes:
        """The body up to the end of the connection; with ``sink``, fed to it (no size
        limit, stopping once it is full) and b"" returned."""
        body = bytearray()
        data = bytes(conn.buffer)
        conn.buffer.clear()
        while True:
            if sink is not None:
                sink.feed(data)
                if sink.full:
                    return b""
            else:
                body += data
                if len(body) > max_body_bytes:
                    raise BodyTooLargeError(None, max_body_bytes)
            with trio.fail_after(self._io_timeout_s):
                data = bytes(await conn.stream.receive_some(RECV_SIZE_BYTES))
            if not data:
                return bytes(body)
            if conn.progress is not None:
                conn.progress.bytes_received += len(data)


class _Sink:
    """Takes a body's bytes in order: drops the first ``skip``, fills ``into``, ignores the rest."""

    def __init__(self, into: memoryview, skip: int) -> None:
        self.into = into
        self.skip = skip
        self.filled = 0

    @property
    def full(self) -> bool:
        return self.filled == len(self.into)

    def feed(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        if self.skip:
            dropped = min(self.skip, len(view))
            view = view[dropped:]
            self.skip -= dropped
        taken = min(len(view), len(self.into) - self.filled)
        self.into[self.filled : self.filled + taken] = view[:taken]
        self.filled += taken


async def _run_in_thread(work: Callable[[], _T], wake: Callable[[], None]) -> _T:
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


async def _close_quietly(conn: _Connection) -> None:
    if conn.thread_socket is not None:
        conn.thread_socket.close()  # the duplicate descriptor only; the stream closes the socket
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await conn.stream.aclose()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            pass
