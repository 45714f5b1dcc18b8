"""Start and stop the real CNCF distribution registry (Debian ``docker-registry``) on loopback.

The registry is started by PID on 127.0.0.1 with a free port and its own storage directory,
and stopped by that PID. Its log (level info) has one ``response completed`` line per request
with ``http.response.written``: ``blob_bytes_served()`` sums those for blob GETs, which is how
the tests prove laziness from the registry's own count, not from kitfs' counters.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
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
_WRITTEN_RE = re.compile(r'http\.response\.written=(\d+)')
_URI_RE = re.compile(r'http\.request\.uri="([^"]+)"')
_METHOD_RE = re.compile(r'http\.request\.method=(\w+)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Registry:
    """One registry process. ``host`` is ``127.0.0.1:PORT``."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.root = workdir / "storage"
        self.log_path = workdir / "registry.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Registry:
        if not os.path.exists(REGISTRY_BINARY):
            raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        config.write_text(_CONFIG.format(root=self.root, port=self.port))
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)], stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"registry exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1):
                    return self
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

    def log_mark(self) -> int:
        """A position in the log; ``blob_bytes_served(since=mark)`` counts after it."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def requests(self, since: int = 0) -> list[tuple[str, str, int]]:
        """(method, uri, bytes written) of every completed request after ``since``."""
        time.sleep(0.2)  # the registry writes its line just after the response
        with open(self.log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        out = []
        for line in text.splitlines():
            if "response completed" not in line:
                continue
            uri, method, written = _URI_RE.search(line), _METHOD_RE.search(line), _WRITTEN_RE.search(line)
            if uri and method:
                out.append((method.group(1), uri.group(1), int(written.group(1)) if written else 0))
        return out

    def blob_bytes_served(self, since: int = 0) -> int:
        return sum(n for method, uri, n in self.requests(since)
                   if method == "GET" and "/blobs/" in uri)

    def blob_requests(self, since: int = 0) -> int:
        return sum(1 for method, uri, _ in self.requests(since)
                   if method == "GET" and "/blobs/" in uri)

    def blob_file(self, digest: str) -> Path:
        algo, hex_ = digest.split(":")
        return self.root / "docker/registry/v2/blobs" / algo / hex_[:2] / hex_ / "data"
