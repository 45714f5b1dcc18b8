"""containerd's registry host configuration (``hosts.toml``): the hosts to ask for a registry.

What this module owns, as containerd's docs/hosts.md and its ``remotes/docker/config`` code
define it (containerd 1.5 to 2.x); pure, bytes in and values out:

- **Which directory** configures a registry (``host_directories``): for ``host:port``, first
  ``host_port_``, then ``host:port``; then ``_default``, for every registry.
- **The hosts, in order** (``parse_hosts_toml``): every ``[host."URL"]`` table in the order of
  the file, then the ``server`` (the top-level keys are the server's), or, without ``server``,
  the registry itself (``HostSpec.host`` None: the caller picks its scheme).
- **URLs**: a host without a scheme is ``https://``; the API root is the URL's path (cleaned)
  with ``/v2`` appended unless it already ends with ``/v2`` or ``override_path = true`` (then
  the path is used as it is: non-compliant registries without ``/v2``).
- **capabilities**: ``pull``, ``resolve``, ``push`` (any case); all three when the key is
  absent. Resolving a tag needs ``pull`` and ``resolve``; fetching by digest needs ``pull``.
- **ca**: a path or a list of paths, relative to the directory of ``hosts.toml``;
  **skip_verify**: a boolean; **header**: a table of strings or lists of strings (a list is
  one header with the values joined by ``, ``, as HTTP folds repeated headers).
- Keys containerd knows that kitfs does not use (``client``, ``dial_timeout``, ``proxy``) are
  checked for their type and listed in ``HostsConfig.unused``; keys containerd ignores are
  listed there too. A wrong type or an unknown capability is a ``UsageError`` naming the file
  and the key (containerd logs such a file as undecodable and ignores it; kitfs says so and
  stops, so that a typo does not silently bypass a mirror).
"""

from __future__ import annotations

import enum
import posixpath
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from kitfs.errors import UsageError

DEFAULT_NAMESPACE = "_default"
_KNOWN_UNUSED = ("client", "dial_timeout", "proxy")
_HOST_KEYS = {"capabilities", "ca", "skip_verify", "header", "override_path", *_KNOWN_UNUSED}


class Capability(enum.Flag):
    """What a host may be asked: resolve a tag (trusted), pull by digest, push."""

    PULL = enum.auto()
    RESOLVE = enum.auto()
    PUSH = enum.auto()


ALL_CAPABILITIES = Capability.PULL | Capability.RESOLVE | Capability.PUSH


@dataclass(frozen=True)
class HostSpec:
    """One host to ask, as ``hosts.toml`` configures it.

    ``host`` is ``name[:port]``, or None for the registry named in the reference (no
    ``server`` in the file, or no file); ``scheme`` is then None too. ``path`` is the API root
    (``/v2``, ``/mirror/v2``, or with ``override_path`` what the URL says, possibly "").
    """

    host: str | None
    scheme: str | None
    path: str = "/v2"
    capabilities: Capability = ALL_CAPABILITIES
    ca_files: tuple[str, ...] = ()
    skip_verify: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    is_server: bool = False  # the last one: the server (or the registry itself)

    def can(self, needed: Capability) -> bool:
        return needed in self.capabilities

    @property
    def url(self) -> str:
        """``scheme://host/path`` for messages (the registry itself: its host only)."""
        if self.host is None:
            return "(the registry itself)"
        return f"{self.scheme}://{self.host}{self.path}"


@dataclass(frozen=True)
class HostsConfig:
    """The hosts of one registry, in the order they are tried; the server (or the registry
    itself) last. ``unused``: keys kitfs read past (``host."URL".client``, …)."""

    hosts: tuple[HostSpec, ...]
    unused: tuple[str, ...] = field(default=())


def upstream_only() -> HostsConfig:
    """What a registry without a ``hosts.toml`` gets: the registry itself, for everything."""
    return HostsConfig((HostSpec(None, None, is_server=True),))


def host_directories(registry: str) -> list[str]:
    """The directory names under the hosts directory that may configure ``registry``, in the
    order containerd looks (the first that exists is used)."""
    names = []
    colon = registry.rfind(":")
    if colon > 0 and not registry.endswith("]"):  # host:port (not a bare [v6] address)
        names.append(f"{registry[:colon]}_{registry[colon + 1:]}_")
    names.append(registry)
    names.append(DEFAULT_NAMESPACE)
    return names


def parse_hosts_toml(data: bytes, base_dir: str, source: str) -> HostsConfig:
    """Parse a ``hosts.toml``. ``base_dir`` is its directory (relative ``ca`` paths are joined
    to it); ``source`` names the file in messages.

    Raises:
        UsageError: not TOML, a value of the wrong type, an unknown capability or a URL
            that is not one.
    """
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{source}: not a valid TOML file: {exc}") from None
    unused: list[str] = []
    hosts_table = document.get("host", {})
    if not isinstance(hosts_table, dict):
        raise UsageError(f"{source}: 'host' must be a table of [host.\"URL\"] tables")
    hosts = []
    for url, table in hosts_table.items():
        if not isinstance(table, dict):
            raise UsageError(f"{source}: host.{_quoted(url)} must be a table")
        what = f"host.{_quoted(url)}"
        unused += [f"{what}.{key}" for key in table if key not in _HOST_KEYS]
        hosts.append(_host(url, table, base_dir, source, what, unused))
    server = document.get("server")
    if server is not None and not isinstance(server, str):
        raise UsageError(f"{source}: 'server' must be a string (a URL)")
    unused += [key for key in document if key not in (_HOST_KEYS | {"server", "host"})]
    hosts.append(_host(server or "", document, base_dir, source, "server", unused,
                       is_server=True))
    return HostsConfig(tuple(hosts), tuple(unused))


def _host(url: str, table: Mapping[str, Any], base_dir: str, source: str, what: str,
          unused: list[str], *, is_server: bool = False) -> HostSpec:
    override_path = _bool(table, "override_path", source, what)
    skip_verify = _bool(table, "skip_verify", source, what)
    capabilities = _capabilities(table.get("capabilities"), source, what)
    ca_files = tuple(posixpath.join(base_dir, path) if not posixpath.isabs(path) else path
                     for path in _strings(table.get("ca"), source, f"{what}.ca"))
    headers = _headers(table.get("header"), source, what)
    for key in _KNOWN_UNUSED:
        if key in table:
            _check_unused(key, table[key], source, what)
            unused.append(f"{what}.{key}" if what != "server" else key)
    if not url:  # no server: the registry itself, whose scheme the caller decides
        return HostSpec(None, None, "" if override_path else "/v2", capabilities, ca_files,
                        skip_verify, headers, is_server)
    if "://" not in url:
        url = "https://" + url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (a port that is not a number raises here)
    except ValueError as exc:
        raise UsageError(f"{source}: {what}: {url!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"{source}: {what}: {url!r} is not an http:// or https:// URL")
    path = parts.path
    if path:
        path = posixpath.normpath(path)
        if path == "/":
            path = ""
        if not path.endswith("/v2") and not override_path:
            path += "/v2"
    elif not override_path:
        path = "/v2"
    return HostSpec(parts.netloc, parts.scheme, path, capabilities, ca_files, skip_verify,
                    headers, is_server)


def _bool(table: Mapping[str, Any], key: str, source: str, what: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise UsageError(f"{source}: {_key(what, key)} must be true or false, not {value!r}")
    return value


def _capabilities(value: Any, source: str, what: str) -> Capability:
    if value is None:
        return ALL_CAPABILITIES
    names = _strings(value, source, _key(what, "capabilities"), single=False)
    if not names:  # containerd: an empty list means "not set", so all of them
        return ALL_CAPABILITIES
    found = Capability(0)
    for name in names:
        try:
            found |= Capability[name.upper()]
        except KeyError:
            raise UsageError(f"{source}: {_key(what, 'capabilities')}: unknown capability "
                             f"{name!r} (pull, resolve, push)") from None
    return found


def _strings(value: Any, source: str, what: str, *, single: bool = True) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) and single:
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    kind = "a string or a list of strings" if single else "a list of strings"
    raise UsageError(f"{source}: {what.removeprefix('server.')} must be {kind}, not {value!r}")


def _headers(value: Any, source: str, what: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise UsageError(f"{source}: {_key(what, 'header')} must be a table")
    headers = []
    for name, item in value.items():
        if not name or any(c in name for c in " \t\r\n:"):
            raise UsageError(f"{source}: {_key(what, 'header')}: {name!r} is not a header name")
        values = _strings(item, source, f"{_key(what, 'header')}.{name}")
        if any("\r" in v or "\n" in v for v in values):
            raise UsageError(f"{source}: {_key(what, 'header')}.{name}: a value holds a line break")
        headers.append((name, ", ".join(values)))
    return tuple(headers)


def _check_unused(key: str, value: Any, source: str, what: str) -> None:
    """The keys kitfs does not use still have containerd's types (so the file is valid)."""
    if key == "client":
        if isinstance(value, str) or (isinstance(value, list) and all(
                isinstance(item, str) or (isinstance(item, list) and len(item) == 2 and all(
                    isinstance(part, str) for part in item)) for item in value)):
            return
        raise UsageError(f"{source}: {_key(what, 'client')} must be a path, a list of paths or "
                         "a list of [cert, key] pairs")
    if not isinstance(value, str):
        raise UsageError(f"{source}: {_key(what, key)} must be a string, not {value!r}")


def _key(what: str, key: str) -> str:
    return key if what == "server" else f"{what}.{key}"


def _quoted(url: str) -> str:
    return '"' + url.replace('"', '\\"') + '"'
