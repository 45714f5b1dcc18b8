"""The verifying floor: the fastest cold, verified read a pure-Python reader reaches here.

A port of ``shared/tools/pipeline_floor.py`` (its ``pipeline()``, the variant with the hash and
the write on and reused buffers), run by the ``seq`` workload on the model blob as a child
process, beside kitfs, in the same run::

    python benchmarks/floor.py URL SIZE_BYTES CACHE_FILE [--workers 2]

``--workers`` threads do Range GETs of 4 MiB on blocking ``http.client`` connections (one
each, keep-alive) and ``readinto`` a reused buffer, then ``pwrite`` it to ``CACHE_FILE``; the
main thread hashes the chunks in order with one SHA-256 and makes a 1 MiB ``bytes`` copy per
MiB (what answering a FUSE read costs at least). Prints one JSON line: ``elapsed_s``, ``cpu_s``
(this process, all threads, the pipeline only: not the interpreter's start) and ``digest``.
A measurement tool, not project code.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import queue
import threading
import time
from urllib.parse import urlsplit

CHUNK_BYTES = 4 << 20
REPLY_BYTES = 1 << 20


def pipeline(url: str, size_bytes: int, cache_file: str, workers: int) -> tuple[float, str]:
    """Read ``url`` (``size_bytes`` long) into ``cache_file``; (seconds, sha256 digest)."""
    parts = urlsplit(url)
    chunks = (size_bytes + CHUNK_BYTES - 1) // CHUNK_BYTES
    todo: queue.Queue[int] = queue.Queue()
    for i in range(chunks):
        todo.put(i)
    done: dict[int, tuple[bytearray, memoryview]] = {}
    free_buffers: list[bytearray] = []
    changed = threading.Condition()
    errors: list[BaseException] = []
    fd = os.open(cache_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def worker() -> None:
        connection = http.client.HTTPConnection(parts.netloc)
        try:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                first, last = i * CHUNK_BYTES, min(size_bytes, (i + 1) * CHUNK_BYTES) - 1
                connection.request("GET", parts.path, headers={"Range": f"bytes={first}-{last}"})
                response = connection.getresponse()
                if response.status != 206:
                    raise RuntimeError(f"HTTP {response.status} for chunk {i}")
                with changed:
                    buffer = free_buffers.pop() if free_buffers else bytearray(CHUNK_BYTES)
                view = memoryview(buffer)[: last - first + 1]
                got = 0
                while got < len(view):
                    n = response.readinto(view[got:])
                    if not n:
                        raise RuntimeError(f"short body for chunk {i}")
                    got += n
                response.read()
                os.pwrite(fd, view, first)
                with changed:
                    done[i] = (buffer, view)
                    changed.notify_all()
        except BaseException as exc:
            with changed:
                errors.append(exc)
                changed.notify_all()

    digest = hashlib.sha256()
    start = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    try:
        for i in range(chunks):
            with changed:
                while i not in done and not errors:
                    changed.wait()
                if errors:
                    raise errors[0]
                buffer, view = done.pop(i)
            digest.update(view)
            for offset in range(0, len(view), REPLY_BYTES):
                bytes(view[offset:offset + REPLY_BYTES])
            with changed:
                free_buffers.append(buffer)
    finally:
        for t in threads:
            t.join()
        os.close(fd)
    return time.monotonic() - start, "sha256:" + digest.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("size_bytes", type=int)
    p.add_argument("cache_file")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    before = os.times()
    elapsed_s, digest = pipeline(args.url, args.size_bytes, args.cache_file, args.workers)
    after = os.times()
    cpu_s = (after.user - before.user) + (after.system - before.system)
    print(json.dumps({"elapsed_s": elapsed_s, "cpu_s": cpu_s, "digest": digest,
                      "size_bytes": args.size_bytes, "workers": args.workers}))


if __name__ == "__main__":
    main()
