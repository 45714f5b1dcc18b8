"""Manifests and configs: a reference resolved to a checked manifest, and a config fetched
and checked, through the cache.

A manifest fetched by digest, and every config, is checked against its digest before use and
kept in the cache (a later open by digest makes no request). A manifest fetched by tag is kept
too (by the digest of its bytes), and the tag's digest with it: when the registry cannot be
reached (``RemoteError``: down, failing, timing out, or ``--offline``), a tag resolves to the
digest it last resolved to, with one warning; a registry that answers (tag not found,
credentials refused) is believed. An image index is resolved to one entry by labels
(``select``).
"""

from __future__ import annotations

import logging
import time

from kitfs.cache.store import ChunkStore
from kitfs.errors import AuthError, NotFoundError, RemoteError, UsageError
from kitfs.format.digest import Digest
from kitfs.format.oci import MAX_CONFIG_BYTES, Index, Manifest, parse_document
from kitfs.format.reference import Reference
from kitfs.remote.registry import RegistryClient

log = logging.getLogger("kitfs.core.modelkit")  # its log lines, as before the split


class ManifestResolver:
    """Resolves references and fetches configs for one ``KitSession``."""

    def __init__(self, store: ChunkStore, select: dict[str, str]) -> None:
        self.store = store
        self._select = select

    async def manifest(self, client: RegistryClient, reference: Reference,
                       via_index: bool = False) -> tuple[Manifest, Digest]:
        """The manifest ``reference`` names (an index resolved to one entry by ``select``),
        and its digest, checked.

        Raises:
            UsageError: ``select`` given for a single manifest.
            KitfsError: as the registry client raises, or a malformed document.
        """
        ref_text = str(reference.digest) if reference.digest else reference.tag
        assert ref_text is not None
        data = self.store.get_document(ref_text) if reference.digest else None
        content_type = None
        if data is None and reference.digest is None:
            data, content_type = await self._manifest_by_tag(client, reference)
        elif data is None:
            data, content_type = await client.get_manifest(reference.repository, ref_text)
        digest = reference.digest or Digest.of(data)
        if reference.digest:
            digest.check(data, f"manifest {reference}")
            self.store.put_document(str(digest), data)
        document = parse_document(data, content_type)
        if isinstance(document, Index):
            entry = document.select(self._select)
            log.info("index %s: selected %s", reference, entry.digest)
            return await self.manifest(client, reference.pinned(entry.digest), via_index=True)
        if self._select and not via_index:
            raise UsageError(f"--select applies to an image index; {reference} is a single manifest")
        return document, digest

    async def _manifest_by_tag(self, client: RegistryClient,
                               reference: Reference) -> tuple[bytes, str | None]:
        """The manifest (or index) a tag names: from the registry, which is then remembered
        (the document by its digest, the tag's digest); when the registry cannot be reached
        (or ``--offline``), the document the tag last resolved to, with one warning."""
        name = f"{reference.registry}/{reference.repository}:{reference.tag}"
        try:
            data, content_type = await client.get_manifest(reference.repository,
                                                           reference.tag or "")
        except (AuthError, NotFoundError):
            raise  # the registry answered: the tag is not there, or not for us
        except RemoteError as exc:
            last = self.store.last_resolved(name)
            kept = self.store.get_document(last[0]) if last is not None else None
            if last is None or kept is None:
                raise
            when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(last[1]))
            log.warning("%s: the registry could not be asked (%s); using %s, the digest this "
                        "tag last resolved to (at %s)", name, exc, last[0], when)
            return kept, None
        digest = str(Digest.of(data))
        self.store.put_document(digest, data)
        self.store.remember_tag(name, digest)
        return data, content_type

    async def document(self, client: RegistryClient, repository: str, digest: Digest, size: int,
                       what: str) -> bytes:
        """A config (a small blob): from the cache, or fetched, checked and kept."""
        data = self.store.get_document(str(digest))
        if data is None:
            data = await client.get_blob(repository, digest, size, MAX_CONFIG_BYTES)
            digest.check(data, what)
            self.store.put_document(str(digest), data)
        return data
