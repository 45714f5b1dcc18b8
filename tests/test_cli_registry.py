"""kitfs ls / cat / inspect / cache against the real distribution registry on loopback.

Each test drives the ``kitfs`` command line as a user would and checks what the user sees,
and, for laziness, what the registry's own log says it served.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from kitfs.demo import Layer, Pusher, Registry, kit_tar, sample_kit, sha256, tar_layer, with_layer_info
from kitfs.format.mediatypes import KIT
from tests.kitfs_cli import run_kitfs

WEIGHTS = os.urandom(24 * 1024 * 1024 + 4321)  # bigger than several 4 MiB chunks


@pytest.fixture(scope="module")
def sample(registry: Registry, pusher: Pusher) -> str:
    reference = f"{registry.host}/team/sample:v1"
    sample_kit(pusher, reference, WEIGHTS)
    return reference


def ls_json(kitfs: Any, reference: str) -> dict[str, dict[str, Any]]:
    return {e["path"]: e for e in json.loads(kitfs("ls", "--json", reference).text)}


def test_ls_shows_the_tree_kit_unpack_writes(kitfs: Any, sample: str) -> None:
    entries = ls_json(kitfs, sample)
    assert entries["Kitfile"]["type"] == "file"
    assert entries["models/weights.safetensors"] == {
        "path": "models/weights.safetensors", "type": "file", "mode": "0644", "size": len(WEIGHTS)}
    assert entries["data/train"]["type"] == "directory"
    assert entries["src/util/io.py"]["size"] == len(b"def load():\n    pass\n")
    assert sorted(p for p in entries if p.startswith("data/train/")) == [
        f"data/train/part-{i:03d}.csv" for i in range(20)]
    assert set(entries) >= {"README.md", "src", "src/train.py", "models", "data"}


def test_options_may_follow_positionals_and_plain_listing(kitfs: Any, sample: str) -> None:
    text = kitfs("ls", sample, "src", "--json").text
    assert {e["path"] for e in json.loads(text)} == {"src", "src/train.py", "src/util",
                                                        "src/util/io.py"}
    plain = kitfs("ls", sample).text
    assert "-rw-r--r--" in plain and "models/weights.safetensors" in plain


def test_kitfile_is_rendered_as_kit_unpack_writes_it(kitfs: Any, sample: str) -> None:
    assert kitfs("cat", sample, "Kitfile").text == (
        "manifestVersion: 1.0.0\n"
        "package:\n  name: sample\n  version: 1.0.0\n  authors: [kitfs]\n"
        "model:\n  name: sample-model\n  path: models/weights.safetensors\n"
        "  format: safetensors\n"
        "code:\n  - path: src\n    description: training code\n"
        "datasets:\n  - name: train\n    path: data/train\n"
        "docs:\n  - path: README.md\n"
    )


def test_cat_returns_exact_bytes(kitfs: Any, sample: str) -> None:
    assert kitfs("cat", sample, "models/weights.safetensors").stdout == WEIGHTS
    assert kitfs("cat", sample, "data/train/part-007.csv").stdout == b"id,value\n7,49\n"


def test_reading_a_small_file_fetches_only_the_chunks_it_needs(
    kitfs: Any, sample: str, registry: Registry
) -> None:
    mark = registry.log_mark()
    assert kitfs("cat", sample, "data/train/part-001.csv").stdout == b"id,value\n1,1\n"
    served = registry.blob_bytes_served(mark)
    # the index of the 24 MiB model layer costs its first and last chunk (4 MiB each, at most);
    # the small layers are read whole; the weights themselves are not fetched.
    assert served <= 8 * 1024 * 1024 + 64 * 1024, served
    assert served < len(WEIGHTS) // 2


def test_second_listing_makes_no_blob_request(kitfs: Any, sample: str, registry: Registry) -> None:
    kitfs("ls", sample)
    mark = registry.log_mark()
    kitfs("ls", sample)
    assert registry.blob_requests(mark) == 0


def test_references_by_digest_and_tag_at_digest(kitfs: Any, sample: str) -> None:
    info = json.loads(kitfs("inspect", "--json", sample).text)
    digest = info["digest"]
    repo = sample.rsplit(":", 1)[0]
    for ref in (f"{repo}@{digest}", f"{sample}@{digest}"):
        assert "models/weights.safetensors" in kitfs("ls", ref).text
    assert info["format"] == "kitops"
    assert [layer["kind"] for layer in info["layers"]] == ["model", "code", "dataset", "docs"]


@pytest.mark.parametrize(
    ("reference", "code", "message"),
    [
        ("not a reference", 64, "invalid reference"),
        ("127.0.0.1:1/UPPER/case:v1", 64, "bad repository"),
        ("127.0.0.1:1/repo:bad tag", 64, "invalid reference"),
    ],
)
def test_malformed_references_give_a_clear_error(kitfs: Any, reference: str, code: int,
                                                  message: str) -> None:
    result = kitfs("ls", reference, check=False)
    assert result.returncode == code
    assert message in result.stderr and "Traceback" not in result.stderr


def test_unknown_tag_and_repository(kitfs: Any, sample: str, registry: Registry) -> None:
    for ref in (sample.rsplit(":", 1)[0] + ":nope", f"{registry.host}/no/such:v1"):
        result = kitfs("ls", ref, check=False)
        assert result.returncode == 66, result.stderr
        assert "not found" in result.stderr and "Traceback" not in result.stderr


def test_dead_registry_fails_within_the_timeout(kitfs: Any) -> None:
    from kitfs.demo import free_port

    result = kitfs("ls", "--timeout", "2", f"127.0.0.1:{free_port()}/x/y:v1", check=False)
    assert result.returncode == 69
    assert "no answer within 2 s" in result.stderr


# --- verification ---------------------------------------------------------------------------


def _tampered_kit(registry: Registry, pusher: Pusher, name: str) -> tuple[str, bytes, Layer]:
    weights = os.urandom(6 * 1024 * 1024)
    reference = f"{registry.host}/team/{name}:v1"
    push = sample_kit(pusher, reference, weights)
    model = push.layers[0]
    registry.flip_stored_byte(model.digest, 2048)  # inside the weights file, after its tar header
    return reference, weights, model


def test_full_read_of_a_tampered_file_fails(kitfs: Any, registry: Registry, pusher: Pusher) -> None:
    reference, _, model = _tampered_kit(registry, pusher, "tampered-eventual")
    result = kitfs("cat", reference, "models/weights.safetensors", check=False)
    assert result.returncode == 65
    assert "failed verification" in result.stderr and model.digest in result.stderr
    # every later read of that layer fails too, and inspect says so
    again = kitfs("cat", reference, "models/weights.safetensors", check=False)
    assert again.returncode == 65
    layers = json.loads(kitfs("inspect", "--json", reference).text)["layers"]
    assert layers[0]["verification"] == "FAILED"
    # other layers are unaffected
    assert kitfs("cat", reference, "data/train/part-002.csv").stdout == b"id,value\n2,4\n"


def test_strict_mode_returns_no_unverified_byte(kitfs: Any, registry: Registry,
                                                pusher: Pusher) -> None:
    reference, _, _ = _tampered_kit(registry, pusher, "tampered-strict")
    # A small read far from the flipped byte: eventual mode would serve it; strict must not.
    result = kitfs("cat", "--verify", "strict", reference, "models/weights.safetensors",
                   check=False)
    assert result.returncode == 65 and result.stdout == b""


def test_verified_layer_shows_verified(kitfs: Any, sample: str) -> None:
    kitfs("cat", sample, "models/weights.safetensors")
    layers = json.loads(kitfs("inspect", "--json", sample).text)["layers"]
    assert layers[0]["verification"] == "verified"


# --- format variants ------------------------------------------------------------------------


def _files() -> dict[str, bytes]:
    return {"models/m.bin": os.urandom(300_000), "models/cfg.json": b'{"a": 1}\n'}


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_layers_read_correctly(kitfs: Any, registry: Registry, pusher: Pusher,
                                          compression: str) -> None:
    files = _files()
    layer = tar_layer("model", files, "models", compression)
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0", "package": {},
                               "model": {"path": "models"}}
    with_layer_info(kitfile, [(kitfile["model"], layer)])
    reference = f"{registry.host}/variants/{compression}:v1"
    pusher.push_kit(reference, kitfile, [layer])
    assert kitfs("cat", reference, "models/m.bin").stdout == files["models/m.bin"]
    entries = ls_json(kitfs, reference)
    assert entries["models/cfg.json"]["size"] == len(files["models/cfg.json"])


def test_legacy_kit_without_digests_uses_parent_relative_names(
    kitfs: Any, registry: Registry, pusher: Pusher
) -> None:
    data = {"data/train.csv": b"a,b\n1,2\n"}
    raw = kit_tar(data, "data/train.csv", legacy=True)
    with tarfile.open(fileobj=__import__("io").BytesIO(raw)) as tar:
        assert tar.getnames() == ["train.csv"]  # as kit < 0.5 stored it
    layer = Layer(f"{KIT}.dataset.v1.tar+gzip", gzip.compress(raw, mtime=0))
    kitfile = {"manifestVersion": "1.0.0", "package": {"name": "old"},
               "datasets": [{"name": "train", "path": "data/train.csv"}]}
    reference = f"{registry.host}/variants/legacy:v1"
    pusher.push_kit(reference, kitfile, [layer], media_type=False)
    assert kitfs("cat", reference, "data/train.csv").stdout == b"a,b\n1,2\n"


def test_raw_layers_and_duplicate_digests(kitfs: Any, registry: Registry, pusher: Pusher) -> None:
    init = b"# package\n"
    layers = [
        Layer(f"{KIT}.code.v1.raw", init, {"org.cncf.model.filepath": "pkg_a/__init__.py"}),
        Layer(f"{KIT}.code.v1.raw", init, {"org.cncf.model.filepath": "pkg_b/__init__.py"}),
        Layer(f"{KIT}.model.v1.raw", b"weights", {
            "org.cncf.model.filepath": "model.gguf",
            "org.cncf.model.file.metadata+json": json.dumps({"name": "model.gguf", "mode": 0o755}),
        }),
    ]
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0", "package": {},
                               "model": {"path": "model.gguf"},
                               "code": [{"path": "pkg_a/__init__.py"}, {"path": "pkg_b/__init__.py"}]}
    with_layer_info(kitfile, [(kitfile["code"][0], layers[0]), (kitfile["code"][1], layers[1]),
                              (kitfile["model"], layers[2])])
    reference = f"{registry.host}/variants/raw:v1"
    pusher.push_kit(reference, kitfile, layers)
    entries = ls_json(kitfs, reference)
    assert entries["pkg_a/__init__.py"]["size"] == entries["pkg_b/__init__.py"]["size"] == len(init)
    assert entries["model.gguf"]["mode"] == "0755"
    assert kitfs("cat", reference, "pkg_b/__init__.py").stdout == init


def test_modelpack_without_kitfile(kitfs: Any, registry: Registry, pusher: Pusher) -> None:
    weight = kit_tar({"weights/model.safetensors": b"tensor-bytes"}, "weights/model.safetensors")
    layer = Layer("application/vnd.cncf.model.weight.v1.tar", weight,
                  {"org.cncf.model.filepath": "weights/model.safetensors"})
    config = {"descriptor": {"name": "mp"}, "config": {"format": "safetensors"},
              "modelfs": {"type": "layers", "diffIds": [sha256(weight)]}}
    reference = f"{registry.host}/variants/modelpack:v1"
    pusher.push_kit(reference, config, [layer],
                    config_media_type="application/vnd.cncf.model.config.v1+json",
                    artifact_type="application/vnd.cncf.model.manifest.v1+json")
    entries = ls_json(kitfs, reference)
    assert "Kitfile" not in entries
    assert kitfs("cat", reference, "weights/model.safetensors").stdout == b"tensor-bytes"


@pytest.mark.parametrize(
    ("member", "what"),
    [
        (lambda: _link("evil", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
        (lambda: _link("hard", tarfile.LNKTYPE, "src/a.py"), "hard link"),
        (lambda: _link("../escape", tarfile.REGTYPE, ""), "leaves the kit"),
        (lambda: _link("/abs", tarfile.REGTYPE, ""), "absolute path"),
        (lambda: _link("fifo", tarfile.FIFOTYPE, ""), "FIFO"),
    ],
)
def test_hostile_tar_entries_are_refused(kitfs: Any, registry: Registry, pusher: Pusher,
                                         member: Any, what: str) -> None:
    info = member()
    raw = kit_tar({"src/a.py": b"x"}, "src", extra=[info])
    layer = Layer(f"{KIT}.code.v1.tar", raw)
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0", "package": {}, "code": [{"path": "src"}]}
    with_layer_info(kitfile, [(kitfile["code"][0], layer)])
    reference = f"{registry.host}/hostile/tar:{abs(hash(what)) % 10**8}"
    pusher.push_kit(reference, kitfile, [layer])
    result = kitfs("ls", reference, check=False)
    assert result.returncode == 65, result.stderr
    assert what in result.stderr and layer.digest in result.stderr
    assert info.name.lstrip("/") in result.stderr


def _link(name: str, kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, target, 0o644
    return info


# --- the cache ------------------------------------------------------------------------------


def test_cache_commands(kitfs: Any, sample: str, cache_dir: Path) -> None:
    kitfs("cat", sample, "models/weights.safetensors")
    stats = json.loads(kitfs("cache", "stats", "--json").text)
    assert stats["used_bytes"] >= len(WEIGHTS)
    assert stats["verified_blobs"] >= 1
    assert oct(cache_dir.stat().st_mode & 0o777) == "0o700"
    assert "0 dropped" in kitfs("cache", "verify").text
    # corrupt one chunk file at rest: verify drops it, and the next read refetches correctly
    chunk = next(p for p in (cache_dir / "chunks").rglob("*") if p.is_file() and p.name == "1")
    data = bytearray(chunk.read_bytes())
    data[10] ^= 1
    chunk.write_bytes(bytes(data))
    assert kitfs("cache", "verify", check=False).returncode == 1
    assert kitfs("cat", sample, "models/weights.safetensors").stdout == WEIGHTS
    kitfs("cache", "gc", "--cache-size", "1M")
    assert json.loads(kitfs("cache", "stats", "--json").text)["used_bytes"] <= 1024 * 1024
    kitfs("cache", "clear")
    assert json.loads(kitfs("cache", "stats", "--json").text)["chunk_count"] == 0


def test_quota_is_respected_while_reading(kitfs: Any, sample: str) -> None:
    out = kitfs("cat", "--cache-size", "8M", sample, "models/weights.safetensors").stdout
    assert out == WEIGHTS
    assert json.loads(kitfs("cache", "stats", "--json").text)["used_bytes"] <= 8 * 1024 * 1024


def test_index_jumps_over_big_bodies_and_reads_dense_headers_once(
    kitfs: Any, registry: Registry, pusher: Pusher
) -> None:
    mib = 1024 * 1024
    big = {f"data/big-{i}.bin": os.urandom(20 * mib) for i in range(3)}
    sparse = tar_layer("dataset", {**big, "data/small.txt": b"small\n"}, "data")
    dense_files = {f"more/d{i // 1000}/f{i}.txt": os.urandom(1500) for i in range(12_000)}
    dense = tar_layer("dataset", dense_files, "more")
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0", "datasets": [
        {"name": "sparse", "path": "data"}, {"name": "dense", "path": "more"}]}
    with_layer_info(kitfile, [(kitfile["datasets"][0], sparse), (kitfile["datasets"][1], dense)])
    reference = f"{registry.host}/team/index-shapes:v1"
    pusher.push_kit(reference, kitfile, [sparse, dense])

    mark = registry.log_mark()
    listing = ls_json(kitfs, f"{reference}")
    assert listing["data/small.txt"]["size"] == 6
    assert sum(1 for p in listing if p.startswith("more/d")) == 12_000 + 12
    by_blob: dict[str, int] = {}
    for method, uri, written in registry.requests(mark):
        if method == "GET" and "/blobs/" in uri:
            digest = uri.rsplit("/", 1)[1]
            by_blob[digest] = by_blob.get(digest, 0) + written
    # one 4 MiB chunk per big file's header (and the end of the archive), not the 60 MiB bodies
    assert by_blob[sparse.digest] <= 5 * 4 * mib, by_blob[sparse.digest]
    # every header of the dense layer is read, each chunk once
    assert by_blob[dense.digest] == len(dense.data)


def test_a_full_cache_disk_serves_uncached_with_a_warning(
    sample: str, registry: Registry, tmp_path: Path
) -> None:
    small = tmp_path / "small-disk"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)], check=True)
    try:
        env = dict(os.environ, KITFS_CACHE_DIR=str(small / "cache"))
        done = run_kitfs("cat", sample, "models/weights.safetensors", env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout == WEIGHTS
        stderr = done.stderr
        assert "WARNING" in stderr and "Traceback" not in stderr
        assert stderr.count("WARNING") == 1, stderr  # one warning, not one per chunk
        verify = run_kitfs("cache", "verify", env=env, timeout_s=60)
        assert verify.returncode == 0, verify.text + verify.stderr
    finally:
        subprocess.run(["umount", str(small)], check=True)
