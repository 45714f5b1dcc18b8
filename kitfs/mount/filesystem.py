"""The FUSE adapter: pyfuse3 operations over one opened ModelKit, read-only.

This module is a thin shim (as mountpoint-s3's ``fuse.rs`` is over its filesystem): every
question goes to ``KitSession`` (``lookup``, ``listdir``, ``read_file``), and this module owns
only what is FUSE-specific:

- inode numbers: a node's inode is derived from its path (64-bit xxh3), so it is the same for
  the mount's whole life and across remounts of the same kit;
- attributes: read-only modes (write bits, setuid, setgid and sticky never shown), owner from
  ``--uid/--gid``, one mtime for the whole kit;
- the one errno boundary (``_boundary``): pyfuse3 ends the mount on any exception that is not
  ``FUSEError``, so every handler is wrapped. A ``KitfsError`` becomes its class's errno
  (``kitfs.errors``), an ``OSError`` its own errno, and anything else is logged with its
  traceback and answered EIO; the mount stays up in every case.
- counters for ``kitfs status`` and ``kitfs metrics`` (reads, bytes, errors, every request the
  kernel sent and how it was answered, how long reads took, verification failures met);
- the kernel's round trips: ``flush`` is not implemented, so the first ``close()`` answers
  ENOSYS and the kernel never sends FLUSH again for the mount's life (nothing is ever dirty);
  an open and close of a cached file then costs the daemon OPEN and RELEASE only (RELEASE
  does not hold up ``close()``), the least a FUSE file system with per-open state can get;
- the kernel's page cache: files keep their pages between opens (``keep_cache``, content never
  changes), so when a layer fails verification the pages of its files are dropped
  (``invalidate_inode``), and every later read of the layer reaches kitfs and fails too.
"""

from __future__ import annotations

import bisect
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio
import xxhash

from kitfs.core.modelkit import KitSession, ModelKit
from kitfs.core.verify import VerifyState
from kitfs.errors import IntegrityError, KitfsError, NotFoundError
from kitfs.format.tree import Node

log = logging.getLogger(__name__)

# Content never changes for the life of a mount (the reference is pinned to a digest), so the
# kernel may keep entries and attributes as long as it likes; a day is "forever" in practice.
CACHE_TIMEOUT_S = 86400.0
BLOCK_SIZE_BYTES = 1 << 20  # st_blksize: tells readers (cp, numpy) to read in 1 MiB pieces
XATTR_DIGEST = b"user.kitfs.digest"  # the digest of the layer a file's bytes come from
XATTR_REFERENCE = b"user.kitfs.reference"  # on the root: the pinned reference

P = ParamSpec("P")
R = TypeVar("R")


# Upper bounds of the read latency histogram's buckets (seconds; +Inf is implied): from a
# chunk in memory (~50 us) through the cache (~1 ms) and a registry fetch (5 ms-1 s) to a
# registry that times out.
READ_SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                        0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Called with (layer digest, the failure's message) once per failure a mount meets.
VerificationFailureHook = Callable[[str, str], None]


@dataclass
class MountCounters:
    """What ``kitfs status`` and ``kitfs metrics`` show per mount (besides the registry's
    own counts)."""

    reads: int = 0
    bytes_served: int = 0
    errors: int = 0
    requests: int = 0  # every request that reached a handler (any operation)
    outcomes: dict[str, int] = field(default_factory=dict)  # "ok" or the errno's name -> requests
    # reads (answered or failed) per latency bucket (the last one: slower than every bound)
    read_buckets: list[int] = field(default_factory=lambda: [0] * (len(READ_SECONDS_BUCKETS) + 1))
    read_seconds: float = 0.0  # their sum
    verification_failures: int = 0  # distinct ones (the same failure answered again is not)

    def count_outcome(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def count_read_time(self, seconds: float) -> None:
        # the first bucket whose bound is >= seconds (Prometheus' le), else the last: +Inf
        self.read_buckets[bisect.bisect_left(READ_SECONDS_BUCKETS, seconds)] += 1
        self.read_seconds += seconds


def _boundary(method: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Translate every exception of a handler into a ``FUSEError``: the one errno mapping."""

    @functools.wraps(method)
    async def handler(*args: P.args, **kwargs: P.kwargs) -> R:
        counters = args[0].counters if args and isinstance(args[0], KitFilesystem) else None
        if counters is not None:
            counters.requests += 1
        try:
            result = await method(*args, **kwargs)
        except pyfuse3.FUSEError as exc:
            _count_outcome(counters, exc.errno)
            raise
        except NotFoundError:
            _count_outcome(counters, errno.ENOENT)
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except KitfsError as exc:
            _count_error(args)
            _count_outcome(counters, exc.errno)
            log.error("%s: %s (%s)", method.__name__, exc, errno.errorcode.get(exc.errno, exc.errno))
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            _count_error(args)
            _count_outcome(counters, exc.errno or errno.EIO)
            log.error("%s: %s", method.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            _count_error(args)
            _count_outcome(counters, errno.EIO)
            log.exception("%s failed unexpectedly; answered EIO, the mount stays up", method.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if counters is not None:
            counters.count_outcome("ok")
        return result

    return handler


def _count_outcome(counters: MountCounters | None, number: int) -> None:
    if counters is not None:
        counters.count_outcome(errno.errorcode.get(number, "EIO"))


def _invalidate_pages(inodes: list[int], digest: str) -> None:
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(ino)
        except OSError as exc:  # ENOENT: the kernel holds nothing of it
            log.debug("invalidate inode %d: %s", ino, exc)
    log.info("layer %s failed verification: the kernel's cached pages of its %d files are "
             "dropped", digest, len(inodes))


def _count_error(args: Any) -> None:
    if args and isinstance(args[0], KitFilesystem):
        args[0].counters.errors += 1


class KitFilesystem(pyfuse3.Operations):
    """Read-only pyfuse3 operations for one ModelKit."""

    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, session: KitSession, kit: ModelKit, *, uid: int, gid: int,
                 mtime_ns: int) -> None:
        super().__init__()
        self.session = session
        self.kit = kit
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.counters = MountCounters()
        self.on_verification_failure: VerificationFailureHook | None = None  # the daemon's audit
        self._failures_seen: set[tuple[int, str]] = set()
        self._nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: kit.tree.root}
        kit.tree.root.ino = pyfuse3.ROOT_INODE
        self._pages_dropped: set[int] = set()  # layers whose files' cached pages were dropped
        # The daemon's nursery, while it serves the mount: page invalidations run there.
        self.background: trio.Nursery | None = None

    # --- inodes and attributes ------------------------------------------------------------

    def inode_of(self, node: Node) -> int:
        """The node's inode: xxh3-64 of its path, probing on the (unlikely) collision."""
        if node.ino:
            return node.ino
        ino = xxhash.xxh3_64_intdigest(node.path.encode("utf-8", "surrogateescape")) or 2
        while ino <= pyfuse3.ROOT_INODE or ino in self._nodes:
            ino = (ino + 1) % (1 << 64)
        self._nodes[ino] = node
        node.ino = ino
        return ino

    def _node(self, inode: int) -> Node:
        node = self._nodes.get(inode)
        if node is None:  # the kernel asked for an inode we never gave out
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = self._template()
        self._describe(attrs, node)
        return attrs

    def _template(self) -> pyfuse3.EntryAttributes:
        """Attributes with the fields every node shares set; ``_describe`` sets the rest."""
        attrs = pyfuse3.EntryAttributes()
        attrs.generation = 0
        attrs.entry_timeout = CACHE_TIMEOUT_S
        attrs.attr_timeout = CACHE_TIMEOUT_S
        attrs.st_uid = self.uid
        attrs.st_gid = self.gid
        attrs.st_rdev = 0
        attrs.st_blksize = BLOCK_SIZE_BYTES
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self.mtime_ns
        return attrs

    def _describe(self, attrs: pyfuse3.EntryAttributes, node: Node) -> None:
        """Set the fields of ``attrs`` that depend on ``node`` (on a ``_template``)."""
        attrs.st_ino = self.inode_of(node)
        permissions = node.mode & 0o555  # read-only: no write bits, no setuid/setgid/sticky
        if node.is_dir:
            attrs.st_mode = stat.S_IFDIR | permissions
            attrs.st_nlink = 2 + sum(1 for child in node.children.values() if child.is_dir)
            attrs.st_size = 0
            attrs.st_blocks = 0
        else:
            attrs.st_mode = stat.S_IFREG | permissions
            attrs.st_nlink = 1
            attrs.st_size = node.size
            attrs.st_blocks = (node.size + 511) // 512

    # --- reading the tree -----------------------------------------------------------------

    @_boundary
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if not parent.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        node = await self.session.lookup(self.kit, parent, os.fsdecode(name))
        return self.attributes(node)

    @_boundary
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self.attributes(self._node(inode))

    @_boundary
    async def opendir(self, inode: int, ctx: Any) -> int:
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        # start_id is the position after the last entry the kernel took; the listing is the
        # same every time (names sorted, nothing ever removed), so positions are stable.
        # pyfuse3 answers READDIRPLUS only: each entry carries its attributes, so the kernel
        # looks none of them up afterwards (a ``find`` over 100,000 files sends 2 LOOKUPs and
        # 800 READDIRPLUS). readdir_reply copies the attributes into the reply at once, so one
        # EntryAttributes serves every entry: 1.3 instead of 2.3 us of the daemon's per entry.
        children = await self.session.listdir(self.kit, self._node(fh))
        attrs = self._template()
        for position in range(start_id, len(children)):
            node = children[position]
            self._describe(attrs, node)
            name = node.path.rpartition("/")[2].encode("utf-8", "surrogateescape")
            if not pyfuse3.readdir_reply(token, name, attrs, position + 1):
                break

    @_boundary
    async def releasedir(self, fh: int) -> None:
        return None

    @_boundary
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EROFS)
        # keep_cache: the bytes never change, so the page cache survives close and reopen.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_boundary
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        # pyfuse3 replies with any buffer (PyObject_GetBuffer, fuse_reply_buf): a view of a
        # chunk held in memory goes to the kernel without a copy of its own
        node = self._node(fh)
        started = time.perf_counter()
        try:
            data = await self.session.read_file(self.kit, node, off, size)
        except IntegrityError as exc:
            if node.source is not None:
                self._drop_cached_pages(node.source.layer_index)
                self._note_verification_failure(node.source.layer_index, str(exc))
            raise
        finally:
            self.counters.count_read_time(time.perf_counter() - started)
        self.counters.reads += 1
        self.counters.bytes_served += len(data)
        return data

    @_boundary
    async def release(self, fh: int) -> None:
        return None

    @_boundary
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        self._node(inode)
        return not mode & os.W_OK  # nothing is writable; default_permissions checks the rest

    @_boundary
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        total_bytes = sum(source.placement.descriptor.size for source in self.kit.layers)
        data.f_blocks = (total_bytes + 4095) // 4096
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(self._nodes)
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    @_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        node = self._node(inode)
        value = self._xattrs(node).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_boundary
    async def listxattr(self, inode: int, ctx: Any) -> Sequence[bytes]:
        return list(self._xattrs(self._node(inode)))

    def _drop_cached_pages(self, layer_index: int) -> None:
        """Have the kernel forget the cached pages of every file of a layer that failed
        verification (pages read before the failure would otherwise still be served). A task
        of the daemon's nursery, in a worker thread, so it waits without holding up this
        request: invalidating pages that the failing read still holds locked blocks until
        the read is answered (libfuse: never in the path of a request). Abandoned, not
        waited for, when the daemon stops (the call cannot be interrupted)."""
        if layer_index < 0 or layer_index in self._pages_dropped or self.background is None:
            return  # (no background nursery: not served by a daemon, no kernel cache to drop)
        self._pages_dropped.add(layer_index)
        inodes = [ino for ino, node in self._nodes.items()
                  if node.source is not None and node.source.layer_index == layer_index]
        digest = self.kit.layers[layer_index].placement.descriptor.digest
        self.background.start_soon(functools.partial(
            trio.to_thread.run_sync, _invalidate_pages, inodes, str(digest),
            abandon_on_cancel=True), name="invalidate-pages")

    def _note_verification_failure(self, layer_index: int, message: str) -> None:
        """Count a failure once per mount and tell the daemon's hook: a layer that failed its
        digest is one failure however often it is refused after; a piece that failed its
        identity (the layer stays good) is one per message."""
        source = self.kit.layers[layer_index] if layer_index >= 0 else None
        state = self.session.store.blob_state(source.content.key) if source else None
        failed = VerifyState.of(state) is VerifyState.FAILED
        seen = (layer_index, "" if failed else message)
        if seen in self._failures_seen:
            return
        self._failures_seen.add(seen)
        self.counters.verification_failures += 1
        if self.on_verification_failure is not None and layer_index >= 0:
            digest = str(self.kit.layers[layer_index].placement.descriptor.digest)
            self.on_verification_failure(digest, message)

    def _xattrs(self, node: Node) -> dict[bytes, bytes]:
        if node is self.kit.tree.root:
            return {XATTR_REFERENCE: str(self.kit.reference).encode()}
        if node.source is not None and node.source.layer_index >= 0:
            layer = self.kit.layers[node.source.layer_index]
            return {XATTR_DIGEST: str(layer.placement.descriptor.digest).encode()}
        return {}

    # --- everything that would change the tree: EROFS ------------------------------------
    # The mount is also made with the "ro" option, so the kernel refuses most of these
    # before they reach us; these answer for whatever still arrives.

    @_boundary
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    @_boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    @_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    @_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    @_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    @_boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    @_boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    @_boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    @_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)

    @_boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    @_boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    @_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    # No ``flush``: pyfuse3's default answers ENOSYS, after which the kernel stops sending
    # FLUSH on close() (fc->no_flush). Answering it instead cost a synchronous round trip to
    # this process on every close(), two per ``dd`` (it dup2()s its input), for nothing.

    @_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        return None  # nothing is ever dirty

    @_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    @_boundary
    async def forget(self, inode_list: Any) -> None:
        # Nodes live as long as the mount (a kit's tree is small next to its data), so an
        # inode stays valid after the kernel forgets it.
        return None
