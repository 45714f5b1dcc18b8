"""The merged directory tree of a ModelKit: Kitfile at the root plus every layer's files.

``TreeBuilder`` takes the entries of each layer (already parsed tar members, or a raw layer's one
file) and merges them as ``kit unpack`` would lay them out on disk: directories repeated across
layers merge, missing parents are synthesised (0755), a file provided twice or a file where a
directory stands is a conflict (kit fails there without ``--overwrite``). Links, devices and
FIFOs are refused, as kit refuses them. Modes keep permission bits only (setuid, setgid and
sticky are stripped); write bits are kept here and dropped by the read-only mount.

Pure: no I/O.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from kitfs.errors import FormatError, NotFoundError, UnsafeEntryError
from kitfs.format.layout import check_entry_path
from kitfs.format.tar import TarMember

DEFAULT_DIR_MODE = 0o755
KITFILE_NAME = "Kitfile"

_TYPE_NAMES = {
    b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device",
    b"6": "FIFO", b"S": "sparse file", b"V": "volume header", b"M": "multi-volume member",
}


@dataclass(frozen=True, slots=True)
class FileSource:
    """Where a file's bytes are: ``size`` bytes at ``offset`` of layer ``layer_index``'s content.

    ``layer_index`` is -1 for the Kitfile, whose bytes are ``inline``.
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

    def lookup(self, path: str) -> Node:
        """The node at ``path`` ('' or '/' is the root). Raises NotFoundError."""
        node = self.root
        for part in (p for p in path.strip("/").split("/") if p):
            child = node.children.get(part) if node.is_dir else None
            if child is None:
                raise NotFoundError(f"no such file or directory in the kit: {path!r}")
            node = child
        return node

    def walk(self) -> Iterator[Node]:
        """Every node, parents before children, names in sorted order."""
        return self.walk_from(self.root)

    @staticmethod
    def walk_from(top: Node) -> Iterator[Node]:
        """``top`` and everything under it, parents before children, names sorted."""
        stack = [top]
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
        for member in members:
            where = f"layer {layer_digest} entry {member.name!r}"
            if not (member.is_file or member.is_dir):
                kind = _TYPE_NAMES.get(member.typeflag, f"type {member.typeflag!r}")
                raise UnsafeEntryError(f"{where}: {kind} entries are not allowed in a ModelKit")
            relative = check_entry_path(member.name, where)
            path = check_entry_path(posixpath.join(prefix, relative), where) if prefix else relative
            if member.is_dir:
                self.add_directory(path, member.mode, where)
            else:
                self.add_file(path, member.mode, member.size,
                              FileSource(layer_index, member.data_offset), where)

    def build(self) -> Tree:
        return Tree(self._root)
