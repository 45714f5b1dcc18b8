"""``--filter`` on ``kitfs mount`` and ``kitfs pull``, against a kit with a part of every kind
(README "Pulling, pinning, offline, diff"): only the selected parts appear on a mount, the
rest is ENOENT, the Kitfile only when asked for; a pull fetches just the selected layers,
each whole (the registry's log is the witness)."""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from kitfs.demo import Pusher, Registry, tar_layer, with_layer_info
from tests.kits import ALL_FILES, FILTERS, EveryPartKit, push_every_part_kit
from tests.mounts import Mounter


@pytest.fixture(scope="module")
def every(registry: Registry, pusher: Pusher) -> EveryPartKit:
    return push_every_part_kit(pusher, f"{registry.host}/team/every-part:v1")


def files_on(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()}


def layer_digests_fetched(registry: Registry, mark: int, config: str) -> dict[str, int]:
    """Blob digest -> bytes the registry served for it since ``mark`` (the config left out)."""
    fetched: dict[str, int] = {}
    for method, uri, written in registry.requests(mark):
        if method == "GET" and "/blobs/" in uri:
            digest = uri.rsplit("/", 1)[1]
            if digest != config:
                fetched[digest] = fetched.get(digest, 0) + written
    return fetched


@pytest.mark.parametrize("kit_filter", sorted(FILTERS))
def test_a_filtered_mount_shows_only_the_selected_parts(
        mounter: Mounter, every: EveryPartKit, registry: Registry, kit_filter: str) -> None:
    mark = registry.log_mark()
    mount = mounter.mount(every.reference, "--filter", kit_filter)
    expected = FILTERS[kit_filter]
    assert files_on(mount.path) == expected
    for path in expected - {"Kitfile"}:
        assert (mount.path / path).read_bytes() == ALL_FILES[path], path
    for path in set(ALL_FILES) - expected:
        with pytest.raises(FileNotFoundError) as caught:
            os.stat(mount.path / path)
        assert caught.value.errno == errno.ENOENT
    if "Kitfile" not in expected:
        assert not (mount.path / "Kitfile").exists()
    # listing and reading everything shown touched no layer the filter left out
    config = every.push.manifest["config"]["digest"]
    assert set(layer_digests_fetched(registry, mark, config)) <= every.digests_for(expected)


def test_filters_repeat_and_the_kitfile_is_the_one_kit_unpack_writes(
        mounter: Mounter, every: EveryPartKit) -> None:
    mount = mounter.mount(every.reference, "--filter", "kitfile,code", "--filter",
                          "datasets:validation", "--filter", "model:llama")
    assert files_on(mount.path) == ({"Kitfile", "models/llama.gguf"} | FILTERS["code"]
                                    | FILTERS["datasets:validation"])
    kitfile = mounter.kitfs("cat", every.reference, "Kitfile").stdout
    assert (mount.path / "Kitfile").read_bytes() == kitfile
    whole = mounter.mount(every.reference, name="whole")
    assert files_on(whole.path) == set(ALL_FILES) | {"Kitfile"}


@pytest.mark.parametrize("kit_filter", sorted(FILTERS))
def test_a_filtered_pull_fetches_and_verifies_just_the_selected_layers_whole(
        kitfs: Any, every: EveryPartKit, registry: Registry, kit_filter: str) -> None:
    mark = registry.log_mark()
    done = kitfs("pull", every.reference, "--filter", kit_filter, "--progress", "none")
    selected = every.digests_for(FILTERS[kit_filter])
    sizes = {layer.digest: len(layer.data) for layer in every.layers.values()}
    config = every.push.manifest["config"]["digest"]
    assert layer_digests_fetched(registry, mark, config) == {d: sizes[d] for d in selected}
    assert re.search(rf"pulled \S+: {len(selected)} layers?, {sum(sizes[d] for d in selected)} "
                     rf"bytes verified \({sum(sizes[d] for d in selected)} fetched\)", done.text)
    stats = json.loads(kitfs("cache", "stats", "--json").text)
    assert stats["verified_blobs"] >= len(selected)
    inspect = json.loads(kitfs("inspect", "--json", every.reference).text)
    states = {layer["digest"]: layer["verification"] for layer in inspect["layers"]}
    assert {d for d, state in states.items() if state == "verified"} == selected


def test_a_bad_filter_is_refused_with_kits_message_before_anything_is_fetched(
        kitfs: Any, mounter: Mounter, every: EveryPartKit, registry: Registry) -> None:
    mark = registry.log_mark()
    done = kitfs("pull", every.reference, "--filter", "parts", check=False)
    assert done.returncode == 64
    assert done.stderr.strip() == ("kitfs: --filter 'parts': invalid filter type 'parts' (must be "
                                   "one of kitfile, model, datasets, code, prompts, docs, "
                                   "mcpservers)")
    mounted = mounter.kitfs("mount", every.reference, str(mounter.mountpoint()), "--filter",
                            "model:a:b", check=False)
    assert mounted.returncode == 64
    assert "invalid filter: should be in format <type1>,<type2>[:<filter1>,<filter2>]" in \
        mounted.stderr
    assert registry.requests(mark) == []


def test_a_filter_selecting_nothing_pulls_nothing_and_says_so(
        kitfs: Any, every: EveryPartKit) -> None:
    done = kitfs("pull", every.reference, "--filter", "datasets:nonexistent")
    assert "pulled" in done.text and ": 0 layers, 0 bytes verified" in done.text
    assert "--filter datasets:nonexistent selects no layer of" in done.stderr


def test_a_model_reference_brings_only_what_the_model_filters_keep(
        mounter: Mounter, pusher: Pusher, registry: Registry) -> None:
    """As kit unpack: the parent kit's model layers are kept by the filters that list model;
    with none, the parent is not even fetched."""
    base_ref = f"{registry.host}/team/base-model:v1"
    base_model = tar_layer("model", {"base/weights.bin": b"base weights\n"}, "base/weights.bin")
    base_docs = tar_layer("docs", {"BASE.md": b"# base\n"}, "BASE.md")
    base: dict[str, Any] = {"manifestVersion": "1.0.0", "model": {"name": "base",
                                                                  "path": "base/weights.bin"},
                            "docs": [{"path": "BASE.md"}]}
    with_layer_info(base, [(base["model"], base_model), (base["docs"][0], base_docs)])
    pusher.push_kit(base_ref, base, [base_model, base_docs])
    data = tar_layer("dataset", {"data/a.csv": b"a\n"}, "data")
    child: dict[str, Any] = {"manifestVersion": "1.0.0", "model": {"path": base_ref},
                             "datasets": [{"name": "a", "path": "data"}]}
    with_layer_info(child, [(child["datasets"][0], data)])
    child_ref = f"{registry.host}/team/fine-tuned:v1"
    pusher.push_kit(child_ref, child, [data])

    mark = registry.log_mark()
    only_data = mounter.mount(child_ref, "--filter", "datasets", name="data")
    assert files_on(only_data.path) == {"data/a.csv"}
    assert not [uri for _, uri, _ in registry.requests(mark) if "/team/base-model/" in uri]
    model = mounter.mount(child_ref, "--filter", "model", name="model")
    assert files_on(model.path) == {"base/weights.bin"}
    assert (model.path / "base/weights.bin").read_bytes() == b"base weights\n"
    named = mounter.mount(child_ref, "--filter", "model:other", name="named")
    assert files_on(named.path) == set()
    everything = mounter.mount(child_ref, name="all")
    assert files_on(everything.path) == {"Kitfile", "data/a.csv", "base/weights.bin"}
