"""Open a ModelKit: resolve the reference, check manifest and config, map layers, build the tree.

``KitSession`` owns the per-process resources (chunk store, one ``RegistryClient`` per registry
host, the ``BlobReader``) and answers the library questions the CLI (and later the mount)
asks: what is in this kit (``open`` then ``tree``), and what are these bytes of this file
(``read_file``).

Resolution rules: a tag is resolved once to a manifest digest and everything after uses the
digest; a manifest fetched by digest, and every config, is checked against its digest before
use and then kept in the cache (a later open by digest makes no request). An image index is
resolved to one entry by labels (``select``). A ``model.path`` naming another ModelKit pulls
that kit's model and model-part layers into the tree (at most 10 levels, no cycles), as
``kit unpack`` does.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from kitfs.cache.index import load_members, store_members
from kitfs.cache.store import ChunkStore
from kitfs.core.reader import (
    DEFAULT_CHUNK_SIZE_BYTES,
    BlobReader,
    Content,
    VerifyMode,
    collapse_groups,
)
from kitfs.errors import FormatError, IntegrityError, KitfsError, NotFoundError
from kitfs.format.digest import Digest
from kitfs.format.layout import CREATED_ANNOTATION, LayoutPlan, Placement, plan_layout
from kitfs.format.mediatypes import Compression, Kind, Layout
from kitfs.format.oci import MAX_CONFIG_BYTES, Index, Manifest, parse_document
from kitfs.format.reference import Reference
from kitfs.format.tar import TarMember, TarScanner
from kitfs.format.tree import FileSource, Node, Tree, TreeBuilder
from kitfs.remote.registry import RegistryClient, RegistryConfig

log = logging.getLogger(__name__)

MAX_MODEL_REFERENCE_CHAIN = 10
# Index building reads headers in windows of this size; each window is a few cached chunks'
# worth of bytes, so a layer of many small files is read sequentially and a layer of a few
# big files costs one chunk per header.
INDEX_WINDOW_BYTES = 64 * 1024


@dataclass(frozen=True)
class LayerSource:
    """A placed layer and the content to read it from."""

    placement: Placement
    content: Content
    reference: Reference  # the kit this layer came from (a parent, for model references)


@dataclass
class ModelKit:
    reference: Reference  # pinned: digest set
    manifest: Manifest
    plan: LayoutPlan
    layers: list[LayerSource]
    created: str | None
    config_digest: Digest
    broken_layers: dict[str, KitfsError] = field(default_factory=dict)  # digest -> why
    _tree: Tree | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SessionOptions:
    cache_dir: Path
    cache_size_bytes: int | None = None
    verify: VerifyMode = VerifyMode.EVENTUAL
    plain_http: bool | None = None  # None: plain HTTP for loopback registries only
    ca_file: str | None = None
    timeout_s: float = 30.0
    chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES
    select: dict[str, str] = field(default_factory=dict)


class KitSession:
    def __init__(self, options: SessionOptions, store: ChunkStore, nursery: trio.Nursery):
        self.options = options
        self.store = store
        self.reader = BlobReader(store, nursery, options.verify, options.chunk_size_bytes)
        self._registries: dict[str, RegistryClient] = {}

    def registry(self, host: str, loopback: bool) -> RegistryClient:
        client = self._registries.get(host)
        if client is None:
            plain = self.options.plain_http if self.options.plain_http is not None else loopback
            config = RegistryConfig(plain_http=plain, ca_file=self.options.ca_file,
                                    timeout_s=self.options.timeout_s)
            client = self._registries[host] = RegistryClient(host, config)
        return client

    async def aclose(self) -> None:
        for client in self._registries.values():
            await client.__aexit__(None, None, None)
        self.store.close()

    # --- resolving --------------------------------------------------------------------------

    async def open(self, reference: Reference) -> ModelKit:
        """Resolve ``reference`` and prepare its layout (no layer data is fetched)."""
        return await self._open(reference, chain=[])

    async def _open(self, reference: Reference, chain: list[str]) -> ModelKit:
        client = self.registry(reference.registry, reference.is_loopback)
        manifest, digest = await self._resolve_manifest(client, reference)
        pinned = reference.pinned(digest)
        config = await self._document(client, reference.repository, manifest.config.digest,
                                      manifest.config.size, "config")
        plan = plan_layout(manifest, config)
        layers = [
            LayerSource(p, Content(client, reference.repository, p.descriptor.digest,
                                   p.descriptor.size, p.layer_type.compression, p.diff_id), pinned)
            for p in plan.placements
        ]
        if plan.parent_model_reference is not None:
            layers = await self._parent_layers(plan.parent_model_reference, pinned, chain) + layers
        return ModelKit(pinned, manifest, plan, layers,
                        manifest.annotations.get(CREATED_ANNOTATION), manifest.config.digest)

    async def _parent_layers(self, text: str, child: Reference, chain: list[str]) -> list[LayerSource]:
        chain = [*chain, str(child.digest)]
        if len(chain) > MAX_MODEL_REFERENCE_CHAIN:
            raise FormatError(f"model reference chain is longer than {MAX_MODEL_REFERENCE_CHAIN}")
        parent_ref = Reference.parse(text)
        parent = await self._open(parent_ref, chain)
        if str(parent.reference.digest) in chain:
            raise FormatError(f"model reference cycle through {parent.reference}")
        return [s for s in parent.layers
                if s.placement.layer_type.kind in (Kind.MODEL, Kind.MODELPART)]

    async def _resolve_manifest(self, client: RegistryClient, reference: Reference
                                ) -> tuple[Manifest, Digest]:
        ref_text = str(reference.digest) if reference.digest else reference.tag
        assert ref_text is not None
        data = self.store.get_document(ref_text) if reference.digest else None
        content_type = None
        if data is None:
            data, content_type = await client.get_manifest(reference.repository, ref_text)
        digest = reference.digest or Digest.of(data)
        if reference.digest:
            digest.check(data, f"manifest {reference}")
            self.store.put_document(str(digest), data)
        document = parse_document(data, content_type)
        if isinstance(document, Index):
            entry = document.select(self.options.select)
            log.info("index %s: selected %s", reference, entry.digest)
            return await self._resolve_manifest(client, reference.pinned(entry.digest))
        return document, digest

    async def _document(self, client: RegistryClient, repository: str, digest: Digest, size: int,
                        what: str) -> bytes:
        data = self.store.get_document(str(digest))
        if data is None:
            data = await client.get_blob(repository, digest, size, MAX_CONFIG_BYTES)
            digest.check(data, what)
            self.store.put_document(str(digest), data)
        return data

    # --- the tree ---------------------------------------------------------------------------

    async def tree(self, kit: ModelKit) -> Tree:
        """The merged tree; indexes every tar layer (from the cache when it can).

        A layer that is refused (unsafe entries, malformed tar, failed verification) is left
        out and recorded in ``kit.broken_layers``; the other layers are still shown. Registry
        failures are not absorbed: they raise.
        """
        if kit._tree is not None:
            return kit._tree
        builder = TreeBuilder(kit.plan.kitfile)
        for position, source in enumerate(kit.layers):
            placement = source.placement
            digest = str(placement.descriptor.digest)
            try:
                if placement.layer_type.layout is Layout.RAW:
                    size = await self._raw_size(source)
                    builder.add_file(placement.raw_path or "", placement.raw_mode, size,
                                     FileSource(position, 0), f"layer {digest}")
                else:
                    members = await self.layer_members(source)
                    builder.add_tar_members(members, position, placement.prefix, digest)
            except (FormatError, IntegrityError) as exc:
                log.debug("layer %s is not shown: %s", digest, exc)  # the caller reports it
                kit.broken_layers[digest] = exc
        kit._tree = builder.build()
        return kit._tree

    def lookup(self, kit: ModelKit, tree: Tree, path: str) -> Node:
        """The node at ``path``; when it is missing and a layer was refused, that refusal."""
        try:
            return tree.lookup(path)
        except NotFoundError:
            if kit.broken_layers:
                raise next(iter(kit.broken_layers.values())) from None
            raise

    async def _raw_size(self, source: LayerSource) -> int:
        if source.content.compression is Compression.NONE:
            return source.content.blob_size
        return await self.reader.size(source.content)

    async def layer_members(self, source: LayerSource) -> list[TarMember]:
        """A tar layer's members: from the cache index, or by reading its headers."""
        key = source.content.key
        members = load_members(self.store, key)
        if members is not None:
            return members
        size = await self.reader.size(source.content)
        scanner = TarScanner(size)
        members = []
        while (want := scanner.wants()) is not None:
            offset, length = want
            window = max(length, INDEX_WINDOW_BYTES)
            data = await self.reader.read(source.content, offset, min(window, size - offset))
            members.extend(scanner.feed(data))
        store_members(self.store, key, members)
        return members

    # --- reading ----------------------------------------------------------------------------

    async def read_file(self, kit: ModelKit, node: Node, offset: int, length: int) -> bytes:
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


@asynccontextmanager
async def open_session(options: SessionOptions) -> AsyncIterator[KitSession]:
    """A session with its own nursery (for decompression jobs); closed on exit."""
    store = ChunkStore(options.cache_dir, options.cache_size_bytes)
    with collapse_groups():
        async with trio.open_nursery() as nursery:
            session = KitSession(options, store, nursery)
            try:
                yield session
            finally:
                nursery.cancel_scope.cancel()
                await session.aclose()
