"""What the read path reads: ``Content`` (a blob as stored, or a compressed blob's
decompressed stream, and where it is kept in the cache), ``VerifyMode`` and ``ChunkBuffer``."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kitfs.format.digest import Digest
from kitfs.format.mediatypes import Compression
from kitfs.remote.registry import RegistryClient


class VerifyMode(enum.Enum):
    STRICT = "strict"
    EVENTUAL = "eventual"
    OFF = "off"


@dataclass(frozen=True)
class Content:
    """A readable byte stream: a blob as stored, or a compressed blob's decompressed stream."""

    registry: RegistryClient
    repository: str
    blob_digest: Digest
    blob_size: int
    compression: Compression
    diff_id: Digest | None = None

    @property
    def key(self) -> str:
        """Where the content is kept in the cache (chunks, index, verification state).

        A decompressed stream is keyed by the digest of the compressed blob, whose bytes are
        checked against it; never by the diffId, which is only what a config claims: a hostile
        config naming another layer's digest as its diffId would otherwise write into, index
        and fail that layer's entries.
        """
        if self.compression is Compression.NONE:
            return str(self.blob_digest)
        prefix = "gunzip" if self.compression is Compression.GZIP else "unzstd"
        return f"{prefix}:{self.blob_digest}"


# A chunk held in memory: the buffer it was received into (a view of it, or of the cache
# blocks it was read from). Never mutated once fetched.
ChunkBuffer = bytearray | memoryview
