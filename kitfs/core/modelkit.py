"""Open a ModelKit: resolve the reference, check manifest and config, map layers, build the tree.

``KitSession`` owns the per-process resources (chunk store, one ``RegistryClient`` per registry
host, the ``BlobReader``) and answers the library questions the CLI (and later the mount)
asks: what is in this kit (``open`` then ``tree``), and what are these bytes of this file
(``read_file``).

Resolution rules: a tag is resolved once to a manifest digest and everything after uses the
digest (manifests and configs: ``kitfs.core.resolve``, which also says what a tag resolves to
when the registry cannot be reached). An image index is resolved to one entry by labels
(``select``). A ``model.path`` naming another ModelKit pulls that kit's model and model-part
layers into the tree (at most 10 levels, no cycles), as ``kit unpack`` does. ``open`` takes
a ``Selection`` (``--filter``): only the layers it selects are in the kit, the Kitfile only
when it asks for it.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import trio

from kitfs.cache.store import ChunkStore
from kitfs.core.indexing import LayerIndexer
from kitfs.core.reader import (
    DEFAULT_CHUNK_SIZE_BYTES,
    BlobReader,
    Content,
    VerifyMode,
    collapse_groups,
)
from kitfs.core.resolve import ManifestResolver
from kitfs.core.verify import VerifyState
from kitfs.errors import (
    FormatError,
    IntegrityError,
    KitfsError,
    NotFoundError,
    UsageError,
    copy_for_waiter,
)
from kitfs.format.digest import Digest
from kitfs.format.filter import Selection
from kitfs.format.layout import CREATED_ANNOTATION, LayoutPlan, Placement, plan_layout
from kitfs.format.mediatypes import Compression, Kind, Layout
from kitfs.format.oci import Manifest
from kitfs.format.reference import Reference
from kitfs.format.tar import TarMember
from kitfs.format.tree import FileSource, Node, Tree, TreeBuilder
from kitfs.remote.hostsdir import load_hosts
from kitfs.remote.registry import RegistryClient, RegistryConfig, RegistryStatistics

log = logging.getLogger(__name__)

MAX_MODEL_REFERENCE_CHAIN = 10
EVERYTHING = Selection()  # no --filter: the whole kit, Kitfile included
# On close, how long a session waits for chunks already served to be hashed and stored.
SETTLE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class LayerSource:
    """A placed layer and the content to read it from."""

    placement: Placement
    content: Content
    reference: Reference  # the kit this layer came from (a parent, for model references)


@dataclass
class _Flight:
    """One indexing of one layer in progress; its waiters share its outcome."""

    done: trio.Event = field(default_factory=trio.Event)
    error: KitfsError | None = None


@dataclass
class _IndexState:
    done: bool = False
    refusal: KitfsError | None = None  # the layer is hostile or malformed: final
    flight: _Flight | None = None


@dataclass
class ModelKit:
    """An opened kit: pinned reference, checked manifest and config, placed layers, and the
    tree as far as it has been indexed (see ``KitSession.lookup``)."""

    reference: Reference  # pinned: digest set
    manifest: Manifest
    plan: LayoutPlan
    layers: list[LayerSource]
    created: str | None
    config_digest: Digest
    tree: Tree
    index_states: list[_IndexState]
    # Positions of the layers not indexed yet (refused ones stay: their error is the answer).
    unindexed: set[int] = field(default_factory=set)
    # Layer positions by claim, and by the parent directory of their claim: a lookup or a
    # listing finds the layers it may need by path, not by scanning 10,000 claims each time.
    _by_claim: dict[str, list[int]] = field(default_factory=dict)
    _by_parent: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for position, source in enumerate(self.layers):
            claim = source.placement.claim
            self._by_claim.setdefault(claim, []).append(position)
            if claim:
                self._by_parent.setdefault(posixpath.dirname(claim), []).append(position)

    def unindexed_layers_for(self, directory: str, child: str | None = None) -> list[int]:
        """The unindexed layers whose files may be in ``directory``: those claiming it or a
        directory above it; for a lookup also those claiming ``child``, for a listing (no
        child) those claiming any entry of it."""
        found = [p for path in _self_and_ancestors(directory) for p in self._by_claim.get(path, ())]
        if child is not None:
            found += self._by_claim.get(child, [])
        else:
            found += self._by_parent.get(directory, [])
        return sorted({p for p in found if p in self.unindexed})

    @property
    def refused_layers(self) -> dict[str, KitfsError]:
        """Digest → why, for the layers found hostile or malformed so far."""
        return {str(source.placement.descriptor.digest): state.refusal
                for source, state in zip(self.layers, self.index_states, strict=True)
                if state.refusal is not None}


DEFAULT_VERIFY = VerifyMode.EVENTUAL  # --verify's default (README "Verification")


@dataclass(frozen=True)
class SessionOptions:
    """A session's options: the cache, verification, the image-index labels, and how
    registries are reached (``RegistryConfig``). Defaults are the command line's."""

    cache_dir: Path
    cache_size_bytes: int | None = None
    verify: VerifyMode = DEFAULT_VERIFY
    chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES
    select: dict[str, str] = field(default_factory=dict)
    registry: RegistryConfig = field(default_factory=RegistryConfig)


class KitSession:
    def __init__(self, options: SessionOptions, store: ChunkStore, nursery: trio.Nursery):
        self.options = options
        self.store = store
        self.reader = BlobReader(store, nursery, options.verify, options.chunk_size_bytes)
        self._resolver = ManifestResolver(store, options.select)
        self._registries: dict[str, RegistryClient] = {}
        self._nursery = nursery
        self._indexer = LayerIndexer(store, self.reader, nursery, options.chunk_size_bytes)

    def registry(self, host: str, loopback: bool) -> RegistryClient:
        client = self._registries.get(host)
        if client is None:
            # Loopback registries speak plain HTTP unless a CA file says they have TLS.
            config = self.options.registry
            client = self._registries[host] = RegistryClient(
                host, replace(config, plain_http=config.plain_for(loopback)),
                hosts=load_hosts(config.hosts_dir, host))
        return client

    def registry_statistics(self) -> RegistryStatistics:
        """Requests and blob bytes fetched so far, summed over every registry."""
        total = RegistryStatistics()
        for client in self._registries.values():
            total.add(client.stats)
        return total

    async def aclose(self) -> None:
        for client in self._registries.values():
            await client.__aexit__(None, None, None)
        self.store.close()

    # --- resolving --------------------------------------------------------------------------

    async def open(self, reference: Reference, selection: Selection = EVERYTHING) -> ModelKit:
        """Resolve ``reference`` and prepare its layout (no layer data is fetched). Only the
        layers ``selection`` (``--filter``) selects are in the kit, and the Kitfile only when
        it asks for it."""
        return await self._open(reference, [], selection)

    async def _open(self, reference: Reference, chain: list[Reference],
                    selection: Selection) -> ModelKit:
        """Open one kit; ``chain`` holds the kits (pinned) whose ``model.path`` led here."""
        client = self.registry(reference.registry, reference.is_loopback)
        manifest, digest = await self._resolver.manifest(client, reference)
        pinned = reference.pinned(digest)
        seen = [kit.digest for kit in chain]
        if digest in seen:  # checked before its config is fetched or its model.path followed
            cycle = [*chain[seen.index(digest):], pinned]
            raise FormatError("model reference cycle: " + " -> ".join(map(str, cycle)))
        config = await self._resolver.document(client, reference.repository,
                                               manifest.config.digest, manifest.config.size,
                                               "config")
        plan = plan_layout(manifest, config)
        layers = [
            LayerSource(p, Content(client, reference.repository, p.descriptor.digest,
                                   p.descriptor.size, p.layer_type.compression, p.diff_id), pinned)
            for p in plan.placements if selection.selects(p.entry)
        ]
        parent_selection = selection.for_parent()
        if plan.parent_model_reference is not None and parent_selection is not None:
            layers = await self._parent_layers(plan.parent_model_reference, pinned, chain,
                                               parent_selection) + layers
        builder = TreeBuilder(plan.kitfile if selection.wants_kitfile else None)
        states = [_IndexState() for _ in layers]
        for source, state in zip(layers, states, strict=True):
            where = f"layer {source.placement.descriptor.digest}"
            try:
                builder.add_parents(source.placement.claim, where)
            except FormatError as exc:  # its path runs through a file: refuse that layer only
                state.refusal = exc
        return ModelKit(pinned, manifest, plan, layers,
                        manifest.annotations.get(CREATED_ANNOTATION), manifest.config.digest,
                        builder.build(), states, set(range(len(layers))))

    async def _parent_layers(self, text: str, child: Reference, chain: list[Reference],
                             selection: Selection) -> list[LayerSource]:
        chain = [*chain, child]
        if len(chain) > MAX_MODEL_REFERENCE_CHAIN:
            raise FormatError(f"model reference chain is longer than {MAX_MODEL_REFERENCE_CHAIN}")
        try:
            parent_ref = Reference.parse(text)
        except UsageError as exc:  # a property of the kit, not of the command line
            raise FormatError(f"{child}: Kitfile model.path: {exc}") from None
        parent = await self._open(parent_ref, chain, selection)
        return [s for s in parent.layers
                if s.placement.layer_type.kind in (Kind.MODEL, Kind.MODELPART)]

    # --- the tree, indexed lazily -----------------------------------------------------------
    #
    # At open the tree holds the Kitfile and the directories above each layer's claim (the path
    # its Kitfile entry names). A layer is indexed (its tar headers read, or from the cache) the
    # first time something is looked up or listed where its files may be: in a directory at or
    # under its claim, or the claim's own name in its parent. ``lookup`` and ``listdir`` are the
    # only ways in, so a caller can never see a directory before the layers that fill it.

    async def lookup(self, kit: ModelKit, directory: Node, name: str) -> Node:
        """The child ``name`` of ``directory``, indexing the layers that may hold it.

        Raises:
            NotFoundError: no such entry, and no layer that could hold it failed.
            KitfsError: the error of a layer that could hold it and could not be indexed.
        """
        child_path = posixpath.join(directory.path, name)
        failures = await self._ensure_indexed(kit, kit.unindexed_layers_for(directory.path,
                                                                             child_path))
        node = directory.children.get(name) if directory.is_dir else None
        if node is not None:
            return node
        if failures:
            raise failures[0]
        raise NotFoundError(f"no such file or directory in the kit: {child_path!r}")

    async def listdir(self, kit: ModelKit, directory: Node) -> list[Node]:
        """The children of ``directory``, sorted by name, indexing the layers that fill it.

        A refused layer (hostile or malformed) is left out: the rest is listed. A layer that
        could not be read for now (registry down) fails the listing rather than shortening it.
        """
        failures = await self._ensure_indexed(kit, kit.unindexed_layers_for(directory.path))
        transient = [f for f in failures if not _is_refusal(f)]
        if transient:
            raise transient[0]
        return [directory.children[name] for name in sorted(directory.children)]

    async def resolve(self, kit: ModelKit, path: str) -> Node:
        """The node at ``path`` ("" or "/" is the root), looked up one component at a time."""
        node = kit.tree.root
        for part in (p for p in path.strip("/").split("/") if p):
            if not node.is_dir:
                raise NotFoundError(f"{node.path!r} is a file, not a directory: {path!r}")
            node = await self.lookup(kit, node, part)
        return node

    async def walk(self, kit: ModelKit, top: Node) -> AsyncIterator[Node]:
        """``top`` and everything under it, parents first, names sorted (indexes as it goes)."""
        stack = [top]
        while stack:
            node = stack.pop()
            yield node
            if node.is_dir:
                stack.extend(reversed(await self.listdir(kit, node)))

    async def index_layer(self, kit: ModelKit, position: int) -> None:
        """Index layer ``position`` of ``kit`` into its tree now (``kitfs pull``).

        Raises:
            KitfsError: why it could not be indexed (a refusal is final, as for a lookup).
        """
        await self._index_layer(kit, position)

    async def layer_tree(self, kit: ModelKit, position: int) -> Tree:
        """The files of layer ``position`` of ``kit`` alone (``kitfs diff``); their sources
        point into ``kit``, so ``read_file`` reads them."""
        return await self._layer_tree(kit.layers[position], position)

    async def _ensure_indexed(self, kit: ModelKit, positions: list[int]) -> list[KitfsError]:
        """Index these layers (concurrently, once each); the errors of those that failed."""
        failures: list[KitfsError] = []

        async def one(position: int) -> None:
            try:
                await self._index_layer(kit, position)
            except KitfsError as exc:
                failures.append(exc)

        pending = [p for p in positions if not kit.index_states[p].done]
        if len(pending) == 1:
            await one(pending[0])
        elif pending:
            async with trio.open_nursery() as nursery:
                for position in pending:
                    nursery.start_soon(one, position)
        return failures

    async def _index_layer(self, kit: ModelKit, position: int) -> None:
        """Merge one layer's entries into the tree, once; a refusal sticks, an outage does not."""
        state = kit.index_states[position]
        while not state.done:
            if state.refusal is not None:
                raise copy_for_waiter(state.refusal)
            if state.flight is not None:
                flight = state.flight
                await flight.done.wait()
                if flight.error is not None:
                    raise copy_for_waiter(flight.error)
                continue
            flight = state.flight = _Flight()
            source = kit.layers[position]
            where = f"layer {source.placement.descriptor.digest}"
            try:
                kit.tree.merge(await self._layer_tree(source, position), where)
                state.done = True
                kit.unindexed.discard(position)
            except KitfsError as exc:
                flight.error = exc
                if _is_refusal(exc):
                    state.refusal = exc
                    log.warning("%s is refused, its files are not shown: %s", where, exc)
                raise
            finally:
                state.flight = None
                flight.done.set()

    async def _layer_tree(self, source: LayerSource, position: int) -> Tree:
        placement = source.placement
        digest = str(placement.descriptor.digest)
        builder = TreeBuilder(None)
        if placement.layer_type.layout is Layout.RAW:
            size = await self._raw_size(source)
            builder.add_file(placement.raw_path or "", placement.raw_mode, size,
                             FileSource(position, 0), f"layer {digest}")
        else:
            # the layer's own tree is built as its headers are parsed, while the next chunks
            # arrive; nothing of it is seen before the whole layer is (merge, by the caller)
            def add(members: list[TarMember]) -> None:
                builder.add_tar_members(members, position, placement.prefix, digest)

            await self.layer_members(source, add)
        return builder.build()

    async def _raw_size(self, source: LayerSource) -> int:
        if source.content.compression is Compression.NONE:
            return source.content.blob_size
        return await self.reader.size(source.content)

    async def layer_members(self, source: LayerSource,
                            add: Callable[[list[TarMember]], None]) -> None:
        """Hand a tar layer's members to ``add`` (``kitfs.core.indexing``)."""
        await self._indexer.members(source.content, add)

    async def settle(self) -> None:
        """Wait until the layer indexes and the chunks fetched so far are kept in the cache."""
        await self._indexer.settle()
        await self.reader.settle()

    # --- reading ----------------------------------------------------------------------------

    async def read_file(self, kit: ModelKit, node: Node, offset: int, length: int) -> bytes | memoryview:
        """Bytes ``[offset, offset+length)`` of a file of the kit (short at end of file)."""
        if node.is_dir or node.source is None:
            raise IsADirectoryError(node.path)
        if offset >= node.size or length <= 0:
            return b""
        length = min(length, node.size - offset)
        source = node.source
        if source.layer_index < 0:
            return source.inline[offset : offset + length]
        layer = kit.layers[source.layer_index]
        start = source.offset + offset
        data = await self.reader.read(
            layer.content, start, length, file_start=source.offset,
            file_end=source.offset + node.size,
        )
        if len(data) != length:
            raise IntegrityError(
                f"layer {layer.placement.descriptor.digest}: file {node.path!r} is shorter than "
                "its tar header says"
            )
        return data


def verification_label(state: VerifyState | None) -> str:
    """A blob's verification state in words, as the Python API shows it (``kitfs inspect``
    and ``kitfs status`` use the same words)."""
    if state is None:
        return "not fetched"
    return {VerifyState.NOT_YET: "unverified", VerifyState.VERIFIED: "verified",
            VerifyState.FAILED: "FAILED"}[state]


def _self_and_ancestors(path: str) -> list[str]:
    """``a/b`` → ``["", "a", "a/b"]``: the claims at or above ``path``."""
    parts = path.split("/") if path else []
    return ["/".join(parts[:i]) for i in range(len(parts) + 1)]


def _is_refusal(error: KitfsError) -> bool:
    """A layer error that will not go away by asking again (the bytes themselves are bad)."""
    return isinstance(error, FormatError | IntegrityError)


@asynccontextmanager
async def open_session(options: SessionOptions) -> AsyncIterator[KitSession]:
    """A session with its own nursery (for decompression jobs); closed on exit.

    The nursery's tasks are cancelled on exit, and the session (its cache, its connections)
    is closed only once they are all done: a decompression job runs partly in worker threads,
    which finish what they are doing before they see the cancellation, and may still record
    chunks meanwhile."""
    store = ChunkStore(options.cache_dir, options.cache_size_bytes)
    session: KitSession | None = None
    try:
        with collapse_groups():
            async with trio.open_nursery() as nursery:
                session = KitSession(options, store, nursery)
                try:
                    yield session
                finally:
                    # indexes and chunks already served are still being stored: keep them
                    with trio.move_on_after(SETTLE_TIMEOUT_S, shield=True):
                        await session.settle()
                    nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if session is not None:
                await session.aclose()
            else:
                store.close()
