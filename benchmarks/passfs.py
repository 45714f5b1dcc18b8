"""The pyfuse3 ceiling: a minimal read-only pass-through filesystem over one local file.

A port of ``shared/tools/passfs.py`` (its default variant: ``os.pread`` inline on the trio
thread, ``FileInfo`` defaults, so ``keep_cache`` on), which the ``seq`` workload mounts over the
local copy of the model file, beside kitfs, in the same run::

    python benchmarks/passfs.py BACKING_FILE MOUNTPOINT

The mount holds one file, ``MOUNTPOINT/file``. The caller raises the mount's read-ahead to
1 MiB, as kitfs does as root, and unmounts it with ``fusermount3 -u``. A measurement tool, not
project code.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1
FILE_NAME = b"file"


class PassFS(pyfuse3.Operations):
    """One read-only file, answered by ``os.pread`` of the backing file."""

    def __init__(self, backing: str) -> None:
        super().__init__()
        self.fd = os.open(backing, os.O_RDONLY)
        self.size_bytes = os.fstat(self.fd).st_size

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode, entry.st_nlink = stat.S_IFDIR | 0o555, 2
        elif inode == FILE_INODE:
            entry.st_mode, entry.st_nlink, entry.st_size = stat.S_IFREG | 0o444, 1, self.size_bytes
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        entry.st_ino = inode
        entry.st_blksize = 1 << 20
        entry.st_blocks = (entry.st_size + 511) // 512
        entry.attr_timeout = entry.entry_timeout = 3600
        return entry

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def lookup(self, parent: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if parent == pyfuse3.ROOT_INODE and name == FILE_NAME:
            return self._attributes(FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, FILE_NAME, self._attributes(FILE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode)  # keep_cache=True by default, as kitfs

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)


def main() -> None:
    backing, mountpoint = sys.argv[1:3]
    pyfuse3.init(PassFS(backing), mountpoint, {*pyfuse3.default_options, "fsname=passfs", "ro"})
    try:
        trio.run(pyfuse3.main)
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
