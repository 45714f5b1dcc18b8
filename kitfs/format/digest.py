"""OCI content digests: parse ``algorithm:hex``, hash bytes, check bytes against a digest.

Only sha256 and sha512 are accepted (the OCI image spec's registered algorithms). Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from kitfs.errors import FormatError, IntegrityError

_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-f0-9]+)$")


@dataclass(frozen=True, order=True)
class Digest:
    """A validated content digest such as ``sha256:2d5b…``."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse and validate a digest string.

        Raises:
            FormatError: unknown algorithm, wrong length or not lower-case hex.
        """
        match = _DIGEST_RE.match(text)
        if not match:
            raise FormatError(f"invalid digest {text!r}")
        algorithm, hex_ = match.groups()
        if algorithm not in _HEX_LENGTH:
            raise FormatError(f"unsupported digest algorithm in {text!r} (sha256, sha512)")
        if len(hex_) != _HEX_LENGTH[algorithm]:
            needed = _HEX_LENGTH[algorithm]
            raise FormatError(f"invalid digest {text!r}: {algorithm} needs {needed} hex digits")
        return cls(algorithm, hex_)

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview, algorithm: str = "sha256") -> Digest:
        """The digest of ``data``."""
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        """A fresh hashlib object of this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def check(self, data: bytes | bytearray | memoryview, what: str) -> None:
        """Raise ``IntegrityError`` naming ``what`` unless ``data`` hashes to this digest."""
        actual = hashlib.new(self.algorithm, data).hexdigest()
        if actual != self.hex:
            raise IntegrityError(
                f"{what}: content is {self.algorithm}:{actual}, expected {self}"
            )

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"
