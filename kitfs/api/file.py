"""``KitFile``: a file of a kit as a seekable, lazy, read-only binary file object.

It is an ``io.BufferedReader`` (the C one: pyarrow's ``read_at`` and pandas' parsers call
``seek`` and ``read`` many times) over ``_KitRawFile``, whose reads go to the core: a read
fetches only the chunks or 128 KiB pieces that cover it, as on a mount. The buffer
(``block_size``) serves small reads from one larger one; a read at least that large goes to
the core as it is (a Parquet column chunk is one read).

Why ``io.BufferedReader`` and not fsspec's ``AbstractBufferedFile``: the same object serves
``Kit.open`` and ``KitFileSystem.open``, its buffer logic is C, and ``read()`` to the end is
one ``readall`` (here: the rest of the file in 16 MiB reads in one call into the loop) rather
than a loop of small reads.
"""

from __future__ import annotations

import errno
import io
from typing import TYPE_CHECKING

from kitfs.format.tree import Node

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

    from kitfs.api.kit import Kit

# The buffer: a small read costs at most three 128 KiB pieces from the registry, and reads in
# order of this size make a stream (the core fetches whole chunks, ahead, from 256 KiB in order).
DEFAULT_BLOCK_SIZE_BYTES = 256 * 1024


class _KitRawFile(io.RawIOBase):
    """Unbuffered reads of one file of a kit."""

    def __init__(self, kit: Kit, node: Node) -> None:
        super().__init__()
        self._kit = kit
        self._node = node
        self._position = 0
        self.name = node.path

    @property
    def size(self) -> int:
        return self._node.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._check_open()
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        if whence == io.SEEK_SET:
            position = offset
        elif whence == io.SEEK_CUR:
            position = self._position + offset
        elif whence == io.SEEK_END:
            position = self._node.size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if position < 0:
            raise OSError(errno.EINVAL, f"negative seek position {position}", self.name)
        self._position = position
        return position

    def readinto(self, buffer: WriteableBuffer) -> int:
        self._check_open()
        view = memoryview(buffer).cast("B")
        if self._position >= self._node.size or not len(view):
            return 0
        filled = 0
        for piece in self._kit._read_node(self._node, self._position, len(view)):
            view[filled : filled + len(piece)] = piece
            filled += len(piece)
        self._position += filled
        return filled

    def readall(self) -> bytes:
        self._check_open()
        if self._position >= self._node.size:
            return b""
        data = b"".join(self._kit._read_node(self._node, self._position,
                                             self._node.size - self._position))
        self._position += len(data)
        return data

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file.")


class KitFile(io.BufferedReader):
    """A file of a kit, open for reading (``Kit.open``, ``KitFileSystem.open``).

    ``path`` is its path in the kit, ``size`` its size, ``digest`` the digest of the layer its
    bytes come from (None for the Kitfile). Reads, seeks and ``readinto`` behave as for a
    local file opened with ``open(path, "rb")``; writing raises ``io.UnsupportedOperation``.
    """

    def __init__(self, kit: Kit, node: Node, block_size: int) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a number of bytes above 0, not {block_size!r}")
        super().__init__(_KitRawFile(kit, node), buffer_size=block_size)
        self.path = node.path
        self.size = node.size
        source = node.source
        self.digest: str | None = None
        if source is not None and source.layer_index >= 0:
            self.digest = kit.info(node.path).digest

    def __repr__(self) -> str:
        return f"<kitfs.KitFile {self.path!r} size={self.size}>"
