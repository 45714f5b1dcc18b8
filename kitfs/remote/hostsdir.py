"""Finding a registry's host configuration in a hosts directory, as containerd does.

The hosts directory is ``--hosts-dir`` (default ``/etc/containerd/certs.d``, containerd's
usual ``config_path``). For a registry, the first of ``host_port_``, ``host:port`` and
``_default`` that exists under it configures it (``kitfs.format.hosts.host_directories``):

- with a ``hosts.toml``, that file (``kitfs.format.hosts.parse_hosts_toml``);
- without one, Docker's certificate layout: every ``*.crt`` in the directory is a CA for the
  registry itself (client certificates, ``*.cert``/``*.key``, are not supported: a warning
  says they are left out);
- no directory at all: the registry itself, as without mirrors.

The files are read when a registry is first needed (a mount reads them once, when it starts).
Keys kitfs does not use are named in one warning per file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kitfs.errors import UsageError
from kitfs.format.hosts import (
    HostsConfig,
    HostSpec,
    host_directories,
    parse_hosts_toml,
    upstream_only,
)

log = logging.getLogger(__name__)

DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")
MAX_HOSTS_TOML_BYTES = 1024 * 1024


def load_hosts(hosts_dir: Path, registry: str) -> HostsConfig:
    """The hosts to ask for ``registry``, from ``hosts_dir``.

    Raises:
        UsageError: an unreadable or invalid ``hosts.toml`` (named, with the reason).
    """
    for name in host_directories(registry):
        directory = hosts_dir / name
        if not directory.is_dir():
            continue
        path = directory / "hosts.toml"
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_HOSTS_TOML_BYTES + 1)
        except FileNotFoundError:
            return _docker_certificates(directory)
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        if len(data) > MAX_HOSTS_TOML_BYTES:
            raise UsageError(f"{path}: larger than {MAX_HOSTS_TOML_BYTES} bytes")
        config = parse_hosts_toml(data, str(directory), str(path))
        if config.unused:
            log.warning("%s: kitfs does not use %s", path, ", ".join(config.unused))
        log.debug("%s: hosts for %s: %s", path, registry,
                  ", ".join(spec.url for spec in config.hosts))
        return config
    return upstream_only()


def _docker_certificates(directory: Path) -> HostsConfig:
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise UsageError(f"cannot list {directory}: {exc.strerror}") from None
    cas = tuple(str(directory / name) for name in names if name.endswith(".crt"))
    clients = [name for name in names if name.endswith((".cert", ".key"))]
    if clients:
        log.warning("%s: client certificates are not supported; left out: %s", directory,
                    ", ".join(clients))
    return HostsConfig((HostSpec(None, None, ca_files=cas, is_server=True),))
