"""The audit log: who mounted, pulled, pinned or cleared what, and what verified; one JSON line
per event.

Where: ``--audit-log FILE``, else ``$KITFS_AUDIT_LOG``, else ``/var/log/kitfs/audit.jsonl``
for root, else ``RUNTIME_DIR/audit.jsonl`` (``kitfs.environment``). The directory is created 0750,
the file 0640. kitfs never rotates, truncates or rewrites it: logrotate's ``copytruncate`` or
a move both work, since each event opens the file anew.

How: each event is one ``write`` of one whole line to the file opened with ``O_APPEND``, then
``fsync``; Linux appends each such write whole, so lines of processes writing at once never
mix (``tests/test_audit.py`` holds several processes to it).

Every line has ``time`` (UTC, ISO 8601), ``event``, ``uid``, ``pid`` and ``host`` (the node's
name), then the event's own fields. The events and their fields:

- ``mount``: ``reference``, ``digest`` (the manifest digest the mount is pinned to),
  ``mountpoint``, ``options`` (verify mode, owner, allow_other, cache directory and size,
  timeout, hosts directory, ...), ``registry_hosts`` (the mirrors and registry asked, in order),
  ``layers`` (digest, path and verification state of each);
- ``mount_failed``: ``reference``, ``mountpoint``, ``error``, ``exit_code``;
- ``unmount``: ``reference``, ``digest``, ``mountpoint``, ``bytes_fetched``, ``bytes_served``;
- ``layer_verification``: ``digest``, ``mountpoint``, ``layer``, ``path``, ``outcome``
  (``verified`` or ``failed``), once per layer and mount when the cache records the outcome;
- ``verification_failure``: ``digest``, ``mountpoint``, ``layer``, ``error``: each failure a
  mount answered (a layer's digest, a piece's identity), once;
- ``pull``, ``pin``, ``unpin``: ``reference``, ``digest``, ``layers``, and what the command
  adds (``AuditLog.record`` takes any JSON fields);
- ``cache_clear``: ``cache_dir``.

No credentials, ever: nothing here sees them, and ``record`` refuses field names that would
hold one (``password``, ``token``, ``authorization``, ``headers``, ...).
"""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MOUNT = "mount"
MOUNT_FAILED = "mount_failed"
UNMOUNT = "unmount"
LAYER_VERIFICATION = "layer_verification"
VERIFICATION_FAILURE = "verification_failure"
PULL = "pull"
PIN = "pin"
UNPIN = "unpin"
CACHE_CLEAR = "cache_clear"

_FORBIDDEN_FIELDS = {"password", "passwd", "secret", "token", "authorization", "auth",
                     "credentials", "headers", "header", "identitytoken", "registrytoken"}


class AuditLog:
    """Appends events to one audit log file. Cheap to make: nothing is opened until ``record``.

    Usage (a command reporting what it did)::

        AuditLog(path).record(audit.PULL, reference=str(ref), digest=str(digest),
                              layers=[...], pinned=True)
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event; returns the line's fields as written.

        Raises:
            OSError: the log cannot be written (the caller says so; see the daemon and cli).
            ValueError: a field name that would hold a credential, or a value JSON cannot hold.
        """
        refused = {name for name in fields if name.lower() in _FORBIDDEN_FIELDS}
        if refused:
            raise ValueError(f"audit events never carry {', '.join(sorted(refused))}")
        line = {"time": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                "event": event, "uid": os.getuid(), "pid": os.getpid(),
                "host": socket.gethostname(), **fields}
        data = (json.dumps(line, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
                + "\n").encode("utf-8", "surrogateescape")
        self._append(data)
        return line

    def _append(self, data: bytes) -> None:
        created = not self.path.exists()
        if created and not os.path.lexists(self.path.parent):
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            written = os.write(fd, data)
            if written != len(data):  # a full disk; what made it in is not a whole line
                raise OSError(f"only {written} of {len(data)} bytes of the line were written")
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # the new file's name is durable too
            directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
