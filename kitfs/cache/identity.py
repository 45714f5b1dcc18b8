"""What a cached chunk is checked against once its blob is verified: pieces and their BLAKE3.

A chunk (4 MiB by default) is cut into pieces of ``PIECE_SIZE_BYTES``. A piece is the smallest
range kitfs fetches (a lone random read fetches the pieces it touches, not the whole chunk)
and the unit a partial chunk is kept in. Once a blob has matched its sha256 digest, the BLAKE3
digest of every piece of every chunk is recorded (``chunk_ids``), so a chunk or a single
piece fetched again after eviction is checked on its own, before a byte of it is served,
without fetching the rest of the blob. BLAKE3 rather than a second SHA-256: it is a
cryptographic hash too (what a forging registry would have to beat), at about a quarter of
SHA-256's CPU cost here (0.25 s per GiB against 1.15 s), and the blob digest, the one every
byte is tied to, stays the registry's sha256.
"""

from __future__ import annotations

import blake3

PIECE_SIZE_BYTES = 128 * 1024
ID_BYTES = 32  # one BLAKE3 digest per piece


def piece_count(length: int) -> int:
    """Pieces in a chunk of ``length`` bytes (the last one may be short)."""
    return -(-length // PIECE_SIZE_BYTES)


def piece_ids(data: bytes | bytearray | memoryview) -> bytes:
    """The concatenated BLAKE3 digests of ``data``'s pieces (``data`` starts on a piece).

    Releases the GIL for each piece (blake3 does for inputs this large), so it runs in
    worker threads beside the trio thread."""
    view = memoryview(data)
    return b"".join(blake3.blake3(view[at : at + PIECE_SIZE_BYTES]).digest()
                    for at in range(0, len(view), PIECE_SIZE_BYTES))


def ids_of_pieces(ids: bytes, first: int, count: int) -> bytes:
    """The part of a chunk's ``ids`` for pieces ``first`` .. ``first + count - 1``."""
    return ids[first * ID_BYTES : (first + count) * ID_BYTES]
