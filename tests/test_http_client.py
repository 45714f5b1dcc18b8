"""The HTTP client's data path: large bodies received by worker threads (``kitfs.remote.http``).

Requests go to the real registry through the fault-injecting proxy (``tests/faultproxy.py``).
What is checked: the bytes, the connection reuse afterwards (``connections_opened``, and the
socket non-blocking again for trio), timeouts and deadlines ending a receive that
a thread is blocked in, and a cancelled request leaving no thread writing into its buffer.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import trio

from kitfs.demo import Pusher, Registry, sha256
from kitfs.errors import RemoteTimeoutError
from kitfs.format.digest import Digest
from kitfs.remote.connection import THREAD_RECEIVE_MIN_BYTES, Progress, Response, TransportError
from kitfs.remote.http import HttpClient
from kitfs.remote.registry import RegistryClient, RegistryConfig
from tests.faultproxy import FaultProxy, Rule, running

MiB = 1024 * 1024
BLOB = os.urandom(8 * MiB).replace(b"\0", b"\1")  # no zero byte: a byte written shows
REPOSITORY = "http/blob"
BIG_RANGE_BYTES = 4 * MiB
assert BIG_RANGE_BYTES >= THREAD_RECEIVE_MIN_BYTES > 4096


@pytest.fixture(scope="module")
def blob_path(registry: Registry, pusher: Pusher) -> str:
    pusher.push_blob(REPOSITORY, BLOB, "application/octet-stream")
    return f"/v2/{REPOSITORY}/blobs/{sha256(BLOB)}"


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with running(FaultProxy(registry.host)) as started:
        yield started


MakeClient = Callable[..., HttpClient]


@pytest.fixture
async def client() -> AsyncIterator[MakeClient]:
    """Makes HttpClients (``io_timeout_s`` 30 s unless given), closed at the end."""
    made: list[HttpClient] = []

    def make(io_timeout_s: float = 30.0) -> HttpClient:
        made.append(HttpClient(ssl.create_default_context(), io_timeout_s=io_timeout_s))
        return made[-1]

    yield make
    for http in made:
        await http.aclose()


def sockets_connected_to(port: int) -> list[int]:
    """This process's descriptors of sockets connected to ``port`` on loopback."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            probe = socket.socket(fileno=os.dup(int(name)))
        except OSError:  # not a socket, or the listing's own descriptor, gone by now
            continue
        with probe:
            try:
                peer = probe.getpeername()
            except OSError:  # not connected
                continue
        if isinstance(peer, tuple) and peer[1] == port:
            found.append(int(name))
    return found


async def get_range(http: HttpClient, url: str, offset: int, into: memoryview,
                    progress: Progress | None = None) -> Response:
    headers = {"Range": f"bytes={offset}-{offset + len(into) - 1}"}
    return await http.request("GET", url, headers, into=into, skip_on_200=offset, progress=progress)


async def test_large_bodies_are_received_in_threads_on_one_kept_alive_connection(
    proxy: FaultProxy, blob_path: str, client: MakeClient
) -> None:
    http = client()
    url = f"http://{proxy.host}{blob_path}"
    for offset, length in ((0, BIG_RANGE_BYTES), (BIG_RANGE_BYTES - 7, BIG_RANGE_BYTES), (5, 4096)):
        buffer = bytearray(length)
        response = await get_range(http, url, offset, memoryview(buffer))
        assert response.status == 206
        assert buffer == BLOB[offset : offset + length]
    assert http.thread_receives == 2  # the 4 KiB one stayed on the trio thread
    assert http.connections_opened == 1
    # back in the pool non-blocking, as trio needs it (O_NONBLOCK is the file's, not the fd's)
    descriptors = sockets_connected_to(int(proxy.host.rpartition(":")[2]))
    assert descriptors
    assert not any(os.get_blocking(fd) for fd in descriptors)


@pytest.mark.parametrize("rule", [Rule("ignore_range"), Rule("forward", chunked=True)],
                         ids=["200-for-a-range", "chunked"])
async def test_whole_blob_and_chunked_answers_give_the_right_bytes(
    proxy: FaultProxy, blob_path: str, client: MakeClient, rule: Rule
) -> None:
    http = client()
    proxy.add(rule)
    offset = 5 * MiB + 3
    buffer = bytearray(2 * MiB)
    await get_range(http, f"http://{proxy.host}{blob_path}", offset, memoryview(buffer))
    assert buffer == BLOB[offset : offset + len(buffer)]


@pytest.mark.parametrize("rule", [None, Rule("ignore_range"), Rule("forward", chunked=True)],
                         ids=["206", "200-for-a-range", "chunked"])
async def test_a_body_fills_several_buffers_in_turn(
    proxy: FaultProxy, blob_path: str, client: MakeClient, rule: Rule | None
) -> None:
    """One range for several chunks, a buffer each (what a stream's read-ahead asks for)."""
    http = client()
    if rule is not None:
        proxy.add(rule)
    offset = MiB + 11
    buffers = (bytearray(2 * MiB), bytearray(3 * MiB - 3), bytearray(4096))
    total = sum(len(buffer) for buffer in buffers)
    response = await http.request(
        "GET", f"http://{proxy.host}{blob_path}", {"Range": f"bytes={offset}-{offset + total - 1}"},
        into=tuple(memoryview(buffer) for buffer in buffers), skip_on_200=offset)
    assert response.body_length == total
    assert b"".join(buffers) == BLOB[offset : offset + total]


async def test_a_body_that_stalls_in_a_thread_times_out_and_the_connection_is_dropped(
    proxy: FaultProxy, blob_path: str, client: MakeClient
) -> None:
    http = client(io_timeout_s=0.5)
    url = f"http://{proxy.host}{blob_path}"
    proxy.add(Rule("stall_body", delay_s=30))
    buffer = bytearray(BIG_RANGE_BYTES)
    progress = Progress()
    with pytest.raises(TransportError) as caught:
        await get_range(http, url, 0, memoryview(buffer), progress)
    assert caught.value.timed_out, caught.value
    assert http.thread_receives == 1
    half = BIG_RANGE_BYTES // 2
    assert progress.bytes_received > half  # the head and half the body
    assert buffer[:half] == BLOB[:half]
    await get_range(http, url, 0, memoryview(bytearray(4096)))
    assert http.connections_opened == 2  # the stalled connection was not reused


async def test_the_callers_deadline_ends_a_stalled_thread_receive_with_its_progress(
    proxy: FaultProxy, blob_path: str, registry: Registry
) -> None:
    """The registry client's deadline (1 s) cuts a body a thread waits for (io timeout 1 s per
    receive, but the body keeps stalling); its message counts the bytes that did arrive."""
    proxy.add(Rule("stall_body", delay_s=30, times=None))
    config = RegistryConfig(plain_http=True, timeout_s=1.0)
    async with RegistryClient(proxy.host, config) as registry_client:
        with pytest.raises(RemoteTimeoutError) as caught:
            await registry_client.fetch_range(REPOSITORY, Digest.parse(sha256(BLOB)), len(BLOB),
                                              0, memoryview(bytearray(BIG_RANGE_BYTES)))
    message = str(caught.value)
    assert "answered HTTP 206" in message, message
    received = int(message.split("(")[-1].split(" bytes received")[0])
    assert received > BIG_RANGE_BYTES // 2, message


async def test_a_cancelled_request_returns_and_no_thread_writes_its_buffer_afterwards(
    proxy: FaultProxy, blob_path: str, client: MakeClient
) -> None:
    http = client()
    url = f"http://{proxy.host}{blob_path}"
    proxy.add(Rule("trickle", bytes_per_s=2000))
    buffer = bytearray(BIG_RANGE_BYTES)
    with trio.fail_after(60):  # a hang guard: cancelling must not wait for the body
        async with trio.open_nursery() as nursery:
            nursery.start_soon(get_range, http, url, 0, memoryview(buffer))
            # the thread is receiving into the buffer (which no event can tell)
            while not all(buffer[:100]):  # noqa: ASYNC110
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert http.thread_receives == 1
    written = bytes(buffer)
    arrived = len(written.rstrip(b"\0"))
    assert 100 <= arrived < len(buffer)
    assert written[:arrived] == BLOB[:arrived]
    await trio.sleep(0.5)  # bytes keep trickling towards the (closed) connection
    assert bytes(buffer) == written
    await get_range(http, url, 0, memoryview(bytearray(4096)))
    assert http.connections_opened == 2  # the cancelled connection was closed
