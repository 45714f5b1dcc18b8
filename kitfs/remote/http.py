"""A lean HTTP/1.1 client on trio: keep-alive connections and bodies read straight into buffers.

Why not httpx: on this class of machine httpx moves blob bodies at 0.25-0.48 GB/s, because
httpcore reads 64 KiB at a time and h11 copies every piece; a client that ``recv_into``s a
preallocated buffer reaches about 1 GB/s, as fast as curl (see the README's design notes). The
registry protocol needs very little of HTTP: GET and HEAD, Content-Length or chunked bodies,
redirects (followed by the registry client), keep-alive. That is what this module does; nothing
more (no HTTP/2, no cookies, no compression).

This module owns the connection pool, connecting (TCP, TLS) and HTTP/1.1's framing (the head,
sized, chunked and unsized bodies); ``kitfs.remote.connection`` owns one connection's
receives, and receives a large body (``THREAD_RECEIVE_MIN_BYTES`` or more, of a known length,
over plain TCP) in a worker thread. It raises ``TransportError`` for anything that went wrong on
the wire (refused, reset, closed early, timed out, malformed response); it has no retries, no
auth and no idea what a registry is: ``kitfs.remote.registry`` decides what to do.
"""

from __future__ import annotations

import os
import ssl
from typing import TypeVar
from urllib.parse import urlsplit

import trio

from kitfs.remote.connection import (
    RECV_SIZE_BYTES,
    THREAD_RECEIVE_MIN_BYTES,
    Connection,
    Progress,
    Response,
    TransportError,
    close_quietly,
)

MAX_HEADER_BYTES = 64 * 1024
ERROR_BODY_BYTES = 64 * 1024  # of an error answer's body, what is read (the rest is dropped)
# A response head is read this much at a time: what comes with it of the body is received
# (and copied) on the trio thread, so not too much; a 4 KiB range still comes in one piece.
HEAD_RECV_BYTES = 16 * 1024
IDLE_CONNECTIONS_PER_ORIGIN = 8
_T = TypeVar("_T")
# Where a body goes: one buffer, or several filled one after the other.
Into = memoryview | tuple[memoryview, ...]


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
        self._idle: dict[tuple[str, str, int], list[Connection]] = {}
        self._limiter = trio.CapacityLimiter(max_connections)
        self.connections_opened = 0
        self.thread_receives = 0  # bodies received by a worker thread

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for conn in connections:
                await close_quietly(conn)
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
                    await close_quietly(conn)
                    # A pooled connection the server closed while idle fails at once: retry
                    # once on a fresh connection. A fresh connection failing is the caller's.
                    if fresh or attempt == 1:
                        raise
                    continue
                except BaseException:
                    await close_quietly(conn)
                    raise
                conn.progress = None
                if not (conn.reusable and self._checkin(origin, conn)):
                    await close_quietly(conn)
                return response
        raise AssertionError("unreachable")

    async def _checkout(self, origin: tuple[str, str, int]) -> tuple[Connection, bool]:
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
                    conn = Connection(tls, None)
                else:
                    conn = Connection(tcp, tcp.socket)
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

    def _checkin(self, origin: tuple[str, str, int], conn: Connection) -> bool:
        """Whether the connection went back to the pool (if not, the caller closes it)."""
        idle = self._idle.setdefault(origin, [])
        if len(idle) < IDLE_CONNECTIONS_PER_ORIGIN and not conn.buffer:
            idle.append(conn)
            return True
        return False

    async def _exchange(
        self,
        conn: Connection,
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

    async def _read_head(self, conn: Connection) -> Response:
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
        conn: Connection,
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

    async def _fill(self, conn: Connection, view: memoryview) -> None:
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

    async def _fill_in_thread(self, conn: Connection, view: memoryview) -> None:
        self.thread_receives += 1
        await conn.receive_in_thread(view, self._io_timeout_s)

    async def _read_chunked(self, conn: Connection, max_body_bytes: int,
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

    async def _read_line(self, conn: Connection) -> bytes:
        while (end := conn.buffer.find(b"\r\n")) < 0:
            if len(conn.buffer) > MAX_HEADER_BYTES:
                raise TransportError("line too long in chunked body")
            with trio.fail_after(self._io_timeout_s):
                conn.buffer += await conn.recv_some()
        line = bytes(conn.buffer[:end])
        del conn.buffer[: end + 2]
        return line

    async def _read_to_eof(self, conn: Connection, max_body_bytes: int,
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
