"""The remote registry's latency: an HTTP/1.1 proxy that answers every request 20 ms late.

Run by the ``remote`` workload (benchmarks/remote.py) as a child process::

    python benchmarks/delayproxy.py UPSTREAM_HOST:PORT [--delay-ms 20] [--netns /proc/PID/ns/net]

Prints the port it listens on (``127.0.0.1``), then serves until SIGTERM. Per client
connection a thread and one keep-alive connection to the upstream registry: each request is
forwarded as is, the upstream's response headers are held ``--delay-ms`` before they are
passed on, then the body is relayed (Content-Length, chunked, or until close) through a
1 MiB buffer. The link cap is not here: the kernel's ``tbf`` on the namespace's loopback does it.

With ``--netns`` only the listening socket is made in that network namespace (``setns``, then
back), so clients in the namespace reach the proxy over its shaped loopback while the proxy
reaches the registry over the host's loopback. A measurement tool, not project code.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import threading
import time
from io import BufferedReader

CLONE_NEWNET = 0x40000000
RELAY_BYTES = 1 << 20


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


def listen_in(netns: str | None) -> socket.socket:
    """A listening socket on 127.0.0.1, made inside ``netns`` if given."""
    if netns is None:
        return socket.create_server(("127.0.0.1", 0))
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(netns, os.O_RDONLY)
    try:
        _setns(target)
        try:
            return socket.create_server(("127.0.0.1", 0))
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


def read_head(stream: BufferedReader) -> bytes | None:
    """The request or status line and headers, up to the blank line; None at a clean EOF."""
    lines: list[bytes] = []
    while True:
        line = stream.readline(65536)
        if not line:
            if lines:
                raise ConnectionError("EOF inside a header block")
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def copy_exact(source: BufferedReader, sink: socket.socket, size_bytes: int, buffer: memoryview) -> None:
    left = size_bytes
    while left:
        n = source.readinto(buffer[: min(left, len(buffer))])
        if not n:
            raise ConnectionError("EOF inside a body")
        sink.sendall(buffer[:n])
        left -= n


def copy_chunked(source: BufferedReader, sink: socket.socket, buffer: memoryview) -> None:
    while True:
        line = source.readline(1024)
        sink.sendall(line)
        size_bytes = int(line.split(b";")[0], 16)
        if size_bytes == 0:
            while (trailer := source.readline(65536)) not in (b"\r\n", b"\n", b""):
                sink.sendall(trailer)
            sink.sendall(b"\r\n")
            return
        copy_exact(source, sink, size_bytes + 2, buffer)  # the data and its CRLF


def body_of_request(head: bytes) -> int:
    length = header(head, b"content-length")
    return int(length) if length else 0


def serve(client: socket.socket, upstream_address: tuple[str, int], delay_s: float) -> None:
    buffer = memoryview(bytearray(RELAY_BYTES))
    upstream = socket.create_connection(upstream_address)
    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client_in, upstream_in = client.makefile("rb"), upstream.makefile("rb")
    try:
        while (request := read_head(client_in)) is not None:
            upstream.sendall(request)
            copy_exact(client_in, upstream, body_of_request(request), buffer)
            response = read_head(upstream_in)
            if response is None:
                return
            time.sleep(delay_s)
            client.sendall(response)
            status = int(response.split(b" ", 2)[1])
            length = header(response, b"content-length")
            if request.startswith(b"HEAD ") or status in (204, 304) or status < 200:
                pass
            elif length is not None:
                copy_exact(upstream_in, client, int(length), buffer)
            elif (header(response, b"transfer-encoding") or b"").lower() == b"chunked":
                copy_chunked(upstream_in, client, buffer)
            else:  # delimited by the upstream closing
                while n := upstream_in.readinto(buffer):
                    client.sendall(buffer[:n])
                return
            if (header(response, b"connection") or b"").lower() == b"close":
                return
    except (ConnectionError, OSError):
        pass
    finally:
        for closeable in (client_in, upstream_in, client, upstream):
            closeable.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("upstream", help="HOST:PORT of the registry")
    p.add_argument("--delay-ms", type=float, default=20.0)
    p.add_argument("--netns", default=None, help="listen in this network namespace (a /proc/PID/ns/net path)")
    args = p.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    listener = listen_in(args.netns)
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(client, (host, int(port)), args.delay_ms / 1e3),
                         daemon=True).start()


if __name__ == "__main__":
    main()
