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
import urllib.error
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

    def log_mark(self) -> int:
        """A position in the log; ``blob_bytes_served(since=mark)`` counts after it."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def requests(self, since: int = 0, agent: str | None = None) -> list[tuple[str, str, int]]:
        """(method, uri, bytes written) of every completed request after ``since``; with
        ``agent``, only those whose User-Agent starts with it (``kitfs/``: not a mirror's)."""
        time.sleep(0.2)  # the registry writes its line just after the response
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


KIT = "application/vnd.kitops.modelkit"
KIT_CONFIG = f"{KIT}.config.v1+json"
KIT_MANIFEST_ARTIFACT = f"{KIT}.manifest.v1+json"
KIT_INDEX_ARTIFACT = f"{KIT}.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


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
    digest: str | None = None  # the manifest's digest, when it was pushed by digest

    def index_entry(self, model_metadata: dict[str, Any] | None = None,
                    annotations: dict[str, str] | None = None,
                    platform: dict[str, Any] | None = None) -> dict[str, Any]:
        """This manifest as an entry of a ModelKit index (needs ``by_digest=True`` pushes)."""
        if self.digest is None:
            raise ValueError("push the kit with by_digest=True to put it in an index")
        body = manifest_bytes(self.manifest)
        entry: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": self.digest,
                                 "size": len(body)}
        if "artifactType" in self.manifest:
            entry["artifactType"] = self.manifest["artifactType"]
        if annotations:
            entry["annotations"] = annotations
        if platform:
            entry["platform"] = platform
        if model_metadata:
            entry["modelMetadata"] = model_metadata
        return entry


def manifest_bytes(document: dict[str, Any]) -> bytes:
    """The exact bytes the Pusher PUTs for a manifest or index it pushes by digest or media type."""
    return json.dumps(document, separators=(",", ":")).encode()


def split_reference(reference: str) -> tuple[str, str | None]:
    """``host/repo[:tag][@digest]`` → (repository, digest or tag or None)."""
    path = reference.split("/", 1)[1]
    path, _, digest = path.partition("@")
    repository, colon, tag = path.rpartition(":")
    if not colon or "/" in tag:
        repository, tag = path, ""
    return repository, digest or tag or None


class Pusher:
    """Pushes blobs and manifests to a registry on loopback with oras-py.

    With ``username``/``password`` every request carries HTTP Basic credentials (what a
    registry with htpasswd auth wants); oras-py's basic backend answers a 401 the same way.
    """

    def __init__(self, host: str, username: str | None = None, password: str | None = None) -> None:
        self.host = host
        if username is not None and password is not None:
            self.oras = oras.provider.Registry(hostname=host, insecure=True, auth_backend="basic")
            self.oras.auth.set_basic_auth(username, password)
            self.oras.session.auth = (username, password)
        else:
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

    def push_manifest(self, reference: str, manifest: dict[str, Any],
                      media_type: str | None = None) -> str | None:
        """PUT a manifest at ``reference`` (a tag or a digest).

        Without ``media_type`` oras-py uploads it (image manifests only: it validates the
        schema). With one, the exact ``manifest_bytes`` are PUT with that Content-Type, which
        is how an image index is pushed; the digest of those bytes is returned.
        """
        if media_type is None:
            container = self.oras.get_container(reference)
            self.oras._check_200_response(self.oras.upload_manifest(manifest, container))
            return None
        body = manifest_bytes(manifest)
        repository, ref = split_reference(reference)
        return self.put_manifest(repository, ref or sha256(body), body, media_type)

    def put_manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> str:
        """PUT raw manifest or index bytes at a tag or digest; returns their digest."""
        url = f"{self.oras.prefix}://{self.host}/v2/{repository}/manifests/{reference}"
        response = self.oras.do_request(url, "PUT", data=body, headers={"Content-Type": media_type})
        self.oras._check_200_response(response)
        return sha256(body)

    def push_index(self, reference: str, entries: list[dict[str, Any]], *,
                   artifact_type: str | None = KIT_INDEX_ARTIFACT,
                   annotations: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
        """Push an OCI image index (a ModelKit index by default) of ``entries`` at ``reference``.

        The entries' manifests must already be in the repository (``push_kit(...,
        by_digest=True)`` then ``Push.index_entry``). Returns the index and its digest.
        """
        index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX}
        if artifact_type:
            index["artifactType"] = artifact_type
        index["manifests"] = entries
        if annotations:
            index["annotations"] = annotations
        digest = self.push_manifest(reference, index, OCI_INDEX)
        assert digest is not None
        return index, digest

    def push_kit(self, reference: str, config: dict[str, Any] | bytes, layers: list[Layer], *,
                 config_media_type: str = KIT_CONFIG, artifact_type: str | None = None,
                 annotations: dict[str, str] | None = None, media_type: bool = True,
                 by_digest: bool = False) -> Push:
        """Push the layers, the config and the manifest.

        With ``by_digest`` the manifest is PUT at its own digest (no tag is made; any tag in
        ``reference`` is ignored) and ``Push.digest`` is set: what an index entry needs.
        """
        repository = split_reference(reference)[0]
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
        if by_digest:
            body = manifest_bytes(manifest)
            digest = self.put_manifest(repository, sha256(body), body, OCI_MANIFEST)
            return Push(f"{self.host}/{repository}@{digest}", manifest, config_bytes, layers, digest)
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
