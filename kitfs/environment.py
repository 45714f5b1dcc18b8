"""Everything kitfs takes from its process environment, read in this module only: the default
places of the cache, the runtime directory, the audit log and the registry credentials, and
what systemd and journald tell a daemon. Each function reads the environment when called
(nothing is remembered), computes a path and creates nothing.

- ``default_cache_dir``: ``$KITFS_CACHE_DIR``, else ``/var/cache/kitfs`` for root, else
  ``${XDG_CACHE_HOME:-~/.cache}/kitfs``;
- ``runtime_dir`` (status files, daemon logs, the default audit log of a user):
  ``$KITFS_RUNTIME_DIR``, else ``/run/kitfs`` for root, else ``$XDG_RUNTIME_DIR/kitfs``,
  else ``/tmp/kitfs-<uid>``;
- ``default_audit_log``: ``$KITFS_AUDIT_LOG``, else ``/var/log/kitfs/audit.jsonl`` for root,
  else ``RUNTIME_DIR/audit.jsonl``;
- ``credential_files``: ``$KITOPS_HOME/credentials.json``, else
  ``${XDG_DATA_HOME:-~/.local/share}/kitops/credentials.json``; then
  ``${DOCKER_CONFIG:-~/.docker}/config.json`` (``kitfs.remote.auth`` says how they are read);
- ``notify_socket``: systemd's ``$NOTIFY_SOCKET``; ``under_journald``: ``$JOURNAL_STREAM``.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT_AUDIT_LOG = Path("/var/log/kitfs/audit.jsonl")


def default_cache_dir() -> Path:
    """``$KITFS_CACHE_DIR``, else /var/cache/kitfs for root, else ``$XDG_CACHE_HOME/kitfs``."""
    if env := os.environ.get("KITFS_CACHE_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/kitfs")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kitfs"


def runtime_dir() -> Path:
    """Where the daemons' status files are (``kitfs.mount.status`` creates it, 0700)."""
    if env := os.environ.get("KITFS_RUNTIME_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/kitfs")
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "kitfs"
    return Path(f"/tmp/kitfs-{os.getuid()}")


def default_audit_log(runtime: Path) -> Path:
    """``$KITFS_AUDIT_LOG``, else ``/var/log/kitfs/audit.jsonl`` for root, else
    ``runtime/audit.jsonl``."""
    if env := os.environ.get("KITFS_AUDIT_LOG"):
        return Path(env)
    return ROOT_AUDIT_LOG if os.geteuid() == 0 else runtime / "audit.jsonl"


def credential_files() -> list[Path]:
    """The files registry credentials are read from, in order of precedence (existing or not)."""
    if kitops_home := os.environ.get("KITOPS_HOME"):
        kit = Path(kitops_home) / "credentials.json"
    else:
        data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        kit = Path(data_home) / "kitops" / "credentials.json"
    docker_dir = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    return [kit, Path(docker_dir) / "config.json"]


def notify_socket() -> str | None:
    """systemd's notification socket for this process (``sd_notify``), if it has one."""
    return os.environ.get("NOTIFY_SOCKET") or None


def under_journald() -> bool:
    """Whether stderr goes to journald (which stamps each line with the time and pid)."""
    return "JOURNAL_STREAM" in os.environ
