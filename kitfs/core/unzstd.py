"""zstd layers: decoding a stream of zstd frames, fed in pieces as they are fetched.

Generic zstd frames cannot be entered in the middle, so a zstd layer is only ever
decompressed from its start (``kitfs.core.compressed`` streams it and stores its chunks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zstandard

from kitfs.errors import FormatError


def decompressor() -> Callable[[bytes | None], bytes]:
    """A feed function: bytes in, decompressed bytes out; ``None`` checks the stream ended.

    A zstd stream may hold several frames back to back; each is decompressed in turn, and a
    stream that stops inside one is a ``FormatError``.
    """
    def new() -> Any:
        return zstandard.ZstdDecompressor().decompressobj()

    current = [new()]
    started = [False]  # has the current frame received any bytes?

    def feed(data: bytes | None) -> bytes:
        d = current[0]
        if data is None:
            if started[0] and not d.eof:
                raise FormatError("zstd stream is truncated")
            return b""
        out = []
        while data:
            started[0] = True
            out.append(d.decompress(data))
            if not d.eof:
                break
            data = d.unused_data  # the next frame
            current[0] = d = new()
            started[0] = False
            if data.strip(b"\0") == b"":
                break
        return b"".join(out)

    return feed
