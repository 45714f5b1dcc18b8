"""The files of a cache directory: where each lives, how it is written and how it is read back.

Layout of a cache directory (created 0700; files 0600)::

    kitfs.db                                  SQLite, WAL (see kitfs.cache.schema)
    lock                                      flock: file and row changes across processes
    chunks/<algo>/<hex[:2]>/<hex>/<idx>       one file per cached chunk of a content key (whole,
                                              or the pieces a partial chunk holds)
    checkpoints/<algo>/<hex[:2]>/<hex>        the checkpoint index of a gzip blob (by its digest)
    tmp/                                      chunk and index files being written

Chunk and checkpoint index files are written alike (``write_all``, to ``tmp/`` first, see
``kitfs.cache.chunks``) and read alike: ``read_checked`` checks every 64 KiB block a read
touches against the xxh3 sums of the file's row (``block_checksums``). Nothing here touches the
database.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from kitfs.errors import CacheError

log = logging.getLogger("kitfs.cache.store")  # the store's log lines, as before the split

BLOCK_SIZE_BYTES = 64 * 1024  # checksum granularity: a 4 KiB read checks at most 2 blocks
_SUM = struct.Struct("<Q")  # one block's xxh3 in a row's ``xxh3`` column
_DIRECT_ALIGN_BYTES = 4096  # O_DIRECT: buffer address, file offset and length multiples of it
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class PreparedChunk:
    """A chunk written to a temporary file by ``ChunkStore.prepare``, not yet recorded.
    ``tmp`` is None when the disk was full (``full_reason`` says how)."""

    tmp: Path | None
    length: int
    sums: bytes
    full_reason: str = ""


def chunk_path(directory: Path, key: str, idx: int) -> Path:
    algo_hex = key.replace(":", "/")
    head, _, hex_ = algo_hex.rpartition("/")
    return directory / "chunks" / head / hex_[:2] / hex_ / str(idx)


def checkpoints_path(directory: Path, blob: str) -> Path:
    algo, _, hex_ = blob.partition(":")
    return directory / "checkpoints" / algo / hex_[:2] / hex_


def block_checksums(data: bytes | bytearray | memoryview) -> bytes:
    """xxh3_64 of every 64 KiB block of ``data``, packed little-endian."""
    view = memoryview(data)
    return b"".join(
        xxhash.xxh3_64_digest(view[i : i + BLOCK_SIZE_BYTES])[::-1]
        for i in range(0, len(view), BLOCK_SIZE_BYTES)
    ) if len(view) else b""


class Damaged(Exception):
    """A cached file that is short, unreadable, or fails its checksums (the message says how)."""


def read_checked(path: Path, file_length: int, sums: bytes, offset: int,
                 length: int) -> bytes | memoryview:
    """Bytes ``[offset, offset+length)`` of a cached file of ``file_length`` bytes, each 64 KiB
    block they touch checked against ``sums`` (a view of the blocks read when the range does
    not start and end on blocks: no copy).

    Raises:
        FileNotFoundError: the file is not there.
        Damaged: it could not be read, is short, or a block fails its checksum.
    """
    end = min(offset + length, file_length)
    if offset >= end:
        return b""
    first_block = offset // BLOCK_SIZE_BYTES
    last_block = (end - 1) // BLOCK_SIZE_BYTES
    start = first_block * BLOCK_SIZE_BYTES
    stop = min((last_block + 1) * BLOCK_SIZE_BYTES, file_length)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, stop - start, start)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise Damaged(f"reading it failed: {exc}") from exc
    if len(data) != stop - start:
        raise Damaged("its file is shorter than recorded")
    view = memoryview(data)  # slices of a view copy nothing
    for block in range(first_block, last_block + 1):
        at = (block - first_block) * BLOCK_SIZE_BYTES
        expected = _SUM.unpack_from(sums, block * 8)[0]
        if xxhash.xxh3_64_intdigest(view[at : at + BLOCK_SIZE_BYTES]) != expected:
            raise Damaged(f"block {block} fails its xxh3 checksum")
    if offset == start and end == stop:
        return data
    return view[offset - start : end - start]


def direct_writes_work(directory: Path) -> bool:
    """Whether files in ``directory`` take O_DIRECT writes (tmpfs does not), tried once."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = directory / f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}-direct"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
        try:
            with mmap.mmap(-1, _DIRECT_ALIGN_BYTES) as page:  # page-aligned
                os.write(fd, page)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
    finally:
        unlink_quietly(probe)


def write_all(fd: int, view: memoryview, direct: bool) -> None:
    """Write ``view`` to the new file ``fd``: with ``direct``, its whole 4 KiB blocks with
    O_DIRECT (the kernel takes them only from a page-aligned buffer: the reader receives
    chunks into anonymous mmaps; from any other it refuses at once, and the write goes through
    the page cache), then the rest through the page cache.

    Why O_DIRECT: a chunk's bytes are already on their way into the kernel's page cache of the
    FUSE file that reads them; writing them through the page cache again made a second copy in
    memory and cost the most CPU of any step of a cold read here (3.4 s per GiB right after the
    page cache was dropped, 0.44 s once warm), where O_DIRECT costs 0.1 s per GiB."""
    done = 0
    aligned = len(view) // _DIRECT_ALIGN_BYTES * _DIRECT_ALIGN_BYTES
    if direct and aligned:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
            while done < aligned:
                done += os.write(fd, view[done:aligned])
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: not an aligned buffer
                raise
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    while done < len(view):
        done += os.write(fd, view[done:])


def make_private(directory: Path) -> None:
    """Make an existing cache directory 0700 (it holds what the user's credentials fetched).

    A looser one (made by hand, or by an older kitfs) is tightened, with a warning; one this
    user cannot chmod (another user's) is refused: kitfs would share it with its owner.
    """
    mode = directory.stat().st_mode & 0o777
    if mode & 0o077 == 0:
        return
    try:
        directory.chmod(0o700)
    except PermissionError:
        raise CacheError(f"the cache directory {directory} is {mode:04o} and not yours to make "
                         "0700; use your own (--cache-dir)") from None
    log.warning("cache directory %s was %04o, now 0700", directory, mode)


def make_dirs_0700(path: Path, root: Path) -> None:
    """``mkdir -p`` under ``root`` with every new directory 0700 (``Path.mkdir(parents=True)``
    gives the parents the default mode)."""
    missing = []
    while not path.exists() and path != root:
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:  # another process made it meanwhile
            pass


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def walk_files(root: Path) -> Iterator[Path]:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            yield Path(dirpath) / name
