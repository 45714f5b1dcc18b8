"""The registry client: manifests by tag or digest, blob byte ranges, auth, retries, timeouts.

All the policy about talking to a registry lives here:

- **One range per request**, clamped to the blob size by the caller's arithmetic (distribution
  answers a range past the end with a 416 whose Content-Length is bogus, which poisons a
  keep-alive connection). A 206 must carry a Content-Range that matches what was asked; a 200
  (a registry or proxy that ignores Range) is read correctly by dropping the bytes before the
  range, and logged once.
- **Retries** on connection failures, timeouts, 429 (honouring Retry-After) and 5xx, with
  exponential backoff, all inside one deadline of ``timeout_s`` per operation, so a dead
  registry gives a clear ``RemoteError`` in bounded time.
- **Auth**: anonymous first; on 401 the ``WWW-Authenticate`` challenge is answered (Basic, or a
  Bearer token fetched from the realm with the credentials if any); a 401 with a token in hand
  (expired) fetches a new one once.
- **Redirects** (to blob storage) are followed with the Range header kept; credentials are not
  sent to another host.

Errors leave as ``kitfs.errors`` types only (``NotFoundError``, ``AuthError``, ``RemoteError``,
``RemoteTimeoutError``).
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from dataclasses import dataclass
from urllib.parse import urlencode, urljoin, urlsplit

import trio

from kitfs.errors import AuthError, NotFoundError, RemoteError, RemoteTimeoutError
from kitfs.format.digest import Digest
from kitfs.format.mediatypes import MANIFEST_ACCEPT
from kitfs.format.oci import MAX_MANIFEST_BYTES
from kitfs.remote.auth import Credentials, find_credentials, parse_challenge
from kitfs.remote.http import HttpClient, Response, TransportError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
# Backoff between retries: 50 ms doubling to 2 s. Short first steps because a loopback
# registry restarts in well under a second; capped so that retries keep probing.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
MAX_REDIRECTS = 5
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_USER_AGENT = "kitfs/0.1"


@dataclass(frozen=True)
class RegistryConfig:
    plain_http: bool = False
    ca_file: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_connections: int = 8


@dataclass
class RegistryStatistics:
    requests: int = 0
    retries: int = 0
    blob_bytes: int = 0


class RegistryClient:
    """Talks to one registry host. Create with ``async with RegistryClient(...)``."""

    def __init__(self, registry: str, config: RegistryConfig,
                 credentials: Credentials | None = None) -> None:
        self.registry = registry
        self.config = config
        self._base = f"{'http' if config.plain_http else 'https'}://{registry}"
        context = ssl.create_default_context(cafile=config.ca_file)
        # A single receive may wait this long; the whole operation is bounded by timeout_s.
        self._http = HttpClient(context, io_timeout_s=min(config.timeout_s, 10.0),
                                max_connections=config.max_connections)
        self._credentials = credentials if credentials is not None else find_credentials(registry)
        self._tokens: dict[str, str] = {}  # scope -> bearer token
        self._challenges: dict[str, str] = {}  # scope -> "basic" or "bearer" once known
        self._warned_full_body = False
        self.stats = RegistryStatistics()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    # --- public operations ----------------------------------------------------------------

    async def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str | None]:
        """Fetch a manifest or index by tag or digest. Returns (bytes, Content-Type).

        Raises:
            NotFoundError: unknown repository, tag or digest.
        """
        url = f"{self._base}/v2/{repository}/manifests/{reference}"
        response = await self._call(
            "GET", url, repository, {"Accept": MANIFEST_ACCEPT},
            what=f"manifest {repository}:{reference}", max_body_bytes=MAX_MANIFEST_BYTES,
        )
        return response.body, response.header("content-type")

    async def get_blob(self, repository: str, digest: Digest, size: int, max_bytes: int) -> bytes:
        """Fetch a small blob (a config) whole. Refuses blobs larger than ``max_bytes``."""
        if size > max_bytes:
            raise RemoteError(f"blob {digest} is {size} bytes, more than {max_bytes} allowed here")
        buffer = bytearray(size)
        await self.fetch_range(repository, digest, size, 0, memoryview(buffer))
        return bytes(buffer)

    async def fetch_range(
        self, repository: str, digest: Digest, blob_size: int, offset: int, into: memoryview
    ) -> None:
        """Read blob bytes ``[offset, offset+len(into))`` into ``into``.

        The range must lie inside the blob (callers clamp). An empty range sends nothing.
        """
        length = len(into)
        if length == 0:
            return
        if offset < 0 or offset + length > blob_size:
            raise ValueError(f"range {offset}+{length} outside blob of {blob_size} bytes")
        url = f"{self._base}/v2/{repository}/blobs/{digest}"
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        response = await self._call(
            "GET", url, repository, headers, what=f"blob {digest} bytes {offset}-{offset + length - 1}",
            into=into, skip_on_200=offset,
        )
        if response.status == 206:
            _check_content_range(response, offset, length, blob_size, digest)
        elif not self._warned_full_body:
            self._warned_full_body = True
            log.warning("registry %s ignored a Range request (answered %d); reading whole bodies",
                        self.registry, response.status)
        self.stats.blob_bytes += length

    # --- the one request loop: auth, redirects, retries, deadline -------------------------

    async def _call(
        self,
        method: str,
        url: str,
        repository: str,
        headers: dict[str, str],
        *,
        what: str,
        into: memoryview | None = None,
        skip_on_200: int = 0,
        max_body_bytes: int = 1 << 20,
    ) -> Response:
        scope = f"repository:{repository}:pull"
        deadline = trio.current_time() + self.config.timeout_s
        backoff_s = BACKOFF_FIRST_S
        auth_attempts = 0
        last_problem = "no attempt made"
        try:
            with trio.fail_at(deadline):
                while True:
                    try:
                        response = await self._follow(
                            method, url, self._headers(headers, scope), into, skip_on_200,
                            max_body_bytes,
                        )
                    except TransportError as exc:
                        last_problem = str(exc)
                    else:
                        status = response.status
                        if 200 <= status < 300:
                            return response
                        if status == 401 and auth_attempts < 2:
                            auth_attempts += 1
                            await self._authenticate(response, scope, what)
                            continue
                        if status in (401, 403):
                            raise AuthError(
                                f"{self.registry}: access to {what} denied ({status}); "
                                "check credentials (kit login / docker login)"
                            )
                        if status == 404:
                            raise NotFoundError(f"{self.registry}: {what} not found")
                        if status != 429 and status < 500:
                            raise RemoteError(
                                f"{self.registry}: {what}: unexpected HTTP {status} "
                                f"{response.reason}"
                            )
                        last_problem = f"HTTP {status} {response.reason}"
                        if (retry_after := _retry_after_s(response)) is not None:
                            backoff_s = max(backoff_s, retry_after)
                    self.stats.retries += 1
                    log.debug("retrying %s in %.2fs: %s", what, backoff_s, last_problem)
                    await trio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
        except trio.TooSlowError:
            raise RemoteTimeoutError(
                f"{self.registry}: {what}: no answer within {self.config.timeout_s:g} s "
                f"(last problem: {last_problem})"
            ) from None

    async def _follow(
        self, method: str, url: str, headers: dict[str, str], into: memoryview | None,
        skip_on_200: int, max_body_bytes: int,
    ) -> Response:
        origin_host = urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            self.stats.requests += 1
            response = await self._http.request(
                method, url, headers, into=into, skip_on_200=skip_on_200,
                max_body_bytes=max_body_bytes,
            )
            if response.status not in (301, 302, 303, 307, 308):
                return response
            location = response.header("location")
            if not location:
                return response
            url = urljoin(url, location)
            if urlsplit(url).netloc != origin_host:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        raise RemoteError(f"{self.registry}: more than {MAX_REDIRECTS} redirects")

    def _headers(self, extra: dict[str, str], scope: str) -> dict[str, str]:
        headers = {"User-Agent": _USER_AGENT, **extra}
        if scope in self._tokens:
            headers["Authorization"] = f"Bearer {self._tokens[scope]}"
        elif self._challenges.get(scope) == "basic" and self._credentials:
            headers["Authorization"] = self._credentials.basic_header()
        return headers

    async def _authenticate(self, response: Response, scope: str, what: str) -> None:
        header = response.header("www-authenticate")
        if not header:
            raise AuthError(f"{self.registry}: {what}: 401 without a WWW-Authenticate challenge")
        challenge = parse_challenge(header)
        if challenge.scheme == "basic":
            if self._credentials is None or self._challenges.get(scope) == "basic":
                raise AuthError(f"{self.registry}: {what} needs credentials (kit login / docker login)")
            self._challenges[scope] = "basic"
            return
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            raise AuthError(f"{self.registry}: unsupported auth challenge {challenge.scheme!r}")
        self._tokens.pop(scope, None)  # an expired token: fetch a new one
        params = {"scope": challenge.params.get("scope", scope)}
        if "service" in challenge.params:
            params["service"] = challenge.params["service"]
        token_url = challenge.params["realm"] + "?" + urlencode(params)
        headers = {"User-Agent": _USER_AGENT}
        if self._credentials is not None:
            headers["Authorization"] = self._credentials.basic_header()
        try:
            token_response = await self._follow("GET", token_url, headers, None, 0, 1 << 20)
        except TransportError as exc:
            raise RemoteError(f"token service {urlsplit(token_url).netloc}: {exc}") from None
        if token_response.status in (401, 403):
            raise AuthError(f"{self.registry}: the token service refused the credentials")
        if token_response.status != 200:
            raise RemoteError(f"token service answered HTTP {token_response.status}")
        try:
            payload = json.loads(token_response.body)
            token = payload.get("token") or payload.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise AuthError(f"{self.registry}: the token service returned no token")
        self._tokens[scope] = token
        self._challenges[scope] = "bearer"


def _retry_after_s(response: Response) -> float | None:
    value = response.header("retry-after")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), 60.0)
    except ValueError:
        return None


def _check_content_range(
    response: Response, offset: int, length: int, blob_size: int, digest: Digest
) -> None:
    header = response.header("content-range") or ""
    match = _CONTENT_RANGE_RE.match(header.strip())
    expected = (offset, offset + length - 1)
    if not match or (int(match[1]), int(match[2])) != expected:
        raise RemoteError(
            f"blob {digest}: asked for bytes {expected[0]}-{expected[1]}, got Content-Range "
            f"{header!r}"
        )
    if match[3] != "*" and int(match[3]) != blob_size:
        raise RemoteError(
            f"blob {digest}: registry says it is {match[3]} bytes, the manifest says {blob_size}"
        )
