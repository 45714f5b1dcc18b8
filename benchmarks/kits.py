"""The generated ModelKit the benchmarks read, written to disk and pushed to the registry.

One kit, ``bench/kit:v1``, laid out as ``kit pack`` lays one out (tar layers with
context-relative names and their ancestor directories, uid 1000, mtime 0; the config is the
Kitfile as JSON with digest and diffId per entry):

- ``models/model.safetensors``: the model layer, one big file (4 GiB of float32 tensors of
  random bytes, 16 MiB each): a real safetensors file, so ``safe_open`` can load it;
- ``parts/part-N.bin`` (N = 0..3): four model-part tar layers of one random file each, for the
  concurrent readers;
- ``parts/raw.bin``: a raw model-part layer (the blob is the file);
- ``data/files``: a dataset layer of many small files (1–4 KiB) in a few hundred directories;
- ``data/text``: a gzip dataset layer of hex text files (compressible, so gzip matters).

Every generated file is kept under DATA_DIR as the "local copy" the limits are measured on;
big blobs are pushed with curl from files (monolithic PUT), never held in memory.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import shutil
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from common import MiB, log, run_quiet

from kitfs.demo import Pusher, manifest_bytes
from kitfs.format.mediatypes import KIT, KIT_CONFIG, OCI_MANIFEST

CREATED = "2026-01-01T00:00:00Z"
SEED = 20261126


@dataclass
class Sizes:
    """How big each generated piece is (``--quick`` shrinks all of them)."""

    model_bytes: int = 4 << 30
    tensor_bytes: int = 16 * MiB
    part_bytes: int = 256 * MiB
    parts: int = 4
    raw_bytes: int = 256 * MiB
    dataset_files: int = 100_000
    dataset_dirs: int = 400
    text_files: int = 16
    text_file_bytes: int = 28 * MiB  # hex text; gzip -6 makes it ~ 0.55 of that

    @classmethod
    def quick(cls) -> Sizes:
        return cls(model_bytes=256 * MiB, tensor_bytes=4 * MiB, part_bytes=16 * MiB,
                   raw_bytes=32 * MiB, dataset_files=5_000, dataset_dirs=50, text_files=4,
                   text_file_bytes=4 * MiB)


@dataclass
class Blob:
    """One layer blob on disk, as pushed."""

    path: Path
    media_type: str
    digest: str
    size_bytes: int
    diff_id: str
    annotations: dict[str, str] = field(default_factory=dict)

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                             "size": self.size_bytes}
        if self.annotations:
            d["annotations"] = self.annotations
        return d


@dataclass
class Kit:
    """What was pushed, where the local copies are, and the paths inside the mount."""

    reference: str
    repository: str
    host: str
    model: Blob
    parts: list[Blob]
    raw: Blob
    dataset: Blob
    text: Blob
    local: dict[str, Path]  # local copies: model, part-N, raw, dataset dir, text dir
    model_path: str = "models/model.safetensors"
    raw_path: str = "parts/raw.bin"
    dataset_path: str = "data/files"
    text_path: str = "data/text"
    text_names: list[str] = field(default_factory=list)
    dataset_entries: int = 0

    def blob_url(self, blob: Blob) -> str:
        return f"http://{self.host}/v2/{self.repository}/blobs/{blob.digest}"

    def part_path(self, i: int) -> str:
        return f"parts/part-{i}.bin"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _random_file(path: Path, size_bytes: int, rng: np.random.Generator) -> None:
    with open(path, "wb") as f:
        left = size_bytes
        while left:
            n = min(left, 16 * MiB)
            f.write(rng.bytes(n))
            left -= n


def write_safetensors(path: Path, size_bytes: int, tensor_bytes: int, rng: np.random.Generator) -> int:
    """A safetensors file of float32 tensors (random bytes) adding up to ``size_bytes``."""
    count = size_bytes // tensor_bytes
    side = int((tensor_bytes // 4) ** 0.5)
    shape = [side, tensor_bytes // 4 // side]
    header: dict[str, Any] = {"__metadata__": {"format": "np", "generator": "kitfs benchmarks"}}
    for i in range(count):
        header[f"layers.{i:04d}.weight"] = {"dtype": "F32", "shape": shape,
                                            "data_offsets": [i * tensor_bytes, (i + 1) * tensor_bytes]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for _ in range(count):
            f.write(rng.bytes(tensor_bytes))
    return count


def _tar_info(name: str, size_bytes: int | None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.uid, info.gid, info.uname, info.gname, info.mtime = 1000, 0, "", "", 0
    if size_bytes is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.size, info.mode = size_bytes, 0o644
    return info


def _ancestors(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def tar_files(tar_path: Path, members: list[tuple[str, Path]], *, compress: bool = False) -> None:
    """A kit-pack style tar of local files (``members``: name in the tar → file), optionally gzip."""
    with open(tar_path, "wb") as raw, contextlib.ExitStack() as stack:
        fileobj: Any = raw
        if compress:
            fileobj = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6))
        with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tar:
            written: set[str] = set()
            for name, path in sorted(members):
                for parent in _ancestors(name):
                    if parent not in written:
                        tar.addfile(_tar_info(parent, None))
                        written.add(parent)
                with open(path, "rb") as f:
                    tar.addfile(_tar_info(name, path.stat().st_size), f)


def _dataset_tar(tar_path: Path, local_dir: Path, sizes: Sizes, rng: np.random.Generator) -> int:
    """The small-files dataset: written as a tar straight from memory, then extracted once with
    ``tar -x`` for the local copy. Returns the number of entries (files and directories)."""
    per_dir = -(-sizes.dataset_files // sizes.dataset_dirs)
    file_sizes = rng.integers(1024, 4097, size=sizes.dataset_files)
    entries = 0
    with tarfile.open(tar_path, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_tar_info("data", None))
        tar.addfile(_tar_info("data/files", None))
        entries += 1  # data/files itself (find lists it)
        for d in range(sizes.dataset_dirs):
            first = d * per_dir
            last = min(sizes.dataset_files, first + per_dir)
            if first >= last:
                break
            directory = f"data/files/d{d:03d}"
            tar.addfile(_tar_info(directory, None))
            entries += 1
            for i in range(first, last):
                size = int(file_sizes[i])
                data = rng.bytes(size)
                tar.addfile(_tar_info(f"{directory}/f{i:06d}.bin", size), io.BytesIO(data))
                entries += 1
    local_dir.mkdir(parents=True, exist_ok=True)
    run_quiet(["tar", "-xf", str(tar_path), "-C", str(local_dir)])
    return entries


def _text_files(directory: Path, sizes: Sizes, rng: np.random.Generator) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(sizes.text_files):
        name = f"shard-{i:03d}.txt"
        with open(directory / name, "wb") as f:
            left = sizes.text_file_bytes
            while left:
                n = min(left, 8 * MiB)
                f.write(rng.bytes(n // 2).hex().encode()[:n])
                left -= n
        names.append(name)
    return names


def _diff_id_of_gzip(path: Path) -> str:
    digest = hashlib.sha256()
    decompressor = zlib.decompressobj(wbits=31)
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            digest.update(decompressor.decompress(chunk))
    digest.update(decompressor.flush())
    return "sha256:" + digest.hexdigest()


def _blob(path: Path, media_type: str, annotations: dict[str, str] | None = None,
          diff_id: str | None = None) -> Blob:
    digest = _sha256_file(path)
    return Blob(path, media_type, digest, path.stat().st_size, diff_id or digest, annotations or {})


def push_blob_file(host: str, repository: str, blob: Blob) -> None:
    """POST an upload session, then one monolithic PUT of the file with curl (fast, no RAM)."""
    request = urllib.request.Request(f"http://{host}/v2/{repository}/blobs/uploads/", method="POST",
                                     data=b"")
    with urllib.request.urlopen(request, timeout=30) as response:
        location = response.headers["Location"]
    if location.startswith("/"):
        location = f"http://{host}{location}"
    separator = "&" if "?" in location else "?"
    run_quiet(["curl", "-sSf", "-X", "PUT", "-H", "Content-Type: application/octet-stream",
               "--upload-file", str(blob.path), f"{location}{separator}digest={blob.digest}"])


def build_and_push(host: str, data_dir: Path, sizes: Sizes) -> Kit:
    """Generate every file under ``data_dir``, build the layers, push the kit; return it.

    Layer tars are deleted once pushed (the registry holds them); the local copies stay.
    """
    rng = np.random.default_rng(SEED)
    local = data_dir / "local"
    blobs_dir = data_dir / "blobs"
    local.mkdir(parents=True, exist_ok=True)
    blobs_dir.mkdir(parents=True, exist_ok=True)
    repository = "bench/kit"

    log(f"generating a {sizes.model_bytes / MiB:.0f} MiB safetensors model")
    model_file = local / "model.safetensors"
    write_safetensors(model_file, sizes.model_bytes, sizes.tensor_bytes, rng)
    tar_files(blobs_dir / "model.tar", [("models/model.safetensors", model_file)])
    model = _blob(blobs_dir / "model.tar", f"{KIT}.model.v1.tar")

    log(f"generating {sizes.parts} parts of {sizes.part_bytes / MiB:.0f} MiB and a raw layer")
    parts = []
    local_parts = {}
    for i in range(sizes.parts):
        part_file = local / f"part-{i}.bin"
        _random_file(part_file, sizes.part_bytes, rng)
        local_parts[f"part-{i}"] = part_file
        tar_files(blobs_dir / f"part-{i}.tar", [(f"parts/part-{i}.bin", part_file)])
        parts.append(_blob(blobs_dir / f"part-{i}.tar", f"{KIT}.modelpart.v1.tar"))
    raw_file = local / "raw.bin"
    _random_file(raw_file, sizes.raw_bytes, rng)
    shutil.copyfile(raw_file, blobs_dir / "raw.blob")
    raw = _blob(blobs_dir / "raw.blob", f"{KIT}.modelpart.v1.raw",
                {"org.cncf.model.filepath": "parts/raw.bin"})

    log(f"generating the dataset of {sizes.dataset_files} small files")
    dataset_local = local / "dataset"
    entries = _dataset_tar(blobs_dir / "dataset.tar", dataset_local, sizes, rng)
    dataset = _blob(blobs_dir / "dataset.tar", f"{KIT}.dataset.v1.tar")

    log("generating the gzip text layer")
    text_local = local / "text"
    names = _text_files(text_local / "data" / "text", sizes, rng)
    tar_files(blobs_dir / "text.tar.gz",
              [(f"data/text/{n}", text_local / "data" / "text" / n) for n in names], compress=True)
    text = _blob(blobs_dir / "text.tar.gz", f"{KIT}.dataset.v1.tar+gzip",
                 diff_id=_diff_id_of_gzip(blobs_dir / "text.tar.gz"))

    kitfile: dict[str, Any] = {
        "manifestVersion": "1.0.0",
        "package": {"name": "bench", "version": "1.0.0", "authors": ["kitfs benchmarks"]},
        "model": {"name": "bench-model", "path": "models/model.safetensors", "format": "safetensors",
                  "parts": [{"path": f"parts/part-{i}.bin"} for i in range(sizes.parts)]
                  + [{"path": "parts/raw.bin"}]},
        "datasets": [{"name": "files", "path": "data/files"}, {"name": "text", "path": "data/text"}],
    }
    entries_layers = [(kitfile["model"], model)]
    entries_layers += list(zip(kitfile["model"]["parts"], [*parts, raw], strict=True))
    entries_layers += list(zip(kitfile["datasets"], [dataset, text], strict=True))
    for entry, blob in entries_layers:
        entry["digest"], entry["diffId"] = blob.digest, blob.diff_id

    layers = [model, *parts, raw, dataset, text]
    log(f"pushing {sum(b.size_bytes for b in layers) / MiB:.0f} MiB to {host}")
    for blob in layers:
        push_blob_file(host, repository, blob)
    pusher = Pusher(host)
    config = json.dumps(kitfile, separators=(",", ":")).encode()
    pusher.push_blob(repository, config, KIT_CONFIG)
    manifest: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": KIT_CONFIG, "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                   "size": len(config)},
        "layers": [b.descriptor() for b in layers],
        "annotations": {"org.opencontainers.image.created": CREATED},
    }
    pusher.put_manifest(repository, "v1", manifest_bytes(manifest), OCI_MANIFEST)
    reference = f"{host}/{repository}:v1"
    for blob in layers:  # the registry has them now; keep only the local copies
        blob.path.unlink()
    local_copies = {"model": model_file, "raw": raw_file, "dataset": dataset_local / "data" / "files",
                    "text": text_local / "data" / "text", **local_parts}
    log(f"pushed {reference}")
    return Kit(reference, repository, host, model, parts, raw, dataset, text, local_copies,
               text_names=names, dataset_entries=entries)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)

