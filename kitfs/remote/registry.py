"""The registry client: manifests by tag or digest, blob byte ranges, from a registry's hosts.

A registry is asked through its hosts (``kitfs.format.hosts``, from containerd's
``hosts.toml``): the mirrors in their order, then the server (the registry itself unless the
file names another). Each host is a ``HostClient`` (``kitfs.remote.host``: auth, redirects,
retries); the policy about which host to ask lives here:

- **Capabilities**: a tag is resolved only by hosts with ``pull`` and ``resolve``; manifests
  by digest, configs and blobs come from hosts with ``pull``. Whatever a mirror answers is
  checked by digest above this layer, so an untrusted mirror cannot change a byte.
- **Falling through, within one deadline**: an operation has ``timeout_s`` in all. A mirror
  with hosts after it gets an equal share of what is left (with one mirror, half) and no
  retries; when it fails, answers an error (404 included) or times out, the next host is
  asked with what is left, and the last host retries as a lone registry does until the
  deadline. A mirror that failed (not a 404) is left out for ``MIRROR_REST_S``, so a dead or
  stalled mirror costs one attempt, not one per read. The error of the last host is the
  answer, with what each mirror said.
- **Cold mirrors**: a pull-through cache that does not hold a blob yet (the distribution
  registry in proxy mode) answers a Range request with 200 and the whole blob, which it then
  fetches from upstream into its store. Reading that body up to the range costs the bytes
  before it: for a 4 KiB read near the end of a 64 MiB blob, 64 MiB. So when the bytes before
  the range are more than the range itself, the answer is dropped unread (its connection
  closed: the mirror goes on filling its store) and the range is asked of the next host;
  when they are not, they are read and dropped (at most twice the range crosses the wire).
  Either way that blob's ranges skip the mirror for ``COLD_MIRROR_FIRST_S`` (doubling on each
  cold answer, up to ``COLD_MIRROR_MAX_S``): the mirror is asked again once it may hold it.
  The last host (no other to ask) is read as before: its whole body, with one warning.
- **One range per request**, clamped to the blob size by the caller's arithmetic (distribution
  answers a range past the end with a 416 whose Content-Length is bogus, which poisons a
  keep-alive connection). A 206 must carry a Content-Range that matches what was asked; a 200
  is read as above; any other 2xx (a 203 from a transforming proxy) is refused.
- **A range that timed out**, when asked for again within ``RECENT_TIMEOUT_S``, is tried with
  a deadline of ``PROBE_TIMEOUT_S`` and, failing again, fails with the first error: the kernel
  asks again, page by page, right after a read fails, and readers that waited for the same
  chunk ask too; each would otherwise wait a whole ``timeout_s`` more. A registry that is
  back answers the short try.

``offline`` (``--offline``): nothing is ever sent; every operation fails at once with
``RemoteError``.

Errors leave as ``kitfs.errors`` types only (``NotFoundError``, ``AuthError``, ``RemoteError``,
``RemoteTimeoutError``; ``UsageError`` for CA files that cannot be loaded).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from kitfs.errors import (
    FormatError,
    KitfsError,
    NotFoundError,
    RemoteError,
    RemoteTimeoutError,
    copy_for_waiter,
)
from kitfs.format.digest import Digest
from kitfs.format.hosts import Capability, HostsConfig, upstream_only
from kitfs.format.mediatypes import MANIFEST_ACCEPT
from kitfs.format.oci import MAX_MANIFEST_BYTES
from kitfs.remote.auth import Credentials
from kitfs.remote.connection import Response
from kitfs.remote.host import (
    DEFAULT_TIMEOUT_S,
    HostClient,
    RegistryConfig,
    RegistryStatistics,
    check_blob_size,
)
from kitfs.remote.http import Into

__all__ = ["DEFAULT_TIMEOUT_S", "RegistryClient", "RegistryConfig", "RegistryStatistics"]

log = logging.getLogger(__name__)

RECENT_TIMEOUT_S = 5.0  # see the module docstring
PROBE_TIMEOUT_S = 1.0
MIRROR_REST_S = 10.0  # a mirror that failed is not asked again for this long
COLD_MIRROR_FIRST_S = 5.0  # a blob a mirror answered cold is not asked of it for this long,
COLD_MIRROR_MAX_S = 60.0  # doubling on each cold answer, up to this
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_T = TypeVar("_T")


class _ColdMirror(RemoteError):
    """A mirror answered a Range request with the whole blob: it does not hold it yet."""


class RegistryClient:
    """Talks to one registry through its hosts. Create with ``async with RegistryClient(...)``.

    ``hosts``: from its ``hosts.toml`` (default: the registry itself only). ``credentials``
    (tests): used for the registry itself instead of looking them up.
    """

    def __init__(self, registry: str, config: RegistryConfig,
                 credentials: Credentials | None = None, hosts: HostsConfig | None = None) -> None:
        self.registry = registry
        self.config = config
        self.stats = RegistryStatistics()
        self._hosts = [
            HostClient(registry, spec, config, self.stats,
                       credentials if (spec.host or registry) == registry else None)
            for spec in (hosts or upstream_only()).hosts
        ]
        self._resting: dict[str, float] = {}  # mirror name -> when it may be asked again
        self._cold: dict[tuple[str, str], tuple[float, float]] = {}  # (mirror, digest) -> (until, period)
        self._warned_full_body = False
        self._timed_out: dict[tuple[str, int, int], tuple[float, RemoteTimeoutError]] = {}

    @property
    def host_names(self) -> list[str]:
        """The hosts asked, in order (host[:port])."""
        return [host.name for host in self._hosts]

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for host in self._hosts:
            await host.aclose()

    # --- public operations ----------------------------------------------------------------

    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str | None]:
        """Fetch a manifest or index by tag or digest. Returns (bytes, Content-Type).

        Raises:
            NotFoundError: unknown repository, tag or digest.
        """
        by_digest = reference.startswith(("sha256:", "sha512:"))
        needed = Capability.PULL if by_digest else Capability.PULL | Capability.RESOLVE
        what = f"manifest {repository}:{reference}"

        async def ask(host: HostClient, timeout_s: float, last: bool) -> tuple[bytes, str | None]:
            response = await host.call(
                "GET", host.url(repository, "manifests", reference), repository,
                {"Accept": MANIFEST_ACCEPT}, what=what, max_body_bytes=MAX_MANIFEST_BYTES,
                timeout_s=timeout_s, retry=last)
            return response.body, response.header("content-type")

        return await self._ask(needed, what, ask, self.config.timeout_s)

    async def get_blob(self, repository: str, digest: Digest, size: int, max_bytes: int) -> bytes:
        """Fetch a small blob (a config) whole. Refuses blobs larger than ``max_bytes``."""
        if size > max_bytes:  # what the manifest says: refused before anything is fetched
            raise FormatError(f"blob {digest} is {size} bytes by its descriptor, more than the "
                              f"{max_bytes} allowed here")
        buffer = bytearray(size)
        await self.fetch_range(repository, digest, size, 0, memoryview(buffer))
        return bytes(buffer)

    async def fetch_range(
        self, repository: str, digest: Digest, blob_size: int, offset: int, into: Into
    ) -> None:
        """Read blob bytes ``[offset, offset+len(into))`` into ``into`` (one buffer, or several
        filled one after the other, each as long as it is).

        The range must lie inside the blob (callers clamp). An empty range sends nothing.
        """
        length = len(into) if isinstance(into, memoryview) else sum(len(view) for view in into)
        if length == 0:
            return
        if offset < 0 or offset + length > blob_size:
            raise ValueError(f"range {offset}+{length} outside blob of {blob_size} bytes")
        what = f"blob {digest} bytes {offset}-{offset + length - 1}"
        asked = (str(digest), offset, length)
        now = trio.current_time()
        self._timed_out = {k: v for k, v in self._timed_out.items()
                           if now - v[0] < RECENT_TIMEOUT_S}
        earlier = self._timed_out.get(asked)

        async def ask(host: HostClient, timeout_s: float, last: bool) -> str:
            response = await host.call(
                "GET", host.url(repository, "blobs", str(digest)), repository,
                {"Range": f"bytes={offset}-{offset + length - 1}"}, what=what, into=into,
                skip_on_200=offset, blob_size=blob_size, timeout_s=timeout_s, retry=last,
                max_skip_bytes=None if last else length)
            if response.status not in (200, 206):  # not a range, nor the blob as it is (203)
                raise RemoteError(f"{host.name}: blob {digest}: answered a Range request with "
                                  f"HTTP {response.status} {response.reason}, neither 206 nor 200")
            check_blob_size(host.name, response, blob_size, f"blob {digest}")
            if response.status == 206:
                _check_content_range(host.name, response, offset, length, digest)
            elif not last:
                self._mark_cold(host.name, str(digest))
                if response.body_length == 0:  # left unread: too much before the range
                    raise _ColdMirror(f"{host.name}: blob {digest}: answered a Range request "
                                      "with the whole blob (a mirror that does not hold it yet)")
            elif not self._warned_full_body:
                self._warned_full_body = True
                log.warning("registry %s ignored a Range request (answered %d); reading whole "
                            "bodies", host.name, response.status)
            return host.name

        self.stats.in_flight += 1
        try:
            host_name = await self._ask(
                Capability.PULL, what, ask,
                min(PROBE_TIMEOUT_S, self.config.timeout_s) if earlier else self.config.timeout_s,
                digest=str(digest))
        except RemoteTimeoutError as exc:
            if earlier is not None:
                raise copy_for_waiter(earlier[1]) from None
            self._timed_out[asked] = (trio.current_time(), exc)
            raise
        finally:
            self.stats.in_flight -= 1
        self._timed_out.pop(asked, None)  # answered: the next ask gets the whole timeout
        self.stats.blob_bytes += length
        by_host = self.stats.blob_bytes_by_host
        by_host[host_name] = by_host.get(host_name, 0) + length

    # --- which host to ask ------------------------------------------------------------------

    async def _ask(self, needed: Capability, what: str,
                   operation: Callable[[HostClient, float, bool], Awaitable[_T]],
                   timeout_s: float, digest: str | None = None) -> _T:
        """``operation(host, timeout_s, last)`` on each host that may do it, in order, until
        one succeeds, all within ``timeout_s`` (see the module docstring)."""
        if self.config.offline:
            raise RemoteError(f"{self.registry}: {what}: not asked for: --offline forbids "
                              "contacting the registry")
        hosts = [host for host in self._hosts if host.spec.can(needed)]
        if not hosts:
            raise NotFoundError(f"{self.registry}: {what}: no host in its hosts.toml may be "
                                f"asked for it (capabilities {needed.name})")
        deadline = trio.current_time() + timeout_s
        passed: list[str] = []  # what each mirror said, for the last host's error
        asked = False
        for position, host in enumerate(hosts):
            last = position == len(hosts) - 1
            now = trio.current_time()
            if not last:
                why = self._skip_reason(host.name, digest, now)
                if why:
                    passed.append(f"{host.name}: {why}")
                    continue
            left_s = deadline - now if asked else timeout_s  # (messages say "4 s", not "3.99")
            share_s = left_s / (1 if last else len(hosts) - position)
            if share_s <= 0:
                break
            asked = True
            try:
                return await operation(host, share_s, last)
            except KitfsError as exc:
                if last:
                    if passed:
                        raise _with_note(exc, "; ".join(passed)) from None
                    raise
                passed.append(str(exc))
                self._fell_through(host.name, exc)
        raise RemoteTimeoutError(f"{self.registry}: {what}: no answer within {timeout_s:g} s "
                                 f"({'; '.join(passed)})")

    def _skip_reason(self, name: str, digest: str | None, now: float) -> str | None:
        until = self._resting.get(name)
        if until is not None and now < until:
            return f"left out for {until - now:.0f} s more after it failed"
        cold = self._cold.get((name, digest)) if digest is not None else None
        if cold is not None and now < cold[0]:
            return "does not hold the blob yet"
        return None

    def _fell_through(self, name: str, error: KitfsError) -> None:
        self.stats.fallbacks += 1
        if isinstance(error, _ColdMirror | NotFoundError):  # the mirror works: no rest
            log.info("%s; asking the next host", error)
        else:
            self._resting[name] = trio.current_time() + MIRROR_REST_S
            log.warning("%s; asking the next host, and leaving %s out for %g s", error, name,
                        MIRROR_REST_S)

    def _mark_cold(self, name: str, digest: str) -> None:
        key = (name, digest)
        earlier = self._cold.get(key)
        period = COLD_MIRROR_FIRST_S if earlier is None else min(2 * earlier[1], COLD_MIRROR_MAX_S)
        self._cold[key] = (trio.current_time() + period, period)


def _with_note(error: KitfsError, note: str) -> KitfsError:
    """The same error (same class, same exit code and errno) with what the mirrors said."""
    twin = copy_for_waiter(error)
    assert isinstance(twin, KitfsError)
    twin.args = (f"{error} (mirrors before it: {note})",)
    return twin


def _check_content_range(
    host: str, response: Response, offset: int, length: int, digest: Digest
) -> None:
    header = response.header("content-range") or ""
    match = _CONTENT_RANGE_RE.match(header.strip())
    expected = (offset, offset + length - 1)
    if not match or (int(match[1]), int(match[2])) != expected:
        raise RemoteError(
            f"{host}: blob {digest}: asked for bytes {expected[0]}-{expected[1]}, got "
            f"Content-Range {header!r}"
        )
