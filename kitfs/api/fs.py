"""``kitfs://`` URLs for fsspec (and so pandas, pyarrow, dask...): ``KitFileSystem``.

URL form: ``kitfs://REGISTRY/REPOSITORY:TAG/PATH``, ``kitfs://REGISTRY/REPOSITORY@sha256:…/PATH``
or ``…:TAG@sha256:…/PATH``. The reference ends at the first path segment after the registry
that holds ``:`` or ``@`` (repository names can hold neither), so the tag or the digest is
required: without one the URL is a ``ValueError``. fsspec paths (``ls`` names, ``find``,
``glob``) are the URL without ``kitfs://``: ``REGISTRY/REPOSITORY:TAG/PATH``.

The package registers this class under the ``fsspec.specs`` entry point (pyproject), so fsspec
finds it without an import of kitfs. Storage options are the command line's
(``kitfs.api.options``); an unknown one is a ``ValueError``.

Every question goes to a ``Kit`` (``kitfs.api.kit``), one per reference named, opened on first
use and kept for the instance's life: a tag is pinned the first time an instance uses it (as a
mount pins it); ``invalidate_cache()`` forgets the pins. Read-only: every method that would
write raises ``OSError`` with EROFS, as a mount does.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections import defaultdict
from typing import Any, NoReturn

from fsspec.callbacks import DEFAULT_CALLBACK
from fsspec.spec import AbstractFileSystem
from fsspec.utils import isfilelike, stringify_path

from kitfs.api.file import DEFAULT_BLOCK_SIZE_BYTES, KitFile
from kitfs.api.kit import Entry, Kit, open_kit_with
from kitfs.api.options import DEFAULT_TIMEOUT_S, DEFAULT_VERIFY, session_options

PROTOCOL = "kitfs"
# Options fsspec itself may pass to any file system's constructor; kitfs has no use for them.
_FSSPEC_OPTIONS = {"use_listings_cache", "listings_expiry_time", "max_paths", "asynchronous",
                   "loop"}
_KITFS_OPTIONS = ("cache_dir", "cache_size", "verify", "plain_http", "ca_file", "timeout",
                  "select")


def split_path(path: str) -> tuple[str, str]:
    """``REGISTRY/REPOSITORY:TAG/PATH`` (no ``kitfs://``) → (``REGISTRY/REPOSITORY:TAG``, ``PATH``).

    Raises:
        ValueError: the path names no tag or digest.
    """
    parts = path.split("/")
    for index in range(1, len(parts)):
        if ":" in parts[index] or "@" in parts[index]:
            return "/".join(parts[: index + 1]), "/".join(parts[index + 1 :])
    raise ValueError(f"kitfs URL {PROTOCOL}://{path} names no tag or digest: expected "
                     f"{PROTOCOL}://REGISTRY/REPOSITORY:TAG/PATH or "
                     f"{PROTOCOL}://REGISTRY/REPOSITORY@sha256:…/PATH")


class KitFileSystem(AbstractFileSystem):  # type: ignore[misc]  # fsspec has no type hints
    """ModelKits as a read-only fsspec file system (see the module docstring)."""

    protocol = PROTOCOL
    root_marker = ""

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None,
                 cache_size: int | str | None = None, verify: str = DEFAULT_VERIFY.value,
                 plain_http: bool | None = None, ca_file: str | os.PathLike[str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, select: dict[str, str] | None = None,
                 **storage_options: Any) -> None:
        unknown = sorted(set(storage_options) - _FSSPEC_OPTIONS)
        if unknown:
            raise ValueError(f"unknown kitfs storage option {unknown[0]!r} (kitfs takes: "
                             f"{', '.join(_KITFS_OPTIONS)})")
        super().__init__(**storage_options)
        self._options = session_options(cache_dir=cache_dir, cache_size=cache_size,
                                        verify=verify, plain_http=plain_http, ca_file=ca_file,
                                        timeout=timeout, select=select)
        self._kits: dict[str, Kit] = {}
        self._lock = threading.Lock()
        self._opening: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

    # --- paths and kits -------------------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        text: str = stringify_path(path)
        if text.startswith(f"{PROTOCOL}://"):
            text = text[len(PROTOCOL) + 3 :]
        return text.rstrip("/")

    def _kit(self, reference: str) -> Kit:
        """The kit a reference names, opened once per instance (its tag pinned then)."""
        kit = self._kits.get(reference)
        if kit is not None:
            return kit
        with self._lock:
            opening = self._opening[reference]
        with opening:  # one open per reference, whatever the number of threads asking
            kit = self._kits.get(reference)
            if kit is None:
                kit = self._kits[reference] = open_kit_with(reference, self._options)
            return kit

    def _locate(self, path: str) -> tuple[str, Kit, str]:
        """A path → (its reference as written, the kit, the path inside the kit)."""
        reference, inner = split_path(self._strip_protocol(path))
        return reference, self._kit(reference), inner

    def kit(self, path: str) -> Kit:
        """The ``Kit`` a URL or path is in (``kitfs.open_kit``'s object)."""
        return self._locate(path)[1]

    def invalidate_cache(self, path: str | None = None) -> None:
        """Forget the kits opened (and the tags pinned): all, or the one ``path`` is in."""
        with self._lock:
            if path is None:
                self._kits.clear()
            else:
                self._kits.pop(split_path(self._strip_protocol(path))[0], None)
        super().invalidate_cache(path)

    @staticmethod
    def _info(reference: str, entry: Entry) -> dict[str, Any]:
        name = f"{reference}/{entry.path}" if entry.path else reference
        return {"name": name, "size": entry.size, "type": entry.type, "mode": entry.mode,
                "digest": entry.digest}

    # --- reading ---------------------------------------------------------------------------------

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        reference, kit, inner = self._locate(path)
        return self._info(reference, kit.info(inner))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        reference, kit, inner = self._locate(path)
        entry, children = kit._entries(inner)  # one call into the loop
        entries = [entry] if children is None else children
        infos = [self._info(reference, e) for e in entries]
        return infos if detail else [info["name"] for info in infos]

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: Any) -> bytes:
        _, kit, inner = self._locate(path)
        return kit.read_bytes(inner, start, end)

    def cat_ranges(self, paths: list[str], starts: Any, ends: Any, max_gap: int | None = None,
                   on_error: str = "return", **kwargs: Any) -> list[Any]:
        """The ranges, read at once (fsspec's default reads them one after the other)."""
        if max_gap is not None:
            raise NotImplementedError("kitfs cat_ranges takes no max_gap: each range fetches "
                                      "only what covers it")
        if not isinstance(paths, list):
            raise TypeError("paths must be a list")
        starts = starts if isinstance(starts, list) else [starts] * len(paths)
        ends = ends if isinstance(ends, list) else [ends] * len(paths)
        if len(starts) != len(paths) or len(ends) != len(paths):
            raise ValueError("paths, starts and ends must have the same length")
        by_kit: defaultdict[str, list[int]] = defaultdict(list)
        located = [self._locate(p) for p in paths]
        for index, (reference, _, _) in enumerate(located):
            by_kit[reference].append(index)
        out: list[Any] = [None] * len(paths)
        for indexes in by_kit.values():
            kit = located[indexes[0]][1]
            results = kit._read_ranges([(located[i][2], starts[i], ends[i]) for i in indexes])
            for index, result in zip(indexes, results, strict=True):
                if isinstance(result, BaseException) and on_error != "return":
                    raise result
                out[index] = result
        return out

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None,
              autocommit: bool = True, cache_options: Any = None, **kwargs: Any) -> KitFile:
        if mode != "rb":
            self._read_only(f"open in mode {mode!r}", path)
        _, kit, inner = self._locate(path)
        return kit.open(inner, block_size=block_size or DEFAULT_BLOCK_SIZE_BYTES)

    def get_file(self, rpath: str, lpath: Any, callback: Any = DEFAULT_CALLBACK,
                 outfile: Any = None, **kwargs: Any) -> None:
        """Download one file, verified: its layer is checked against its digest first
        (fetching what the cache lacks of it), unless ``verify="off"``. So no byte that fails
        its digest is written; a tar has no digest per file, so getting one small file of a
        big layer fetches the whole layer."""
        _, kit, inner = self._locate(rpath)
        if outfile is None and not isfilelike(lpath) and kit.info(inner).type == "directory":
            os.makedirs(lpath, exist_ok=True)
            return
        kit._verify_source_of(inner)
        super().get_file(rpath, lpath, callback=callback, outfile=outfile, **kwargs)

    def ukey(self, path: str) -> str:
        """Changes exactly when the bytes may: from the layer digest, the file's offset in
        the layer and its size (the config digest for the Kitfile, the manifest digest for a
        directory)."""
        _, kit, inner = self._locate(path)
        return hashlib.sha256(kit._identity(inner).encode("utf-8", "surrogateescape")).hexdigest()

    def checksum(self, path: str) -> int:
        return int(self.ukey(path), 16)

    # --- read-only --------------------------------------------------------------------------------

    @staticmethod
    def _read_only(what: str, path: Any) -> NoReturn:
        raise OSError(errno.EROFS, f"kitfs is read-only: cannot {what}", str(path))

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> NoReturn:
        self._read_only("mkdir", path)

    def makedirs(self, path: str, exist_ok: bool = False) -> NoReturn:
        self._read_only("makedirs", path)

    def rmdir(self, path: str) -> NoReturn:
        self._read_only("rmdir", path)

    def rm_file(self, path: str) -> NoReturn:
        self._read_only("remove a file", path)

    def _rm(self, path: str) -> NoReturn:
        self._read_only("remove", path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> NoReturn:
        self._read_only("remove", path)

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> NoReturn:
        self._read_only("touch", path)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> NoReturn:
        self._read_only("write", path)

    def put_file(self, lpath: Any, rpath: str, callback: Any = DEFAULT_CALLBACK,
                 mode: str = "overwrite", **kwargs: Any) -> NoReturn:
        self._read_only("put", rpath)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> NoReturn:
        self._read_only("copy to", path2)

    def mv(self, path1: Any, path2: Any, recursive: bool = False, maxdepth: int | None = None,
           **kwargs: Any) -> NoReturn:
        self._read_only("move", path1)

    def setxattrs(self, path: str, **kwargs: Any) -> NoReturn:
        self._read_only("set attributes of", path)
