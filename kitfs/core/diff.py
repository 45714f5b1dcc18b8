"""``kitfs diff A B``: the layers and files two kits differ by, without fetching what they share.

Layers: a layer of A and one of B are the same when they have the same digest and are placed
the same way (same path, same legacy prefix); those are shared, and nothing of them is read.
Of the others, a layer of A and one of B with the same kind at the same Kitfile path are one
layer *changed*; the rest are *removed* (only in A) or *added* (only in B).

Files: only the layers that are not shared are read (a tar layer's headers, as a listing
reads them; a raw layer's size is its descriptor's). A file in both is *changed* when its
size or mode differs; with ``content`` also when its bytes differ (both files are read and
hashed, unless they are uncompressed raw layers, whose digest is their content's). A file of
a shared layer is the same in both kits, so it is never read. The Kitfile is compared as
``kit unpack`` writes it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

from kitfs.core.modelkit import KitSession, LayerSource, ModelKit
from kitfs.format.mediatypes import Compression, Layout
from kitfs.format.tree import Node

READ_BYTES = 16 * 1024 * 1024  # hashing a file's content, a read at a time


@dataclass(frozen=True)
class LayerSide:
    digest: str
    size_bytes: int


@dataclass(frozen=True)
class LayerChange:
    change: str  # "added", "removed" or "changed"
    kind: str
    path: str  # where its files go ("." for the whole tree)
    a: LayerSide | None
    b: LayerSide | None


@dataclass(frozen=True)
class FileSide:
    size_bytes: int
    mode: int
    digest: str | None = None  # of the content, when it was hashed (or is the layer's)


@dataclass(frozen=True)
class FileChange:
    change: str  # "added", "removed" or "changed"
    path: str
    a: FileSide | None
    b: FileSide | None


@dataclass
class KitDiff:
    a: ModelKit
    b: ModelKit
    kitfile_changed: bool
    shared_layers: int
    layers: list[LayerChange] = field(default_factory=list)
    files: list[FileChange] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return not (self.kitfile_changed or self.layers or self.files)


def _identity(source: LayerSource) -> tuple[str, str, str | None, str]:
    p = source.placement
    return (str(p.descriptor.digest), p.prefix, p.raw_path, p.claim)


def _layer_side(source: LayerSource) -> LayerSide:
    return LayerSide(str(source.placement.descriptor.digest), source.placement.descriptor.size)


async def diff_kits(session: KitSession, a: ModelKit, b: ModelKit, *,
                    content: bool = False) -> KitDiff:
    """What changed from ``a`` to ``b``. Reads only the layers they do not share.

    Raises:
        KitfsError: a layer that is not shared could not be read (registry, refusal).
    """
    only_a = _unmatched(a.layers, b.layers)
    only_b = _unmatched(b.layers, a.layers)

    result = KitDiff(a, b, a.plan.kitfile != b.plan.kitfile, len(a.layers) - len(only_a))
    unpaired_b = list(only_b)
    for pa in only_a:
        source = a.layers[pa]
        kind = source.placement.layer_type.kind
        match = next((pb for pb in unpaired_b
                      if b.layers[pb].placement.layer_type.kind is kind
                      and b.layers[pb].placement.claim == source.placement.claim), None)
        path = source.placement.claim or "."
        if match is None:
            result.layers.append(LayerChange("removed", kind.value, path, _layer_side(source), None))
            continue
        unpaired_b.remove(match)
        result.layers.append(LayerChange("changed", kind.value, path, _layer_side(source),
                                         _layer_side(b.layers[match])))
    for pb in unpaired_b:
        source = b.layers[pb]
        result.layers.append(LayerChange("added", source.placement.layer_type.kind.value,
                                         source.placement.claim or ".", None, _layer_side(source)))

    files_a = await _files(session, a, only_a)
    files_b = await _files(session, b, only_b)
    for path in sorted(set(files_a) | set(files_b)):
        node_a, node_b = files_a.get(path), files_b.get(path)
        if node_b is None:
            assert node_a is not None
            result.files.append(FileChange("removed", path, _side(a, node_a), None))
        elif node_a is None:
            result.files.append(FileChange("added", path, None, _side(b, node_b)))
        else:
            change = await _compare(session, a, node_a, b, node_b, content)
            if change is not None:
                result.files.append(change)
    return result


async def _files(session: KitSession, kit: ModelKit, positions: list[int]) -> dict[str, Node]:
    """The files of these layers of ``kit``, by path."""
    files: dict[str, Node] = {}
    for position in positions:
        tree = await session.layer_tree(kit, position)
        files.update((node.path, node) for node in tree.walk() if not node.is_dir)
    return files


def _raw_digest(kit: ModelKit, node: Node) -> str | None:
    """The content digest of a file that is an uncompressed raw layer (its layer digest)."""
    assert node.source is not None
    placement = kit.layers[node.source.layer_index].placement
    if (placement.layer_type.layout is Layout.RAW
            and placement.layer_type.compression is Compression.NONE):
        return str(placement.descriptor.digest)
    return None


def _side(kit: ModelKit, node: Node, digest: str | None = None) -> FileSide:
    return FileSide(node.size, node.mode, digest or _raw_digest(kit, node))


async def _compare(session: KitSession, a: ModelKit, node_a: Node, b: ModelKit, node_b: Node,
                   content: bool) -> FileChange | None:
    side_a, side_b = _side(a, node_a), _side(b, node_b)
    if (side_a.size_bytes, side_a.mode) != (side_b.size_bytes, side_b.mode):
        return FileChange("changed", node_a.path, side_a, side_b)
    if side_a.digest is not None and side_b.digest is not None:  # both known without a read
        return (FileChange("changed", node_a.path, side_a, side_b)
                if side_a.digest != side_b.digest else None)
    if not content:
        return None
    side_a = _side(a, node_a, side_a.digest or await _content_digest(session, a, node_a))
    side_b = _side(b, node_b, side_b.digest or await _content_digest(session, b, node_b))
    return FileChange("changed", node_a.path, side_a, side_b) if side_a.digest != side_b.digest \
        else None


async def _content_digest(session: KitSession, kit: ModelKit, node: Node) -> str:
    hasher = hashlib.sha256()
    offset = 0
    while offset < node.size:
        data = await session.read_file(kit, node, offset, READ_BYTES)
        hasher.update(data)
        offset += len(data)
    return f"sha256:{hasher.hexdigest()}"


def _unmatched(layers: list[LayerSource], others: list[LayerSource]) -> list[int]:
    """Positions of ``layers`` with no layer of the same identity left in ``others`` (each
    layer of ``others`` matches one at most)."""
    left = Counter(_identity(s) for s in others)
    unmatched = []
    for position, source in enumerate(layers):
        identity = _identity(source)
        if left[identity] > 0:
            left[identity] -= 1
        else:
            unmatched.append(position)
    return unmatched
