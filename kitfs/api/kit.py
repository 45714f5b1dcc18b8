"""The synchronous Python API: ``open_kit`` → ``Kit`` (one ModelKit pinned to its manifest
digest: its Kitfile, layers, tree and bytes) → ``KitFile`` (``kitfs.api.file``).

The same core answers as for the mount and the CLI, so the semantics are the mount's (README
"Semantics", "Verification"): the tree ``kit unpack`` writes, the bytes of the digests,
laziness (a read fetches only what covers it), the ``verify`` modes, the errors (as Python
exceptions, ``kitfs.api.runtime``) and the shared cache. Every call runs on the runtime's trio
thread, so a ``Kit`` can be used from any thread, and from a thread whose asyncio loop is
running (Jupyter).
"""

from __future__ import annotations

import copy
import errno
import os
import posixpath
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, overload

import trio

from kitfs.api.file import DEFAULT_BLOCK_SIZE_BYTES, KitFile
from kitfs.api.html import kit_html
from kitfs.api.options import DEFAULT_TIMEOUT_S, DEFAULT_VERIFY, session_options
from kitfs.api.runtime import RUNTIME, StaleGenerationError, python_error
from kitfs.core.modelkit import KitSession, ModelKit, SessionOptions, verification_label
from kitfs.core.reader import VerifyMode
from kitfs.core.verify import VerifyState
from kitfs.errors import IntegrityError, UsageError
from kitfs.format.reference import Reference
from kitfs.format.tree import Node

# One read of the core asks for at most this much (as ``kitfs cat`` does): a larger read is
# made of several in turn, each fetching its chunks in parallel, so memory and the number of
# requests in flight stay bounded whatever a caller asks for.
MAX_READ_BYTES = 16 * 1024 * 1024
# Ranges of one cat_ranges call read at once.
MAX_PARALLEL_RANGES = 16

Pieces = list[bytes | memoryview]


@dataclass(frozen=True)
class Entry:
    """A file or directory of a kit."""

    path: str  # inside the kit, "" for the root
    type: Literal["file", "directory"]
    size: int  # bytes (0 for a directory)
    mode: int  # permission bits as packed (what ``kitfs ls`` shows; a mount drops write bits)
    digest: str | None  # the layer a file's bytes come from (None: a directory, the Kitfile)


@dataclass(frozen=True)
class Layer:
    """A layer of a kit, as ``kitfs inspect`` shows it."""

    digest: str
    media_type: str
    kind: str  # model, modelpart, dataset, code, docs, prompt, ...
    layout: str  # tar or raw
    compression: str  # none, gzip or zstd
    size: int  # bytes of the blob
    path: str  # where its files are in the kit ("." for the root)
    diff_id: str | None
    verification: str  # "not fetched", "unverified", "verified" or "FAILED", from the cache
    source: str  # the kit it comes from (another one for a model.path reference)


@dataclass(frozen=True)
class VerifyProgress:
    """What ``Kit.verify`` tells its ``progress`` callback after each layer."""

    digest: str  # the layer just checked
    layers_done: int
    layers_total: int
    bytes_done: int  # blob bytes of the layers checked so far
    bytes_total: int
    error: str | None  # why that layer failed, or None


@dataclass(frozen=True)
class _Opened:
    generation: int
    session: KitSession
    kit: ModelKit


class Kit:
    """A ModelKit, opened with ``open_kit``: pinned to its manifest digest for its whole life.

    Paths are relative to the kit's root (``"data/train.csv"``; ``""`` is the root). Every
    method may be called from any thread, and inside a running asyncio loop.
    """

    def __init__(self, opened: _Opened, options: SessionOptions) -> None:
        self._opened = opened
        self._options = options
        self._lock = threading.Lock()
        #: the pinned reference, ``registry/repository[:tag]@sha256:…``
        self.reference: str = str(opened.kit.reference)
        #: the manifest digest everything is read under
        self.digest: str = str(opened.kit.reference.digest)

    # --- calls into the loop ------------------------------------------------------------------

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(session, modelkit, *args)`` on the loop; after a new loop started (shutdown,
        fork) the kit is opened again there, by its digest."""
        while True:
            opened = self._opened
            try:
                return RUNTIME.call(fn, opened.session, opened.kit, *args,
                                    generation=opened.generation)
            except StaleGenerationError:
                with self._lock:
                    if self._opened is opened:
                        self._opened = RUNTIME.call(_open, self._options, opened.kit.reference)

    # --- what the kit is ----------------------------------------------------------------------

    @property
    def kitfile(self) -> dict[str, Any] | None:
        """The Kitfile as a dict, as the config holds it (kit adds ``digest`` and ``diffId`` to
        each entry); None for a ModelPack without one. A copy: changing it changes nothing."""
        return copy.deepcopy(self._opened.kit.plan.kitfile_data)

    @property
    def created(self) -> str | None:
        """The manifest's ``org.opencontainers.image.created`` annotation (the mount's mtime)."""
        return self._opened.kit.created

    @property
    def layers(self) -> list[Layer]:
        """Every layer shown, in manifest order, with its verification state as the cache
        records it now."""
        result: list[Layer] = self._run(_layers)
        return result

    # --- the tree -----------------------------------------------------------------------------

    def info(self, path: str = "") -> Entry:
        """The entry at ``path``. Raises FileNotFoundError."""
        result: Entry = self._run(_info, _clean(path))
        return result

    def exists(self, path: str) -> bool:
        try:
            self.info(path)
        except FileNotFoundError:
            return False
        return True

    @overload
    def ls(self, path: str = "", detail: Literal[False] = False) -> list[str]: ...
    @overload
    def ls(self, path: str = "", detail: Literal[True] = ...) -> list[Entry]: ...

    def ls(self, path: str = "", detail: bool = False) -> list[str] | list[Entry]:
        """The entries of the directory ``path`` (their paths, or ``Entry``s with ``detail``),
        sorted by name. Layers found hostile or malformed are left out, as on a mount.

        Raises:
            FileNotFoundError: no such path; NotADirectoryError: ``path`` is a file.
        """
        entry, children = self._entries(path)
        if children is None:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory in the kit", entry.path)
        return children if detail else [child.path for child in children]

    def _entries(self, path: str) -> tuple[Entry, list[Entry] | None]:
        """The entry at ``path`` and, for a directory, its children (``KitFileSystem.ls``)."""
        result: tuple[Entry, list[Entry] | None] = self._run(_list, _clean(path))
        return result

    def walk(self, path: str = "") -> list[Entry]:
        """``path`` and everything under it, parents first, names sorted (``kitfs ls``)."""
        result: list[Entry] = self._run(_walk, _clean(path))
        return result

    # --- bytes --------------------------------------------------------------------------------

    def open(self, path: str, block_size: int = DEFAULT_BLOCK_SIZE_BYTES) -> KitFile:
        """A seekable, lazy, read-only binary file: each read fetches only what covers it.

        ``block_size`` is its buffer: smaller reads are served from one read of that size.
        Raises FileNotFoundError, IsADirectoryError.
        """
        node: Node = self._run(_resolve, _clean(path))
        if node.is_dir:
            raise IsADirectoryError(errno.EISDIR, "a directory of the kit", path)
        return KitFile(self, node, block_size)

    def read_bytes(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        """The bytes ``[start:end]`` of a file (slice rules: negative counts from its end)."""
        pieces: Pieces = self._run(_read_path, _clean(path), start, end)
        return b"".join(pieces)

    def _read_node(self, node: Node, offset: int, length: int) -> Pieces:
        """Bytes ``[offset, offset+length)`` of a file (``KitFile``), in pieces."""
        pieces: Pieces = self._run(_read_node, node, offset, length)
        return pieces

    def _read_ranges(self, ranges: list[tuple[str, int | None, int | None]]
                     ) -> list[bytes | BaseException]:
        """``(path, start, end)`` ranges read at once; an error is returned in its place."""
        results: list[Pieces | BaseException] = self._run(
            _read_ranges, [(_clean(p), s, e) for p, s, e in ranges])
        return [python_error(r) if isinstance(r, BaseException) else b"".join(r) for r in results]

    # --- verification -------------------------------------------------------------------------

    def verify(self, progress: Callable[[VerifyProgress], None] | None = None) -> None:
        """Check every layer against its digest, fetching what the cache does not hold.

        ``progress`` is called after each layer, in the calling thread. Every layer is checked
        even when one fails; then OSError (EIO) names the failures.
        Raises PermissionError or OSError when the registry refuses or fails.
        """
        blobs: list[tuple[int, str, int]] = self._run(_blobs)
        total = sum(size for _, _, size in blobs)
        failures: list[OSError] = []
        done = 0
        for count, (position, digest, size) in enumerate(blobs, 1):
            error = None
            try:
                self._run(_verify_layer, position)
            except OSError as exc:
                if not isinstance(exc.__cause__, IntegrityError):
                    raise
                failures.append(exc)
                error = str(exc.__cause__)
            done += size
            if progress is not None:
                progress(VerifyProgress(digest, count, len(blobs), done, total, error))
        if failures:
            reasons = "; ".join(str(f.__cause__) for f in failures)
            raise OSError(errno.EIO, f"{len(failures)} of {len(blobs)} layers of {self.reference} "
                          f"failed verification: {reasons}") from failures[0]

    def _verify_source_of(self, path: str) -> None:
        """Verify the layer a file's bytes come from (``KitFileSystem.get``); not with
        ``verify="off"``."""
        self._run(_verify_source_of, _clean(path))

    def _identity(self, path: str) -> str:
        """What a file's bytes are determined by (``KitFileSystem.ukey``)."""
        result: str = self._run(_identity, _clean(path))
        return result

    # --- display ------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"<kitfs.Kit {self.reference}>"

    def _repr_html_(self) -> str:
        """A notebook's view: reference, digest, and each layer's kind, path, size, state."""
        kit = self._opened.kit
        return kit_html(self.reference, self.digest, kit.plan.family.value, kit.created,
                        self.layers)


def open_kit(
    reference: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_size: int | str | None = None,
    verify: str = DEFAULT_VERIFY.value,
    plain_http: bool | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    select: Mapping[str, str] | None = None,
) -> Kit:
    """Open the ModelKit ``reference`` (``registry/repo:tag``, ``registry/repo@sha256:…``):
    resolve and pin it, check its manifest and config. No layer data is fetched.

    The options are the command line's (``kitfs.api.options.session_options``). Raises
    ValueError (a bad reference or option), FileNotFoundError (no such tag or repository),
    PermissionError (the registry refused the credentials), OSError (a malformed kit, the
    registry failing).
    """
    options = session_options(cache_dir=cache_dir, cache_size=cache_size, verify=verify,
                              plain_http=plain_http, ca_file=ca_file, timeout=timeout,
                              select=select)
    return open_kit_with(reference, options)


def open_kit_with(reference: str, options: SessionOptions) -> Kit:
    """``open_kit`` with the options already checked (``KitFileSystem``)."""
    try:
        parsed = Reference.parse(reference)
    except UsageError as exc:
        raise ValueError(str(exc)) from exc
    opened: _Opened = RUNTIME.call(_open, options, parsed)
    return Kit(opened, options)


def _clean(path: str) -> str:
    """A path inside the kit, without leading or trailing slashes ("" for the root)."""
    cleaned = posixpath.normpath("/" + path).strip("/")
    return "" if cleaned == "." else cleaned


def _slice(size: int, start: int | None, end: int | None) -> tuple[int, int]:
    """``[start:end]`` of ``size`` bytes as (offset, length)."""
    begin, stop, _ = slice(start, end).indices(size)
    return begin, max(0, stop - begin)


# --- on the loop's thread -------------------------------------------------------------------


async def _open(options: SessionOptions, reference: Reference) -> _Opened:
    loop = RUNTIME.in_loop()
    session = await loop.session(options)
    return _Opened(loop.generation, session, await session.open(reference))


def _entry(kit: ModelKit, node: Node) -> Entry:
    digest = None
    if node.source is not None and node.source.layer_index >= 0:
        digest = str(kit.layers[node.source.layer_index].placement.descriptor.digest)
    if node.is_dir:
        return Entry(node.path, "directory", 0, node.mode, None)
    return Entry(node.path, "file", node.size, node.mode, digest)


async def _resolve(session: KitSession, kit: ModelKit, path: str) -> Node:
    return await session.resolve(kit, path)


async def _info(session: KitSession, kit: ModelKit, path: str) -> Entry:
    return _entry(kit, await session.resolve(kit, path))


async def _list(session: KitSession, kit: ModelKit, path: str) -> tuple[Entry, list[Entry] | None]:
    node = await session.resolve(kit, path)
    if not node.is_dir:
        return _entry(kit, node), None
    return _entry(kit, node), [_entry(kit, child) for child in await session.listdir(kit, node)]


async def _walk(session: KitSession, kit: ModelKit, path: str) -> list[Entry]:
    top = await session.resolve(kit, path)
    return [_entry(kit, node) async for node in session.walk(kit, top)]


async def _read_node(session: KitSession, kit: ModelKit, node: Node, offset: int,
                     length: int) -> Pieces:
    pieces: Pieces = []
    end = min(node.size, offset + length)
    while offset < end:
        data = await session.read_file(kit, node, offset, min(MAX_READ_BYTES, end - offset))
        if not data:
            break
        pieces.append(data)  # a view of a chunk held in memory: never changed, kept alive by it
        offset += len(data)
    return pieces


async def _read_path(session: KitSession, kit: ModelKit, path: str, start: int | None,
                     end: int | None) -> Pieces:
    node = await session.resolve(kit, path)
    if node.is_dir:
        raise IsADirectoryError(errno.EISDIR, "a directory of the kit", path)
    offset, length = _slice(node.size, start, end)
    return await _read_node(session, kit, node, offset, length)


async def _read_ranges(session: KitSession, kit: ModelKit,
                       ranges: list[tuple[str, int | None, int | None]]
                       ) -> list[Pieces | BaseException]:
    results: list[Pieces | BaseException] = [[] for _ in ranges]
    limiter = trio.CapacityLimiter(MAX_PARALLEL_RANGES)

    async def one(index: int, path: str, start: int | None, end: int | None) -> None:
        async with limiter:
            try:
                results[index] = await _read_path(session, kit, path, start, end)
            except Exception as exc:
                results[index] = exc

    async with trio.open_nursery() as nursery:
        for index, (path, start, end) in enumerate(ranges):
            nursery.start_soon(one, index, path, start, end)
    return results


def _in_manifest_order(kit: ModelKit) -> list[int]:
    """Positions of the kit's layers, by kit then manifest order (as ``kitfs inspect``)."""
    return sorted(range(len(kit.layers)),
                  key=lambda p: (str(kit.layers[p].reference), kit.layers[p].placement.index))


async def _layers(session: KitSession, kit: ModelKit) -> list[Layer]:
    layers = []
    for source in (kit.layers[p] for p in _in_manifest_order(kit)):
        placement = source.placement
        descriptor = placement.descriptor
        state = VerifyState.of(session.store.blob_state(source.content.key))
        layers.append(Layer(
            digest=str(descriptor.digest), media_type=descriptor.media_type,
            kind=placement.layer_type.kind.value, layout=placement.layer_type.layout.value,
            compression=placement.layer_type.compression.value, size=descriptor.size,
            path=placement.claim or ".",
            diff_id=str(placement.diff_id) if placement.diff_id else None,
            verification=verification_label(state), source=str(source.reference)))
    return layers


async def _blobs(session: KitSession, kit: ModelKit) -> list[tuple[int, str, int]]:
    """(position of a layer, its digest, its size) once per content of the kit."""
    seen: set[str] = set()
    blobs = []
    for position in _in_manifest_order(kit):
        source = kit.layers[position]
        if source.content.key not in seen:
            seen.add(source.content.key)
            descriptor = source.placement.descriptor
            blobs.append((position, str(descriptor.digest), descriptor.size))
    return blobs


async def _verify_layer(session: KitSession, kit: ModelKit, position: int) -> None:
    await session.reader.verify_now(kit.layers[position].content)


async def _verify_source_of(session: KitSession, kit: ModelKit, path: str) -> None:
    node = await session.resolve(kit, path)
    if session.options.verify is VerifyMode.OFF or node.source is None:
        return
    if node.source.layer_index >= 0:
        await session.reader.verify_now(kit.layers[node.source.layer_index].content)


async def _identity(session: KitSession, kit: ModelKit, path: str) -> str:
    node = await session.resolve(kit, path)
    if node.is_dir or node.source is None:
        return f"{kit.reference.digest} directory {node.path}"
    if node.source.layer_index < 0:  # the Kitfile: rendered from the config
        return f"{kit.config_digest} Kitfile"
    content = kit.layers[node.source.layer_index].content
    return f"{content.key} {node.source.offset} {node.size}"
