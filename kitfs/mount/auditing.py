"""What a mount daemon tells the audit log (``kitfs.audit``): its mount, the verification
outcome of each layer, each verification failure it answered, its unmount; and the one call
other commands make (``record_event``: ``cache clear``, pulls and pins).

The mount's line is written before the mount is reported ready, and a log that cannot be
written then fails the mount (a mount the audit log does not know of never serves). Later
lines that cannot be written are logged as warnings: a running mount is not taken down.
Layer outcomes come from the blob states of the status record (``verified``, ``FAILED``), so
an outcome reached by another process sharing the cache is recorded too.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kitfs import audit
from kitfs.audit import AuditLog
from kitfs.environment import default_audit_log, runtime_dir
from kitfs.errors import UsageError
from kitfs.mount.record import BlobStatus
from kitfs.mount.status import make_runtime_dir

if TYPE_CHECKING:
    from kitfs.core.modelkit import KitSession, ModelKit
    from kitfs.mount.daemon import MountOptions

log = logging.getLogger(__name__)

_OUTCOMES = {"verified": "verified", "FAILED": "failed"}


def audit_log_path(given: Path | None) -> Path:
    """``--audit-log`` when given, else the default (``kitfs.environment.default_audit_log``);
    absolute. A default in the runtime directory (a user's) makes that directory, 0700."""
    if given is not None:
        return given.absolute()
    path = default_audit_log(runtime_dir())
    if path.parent == runtime_dir():
        make_runtime_dir()
    return path.absolute()


def record_event(given: Path | None, event: str, **fields: Any) -> None:
    """Append ``event`` to the audit log (``given``: the command's ``--audit-log``). A log that
    cannot be written is a warning: what the command did is done. For the commands that
    change what a node holds (``cache clear``, ``pull``, ``pin``, ``unpin``), e.g.::

        record_event(args.audit_log, audit.PULL, reference=str(ref), digest=str(digest),
                     layers=[...], pinned=args.pin)
    """
    path = audit_log_path(given)
    try:
        AuditLog(path).record(event, **fields)
    except OSError as exc:
        log.warning("could not write the audit log %s: %s", path, exc.strerror or exc)


def mount_options(options: MountOptions) -> dict[str, Any]:
    """A mount's options as its audit line shows them (nothing secret is among them)."""
    session, registry = options.session, options.session.registry
    return {
        "verify": session.verify.value, "uid": options.uid, "gid": options.gid,
        "allow_other": options.allow_other, "cache_dir": str(session.cache_dir),
        "cache_size_bytes": session.cache_size_bytes, "timeout_s": registry.timeout_s,
        "plain_http": registry.plain_http, "ca_file": registry.ca_file,
        "hosts_dir": str(registry.hosts_dir), "select": session.select,
    }


class MountAudit:
    """The audit events of one mount; ``path`` None: no audit log (library use)."""

    def __init__(self, path: Path | None, options: MountOptions) -> None:
        self._log = AuditLog(path) if path is not None else None
        self._options = options
        self._mountpoint = str(options.mountpoint.absolute())
        self._digest = ""
        self._announced: dict[str, str] = {}  # layer digest -> outcome recorded

    def mounted(self, kit: ModelKit, session: KitSession, blobs: list[BlobStatus]) -> None:
        """The mount's line. Raises UsageError when the log cannot be written."""
        if self._log is None:
            return
        self._digest = str(kit.reference.digest)
        client = session.registry(kit.reference.registry, kit.reference.is_loopback)
        try:
            self._log.record(audit.MOUNT, reference=self._options.reference, digest=self._digest,
                             mountpoint=self._mountpoint, options=mount_options(self._options),
                             registry_hosts=client.host_names,
                             layers=[dataclasses.asdict(b) for b in blobs])
        except OSError as exc:
            raise UsageError(f"cannot write the audit log {self._log.path}: "
                             f"{exc.strerror or exc}") from None
        self._announced = {b.digest: _OUTCOMES[b.state] for b in blobs if b.state in _OUTCOMES}

    def layers(self, blobs: list[BlobStatus]) -> None:
        """A line for each layer whose outcome the cache now records, once."""
        for blob in blobs:
            outcome = _OUTCOMES.get(blob.state)
            if outcome is None or self._announced.get(blob.digest) == outcome:
                continue
            self._announced[blob.digest] = outcome
            self._write(audit.LAYER_VERIFICATION, digest=self._digest, mountpoint=self._mountpoint,
                        layer=blob.digest, path=blob.path, outcome=outcome)

    def failure(self, layer: str, message: str) -> None:
        self._write(audit.VERIFICATION_FAILURE, digest=self._digest, mountpoint=self._mountpoint,
                    layer=layer, error=message)

    def unmounted(self, bytes_fetched: int, bytes_served: int) -> None:
        if self._digest:  # only a mount that was recorded
            self._write(audit.UNMOUNT, reference=self._options.reference, digest=self._digest,
                        mountpoint=self._mountpoint, bytes_fetched=bytes_fetched,
                        bytes_served=bytes_served)

    def failed(self, exit_code: int, message: str) -> None:
        self._write(audit.MOUNT_FAILED, reference=self._options.reference,
                    mountpoint=self._mountpoint, error=message, exit_code=exit_code)

    def _write(self, event: str, **fields: Any) -> None:
        if self._log is None:
            return
        try:
            self._log.record(event, **fields)
        except OSError as exc:
            log.warning("could not write the audit log %s: %s", self._log.path,
                        exc.strerror or exc)
