"""``kitfs pull``: the selected layers of a kit fetched whole into the cache, verified and
indexed, optionally pinned; a mount (or ``cat``) of it then needs no registry.

Nothing here fetches on its own: each layer is read from start to end through the session's
``BlobReader``, which fetches what the cache lacks with its sequential read-ahead (several
chunks in flight) and verifies the blob digest (and a compressed layer's diffId) as it goes;
``BlobReader.verify_now`` then makes sure the digest was checked, and a tar layer is indexed
from the cached bytes (so its entries are checked as a mount would check them). Layers are
pulled one after the other, in the kit's order; the first failure ends the pull with the
failed layer named.

Pins (``pin=True``): every key the layers' bytes live under (the blob digest; for a
compressed layer also its decompressed stream's key) is pinned for the reference *before*
anything is fetched, so eviction under the quota cannot drop an earlier layer while a later
one arrives. Pins the pull added are taken back if it fails, and if what they hold ends up
over the quota (refused, as the cache refuses a quota smaller than its pins).

Progress is reported to a ``PullProgress`` as bytes of layer blobs done (for a compressed
layer, the compressed bytes the registry sent so far; whole once it is done).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from kitfs.core.modelkit import KitSession, LayerSource, ModelKit
from kitfs.errors import KitfsError, UsageError
from kitfs.format.mediatypes import Compression, Layout

READ_BYTES = 4 * 1024 * 1024  # one chunk per read: the reader's read-ahead fetches ahead


@dataclass(frozen=True)
class PullLayer:
    """One layer to pull (layers sharing one content are pulled once)."""

    position: int  # in ``ModelKit.layers``
    source: LayerSource

    @property
    def digest(self) -> str:
        return str(self.source.placement.descriptor.digest)

    @property
    def size_bytes(self) -> int:
        return self.source.placement.descriptor.size

    @property
    def kind(self) -> str:
        return self.source.placement.layer_type.kind.value

    @property
    def path(self) -> str:
        return self.source.placement.claim or "."

    @property
    def keys(self) -> list[str]:
        """What the layer's bytes are kept under: its content key, and the blob digest too
        for a compressed layer (its gzip checkpoints)."""
        content = self.source.content
        return list(dict.fromkeys([content.key, str(content.blob_digest)]))

    def describe(self) -> str:
        return f"{self.digest} ({self.kind} {self.path})"


class PullProgress(Protocol):
    def started(self, kit: ModelKit, layers: list[PullLayer], total_bytes: int) -> None: ...

    def advanced(self, done_bytes: int) -> None: ...

    def layer_done(self, layer: PullLayer, done_layers: int, done_bytes: int) -> None: ...

    def stopped(self) -> None: ...


@dataclass(frozen=True)
class PullResult:
    kit: ModelKit
    layers: list[PullLayer]
    total_bytes: int  # of the layers' blobs
    fetched_bytes: int  # what the registry sent (blob bytes)
    seconds: float
    pinned: bool


def layers_to_pull(kit: ModelKit) -> list[PullLayer]:
    """The kit's layers, one per content (two layers of one digest are one pull)."""
    seen: set[str] = set()
    layers = []
    for position, source in enumerate(kit.layers):
        if source.content.key not in seen:
            seen.add(source.content.key)
            layers.append(PullLayer(position, source))
    return layers


async def pull(session: KitSession, kit: ModelKit, reference: str, progress: PullProgress, *,
               pin: bool = False) -> PullResult:
    """Fetch, verify and index every layer of ``kit`` (opened with its ``--filter``).

    ``reference`` is the reference as the user gave it (what a pin is recorded under).

    Raises:
        UsageError: ``pin`` and the pinned layers would not fit in the quota.
        KitfsError: the first layer that failed, as ``type(error)`` with the layer named.
    """
    layers = layers_to_pull(kit)
    total = sum(layer.size_bytes for layer in layers)
    fetched_before = session.registry_statistics().blob_bytes
    started = time.monotonic()
    added: list[str] = []
    if pin:
        _check_room(session, reference, layers)
        added = session.store.pins.add(reference, str(kit.reference.digest),
                                       [key for layer in layers for key in layer.keys])
    progress.started(kit, layers, total)
    done_bytes = 0
    try:
        for number, layer in enumerate(layers, start=1):
            try:
                await _pull_layer(session, kit, layer, done_bytes, progress)
            except KitfsError as exc:
                raise type(exc)(f"layer {layer.describe()} of {kit.reference}: {exc}") from exc
            done_bytes += layer.size_bytes
            progress.layer_done(layer, number, done_bytes)
        if pin:
            _check_pins_fit(session, reference)
    except BaseException:
        if added:
            session.store.pins.remove(reference, added)
        raise
    finally:
        progress.stopped()
    await session.settle()  # chunks and tar indexes kept in the cache before it returns
    return PullResult(kit, layers, total, session.registry_statistics().blob_bytes - fetched_before,
                      time.monotonic() - started, pin)


async def _pull_layer(session: KitSession, kit: ModelKit, layer: PullLayer, done_before: int,
                      progress: PullProgress) -> None:
    reader = session.reader
    content = layer.source.content
    offset = 0
    if content.compression is Compression.NONE:
        while offset < content.blob_size:
            data = await reader.read(content, offset, min(READ_BYTES, content.blob_size - offset))
            offset += len(data)
            progress.advanced(done_before + offset)
    else:  # the decompressed stream, read in order; progress in compressed bytes fetched
        fetched_at_start = session.registry_statistics().blob_bytes
        while data := await reader.read(content, offset, READ_BYTES):
            offset += len(data)
            fetched = session.registry_statistics().blob_bytes - fetched_at_start
            progress.advanced(done_before + min(fetched, layer.size_bytes))
    await reader.verify_now(content)
    if layer.source.placement.layer_type.layout is Layout.TAR:
        await session.index_layer(kit, layer.position)


def _check_room(session: KitSession, reference: str, layers: list[PullLayer]) -> None:
    """Refuse up front a pin that cannot fit: what other references pin, plus these layers
    (a compressed layer counted at its decompressed size when the cache knows it, else at
    its blob size: checked again once it is pulled)."""
    store = session.store
    quota = store.quota_bytes
    if quota is None:
        return
    pinned_elsewhere = store.pins.pinned_bytes(excluding_reference=reference)
    keys_elsewhere = {key for pin in store.pins.all() if pin.reference != reference
                      for key in pin.keys}
    needed = 0
    for layer in layers:
        content = layer.source.content
        if content.key in keys_elsewhere:
            continue  # counted in pinned_elsewhere
        state = store.blob_state(content.key)
        needed += state.size if state is not None and state.size >= 0 else layer.size_bytes
    if pinned_elsewhere + needed > quota:
        raise UsageError(
            f"pinning {reference} needs {needed} bytes, and {pinned_elsewhere} bytes are pinned "
            f"already: more than the cache's quota (--cache-size {quota} bytes); kitfs cache "
            "pins lists the pins, kitfs cache unpin REF releases one")


def _check_pins_fit(session: KitSession, reference: str) -> None:
    store = session.store
    quota = store.quota_bytes
    pinned = store.pins.pinned_bytes()
    if quota is not None and pinned > quota:
        raise UsageError(
            f"pinning {reference} would pin {pinned} bytes in all, more than the cache's quota "
            f"(--cache-size {quota} bytes); kitfs cache pins lists the pins, kitfs cache unpin "
            "REF releases one")
