"""The embedded default: a loopback registry (Debian ``docker-registry``) with a sample kit.

``kitfs demo`` and the test suite both use it. The registry is started by PID on 127.0.0.1
with a free port and its own storage directory, and stopped by that PID. Its log (level info)
has one ``response completed`` line per request with ``http.response.written``:
``blob_bytes_served()`` sums those for blob GETs, which is how the tests prove laziness from
the registry's own count, not from kitfs' counters.

Kit builders: ModelKits written the way ``kit pack`` writes them, pushed with oras-py.

``kit pack`` (v0.5+) walks the context directory in lexical order and writes, per Kitfile
entry, a tar whose names are context-relative, with every ancestor directory as its own entry
(no trailing slash), uid 1000, gid 0, empty user/group names and mtime 0, using PAX records only
where USTAR cannot hold a name or size. The config is the Kitfile as JSON with ``digest`` and
``diffId`` added to every entry. The builders here reproduce that, plus the older and foreign
variants (legacy parent-relative tars, gzip, zstd, raw, ModelPack, duplicate digests).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import oras.provider
import zstandard

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


KIT = "application/vnd.kitops.modelkit"
KIT_CONFIG = f"{KIT}.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def kit_tar(files: dict[str, bytes], layer_path: str, *, legacy: bool = False,
            modes: dict[str, int] | None = None, extra: list[tarfile.TarInfo] | None = None,
            fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar of ``files`` (context-relative path → bytes) as kit pack writes one layer.

    ``layer_path`` is the Kitfile path of the entry (a file or a directory); its ancestors are
    written as directory entries. With ``legacy`` names are relative to its parent directory.
    """
    modes = modes or {}
    base = posixpath.dirname(layer_path) if legacy else ""
    names: set[str] = set()
    for path in files:
        parts = path.split("/")
        for i in range(1, len(parts)):
            names.add("/".join(parts[:i]))
        names.add(path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name in sorted(names):
            if legacy:
                if (base and not (name + "/").startswith(base + "/")) or name == base:
                    continue
                arcname = posixpath.relpath(name, base) if base else name
            else:
                arcname = name
            info = tarfile.TarInfo(arcname)
            info.uid, info.gid, info.uname, info.gname, info.mtime = 1000, 0, "", "", 0
            if name in files:
                info.size = len(files[name])
                info.mode = modes.get(name, 0o644)
                tar.addfile(info, io.BytesIO(files[name]))
            else:
                info.type = tarfile.DIRTYPE
                info.mode = modes.get(name, 0o755)
                tar.addfile(info)
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"\0" * info.size) if info.isreg() else None)
    return buf.getvalue()


@dataclass
class Layer:
    media_type: str
    data: bytes
    annotations: dict[str, str] = field(default_factory=dict)
    diff_id: str | None = None

    @property
    def digest(self) -> str:
        return sha256(self.data)

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                             "size": len(self.data)}
        if self.annotations:
            d["annotations"] = self.annotations
        return d


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def tar_layer(kind: str, files: dict[str, bytes], layer_path: str, compression: str = "none",
              **kwargs: Any) -> Layer:
    raw = kit_tar(files, layer_path, **kwargs)
    suffix = "" if compression == "none" else f"+{compression}"
    return Layer(f"{KIT}.{kind}.v1.tar{suffix}", compress(raw, compression), diff_id=sha256(raw))


@dataclass
class Push:
    reference: str
    manifest: dict[str, Any]
    config: bytes
    layers: list[Layer]


class Pusher:
    """Pushes blobs and manifests to a registry on loopback with oras-py."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.oras = oras.provider.Registry(hostname=host, insecure=True)

    def push_blob(self, repository: str, data: bytes, media_type: str) -> None:
        container = self.oras.get_container(f"{self.host}/{repository}:unused")
        with tempfile.NamedTemporaryFile() as f:
            f.write(data)
            f.flush()
            layer = {"mediaType": media_type, "digest": sha256(data), "size": len(data)}
            response = self.oras.upload_blob(f.name, container, layer, do_chunked=True,
                                             chunk_size=64 << 20)
            self.oras._check_200_response(response)

    def push_manifest(self, reference: str, manifest: dict[str, Any]) -> None:
        container = self.oras.get_container(reference)
        self.oras._check_200_response(self.oras.upload_manifest(manifest, container))

    def push_kit(self, reference: str, config: dict[str, Any] | bytes, layers: list[Layer], *,
                 config_media_type: str = KIT_CONFIG, artifact_type: str | None = None,
                 annotations: dict[str, str] | None = None, media_type: bool = True) -> Push:
        repository = reference.split("/", 1)[1].rsplit(":", 1)[0]
        config_bytes = config if isinstance(config, bytes) else json.dumps(
            config, separators=(",", ":")).encode()
        seen = set()
        for layer in layers:
            if layer.digest not in seen:
                self.push_blob(repository, layer.data, layer.media_type)
                seen.add(layer.digest)
        self.push_blob(repository, config_bytes, config_media_type)
        manifest: dict[str, Any] = {"schemaVersion": 2}
        if media_type:
            manifest["mediaType"] = OCI_MANIFEST
        if artifact_type:
            manifest["artifactType"] = artifact_type
        manifest["config"] = {"mediaType": config_media_type, "digest": sha256(config_bytes),
                              "size": len(config_bytes)}
        manifest["layers"] = [layer.descriptor() for layer in layers]
        if annotations:
            manifest["annotations"] = annotations
        self.push_manifest(reference, manifest)
        return Push(reference, manifest, config_bytes, layers)


def with_layer_info(kitfile: dict[str, Any], entries: list[tuple[dict[str, Any], Layer]]
                    ) -> dict[str, Any]:
    """Add digest/diffId to Kitfile entries, as kit pack records them in the config."""
    for entry, layer in entries:
        entry["digest"] = layer.digest
        entry["diffId"] = layer.diff_id or layer.digest
    return kitfile


def sample_kit(pusher: Pusher, reference: str, weights: bytes, compression: str = "none") -> Push:
    """The sample ModelKit: weights, a dataset directory, code and docs."""
    model = tar_layer("model", {"models/weights.safetensors": weights},
                      "models/weights.safetensors", compression)
    data_files = {f"data/train/part-{i:03d}.csv": f"id,value\n{i},{i * i}\n".encode()
                  for i in range(20)}
    dataset = tar_layer("dataset", data_files, "data/train", compression)
    code = tar_layer("code", {"src/train.py": b"print('train')\n",
                              "src/util/io.py": b"def load():\n    pass\n"}, "src", compression)
    docs = tar_layer("docs", {"README.md": b"# Sample kit\n"}, "README.md", compression)
    kitfile: dict[str, Any] = {
        "manifestVersion": "1.0.0",
        "package": {"name": "sample", "version": "1.0.0", "authors": ["kitfs"]},
        "model": {"name": "sample-model", "path": "models/weights.safetensors",
                  "format": "safetensors"},
        "code": [{"path": "src", "description": "training code"}],
        "datasets": [{"name": "train", "path": "data/train"}],
        "docs": [{"path": "README.md"}],
    }
    with_layer_info(kitfile, [(kitfile["model"], model), (kitfile["code"][0], code),
                              (kitfile["datasets"][0], dataset), (kitfile["docs"][0], docs)])
    return pusher.push_kit(reference, kitfile, [model, code, dataset, docs],
                           annotations={"ml.kitops.modelkit.cli-version": "1.7.0"})


def write_local(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
