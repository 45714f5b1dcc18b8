"""The pyfuse3 ceiling: a minimal read-only pass-through filesystem over one local file, or
over a local directory tree.

A port of ``shared/tools/passfs.py`` (its default variant: ``os.pread`` inline on the trio
thread, ``FileInfo`` defaults, so ``keep_cache`` on), which the ``seq`` workload mounts over the
local copy of the model file, beside kitfs, in the same run::

    python benchmarks/passfs.py BACKING_FILE MOUNTPOINT

The mount holds one file, ``MOUNTPOINT/file``. The caller raises the mount's read-ahead to
1 MiB, as kitfs does as root, and unmounts it with ``fusermount3 -u``.

With ``--tree``, the ``find`` workload's floor: the mount shows a copy of ``BACKING_DIR``'s
tree (names, sizes, modes; no file contents), read once at start and answered from memory
with attributes made beforehand, the least a pyfuse3 filesystem can do per request and per
entry (it answers READDIRPLUS, as kitfs does, so a ``find`` sends no LOOKUP per entry)::

    python benchmarks/passfs.py --tree BACKING_DIR MOUNTPOINT

A measurement tool, not project code.
"""

from __future__ import annotations

import errno
import itertools
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


class TreeFS(pyfuse3.Operations):
    """A read-only copy of a directory tree's names and attributes, answered from memory."""

    def __init__(self, top: str) -> None:
        super().__init__()
        self.attributes: dict[int, pyfuse3.EntryAttributes] = {}
        self.entries: dict[int, list[tuple[bytes, int]]] = {}  # directory -> sorted children
        self.children: dict[int, dict[bytes, int]] = {}
        self._inodes = itertools.count(pyfuse3.ROOT_INODE + 1)
        self._add(os.fsencode(top), pyfuse3.ROOT_INODE)

    def _add(self, path: bytes, inode: int) -> None:
        info = os.lstat(path)
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.st_mode, entry.st_nlink, entry.st_size = info.st_mode, info.st_nlink, info.st_size
        entry.st_blksize = 1 << 20
        entry.st_blocks = (info.st_size + 511) // 512
        entry.attr_timeout = entry.entry_timeout = 86400
        self.attributes[inode] = entry
        if stat.S_ISDIR(info.st_mode):
            children = self.children[inode] = {}
            for name in sorted(os.listdir(path)):
                children[name] = next(self._inodes)
                self._add(os.path.join(path, name), children[name])
            self.entries[inode] = list(children.items())

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self.attributes[inode]

    async def lookup(self, parent: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        child = self.children.get(parent, {}).get(name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attributes[child]

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode not in self.entries:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries, attributes = self.entries[fh], self.attributes
        for position in range(start_id, len(entries)):
            name, inode = entries[position]
            if not pyfuse3.readdir_reply(token, name, attributes[inode], position + 1):
                break


def main() -> None:
    tree = sys.argv[1] == "--tree"
    backing, mountpoint = sys.argv[1 + tree:3 + tree]
    operations = TreeFS(backing) if tree else PassFS(backing)
    pyfuse3.init(operations, mountpoint, {*pyfuse3.default_options, "fsname=passfs", "ro"})
    try:
        trio.run(pyfuse3.main)
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
