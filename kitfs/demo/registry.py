"""The demo's registry: the CNCF distribution registry (Debian ``docker-registry``) on loopback.

``kitfs demo`` and the test suite both start it. It runs by PID on 127.0.0.1 with a free port
and its own storage directory, and is stopped by that PID. Its log (level info) has one
``response completed`` line per request with ``http.response.written``: ``blob_bytes_served()``
sums those for blob GETs, which is how the tests prove laziness from the registry's own count,
not from kitfs' counters. Optional: htpasswd credentials (bcrypt, a test extra) and
pull-through proxy mode.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

REGISTRY_BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"

_CONFIG = """version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: kitfs-test
health:
  storagedriver:
    enabled: false
"""
# Appended to _CONFIG for a registry that wants credentials (distribution's htpasswd access
# controller: Basic auth, bcrypt hashes only; distribution 2.8 accepts it over plain HTTP).
_AUTH_CONFIG = """auth:
  htpasswd:
    realm: {realm}
    path: {path}
"""
# Appended for a pull-through cache of another registry (distribution's proxy mode): it fetches
# what it does not hold from ``remoteurl`` and keeps it in its own storage.
_PROXY_CONFIG = """proxy:
  remoteurl: {url}
"""
_WRITTEN_RE = re.compile(r'http\.response\.written=(\d+)')
# logfmt quotes a value only when it must (a blob URI holds ':'); a manifest by tag is bare.
_URI_RE = re.compile(r'http\.request\.uri=(?:"([^"]+)"|([^\s"]+))')
_METHOD_RE = re.compile(r'http\.request\.method=(\w+)')
_AGENT_RE = re.compile(r'http\.request\.useragent=(?:"([^"]*)"|([^\s"]*))')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def htpasswd_line(username: str, password: str) -> str:
    """One ``user:bcrypt-hash`` line as ``htpasswd -B`` writes it (cost 4: tests want speed).

    Needs the ``bcrypt`` package (a test extra: ``pip install -e '.[test]'``).
    """
    import bcrypt  # only the tests need it; kitfs itself never hashes a password

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return f"{username}:{hashed}"


class Registry:
    """One registry process. ``host`` is ``127.0.0.1:PORT``.

    With ``users`` (name → password) the registry wants HTTP Basic credentials for every
    request (distribution's htpasswd access controller, realm ``realm``); without, it is open.
    With ``proxy_of`` (another registry's ``host:port``) it is a pull-through cache of that
    registry (read-only, as distribution's proxy mode is).
    """

    def __init__(self, workdir: Path, port: int | None = None, *,
                 users: dict[str, str] | None = None, realm: str = "kitfs-test",
                 proxy_of: str | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.root = workdir / "storage"
        self.log_path = workdir / "registry.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.users = dict(users or {})
        self.realm = realm
        self.htpasswd_path = workdir / "htpasswd"
        self.proxy_of = proxy_of

    def start(self) -> Registry:
        if not os.path.exists(REGISTRY_BINARY):
            raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        text = _CONFIG.format(root=self.root, port=self.port)
        if self.users:
            self.htpasswd_path.write_text(
                "".join(htpasswd_line(u, p) + "\n" for u, p in self.users.items()))
            self.htpasswd_path.chmod(0o600)
            text += _AUTH_CONFIG.format(realm=self.realm, path=self.htpasswd_path)
        if self.proxy_of:
            text += _PROXY_CONFIG.format(url=f"http://{self.proxy_of}")
        config.write_text(text)
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the fd
            self.process = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"registry exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1):
                    return self
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code == 401 and self.users:  # up, and asking for credentials
                    return self
                time.sleep(0.05)
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("registry did not start within 15 s")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def _settled_log_size(self, quiet_s: float = 0.2, limit_s: float = 3.0) -> int:
        """The log's size once no line has been added for ``quiet_s``: the registry writes
        a request's line just after its response, so a client that has its bytes may not
        be in the log yet."""
        def size() -> int:
            return self.log_path.stat().st_size if self.log_path.exists() else 0
        deadline = time.monotonic() + limit_s
        last, quiet_since = size(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = size()
            if now != last:
                last, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                break
        return last

    def log_mark(self) -> int:
        """A position in the log after every request made so far has been logged;
        ``blob_bytes_served(since=mark)`` counts what comes after it."""
        return self._settled_log_size()

    def requests(self, since: int = 0, agent: str | None = None) -> list[tuple[str, str, int]]:
        """(method, uri, bytes written) of every completed request after ``since``; with
        ``agent``, only those whose User-Agent starts with it (``kitfs/``: not a mirror's)."""
        self._settled_log_size()
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            if "response completed" not in line:
                continue
            uri, method, written = _URI_RE.search(line), _METHOD_RE.search(line), _WRITTEN_RE.search(line)
            if agent is not None:
                found = _AGENT_RE.search(line)
                if not found or not (found.group(1) or found.group(2) or "").startswith(agent):
                    continue
            if uri and method:
                out.append((method.group(1), uri.group(1) or uri.group(2),
                            int(written.group(1)) if written else 0))
        return out

    def blob_bytes_served(self, since: int = 0, agent: str | None = None) -> int:
        return sum(n for method, uri, n in self.requests(since, agent)
                   if method == "GET" and "/blobs/" in uri)

    def blob_requests(self, since: int = 0, agent: str | None = None) -> int:
        return sum(1 for method, uri, _ in self.requests(since, agent)
                   if method == "GET" and "/blobs/" in uri)

    def blob_file(self, digest: str) -> Path:
        algo, hex_ = digest.split(":")
        return self.root / "docker/registry/v2/blobs" / algo / hex_[:2] / hex_ / "data"

    def flip_stored_byte(self, digest: str, at: int | None = None, mask: int = 0xFF) -> None:
        """XOR one byte of a blob in this registry's own storage with ``mask`` (``at``: an
        index, negative from the end; default the middle). The registry then serves the
        changed bytes under the old digest, as a tampered or broken registry would."""
        stored = self.blob_file(digest)
        data = bytearray(stored.read_bytes())
        data[len(data) // 2 if at is None else at] ^= mask
        stored.write_bytes(bytes(data))
