"""The registry client: manifests by tag or digest, blob byte ranges, auth, retries, timeouts.

All the policy about talking to a registry lives here:

- **One range per request**, clamped to the blob size by the caller's arithmetic (distribution
  answers a range past the end with a 416 whose Content-Length is bogus, which poisons a
  keep-alive connection). A 206 must carry a Content-Range that matches what was asked; a 200
  (a registry or proxy that ignores Range) is read correctly by dropping the bytes before the
  range, and logged once; any other 2xx (a 203 from a transforming proxy) is refused.
- **Retries** on connection failures, timeouts, 429 (honouring Retry-After) and 5xx, from the
  registry or its token service, with exponential backoff, all inside one deadline of
  ``timeout_s`` per operation, so a dead registry gives a clear ``RemoteError`` in bounded
  time. An untrusted TLS certificate is not retried: it fails at once, naming the host.
  A blob range that failed only once that deadline passed is, when asked for again within
  ``RECENT_TIMEOUT_S``, tried with a deadline of ``PROBE_TIMEOUT_S`` and, failing again,
  fails with the first error: the kernel asks again, page by page, right after a read
  fails, and readers that waited for the same chunk ask too; each would otherwise wait a
  whole ``timeout_s`` more. A registry that is back answers the short try.
- **TLS**: the system CAs, plus those of ``ca_file`` when given.
- **Auth**: anonymous first; on 401 the ``WWW-Authenticate`` challenge is answered (Basic, or a
  Bearer token fetched from the realm with the credentials if any); a 401 with a token in hand
  (expired) fetches a new one once. Refused credentials are named (user and file), never shown.
- **Redirects** (to blob storage) are followed with the Range header kept; credentials are not
  sent to another host.

``offline`` (``--offline``): nothing is ever sent; every operation fails at once with
``RemoteError``.

Errors leave as ``kitfs.errors`` types only (``NotFoundError``, ``AuthError``, ``RemoteError``,
``RemoteTimeoutError``; ``UsageError`` for a ``ca_file`` that cannot be loaded).
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from dataclasses import dataclass
from urllib.parse import urlencode, urljoin, urlsplit

import trio

from kitfs.errors import (
    AuthError,
    FormatError,
    IntegrityError,
    NotFoundError,
    RemoteError,
    RemoteTimeoutError,
    UsageError,
    copy_for_waiter,
)
from kitfs.format.digest import Digest
from kitfs.format.mediatypes import MANIFEST_ACCEPT
from kitfs.format.oci import MAX_MANIFEST_BYTES
from kitfs.remote.auth import Credentials, find_credentials, parse_challenge
from kitfs.remote.http import (
    BodyTooLargeError,
    HttpClient,
    Into,
    Progress,
    Response,
    TransportError,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
# Backoff between retries: 50 ms doubling to 2 s. Short first steps because a loopback
# registry restarts in well under a second; capped so that retries keep probing.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
MAX_REDIRECTS = 5
RECENT_TIMEOUT_S = 5.0  # see the module docstring
PROBE_TIMEOUT_S = 1.0
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_USER_AGENT = "kitfs/0.1"


@dataclass(frozen=True)
class RegistryConfig:
    plain_http: bool = False
    ca_file: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_connections: int = 8
    offline: bool = False  # --offline: every operation fails at once, nothing is sent


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
        context = _ssl_context(config.ca_file)
        # A single receive may wait this long; the whole operation is bounded by timeout_s.
        self._http = HttpClient(context, io_timeout_s=min(config.timeout_s, 10.0),
                                max_connections=config.max_connections)
        self._credentials = credentials if credentials is not None else find_credentials(registry)
        self._tokens: dict[str, str] = {}  # scope -> bearer token
        self._challenges: dict[str, str] = {}  # scope -> "basic" or "bearer" once known
        self._warned_full_body = False
        self._timed_out: dict[tuple[str, int, int], tuple[float, RemoteTimeoutError]] = {}
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
        url = f"{self._base}/v2/{repository}/blobs/{digest}"
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        asked = (str(digest), offset, length)
        now = trio.current_time()
        self._timed_out = {k: v for k, v in self._timed_out.items()
                           if now - v[0] < RECENT_TIMEOUT_S}
        earlier = self._timed_out.get(asked)
        try:
            response = await self._call(
                "GET", url, repository, headers,
                what=f"blob {digest} bytes {offset}-{offset + length - 1}", into=into,
                skip_on_200=offset, blob_size=blob_size,
                timeout_s=min(PROBE_TIMEOUT_S, self.config.timeout_s) if earlier else None,
            )
        except RemoteTimeoutError as exc:
            if earlier is not None:
                raise copy_for_waiter(earlier[1]) from None
            self._timed_out[asked] = (trio.current_time(), exc)
            raise
        self._timed_out.pop(asked, None)  # answered: the next ask gets the whole timeout
        if response.status not in (200, 206):  # not a range, nor the blob as it is (203)
            raise RemoteError(f"{self.registry}: blob {digest}: answered a Range request with HTTP "
                              f"{response.status} {response.reason}, neither 206 nor 200")
        _check_blob_size(self.registry, response, blob_size, f"blob {digest}")
        if response.status == 206:
            _check_content_range(self.registry, response, offset, length, digest)
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
        into: Into | None = None,
        skip_on_200: int = 0,
        max_body_bytes: int = 1 << 20,
        timeout_s: float | None = None,
        blob_size: int | None = None,
    ) -> Response:
        """One operation, with auth, redirects and retries, until it succeeds or ``timeout_s``
        (default: the configured timeout) has passed. ``blob_size`` (blob reads): an answer
        saying the blob has another size ends it with IntegrityError."""
        if self.config.offline:
            raise RemoteError(f"{self.registry}: {what}: not asked for: --offline forbids "
                              "contacting the registry")
        scope = f"repository:{repository}:pull"
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        deadline = trio.current_time() + timeout_s
        backoff_s = BACKOFF_FIRST_S
        auth_attempts = 0
        last_problem = "still waiting for the first answer"
        answered = False  # the last problem was an HTTP answer, not a connection failure
        progress = Progress()  # of the attempt in flight: its answer, if one is arriving
        try:
            with trio.fail_at(deadline):
                while True:
                    retry_after: float | None = None
                    progress = Progress()
                    try:
                        response = await self._follow(
                            method, url, self._headers(headers, scope), into, skip_on_200,
                            max_body_bytes, progress,
                        )
                    except BodyTooLargeError as exc:  # what it sends on purpose: not retried
                        raise FormatError(f"{self.registry}: {what}: {exc}; kitfs refuses it "
                                          "unread") from None
                    except TransportError as exc:
                        progress = Progress()  # only an answer the deadline cuts short counts
                        if blob_size is not None and exc.response is not None:  # a short body
                            _check_blob_size(self.registry, exc.response, blob_size, what)
                        if exc.permanent:
                            raise RemoteError(f"{self.registry}: {what}: {exc} (a private CA "
                                              "can be given with --ca-file)") from None
                        last_problem, answered = str(exc), False
                    else:
                        progress = Progress()
                        status = response.status
                        if 200 <= status < 300:
                            return response
                        if status == 401 and auth_attempts < 2:
                            try:
                                await self._authenticate(response, scope, what)
                            except _TokenServiceUnavailable as exc:
                                last_problem, answered = str(exc), exc.answered
                                retry_after = exc.retry_after
                            else:
                                auth_attempts += 1
                                continue
                        elif status in (401, 403):
                            raise AuthError(
                                f"{self.registry}: access to {what} denied ({status}); "
                                "check credentials (kit login / docker login)"
                            )
                        elif status == 404:
                            raise NotFoundError(f"{self.registry}: {what} not found")
                        elif status == 416 and blob_size is not None:  # past the blob's end
                            _check_blob_size(self.registry, response, blob_size, what)
                            raise RemoteError(f"{self.registry}: {what}: HTTP 416, the range is "
                                              f"not satisfiable ({response.header('content-range')})")
                        elif status != 429 and status < 500:
                            raise RemoteError(
                                f"{self.registry}: {what}: unexpected HTTP {status} "
                                f"{response.reason}"
                            )
                        else:
                            last_problem, answered = f"HTTP {status} {response.reason}", True
                            retry_after = _retry_after_s(response)
                    if retry_after is not None:
                        backoff_s = max(backoff_s, retry_after)
                    self.stats.retries += 1
                    log.debug("retrying %s in %.2fs: %s", what, backoff_s, last_problem)
                    await trio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
        except trio.TooSlowError:
            if progress.status is not None:
                raise RemoteTimeoutError(
                    f"{self.registry}: {what}: answered HTTP {progress.status}, but the answer "
                    f"was still arriving after {timeout_s:g} s ({progress.bytes_received} bytes "
                    "received)"
                ) from None
            if answered:
                raise RemoteTimeoutError(
                    f"{self.registry}: {what}: still failing after {timeout_s:g} s "
                    f"of retries (last answer: {last_problem})"
                ) from None
            if progress.stage:  # the deadline cut an attempt short: say where it was
                last_problem += f"; the last attempt was {progress.stage}"
            raise RemoteTimeoutError(
                f"{self.registry}: {what}: no answer within {timeout_s:g} s "
                f"(last problem: {last_problem})"
            ) from None

    async def _follow(
        self, method: str, url: str, headers: dict[str, str], into: Into | None,
        skip_on_200: int, max_body_bytes: int, progress: Progress | None = None,
    ) -> Response:
        origin_host = urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            self.stats.requests += 1
            if progress is not None:  # a redirect starts the answer over
                progress.status, progress.bytes_received = None, 0
            response = await self._http.request(
                method, url, headers, into=into, skip_on_200=skip_on_200,
                max_body_bytes=max_body_bytes, progress=progress,
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
            if self._credentials is None:
                raise AuthError(f"{self.registry}: {what} needs credentials (kit login / docker login)")
            if self._challenges.get(scope) == "basic":  # they were sent, and refused
                raise AuthError(f"{self.registry}: {what}: the registry refused "
                                f"{self._describe_credentials()} (kit login / docker login)")
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
        service = urlsplit(token_url).netloc
        try:
            token_response = await self._follow("GET", token_url, headers, None, 0, 1 << 20)
        except BodyTooLargeError as exc:
            raise RemoteError(f"token service {service}: {exc}") from None
        except TransportError as exc:
            if exc.permanent:
                raise RemoteError(f"token service {service}: {exc}") from None
            raise _TokenServiceUnavailable(f"token service {service}: {exc}", None, False) from None
        status = token_response.status
        if status in (401, 403):
            who = self._describe_credentials() if self._credentials else "anonymous access"
            raise AuthError(f"{self.registry}: the token service {service} refused {who} "
                            "(kit login / docker login)")
        if status == 429 or status >= 500:
            raise _TokenServiceUnavailable(
                f"token service {service}: HTTP {status} {token_response.reason}",
                _retry_after_s(token_response), True)
        if status != 200:
            raise RemoteError(f"{self.registry}: token service {service} answered HTTP {status} "
                              f"{token_response.reason}")
        try:
            payload = json.loads(token_response.body)
            token = payload.get("token") or payload.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise AuthError(f"{self.registry}: the token service returned no token")
        self._tokens[scope] = token
        self._challenges[scope] = "bearer"

    def _describe_credentials(self) -> str:
        """``the credentials of user 'u' from <file>``: never the secret."""
        assert self._credentials is not None
        source = getattr(self._credentials, "source", "")
        return (f"the credentials of user {self._credentials.username!r}"
                + (f" from {source}" if source else ""))


class _TokenServiceUnavailable(Exception):
    """The token service failed in a way worth retrying (connection, 429, 5xx)."""

    def __init__(self, message: str, retry_after: float | None, answered: bool) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.answered = answered


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """The system CAs, plus those of ``ca_file`` (``create_default_context(cafile=…)`` would
    use the file instead of the system store, so a redirect to public storage would fail)."""
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"--ca-file {ca_file}: cannot load CA certificates from it: "
                             f"{exc.strerror or exc}") from None
    return context


def _retry_after_s(response: Response) -> float | None:
    value = response.header("retry-after")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), 60.0)
    except ValueError:
        return None


_TOTAL_RE = re.compile(r"^bytes (?:\d+-\d+|\*)/(\d+)$")


def _check_blob_size(registry: str, response: Response, blob_size: int, what: str) -> None:
    """IntegrityError when the answer says the blob has another size than the manifest says:
    the Content-Range total of a 206 or 416, the Content-Length of a whole-blob 200."""
    match = _TOTAL_RE.match((response.header("content-range") or "").strip())
    total = int(match[1]) if match else None
    length = response.header("content-length")
    if total is None and response.status == 200 and length is not None and length.isdigit():
        total = int(length)
    if total is not None and total != blob_size:
        raise IntegrityError(f"{registry}: {what}: the registry has {total} bytes, the manifest "
                             f"says {blob_size}")


def _check_content_range(
    registry: str, response: Response, offset: int, length: int, digest: Digest
) -> None:
    header = response.header("content-range") or ""
    match = _CONTENT_RANGE_RE.match(header.strip())
    expected = (offset, offset + length - 1)
    if not match or (int(match[1]), int(match[2])) != expected:
        raise RemoteError(
            f"{registry}: blob {digest}: asked for bytes {expected[0]}-{expected[1]}, got "
            f"Content-Range {header!r}"
        )
