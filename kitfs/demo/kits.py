"""ModelKits written the way ``kit pack`` writes them, pushed with oras-py; the demo's sample kit.

``kit pack`` (v0.5+) walks the context directory in lexical order and writes, per Kitfile
entry, a tar whose names are context-relative, with every ancestor directory as its own entry
(no trailing slash), uid 1000, gid 0, empty user/group names and mtime 0, using PAX records only
where USTAR cannot hold a name or size. The config is the Kitfile as JSON with ``digest`` and
``diffId`` added to every entry. The builders here reproduce that, plus the older and foreign
variants (legacy parent-relative tars, gzip, zstd, raw, ModelPack, duplicate digests).
Media types come from ``kitfs.format.mediatypes``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import posixpath
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Any

import oras.provider
import zstandard

from kitfs.format.mediatypes import KIT, KIT_CONFIG, KIT_INDEX_ARTIFACT, OCI_INDEX, OCI_MANIFEST


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


@dataclass
class Entry:
    """One Kitfile entry and the layer that holds it (none: a model that names another kit)."""

    section: str  # model; parts (the model's); datasets, code, docs, prompts, mcpServers
    fields: dict[str, Any]
    layer: Layer | None = None


def kitfile_of(entries: list[Entry], package: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Kitfile of ``entries`` (in their order), with digests as kit pack records them."""
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0"}
    if package is not None:
        kitfile["package"] = package
    placed = []
    for entry in entries:
        fields = dict(entry.fields)
        if entry.section == "model":
            kitfile["model"] = fields
        elif entry.section == "parts":
            kitfile["model"].setdefault("parts", []).append(fields)
        else:
            kitfile.setdefault(entry.section, []).append(fields)
        if entry.layer is not None:
            placed.append((fields, entry.layer))
    return with_layer_info(kitfile, placed)


def push_entries(pusher: Pusher, reference: str, entries: list[Entry], *,
                 package: dict[str, Any] | None = None, layers: list[Layer] | None = None,
                 **push: Any) -> Push:
    """Push a kit of ``entries``: its Kitfile, and their layers in that order (or ``layers``).
    ``push``: the rest of ``Pusher.push_kit``'s options."""
    return pusher.push_kit(reference, kitfile_of(entries, package),
                           [e.layer for e in entries if e.layer] if layers is None else layers,
                           **push)


def sample_kit(pusher: Pusher, reference: str, weights: bytes, compression: str = "none") -> Push:
    """The sample ModelKit: weights, a dataset directory, code and docs."""
    data_files = {f"data/train/part-{i:03d}.csv": f"id,value\n{i},{i * i}\n".encode()
                  for i in range(20)}
    code = {"src/train.py": b"print('train')\n", "src/util/io.py": b"def load():\n    pass\n"}
    return push_entries(pusher, reference, [
        Entry("model", {"name": "sample-model", "path": "models/weights.safetensors",
                        "format": "safetensors"},
              tar_layer("model", {"models/weights.safetensors": weights},
                        "models/weights.safetensors", compression)),
        Entry("code", {"path": "src", "description": "training code"},
              tar_layer("code", code, "src", compression)),
        Entry("datasets", {"name": "train", "path": "data/train"},
              tar_layer("dataset", data_files, "data/train", compression)),
        Entry("docs", {"path": "README.md"},
              tar_layer("docs", {"README.md": b"# Sample kit\n"}, "README.md", compression)),
    ], package={"name": "sample", "version": "1.0.0", "authors": ["kitfs"]},
        annotations={"ml.kitops.modelkit.cli-version": "1.7.0"})
