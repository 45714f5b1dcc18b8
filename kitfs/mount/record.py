"""The status record a mount daemon publishes about itself, typed: what ``kitfs.mount.daemon``
writes every second (``RUNTIME_DIR/<pid>.json``, ``kitfs.mount.status``) and what ``kitfs
status``, ``kitfs metrics`` (``kitfs.mount.metrics``), ``kitfs umount`` and the audit log's
layer lines read back.

The JSON form (``to_json``) is what ``kitfs status --json`` prints: field names are the
dataclasses' own. ``MountStatus.from_json`` reads it back and raises ``ValueError`` for a
record it cannot read (a file of another kitfs version, say), which readers skip.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BlobStatus:
    """One layer of the mount: its digest, where it is placed, its verification state in
    words (``kitfs.core.modelkit.verification_label``: ``not fetched``, ``unverified``,
    ``verified``, ``FAILED``)."""

    digest: str
    path: str
    state: str


@dataclass(frozen=True)
class ReadSeconds:
    """The histogram of FUSE read durations: ``counts`` has one more entry than ``bounds``
    (the last: above every bound)."""

    bounds: list[float]
    counts: list[int]
    sum: float


@dataclass(frozen=True)
class MountFigures:
    """The figures ``kitfs metrics`` exposes for one mount (``kitfs.mount.metrics``)."""

    fetched_bytes_by_host: dict[str, int]
    registry_requests: int
    registry_retries: int
    registry_fallbacks: int
    fetches_in_flight: int
    served_bytes: int
    requests_by_outcome: dict[str, int]
    read_seconds: ReadSeconds
    cache_hits: int
    cache_misses: int
    verification_failures: int
    cache_quota_bytes: int | None
    cache_evicted_files: int
    cache_evicted_bytes: int


@dataclass(frozen=True)
class MountStatus:
    """What one mount daemon reports about itself."""

    pid: int
    reference: str  # as mounted (a tag stays a tag; ``digest`` is what it was pinned to)
    digest: str
    mountpoint: str
    cache_dir: str
    verify: str  # the --verify mode
    started: float  # when the mount was made (seconds since the epoch)
    bytes_fetched: int
    registry_requests: int
    bytes_served: int
    reads: int
    errors: int
    requests: int  # FUSE requests answered (every operation)
    # chunk accesses (of uncompressed layers) answered from the cache; None before any
    cache_hit_ratio: float | None
    blobs: list[BlobStatus]
    metrics: MountFigures

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: Any) -> MountStatus:
        """A record as ``to_json`` wrote it.

        Raises:
            ValueError: not such a record (fields missing, unknown or of the wrong kind).
        """
        try:
            fields = dict(record)
            figures = dict(fields["metrics"])
            figures["read_seconds"] = ReadSeconds(**figures["read_seconds"])
            fields["metrics"] = MountFigures(**figures)
            fields["blobs"] = [BlobStatus(**blob) for blob in fields["blobs"]]
            status = cls(**fields)
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"not a kitfs mount status record: {exc}") from None
        if not isinstance(status.pid, int) or not isinstance(status.mountpoint, str):
            raise ValueError("not a kitfs mount status record: no pid or mountpoint")
        return status


@dataclass(frozen=True)
class MountEntry:
    """A kitfs mount of the mount table, with its daemon's record when this user can read it
    (``None``: another user's daemon, or one with another runtime directory)."""

    mountpoint: str
    reference: str  # the mount's source in the mount table
    status: MountStatus | None

    def to_json(self) -> dict[str, Any]:
        """``kitfs status --json``'s entry: the daemon's record, else what the table says."""
        if self.status is not None:
            return self.status.to_json()
        return {"reference": self.reference, "mountpoint": self.mountpoint, "pid": None}
