"""The merged directory tree of a ModelKit: Kitfile at the root plus every layer's files.

``TreeBuilder`` takes the entries of each layer (already parsed tar members, or a raw layer's one
file) and merges them as ``kit unpack`` would lay them out on disk: directories repeated across
layers merge, missing parents are synthesised (0755), a file provided twice or a file where a
directory stands is a conflict (kit fails there without ``--overwrite``). Links, devices and
FIFOs are refused, as kit refuses them. Modes keep permission bits only (setuid, setgid and
sticky are stripped); write bits are kept here and dropped by the read-only mount.
``shell_quoted`` is how the command line prints a tree's names.

Pure: no I/O.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from kitfs.errors import FormatError, UnsafeEntryError
from kitfs.format.layout import clean_entry_path
from kitfs.format.tar import DIRECTORY_TYPE, REGULAR_TYPES, TarMember

DEFAULT_DIR_MODE = 0o755
KITFILE_NAME = "Kitfile"

_TYPE_NAMES = {
    b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device",
    b"6": "FIFO", b"S": "sparse file", b"V": "volume header", b"M": "multi-volume member",
}


class FileSource(NamedTuple):
    """Where a file's bytes are: ``size`` bytes at ``offset`` of layer ``layer_index``'s content.

    ``layer_index`` is -1 for the Kitfile, whose bytes are ``inline``. (A NamedTuple, not a
    frozen dataclass: a layer of 100,000 files makes 100,000 of them, and this is 3x cheaper.)
    """

    layer_index: int
    offset: int
    inline: bytes = b""


@dataclass(slots=True)
class Node:
    path: str  # "" for the root
    is_dir: bool
    mode: int  # permission bits only
    size: int = 0
    source: FileSource | None = None
    children: dict[str, Node] = field(default_factory=dict)
    explicit: bool = False  # a directory seen in a layer (not synthesised)


class Tree:
    """A read-only view of the merged tree."""

    def __init__(self, root: Node) -> None:
        self.root = root

    def walk(self) -> Iterator[Node]:
        """Every node, parents before children, names in sorted order."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children[name] for name in sorted(node.children, reverse=True))

    def merge(self, other: Tree, where: str) -> None:
        """Add ``other``'s nodes (one layer's entries) to this tree: all of them or none.

        Directories present in both merge (a synthesised one takes the other's mode); a file
        meeting anything at the same path is a conflict, as ``kit unpack`` refuses to overwrite.

        Raises:
            FormatError: naming the first conflicting path; this tree is then unchanged.
        """
        pairs = [(self.root, other.root)]
        while pairs:  # check everything first, so a refused layer leaves no trace
            mine, theirs = pairs.pop()
            for name, node in theirs.children.items():
                existing = mine.children.get(name)
                if existing is None:
                    continue
                if not (existing.is_dir and node.is_dir):
                    what = "a directory" if existing.is_dir else "a file"
                    raise FormatError(
                        f"{where}: {node.path!r} conflicts with {what} another layer has at the "
                        "same path (kit unpack refuses to overwrite)"
                    )
                pairs.append((existing, node))
        pairs = [(self.root, other.root)]
        while pairs:
            mine, theirs = pairs.pop()
            for name, node in theirs.children.items():
                existing = mine.children.get(name)
                if existing is None:
                    mine.children[name] = node
                    continue
                if node.explicit and not existing.explicit:
                    existing.mode, existing.explicit = node.mode, True
                pairs.append((existing, node))


class TreeBuilder:
    """Collects layer entries into a ``Tree``."""

    def __init__(self, kitfile: bytes | None) -> None:
        self._root = Node("", True, DEFAULT_DIR_MODE, explicit=True)
        if kitfile is not None:
            self._root.children[KITFILE_NAME] = Node(
                KITFILE_NAME, False, 0o644, len(kitfile), FileSource(-1, 0, kitfile)
            )

    def _parent_of(self, path: str, where: str) -> Node:
        node = self._root
        parent = posixpath.dirname(path)
        for part in (p for p in parent.split("/") if p):
            child = node.children.get(part)
            if child is None:
                prefix = f"{node.path}/{part}" if node.path else part
                child = node.children[part] = Node(prefix, True, DEFAULT_DIR_MODE)
            elif not child.is_dir:
                raise FormatError(f"{where}: {child.path!r} is a file and also a directory")
            node = child
        return node

    def add_parents(self, path: str, where: str) -> None:
        """Synthesise the directories above ``path`` (0755, as ``kit unpack`` creates them)."""
        self._parent_of(path, where)

    def add_directory(self, path: str, mode: int, where: str) -> None:
        if not path:
            return
        parent = self._parent_of(path, where)
        name = posixpath.basename(path)
        existing = parent.children.get(name)
        if existing is None:
            parent.children[name] = Node(path, True, mode & 0o777, explicit=True)
        elif not existing.is_dir:
            raise FormatError(f"{where}: {path!r} is a file in one layer and a directory in another")
        elif not existing.explicit:
            existing.mode, existing.explicit = mode & 0o777, True

    def add_file(self, path: str, mode: int, size: int, source: FileSource, where: str) -> None:
        if not path:
            raise UnsafeEntryError(f"{where}: a file entry names the kit root")
        parent = self._parent_of(path, where)
        name = posixpath.basename(path)
        existing = parent.children.get(name)
        if existing is not None:
            what = "a directory" if existing.is_dir else "another file"
            raise FormatError(
                f"{where}: {path!r} conflicts with {what} at the same path "
                "(kit unpack refuses to overwrite)"
            )
        parent.children[name] = Node(path, False, mode & 0o777, size, source)

    def add_tar_members(
        self, members: Iterable[TarMember], layer_index: int, prefix: str, layer_digest: str
    ) -> None:
        """Add one tar layer's members; ``prefix`` is the legacy parent directory ('' if none).

        Raises:
            UnsafeEntryError: an entry kit refuses, naming the layer digest and the entry.
        """
        # The hot loop of indexing a layer of many small files: directories already met are
        # looked up by path, and the error message is only formatted for an error.
        parents: dict[str, Node] = {}
        for member in members:
            typeflag = member.typeflag
            is_dir = typeflag == DIRECTORY_TYPE
            if not (is_dir or typeflag in REGULAR_TYPES):
                kind = _TYPE_NAMES.get(typeflag, f"type {typeflag!r}")
                raise UnsafeEntryError(f"{_where(layer_digest, member)}: {kind} entries are not "
                                       "allowed in a ModelKit")
            path, problem = clean_entry_path(member.name)
            if problem is None and prefix:
                path, problem = clean_entry_path(posixpath.join(prefix, path))
            if problem is not None:
                raise UnsafeEntryError(f"{_where(layer_digest, member)}: {problem}")
            if is_dir:
                self.add_directory(path, member.mode, _where(layer_digest, member))
                continue
            if not path:
                raise UnsafeEntryError(f"{_where(layer_digest, member)}: a file entry names the "
                                       "kit root")
            parent_path, _, name = path.rpartition("/")
            parent = parents.get(parent_path)
            if parent is None:
                parent = parents[parent_path] = self._parent_of(path, _where(layer_digest, member))
            existing = parent.children.get(name)
            if existing is not None:
                what = "a directory" if existing.is_dir else "another file"
                raise FormatError(f"{_where(layer_digest, member)}: {path!r} conflicts with {what} "
                                  "at the same path (kit unpack refuses to overwrite)")
            parent.children[name] = Node(path, False, member.mode & 0o777, member.size,
                                         FileSource(layer_index, member.data_offset))

    def build(self) -> Tree:
        return Tree(self._root)


def _where(layer_digest: str, member: TarMember) -> str:
    return f"layer {layer_digest} entry {member.name!r}"


_SHELL_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "'": "\\'", "\\": "\\\\"}


def shell_quoted(path: str) -> str:
    """A tar name as ``kitfs ls`` prints it: as it is when it is printable UTF-8, else in
    bash's ``$'…'`` quoting (``\\n``, ``\\xff`` for a byte that is not UTF-8), so that every
    entry is one line and can be pasted into a shell as an argument of ``kitfs cat``."""
    if path.isprintable():  # lone surrogates (undecodable bytes) are not printable
        return path
    out = []
    for char in path:
        if char in _SHELL_ESCAPES:
            out.append(_SHELL_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        else:  # a control character, or a byte that was not UTF-8 (a surrogate escape)
            out.extend(f"\\x{byte:02x}" for byte in char.encode("utf-8", "surrogateescape"))
    return "$'" + "".join(out) + "'"
