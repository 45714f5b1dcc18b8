"""A fault-injecting HTTP/1.1 proxy for the registry tests; the real registry is behind it.

The tests push kits straight to the real CNCF distribution registry, then point kitfs at this
proxy, which forwards every request to the registry unless a rule says otherwise. It is for
two things: injecting the faults a registry, a CDN or a network can produce, and counting what
went over the wire (``seen`` records every request with the status and body bytes answered).

A ``Rule`` matches a method and a path regex and applies to the first ``times`` matching
requests (``times=None``: all of them); the first rule that matches wins::

    proxy.add(Rule("status", status=503, times=3))            # then forward normally
    proxy.add(Rule("status", status=429, retry_after="1"))
    proxy.add(Rule("reset"))          # close with SO_LINGER 0: the client sees ECONNRESET
    proxy.add(Rule("truncate"))       # the full Content-Length, half the body, then close
    proxy.add(Rule("stall_body", delay_s=5))  # the same, with a pause before the close
    proxy.add(Rule("ignore_range"))   # forward without Range: 200 and the whole blob
    proxy.add(Rule("wrong_range"))    # a 206 whose Content-Range is one byte off
    proxy.add(Rule("redirect"))       # 307 to the "storage" listener, which records Range
    proxy.add(Rule("stall", delay_s=2))  # sleep, then answer normally
    proxy.add(Rule("trickle", bytes_per_s=1))  # the headers, then the body one byte at a time
    proxy.add(Rule("forward", chunked=True))  # as the registry answers, but chunked
    proxy.add(Rule("forward", path="/manifests/", body=huge))  # a hostile registry's answer

``chunked=True`` sends a forwarded body with chunked transfer encoding, ``rewrite_status``
replaces the forwarded status (e.g. a 203 from a transforming proxy) and ``body`` the forwarded
body (the registry's headers kept, Content-Length fitted), with any action that forwards; a
``body`` as long as the blob answers a range request with its own bytes of that range (a
registry forging a blob consistently).

Auth covers the whole ``/v2/`` API: ``require_basic(user, password)``, or
``require_bearer(...)`` with a token endpoint the proxy serves itself at ``/token``
(``WWW-Authenticate: Bearer realm=…,service=…,scope=…``); ``revoke_tokens()``, or
``revoke_after`` authorized requests, makes every token issued so far invalid, so the next
request with one gets a 401; with ``lifetime_s`` each token expires that long after it was
issued, as real registries' tokens do. TLS: pass server contexts (``server_context``) made from
certificates that ``make_ca``/``issue`` create with the ``openssl`` command.

Everything listens on 127.0.0.1 on free ports; ``start``/``stop`` run and end the threads.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, urlsplit

Action = Literal["forward", "status", "reset", "truncate", "stall_body", "ignore_range",
                 "wrong_range", "redirect", "stall", "trickle"]

IO_TIMEOUT_S = 30.0
_PIECE_BYTES = 256 * 1024
# Response headers that describe the upstream connection, not the content: never copied.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}
_REPO_RE = re.compile(r"^/v2/(.+?)/(?:manifests|blobs)/")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


@dataclass
class Rule:
    action: Action
    path: str = "/blobs/"  # a regex searched in the request path
    method: str = "GET"
    times: int | None = 1  # how many matching requests it applies to; None: every one
    status: int = 503  # for "status"
    retry_after: str | None = None  # for "status": the Retry-After header
    delay_s: float = 0.0  # for "stall" and "stall_body"
    bytes_per_s: float = 1.0  # for "trickle"
    chunked: bool = False  # send the forwarded body with Transfer-Encoding: chunked
    rewrite_status: int | None = None  # answer the forwarded response with this status
    body: bytes | None = None  # answer these bytes instead of the forwarded body
    hits: int = 0

    def take(self, method: str, path: str) -> bool:
        """Count and return True when this rule applies to the request."""
        if method != self.method or not re.search(self.path, path):
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        self.hits += 1
        return True


@dataclass
class Seen:
    """One request as the proxy (or the storage listener) received and answered it."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    at: float  # time.monotonic() when it arrived
    action: str = "forward"
    status: int = 0  # what was answered; 0: nothing (reset)
    body_bytes: int = 0  # body bytes written to the client


@dataclass
class _Bearer:
    user: str | None
    password: str | None
    revoke_after: int | None
    lifetime_s: float | None = None
    valid: set[str] = field(default_factory=set)
    issued: list[str] = field(default_factory=list)
    issued_at: dict[str, float] = field(default_factory=dict)  # token -> time.monotonic()
    scopes: list[str] = field(default_factory=list)
    authorized: int = 0


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, proxy: FaultProxy, answer: str, context: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.proxy = proxy
        self.answer = answer  # "proxy" or "storage"
        self.context = context

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that goes away (or refuses our certificate) is normal here; anything
        # else is a bug in the proxy, which the fixture reports.
        exc = sys.exc_info()[1]
        if exc is not None and not isinstance(exc, OSError):
            self.proxy.errors.append(exc)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as registries do
    timeout = IO_TIMEOUT_S
    server: _Server

    def setup(self) -> None:
        if self.server.context is not None:
            self.request.settimeout(IO_TIMEOUT_S)
            self.request = self.server.context.wrap_socket(self.request, server_side=True)
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self.server.context is not None:  # the server closes only the plain socket
                self.connection.close()

    def do_GET(self) -> None:
        if self.server.answer == "storage":
            self.server.proxy._serve_storage(self)
        else:
            self.server.proxy._serve(self)

    def log_message(self, format: str, *args: object) -> None:
        pass


class FaultProxy:
    """The proxy in front of ``upstream`` (``host:port`` of the real registry, plain HTTP).

    ``host`` is what references name (``hostname:port``; ``hostname`` defaults to 127.0.0.1
    and may be a name that resolves to it, for TLS certificates). ``storage`` is a second
    listener that blob GETs are redirected to by ``Rule("redirect")``.
    """

    def __init__(self, upstream: str, *, hostname: str = "127.0.0.1",
                 context: ssl.SSLContext | None = None,
                 storage_context: ssl.SSLContext | None = None) -> None:
        self.upstream = upstream
        self.hostname = hostname
        self.rules: list[Rule] = []
        self.seen: list[Seen] = []
        self.storage_seen: list[Seen] = []
        self.errors: list[BaseException] = []
        self._basic: tuple[str, str] | None = None
        self._bearer: _Bearer | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server(self, "proxy", context)
        self._storage = _Server(self, "storage", storage_context)
        self._threads: list[threading.Thread] = []

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        for server in (self._server, self._storage):
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"faultproxy-{server.answer}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop listening (a later connection is refused) and wake stalled answers."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for server in (self._server, self._storage):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()

    @property
    def host(self) -> str:
        return f"{self.hostname}:{self._server.port}"

    @property
    def storage_url(self) -> str:
        scheme = "https" if self._storage.context is not None else "http"
        return f"{scheme}://127.0.0.1:{self._storage.port}"

    # --- programming it ---------------------------------------------------------------------

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def require_basic(self, user: str, password: str) -> None:
        self._basic = (user, password)

    def require_bearer(self, user: str | None = None, password: str | None = None, *,
                       revoke_after: int | None = None, lifetime_s: float | None = None) -> None:
        """Bearer tokens from /token (which wants ``user``/``password`` when given);
        after ``revoke_after`` authorized requests every token issued so far is revoked once;
        each token expires ``lifetime_s`` after it was issued."""
        self._bearer = _Bearer(user, password, revoke_after, lifetime_s)

    def revoke_tokens(self) -> None:
        assert self._bearer is not None
        with self._lock:
            self._bearer.valid.clear()

    @property
    def tokens_issued(self) -> list[str]:
        return list(self._bearer.issued) if self._bearer else []

    # --- what happened ----------------------------------------------------------------------

    def requests(self, path: str = "", method: str = "GET") -> list[Seen]:
        """Requests whose path contains ``path``, in arrival order."""
        with self._lock:
            return [s for s in self.seen if s.method == method and path in s.path]

    @property
    def bytes_forwarded(self) -> int:
        with self._lock:
            return sum(s.body_bytes for s in self.seen)

    # --- answering ----------------------------------------------------------------------------

    def _serve(self, h: _Handler) -> None:
        seen = Seen(h.command, h.path, {k.lower(): v for k, v in h.headers.items()},
                    time.monotonic())
        with self._lock:
            self.seen.append(seen)
        is_token = h.path.startswith("/token")
        if not is_token and not self._authorized(h, seen):
            return
        with self._lock:
            rule = next((r for r in self.rules if r.take(h.command, h.path)), None)
        if rule is not None:
            seen.action = rule.action
            if rule.action == "stall":
                self._stopping.wait(rule.delay_s)
                if self._stopping.is_set():
                    h.close_connection = True
                    return
            elif rule.action == "status":
                error_headers = [("Content-Type", "application/json")]
                if rule.retry_after is not None:
                    error_headers.append(("Retry-After", rule.retry_after))
                self._send(h, seen, rule.status, error_headers,
                           b'{"errors":[{"code":"UNAVAILABLE"}]}')
                return
            elif rule.action == "reset":
                self._reset(h)
                return
            elif rule.action == "redirect":
                location = f"{self.storage_url}/storage{h.path}?signature=fake"
                self._send(h, seen, 307, [("Location", location)], b"")
                return
        if is_token:
            self._issue_token(h, seen)
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() in ("accept", "range", "user-agent")}
        if rule is not None and rule.action == "ignore_range":
            headers = {k: v for k, v in headers.items() if k.lower() != "range"}
        status, reply_headers, body = self._upstream(h.command, h.path, headers)
        if rule is not None and rule.action == "wrong_range" and status == 206:
            reply_headers = [(k, _shift_content_range(v) if k.lower() == "content-range" else v)
                             for k, v in reply_headers]
        if rule is not None and rule.rewrite_status is not None:
            status = rule.rewrite_status
        if rule is not None and rule.body is not None:
            body = _ranged(rule.body, status, reply_headers)
        if rule is not None and rule.action == "trickle":
            self._trickle(h, seen, status, reply_headers, body, rule.bytes_per_s)
            return
        cut = (len(body) // 2 if rule is not None and rule.action in ("truncate", "stall_body")
               else None)
        stall_s = rule.delay_s if rule is not None and rule.action == "stall_body" else 0.0
        self._send(h, seen, status, reply_headers, body, cut_at=cut, stall_s=stall_s,
                   chunked=rule is not None and rule.chunked)

    def _serve_storage(self, h: _Handler) -> None:
        """Blob storage behind a redirect: serves the bytes and records the headers it got."""
        seen = Seen(h.command, h.path, {k.lower(): v for k, v in h.headers.items()},
                    time.monotonic())
        with self._lock:
            self.storage_seen.append(seen)
        path = urlsplit(h.path).path.removeprefix("/storage")
        headers = {k: v for k, v in h.headers.items() if k.lower() == "range"}
        status, reply_headers, body = self._upstream(h.command, path, headers)
        self._send(h, seen, status, reply_headers, body)

    def _authorized(self, h: _Handler, seen: Seen) -> bool:
        given = h.headers.get("Authorization", "")
        if self._basic is not None:
            expected = "Basic " + base64.b64encode(":".join(self._basic).encode()).decode()
            if given == expected:
                return True
            challenge = 'Basic realm="faultproxy"'
        elif self._bearer is not None:
            bearer = self._bearer
            with self._lock:
                token = given[7:] if given.startswith("Bearer ") else ""
                ok = token in bearer.valid and (
                    bearer.lifetime_s is None
                    or time.monotonic() - bearer.issued_at[token] < bearer.lifetime_s)
                if ok:
                    bearer.authorized += 1
                    if bearer.revoke_after is not None and bearer.authorized == bearer.revoke_after:
                        bearer.valid.clear()  # this request passes; the next one with it fails
            if ok:
                return True
            scheme = "https" if self._server.context is not None else "http"
            challenge = f'Bearer realm="{scheme}://{self.host}/token",service="faultproxy"'
            if match := _REPO_RE.match(h.path):
                challenge += f',scope="repository:{match[1]}:pull"'
        else:
            return True
        self._send(h, seen, 401, [("WWW-Authenticate", challenge),
                                  ("Content-Type", "application/json")],
                   b'{"errors":[{"code":"UNAUTHORIZED"}]}')
        return False

    def _issue_token(self, h: _Handler, seen: Seen) -> None:
        bearer = self._bearer
        if bearer is None:
            self._send(h, seen, 404, [], b"")
            return
        if bearer.user is not None:
            expected = f"{bearer.user}:{bearer.password}".encode()
            given = h.headers.get("Authorization", "")
            if given != "Basic " + base64.b64encode(expected).decode():
                self._send(h, seen, 401, [("Content-Type", "application/json")],
                           b'{"details":"incorrect username or password"}')
                return
        token = secrets.token_hex(12)
        query = parse_qs(urlsplit(h.path).query)
        with self._lock:
            bearer.valid.add(token)
            bearer.issued.append(token)
            bearer.issued_at[token] = time.monotonic()
            bearer.scopes += query.get("scope", [])
        body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
        self._send(h, seen, 200, [("Content-Type", "application/json")], body)

    def _upstream(self, method: str, path: str, headers: dict[str, str]
                  ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream, timeout=IO_TIMEOUT_S)
        try:
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            body = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
            return response.status, kept, body
        finally:
            conn.close()

    def _send(self, h: _Handler, seen: Seen, status: int, headers: list[tuple[str, str]],
              body: bytes, *, cut_at: int | None = None, stall_s: float = 0.0,
              chunked: bool = False) -> None:
        """Answer; with ``cut_at``, stop the body there and close the connection (after
        ``stall_s``, or when the proxy stops)."""
        seen.status = status
        h.send_response_only(status)
        for name, value in headers:
            h.send_header(name, value)
        if chunked:
            h.send_header("Transfer-Encoding", "chunked")
        else:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command == "HEAD":
            return
        if cut_at is not None:
            h.close_connection = True
        sent = body if cut_at is None else body[:cut_at]
        for start in range(0, len(sent), _PIECE_BYTES):  # counted as written: a client may
            piece = sent[start : start + _PIECE_BYTES]  # close once it has what it wants
            h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            seen.body_bytes += len(piece)
        if chunked:
            h.wfile.write(b"0\r\n\r\n")
        if stall_s:
            h.wfile.flush()
            self._stopping.wait(stall_s)

    def _trickle(self, h: _Handler, seen: Seen, status: int, headers: list[tuple[str, str]],
                 body: bytes, bytes_per_s: float) -> None:
        """Answer with the full Content-Length, then the body one byte per ``1/bytes_per_s``
        seconds, until it is all sent, the client goes away or the proxy stops."""
        seen.status = status
        h.send_response_only(status)
        for name, value in headers:
            h.send_header(name, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.flush()
        for at in range(len(body)):
            if self._stopping.wait(1 / bytes_per_s):
                h.close_connection = True
                return
            h.wfile.write(body[at : at + 1])
            h.wfile.flush()
            seen.body_bytes += 1

    def _reset(self, h: _Handler) -> None:
        """Close the connection with a TCP RST (SO_LINGER on, zero timeout)."""
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.connection.close()
        h.close_connection = True


@contextlib.contextmanager
def running(proxy: FaultProxy) -> Iterator[FaultProxy]:
    """Start ``proxy``, stop it at the end, then fail if it hit an error of its own."""
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
    assert not proxy.errors, proxy.errors


def _ranged(forged: bytes, status: int, headers: list[tuple[str, str]]) -> bytes:
    """``forged``, or the range of it a 206 answers when ``forged`` is as long as the blob."""
    value = next((v for k, v in headers if k.lower() == "content-range"), "")
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", value.strip())
    if status != 206 or match is None or int(match[3]) != len(forged):
        return forged
    return forged[int(match[1]) : int(match[2]) + 1]


def _shift_content_range(value: str) -> str:
    match = _CONTENT_RANGE_RE.match(value.strip())
    if not match:
        return value
    start, end, total = (int(g) for g in match.groups())
    return f"bytes {start + 1}-{end + 1}/{total}"


# --- TLS certificates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError("the TLS tests need the openssl command (apt-get install openssl)")
    subprocess.run([binary, *args], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> Cert:
    """A self-signed CA certificate (``openssl req -x509``), valid for two days."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = Cert(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "2", "-subj", f"/CN={name}", "-keyout", str(ca.key),
             "-out", str(ca.cert), "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return ca


def issue(ca: Cert, directory: Path, name: str, hostnames: list[str]) -> Cert:
    """A server certificate signed by ``ca`` for ``hostnames`` (DNS names or IP addresses)."""
    leaf = Cert(directory / f"{name}.pem", directory / f"{name}.key")
    names = ",".join(f"IP:{h}" if re.fullmatch(r"[\d.]+|[0-9a-fA-F:]+", h) else f"DNS:{h}"
                     for h in hostnames)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "2", "-subj", f"/CN={hostnames[0]}", "-keyout", str(leaf.key),
             "-out", str(leaf.cert), "-CA", str(ca.cert), "-CAkey", str(ca.key),
             "-addext", f"subjectAltName={names}", "-addext", "basicConstraints=critical,CA:FALSE",
             "-addext", "extendedKeyUsage=serverAuth")
    return leaf


def server_context(cert: Cert) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert, cert.key)
    return context
