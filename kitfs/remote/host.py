"""One host of a registry (the registry itself, or a mirror): its URLs, TLS, credentials and
tokens, and the one request loop (auth, redirects, retries, deadline).

``RegistryClient`` (``kitfs.remote.registry``) decides which hosts to ask and in which order;
a ``HostClient`` asks one of them:

- **URLs**: ``scheme://host/API-root/REPOSITORY/manifests|blobs/REF`` (the API root is
  ``/v2`` unless ``hosts.toml`` says otherwise); a mirror is told the registry it stands for
  with ``?ns=REGISTRY``, as containerd does.
- **Retries** on connection failures, timeouts, 429 (honouring Retry-After) and 5xx, from the
  host or its token service, with exponential backoff, all inside one deadline of
  ``timeout_s`` per operation, so a dead host gives a clear ``RemoteError`` in bounded time.
  An operation still retrying after ``RETRY_WARNING_AFTER_S`` logs one warning (what fails,
  and when it will give up), so a user is not left waiting in silence for the whole timeout.
  An untrusted TLS certificate is not retried: it fails at once, naming the host. A mirror
  with another host after it is not retried at all (``retry=False``): the next host is.
- **TLS**: the system CAs, plus ``--ca-file`` and the host's ``ca`` files; ``skip_verify``
  turns verification off for that host only.
- **Auth**: anonymous first; on 401 the ``WWW-Authenticate`` challenge is answered (Basic, or a
  Bearer token fetched from the realm with the credentials if any); a 401 with a token in hand
  (expired) fetches a new one once. Credentials are those of this host's name (a mirror's own,
  not the registry's), looked up at the first challenge, in a worker thread (a credential
  helper is a subprocess). Refused credentials are named (user and file), never shown.
- **Redirects** (to blob storage) are followed with the Range header kept; credentials are not
  sent to another host.
- **Headers** from ``hosts.toml`` go with every request to the host (never into a log).
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlencode, urljoin, urlsplit

import trio

from kitfs.errors import (
    AuthError,
    FormatError,
    IntegrityError,
    NotFoundError,
    RemoteError,
    RemoteTimeoutError,
    UsageError,
)
from kitfs.format.hosts import HostSpec
from kitfs.remote.auth import Credentials, find_credentials, parse_challenge
from kitfs.remote.connection import Progress, Response, TransportError
from kitfs.remote.hostsdir import DEFAULT_HOSTS_DIR
from kitfs.remote.http import BodyTooLargeError, HttpClient, Into
from kitfs.version import __version__

log = logging.getLogger("kitfs.remote.registry")  # the registry client's log lines, as before

DEFAULT_TIMEOUT_S = 30.0
# Backoff between retries: 50 ms doubling to 2 s. Short first steps because a loopback
# registry restarts in well under a second; capped so that retries keep probing.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
MAX_REDIRECTS = 5
# An operation retrying for this long says so, once: longer than a loopback registry's restart.
RETRY_WARNING_AFTER_S = 1.0
_USER_AGENT = f"kitfs/{__version__}"


@dataclass(frozen=True)
class RegistryConfig:
    """How registries are reached (``--plain-http``, ``--ca-file``, ``--timeout``,
    ``--hosts-dir``, ``--offline``); the defaults here are the command line's and the API's."""

    # for the registry itself (hosts.toml URLs carry their scheme). None: plain HTTP for a
    # loopback registry without a CA file, else HTTPS (``plain_for``); a client given None
    # speaks HTTPS.
    plain_http: bool | None = None
    ca_file: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    hosts_dir: Path = DEFAULT_HOSTS_DIR  # containerd's hosts.toml files: mirrors per registry
    max_connections: int = 8  # per host
    offline: bool = False  # --offline: every operation fails at once, nothing is sent

    def plain_for(self, loopback: bool) -> bool:
        """Whether a registry (``loopback``: on this machine) is spoken to in plain HTTP."""
        if self.plain_http is not None:
            return self.plain_http
        return loopback and self.ca_file is None


@dataclass
class RegistryStatistics:
    """What one process asked of a registry's hosts (``fetch_range`` and friends)."""

    requests: int = 0
    retries: int = 0
    blob_bytes: int = 0
    fallbacks: int = 0  # a mirror failed, or was cold, and the next host was asked
    in_flight: int = 0  # blob range fetches under way
    blob_bytes_by_host: dict[str, int] = field(default_factory=dict)  # host[:port] -> bytes

    def add(self, other: RegistryStatistics) -> None:
        self.requests += other.requests
        self.retries += other.retries
        self.blob_bytes += other.blob_bytes
        self.fallbacks += other.fallbacks
        self.in_flight += other.in_flight
        for host, count in other.blob_bytes_by_host.items():
            self.blob_bytes_by_host[host] = self.blob_bytes_by_host.get(host, 0) + count


class HostClient:
    """Talks to one host for one registry. ``aclose`` when done."""

    def __init__(self, registry: str, spec: HostSpec, config: RegistryConfig,
                 stats: RegistryStatistics, credentials: Credentials | None = None) -> None:
        self.registry = registry
        self.spec = spec
        self.name = spec.host or registry  # host[:port]
        self.config = config
        self.stats = stats
        scheme = spec.scheme or ("http" if config.plain_http else "https")
        self._root = f"{scheme}://{self.name}{spec.path}"
        self._query = "" if self.name == registry else "?ns=" + quote(registry, safe=":[]")
        context = ssl_context(config.ca_file, spec.ca_files, spec.skip_verify)
        # A single receive may wait this long; the whole operation is bounded by timeout_s.
        self._http = HttpClient(context, io_timeout_s=min(config.timeout_s, 10.0),
                                max_connections=config.max_connections)
        # Looked up on the first challenge (find_credentials may run a credential helper for
        # up to 10 s: in a worker thread, never on the trio thread), once for all requests.
        self._credentials = credentials
        self._credentials_found = credentials is not None
        self._credentials_lock = trio.Lock()
        self._configured_headers = dict(spec.headers)
        self._tokens: dict[str, str] = {}  # scope -> bearer token
        self._challenges: dict[str, str] = {}  # scope -> "basic" or "bearer" once known

    async def aclose(self) -> None:
        await self._http.aclose()

    def url(self, repository: str, kind: str, reference: str) -> str:
        """The URL of a manifest or blob (``kind``: "manifests" or "blobs") on this host."""
        return f"{self._root}/{repository}/{kind}/{reference}{self._query}"

    # --- the one request loop: auth, redirects, retries, deadline -------------------------

    async def call(
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
        retry: bool = True,
        max_skip_bytes: int | None = None,
    ) -> Response:
        """One operation, with auth, redirects and retries, until it succeeds or ``timeout_s``
        (default: the configured timeout) has passed. ``blob_size`` (blob reads): an answer
        saying the blob has another size ends it with IntegrityError. Without ``retry`` (a
        mirror with another host after it) the first failure worth a retry ends it with a
        ``RemoteError``; ``max_skip_bytes``: see ``HttpClient.request``."""
        scope = f"repository:{repository}:pull"
        timeout_s = self.config.timeout_s if timeout_s is None else timeout_s
        started = trio.current_time()
        deadline = started + timeout_s
        backoff_s = BACKOFF_FIRST_S
        warned = False  # that this operation is being retried (once)
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
                            max_body_bytes, progress, max_skip_bytes,
                        )
                    except BodyTooLargeError as exc:  # what it sends on purpose: not retried
                        raise FormatError(f"{self.name}: {what}: {exc}; kitfs refuses it "
                                          "unread") from None
                    except TransportError as exc:
                        progress = Progress()  # only an answer the deadline cuts short counts
                        if blob_size is not None and exc.response is not None:  # a short body
                            check_blob_size(self.name, exc.response, blob_size, what)
                        if exc.permanent:
                            raise RemoteError(f"{self.name}: {what}: {exc} (a private CA "
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
                                f"{self.name}: access to {what} denied ({status}); "
                                "check credentials (kit login / docker login)"
                            )
                        elif status == 404:
                            raise NotFoundError(f"{self.name}: {what} not found")
                        elif status == 416 and blob_size is not None:  # past the blob's end
                            check_blob_size(self.name, response, blob_size, what)
                            raise RemoteError(f"{self.name}: {what}: HTTP 416, the range is "
                                              f"not satisfiable ({response.header('content-range')})")
                        elif status != 429 and status < 500:
                            raise RemoteError(
                                f"{self.name}: {what}: unexpected HTTP {status} "
                                f"{response.reason}"
                            )
                        else:
                            last_problem, answered = f"HTTP {status} {response.reason}", True
                            retry_after = _retry_after_s(response)
                    if not retry:
                        raise RemoteError(f"{self.name}: {what}: {last_problem}")
                    if retry_after is not None:
                        backoff_s = max(backoff_s, retry_after)
                    self.stats.retries += 1
                    log.debug("retrying %s in %.2fs: %s", what, backoff_s, last_problem)
                    if not warned and trio.current_time() - started >= RETRY_WARNING_AFTER_S:
                        warned = True
                        log.warning("%s: %s: %s; retrying, giving up %g s after the first "
                                    "attempt (--timeout)", self.name, what, last_problem,
                                    timeout_s)
                    await trio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
        except trio.TooSlowError:
            if progress.status is not None:
                raise RemoteTimeoutError(
                    f"{self.name}: {what}: answered HTTP {progress.status}, but the answer "
                    f"was still arriving after {timeout_s:g} s ({progress.bytes_received} bytes "
                    "received)"
                ) from None
            if answered:
                raise RemoteTimeoutError(
                    f"{self.name}: {what}: still failing after {timeout_s:g} s "
                    f"of retries (last answer: {last_problem})"
                ) from None
            if progress.stage:  # the deadline cut an attempt short: say where it was
                last_problem += f"; the last attempt was {progress.stage}"
            raise RemoteTimeoutError(
                f"{self.name}: {what}: no answer within {timeout_s:g} s "
                f"(last problem: {last_problem})"
            ) from None

    async def _follow(
        self, method: str, url: str, headers: dict[str, str], into: Into | None,
        skip_on_200: int, max_body_bytes: int, progress: Progress | None = None,
        max_skip_bytes: int | None = None,
    ) -> Response:
        origin_host = urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            self.stats.requests += 1
            if progress is not None:  # a redirect starts the answer over
                progress.status, progress.bytes_received = None, 0
            response = await self._http.request(
                method, url, headers, into=into, skip_on_200=skip_on_200,
                max_body_bytes=max_body_bytes, progress=progress, max_skip_bytes=max_skip_bytes,
            )
            if response.status not in (301, 302, 303, 307, 308):
                return response
            location = response.header("location")
            if not location:
                return response
            url = urljoin(url, location)
            if urlsplit(url).netloc != origin_host:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        raise RemoteError(f"{self.name}: more than {MAX_REDIRECTS} redirects")

    def _headers(self, extra: dict[str, str], scope: str) -> dict[str, str]:
        """Ours, then hosts.toml's ``header`` (which may replace the User-Agent, or give a
        static Authorization), then the request's own; a token or credentials from a
        challenge win."""
        headers = {"User-Agent": _USER_AGENT, **self._configured_headers, **extra}
        if scope in self._tokens:
            headers["Authorization"] = f"Bearer {self._tokens[scope]}"
        elif self._challenges.get(scope) == "basic" and self._credentials:
            headers["Authorization"] = self._credentials.basic_header()
        return headers

    async def _find_credentials(self) -> None:
        """This host's credentials (``kitfs.remote.auth``), looked up once, off the trio thread:
        a credential helper is a subprocess (``CREDENTIAL_HELPER_TIMEOUT_S`` at most)."""
        async with self._credentials_lock:
            if not self._credentials_found:
                # abandoned on cancel (the operation's deadline): the helper's own timeout ends it
                self._credentials = await trio.to_thread.run_sync(
                    find_credentials, self.name, abandon_on_cancel=True)
                self._credentials_found = True

    async def _authenticate(self, response: Response, scope: str, what: str) -> None:
        header = response.header("www-authenticate")
        if not header:
            raise AuthError(f"{self.name}: {what}: 401 without a WWW-Authenticate challenge")
        await self._find_credentials()
        challenge = parse_challenge(header)
        if challenge.scheme == "basic":
            if self._credentials is None:
                raise AuthError(f"{self.name}: {what} needs credentials (kit login / docker login)")
            if self._challenges.get(scope) == "basic":  # they were sent, and refused
                raise AuthError(f"{self.name}: {what}: the registry refused "
                                f"{self._describe_credentials()} (kit login / docker login)")
            self._challenges[scope] = "basic"
            return
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            raise AuthError(f"{self.name}: unsupported auth challenge {challenge.scheme!r}")
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
            raise AuthError(f"{self.name}: the token service {service} refused {who} "
                            "(kit login / docker login)")
        if status == 429 or status >= 500:
            raise _TokenServiceUnavailable(
                f"token service {service}: HTTP {status} {token_response.reason}",
                _retry_after_s(token_response), True)
        if status != 200:
            raise RemoteError(f"{self.name}: token service {service} answered HTTP {status} "
                              f"{token_response.reason}")
        try:
            payload = json.loads(token_response.body)
            token = payload.get("token") or payload.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise AuthError(f"{self.name}: the token service returned no token")
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


def ssl_context(ca_file: str | None, ca_files: tuple[str, ...] = (),
                skip_verify: bool = False) -> ssl.SSLContext:
    """The system CAs, plus those of ``ca_file`` and ``ca_files`` (``create_default_context(
    cafile=…)`` would use the file instead of the system store, so a redirect to public
    storage would fail); with ``skip_verify`` no certificate or host name is checked."""
    context = ssl.create_default_context()
    for path, what in [(ca_file, "--ca-file"), *((f, "hosts.toml ca") for f in ca_files)]:
        if path is None:
            continue
        try:
            context.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"{what} {path}: cannot load CA certificates from it: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
    if skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
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


def check_blob_size(registry: str, response: Response, blob_size: int, what: str) -> None:
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
