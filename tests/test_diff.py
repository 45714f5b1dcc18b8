"""``kitfs diff A B`` against the real registry (README "Pulling, pinning, offline, diff"):
layers and files added, removed and changed, by size and mode, by content with ``--content``,
and never a byte of a layer the two kits share (the registry's log is the witness)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import pytest

from kitfs.demo import Layer, Pusher, Registry, tar_layer, with_layer_info
from kitfs.format.mediatypes import KIT

MiB = 1024 * 1024
FILEPATH = "org.cncf.model.filepath"


@dataclass
class Versions:
    v1: str
    v2: str
    layers1: dict[str, Layer]
    layers2: dict[str, Layer]


def _push(pusher: Pusher, reference: str, layers: dict[str, Layer], docs: list[str]) -> None:
    kitfile: dict[str, Any] = {
        "manifestVersion": "1.0.0", "package": {"name": "diffed"},
        "model": {"name": "w", "path": "models/w.bin",
                  "parts": [{"name": "tok", "path": "models/tok.json"}]},
        "code": [{"path": "src"}],
        "datasets": [{"name": "d", "path": "data"}],
        "docs": [{"path": path} for path in docs],
    }
    entries = [(kitfile["model"], layers["model"]), (kitfile["model"]["parts"][0], layers["part"]),
               (kitfile["code"][0], layers["code"]), (kitfile["datasets"][0], layers["data"])]
    entries += [(entry, layers[entry["path"]]) for entry in kitfile["docs"]]
    if "prompt" in layers:
        kitfile["prompts"] = [{"name": "p", "path": "prompts/p.md"}]
        entries.append((kitfile["prompts"][0], layers["prompt"]))
    with_layer_info(kitfile, entries)
    pusher.push_kit(reference, kitfile, list(layers.values()))


@pytest.fixture(scope="module")
def versions(registry: Registry, pusher: Pusher) -> Versions:
    code = tar_layer("code", {"src/x.py": b"x = 1\n"}, "src")
    readme = tar_layer("docs", {"README.md": b"# diffed\n"}, "README.md")
    same_size = os.urandom(20 * MiB)
    data1 = {"data/a.csv": b"a\n1\n", "data/b.csv": b"b\n1\n", "data/c.csv": b"c\n",
             "data/e.csv": b"e\n", "data/f.sh": b"echo f\n"}
    data2 = {"data/a.csv": b"a\n1\n", "data/b.csv": b"b\n2\n", "data/d.csv": b"d\n",
             "data/e.csv": b"e\ne\n", "data/f.sh": b"echo f\n"}
    layers1 = {
        "model": tar_layer("model", {"models/w.bin": same_size}, "models/w.bin"),
        "part": Layer(f"{KIT}.modelpart.v1.raw", b'{"v": 1}', {FILEPATH: "models/tok.json"}),
        "code": code, "data": tar_layer("dataset", data1, "data"),
        "README.md": readme,
        "NOTES.md": tar_layer("docs", {"NOTES.md": b"notes\n"}, "NOTES.md"),
    }
    changed = bytearray(same_size)
    changed[13 * MiB] ^= 1  # same size, one bit different
    layers2 = {
        "model": tar_layer("model", {"models/w.bin": bytes(changed)}, "models/w.bin"),
        "part": Layer(f"{KIT}.modelpart.v1.raw", b'{"v": 22}', {FILEPATH: "models/tok.json"}),
        "code": code, "data": tar_layer("dataset", data2, "data", modes={"data/f.sh": 0o755}),
        "README.md": readme,
        "prompt": tar_layer("code", {"prompts/p.md": b"be brief\n"}, "prompts/p.md"),
    }
    layers2["prompt"].annotations["ml.kitops.modelkit.layer-subtype"] = "prompt"
    v1, v2 = f"{registry.host}/team/diffed:v1", f"{registry.host}/team/diffed:v2"
    _push(pusher, v1, layers1, ["README.md", "NOTES.md"])
    _push(pusher, v2, layers2, ["README.md"])
    return Versions(v1, v2, layers1, layers2)


def blob_bytes_by_digest(registry: Registry, mark: int) -> dict[str, int]:
    fetched: dict[str, int] = {}
    for method, uri, written in registry.requests(mark):
        if method == "GET" and "/blobs/" in uri:
            digest = uri.rsplit("/", 1)[1]
            fetched[digest] = fetched.get(digest, 0) + written
    return fetched


def test_diff_names_the_changed_added_and_removed_layers_and_files(
        kitfs: Any, versions: Versions, registry: Registry) -> None:
    mark = registry.log_mark()
    result = json.loads(kitfs("diff", versions.v1, versions.v2, "--json").text)
    l1, l2 = versions.layers1, versions.layers2
    assert result["kitfileChanged"] is True
    assert result["sharedLayers"] == 2  # code and README.md
    assert [(c["change"], c["kind"], c["path"], (c["a"] or {}).get("digest"),
             (c["b"] or {}).get("digest")) for c in result["layers"]] == [
        ("changed", "model", "models/w.bin", l1["model"].digest, l2["model"].digest),
        ("changed", "modelpart", "models/tok.json", l1["part"].digest, l2["part"].digest),
        ("changed", "dataset", "data", l1["data"].digest, l2["data"].digest),
        ("removed", "docs", "NOTES.md", l1["NOTES.md"].digest, None),
        ("added", "prompt", "prompts/p.md", None, l2["prompt"].digest),
    ]
    files = {c["path"]: c for c in result["files"]}
    assert {path: c["change"] for path, c in files.items()} == {
        "NOTES.md": "removed", "data/c.csv": "removed", "data/d.csv": "added",
        "data/e.csv": "changed", "data/f.sh": "changed", "models/tok.json": "changed",
        "prompts/p.md": "added"}  # w.bin and b.csv: same size and mode, not compared
    assert (files["data/e.csv"]["a"]["size"], files["data/e.csv"]["b"]["size"]) == (2, 4)
    assert (files["data/f.sh"]["a"]["mode"], files["data/f.sh"]["b"]["mode"]) == ("0644", "0755")
    # a raw layer is its file: its digest is the content's, known without a read
    assert (files["models/tok.json"]["a"]["digest"], files["models/tok.json"]["b"]["digest"]) == (
        l1["part"].digest, l2["part"].digest)
    fetched = blob_bytes_by_digest(registry, mark)
    assert l1["code"].digest not in fetched and l1["README.md"].digest not in fetched
    assert fetched[l1["model"].digest] <= 8 * MiB  # its headers (first and last chunk) only


def test_diff_with_content_compares_the_bytes_of_same_size_files(
        kitfs: Any, versions: Versions, registry: Registry) -> None:
    mark = registry.log_mark()
    result = json.loads(kitfs("diff", versions.v1, versions.v2, "--content", "--json").text)
    files = {c["path"]: c for c in result["files"]}
    assert files["models/w.bin"]["change"] == files["data/b.csv"]["change"] == "changed"
    assert files["models/w.bin"]["a"]["digest"] != files["models/w.bin"]["b"]["digest"]
    assert files["models/w.bin"]["a"]["size"] == files["models/w.bin"]["b"]["size"]
    assert "data/a.csv" not in files  # same bytes
    fetched = blob_bytes_by_digest(registry, mark)
    shared = {versions.layers1["code"].digest, versions.layers1["README.md"].digest}
    assert not shared & set(fetched)


def test_diff_prints_one_line_per_change(kitfs: Any, versions: Versions) -> None:
    lines = kitfs("diff", versions.v1, versions.v2).text.splitlines()
    l1, l2 = versions.layers1, versions.layers2
    assert lines[0].startswith(f"--- {versions.v1}@sha256:")
    assert lines[1].startswith(f"+++ {versions.v2}@sha256:")
    assert lines[2:] == [
        "M Kitfile",
        f"M layer model models/w.bin {l1['model'].digest} ({len(l1['model'].data)} bytes) -> "
        f"{l2['model'].digest} ({len(l2['model'].data)} bytes)",
        f"M layer modelpart models/tok.json {l1['part'].digest} (8 bytes) -> {l2['part'].digest} "
        "(9 bytes)",
        f"M layer dataset data {l1['data'].digest} ({len(l1['data'].data)} bytes) -> "
        f"{l2['data'].digest} ({len(l2['data'].data)} bytes)",
        f"D layer docs NOTES.md {l1['NOTES.md'].digest} ({len(l1['NOTES.md'].data)} bytes)",
        f"A layer prompt prompts/p.md {l2['prompt'].digest} ({len(l2['prompt'].data)} bytes)",
        "D NOTES.md (6 bytes)",
        "D data/c.csv (2 bytes)",
        "A data/d.csv (2 bytes)",
        "M data/e.csv (size 2 -> 4)",
        "M data/f.sh (mode 0644 -> 0755)",
        f"M models/tok.json (size 8 -> 9, content {l1['part'].digest} -> {l2['part'].digest})",
        "A prompts/p.md (9 bytes)",
        "2 layers shared (not read)",
    ]


def test_a_kit_against_itself_reads_no_layer(kitfs: Any, versions: Versions,
                                             registry: Registry) -> None:
    mark = registry.log_mark()
    lines = kitfs("diff", versions.v2, versions.v2).text.splitlines()
    assert lines[2:] == ["6 layers shared (not read)"]
    fetched = blob_bytes_by_digest(registry, mark)
    assert not {layer.digest for layer in versions.layers2.values()} & set(fetched)
