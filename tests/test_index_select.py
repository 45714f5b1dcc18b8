"""ModelKit index (OCI image index) entry selection: ``--select KEY=VALUE``.

The rules are kit's (KitOps ``pkg/lib/index/select.go``): an entry is chosen when it carries
every label asked for, exactly one entry must match (an index of one entry needs no selector),
``modelMetadata`` is a flat object of labels whose values are any JSON, compared unquoted for a
string and as JSON text otherwise. kitfs also selects by annotations and ``platform.KEY``.

The first half checks ``Index.select`` on parsed bytes; the second pushes two ModelKits by
digest and an index over them to the real registry, and drives the ``kitfs`` command line.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from kitfs.demo import Entry, Push, Pusher, Registry, push_entries, tar_layer
from kitfs.errors import NotFoundError, UsageError
from kitfs.format.mediatypes import KIT_ARTIFACT, OCI_INDEX, OCI_MANIFEST
from kitfs.format.oci import Index, parse_document

# ============================================================================================
# Index.select on parsed bytes
# ============================================================================================


def digest_of(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def entry(name: str, **extra: Any) -> dict[str, Any]:
    return {"mediaType": OCI_MANIFEST, "digest": digest_of(name), "size": 649, **extra}


def index_of(*entries: dict[str, Any], raw: str | None = None) -> Index:
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX,
                "artifactType": "application/vnd.kitops.modelkit.index.v1+json",
                "manifests": list(entries)}
    parsed = parse_document(raw.encode() if raw else json.dumps(document).encode(), None)
    assert isinstance(parsed, Index)
    return parsed


def test_select_by_every_label_given() -> None:
    index = index_of(entry("a", modelMetadata={"quantization": "q4_0", "vram": "6GB"}),
                     entry("b", modelMetadata={"quantization": "q8_0"}))
    assert str(index.select({"quantization": "q8_0"}).digest) == digest_of("b")
    assert str(index.select({"quantization": "q4_0", "vram": "6GB"}).digest) == digest_of("a")
    with pytest.raises(NotFoundError, match="no entry of the index has quantization=q4_0, vram=24GB"):
        index.select({"quantization": "q4_0", "vram": "24GB"})


def test_model_metadata_is_a_flat_object_of_labels() -> None:
    """A label may be called ``labels``: it is one label, not a nested object of labels."""
    index = index_of(entry("a", modelMetadata={"labels": "x", "quantization": "q4_0"}),
                     entry("b", modelMetadata={"labels": {"k": "v"}, "quantization": "q8_0"}))
    assert str(index.select({"quantization": "q4_0"}).digest) == digest_of("a")
    assert str(index.select({"labels": '{"k":"v"}'}).digest) == digest_of("b")


def test_label_values_compare_as_kit_formats_them() -> None:
    """Strings unquoted; numbers, booleans, arrays and objects as their (compact) JSON text,
    numbers exactly as written (``1e3`` is not ``1000.0``)."""
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        entry("a", modelMetadata={"activeParameters": 7000000000, "gpu": True,
                                  "targetAccelerator": ["cuda", "metal"], "ratio": "@RATIO@",
                                  "vram": {"bytes": 6442450944}, "name": "ünï"}),
        entry("b", modelMetadata={"gpu": False}),
    ]}).replace('"@RATIO@"', "1e3")
    index = index_of(raw=raw)
    a = digest_of("a")
    for key, value in [("activeParameters", "7000000000"), ("gpu", "true"),
                       ("targetAccelerator", '["cuda","metal"]'), ("ratio", "1e3"),
                       ("vram", '{"bytes":6442450944}'), ("name", "ünï")]:
        assert str(index.select({key: value}).digest) == a, (key, value)
    assert str(index.select({"gpu": "false"}).digest) == digest_of("b")
    with pytest.raises(NotFoundError):
        index.select({"ratio": "1000.0"})


def test_several_matches_are_a_usage_error_listing_them() -> None:
    index = index_of(entry("a", modelMetadata={"quantization": "q4_0", "family": "llama"}),
                     entry("b", modelMetadata={"quantization": "q8_0", "family": "llama"}),
                     entry("c", modelMetadata={"quantization": "q8_0", "family": "qwen"}))
    with pytest.raises(UsageError) as caught:
        index.select({})
    message = str(caught.value)
    assert "the index holds 3 ModelKits; choose one with --select KEY=VALUE" in message
    assert all(digest_of(n) in message for n in "abc")
    assert "(family=llama, quantization=q4_0)" in message
    assert caught.value.exit_code == 64

    with pytest.raises(UsageError) as caught:
        index.select({"family": "llama"})
    message = str(caught.value)
    assert "2 entries of the index match family=llama" in message
    assert digest_of("a") in message and digest_of("b") in message
    assert digest_of("c") not in message  # only the candidates are listed


def test_no_match_lists_the_whole_index() -> None:
    index = index_of(entry("a", modelMetadata={"quantization": "q4_0"}), entry("b"))
    with pytest.raises(NotFoundError) as caught:
        index.select({"quantization": "q2_K"})
    message = str(caught.value)
    assert "no entry of the index has quantization=q2_K; the index contains:" in message
    assert f"{digest_of('a')}  (quantization=q4_0)" in message
    assert f"{digest_of('b')}  (no labels)" in message
    assert caught.value.exit_code == 66


def test_a_single_entry_needs_no_selector_and_an_empty_index_is_not_found() -> None:
    assert str(index_of(entry("a")).select({}).digest) == digest_of("a")
    with pytest.raises(NotFoundError, match="the index contains no ModelKits"):
        index_of().select({})


def test_the_same_manifest_listed_twice_is_not_ambiguous() -> None:
    index = index_of(entry("a", modelMetadata={"q": "4"}), entry("a", modelMetadata={"q": "4"}))
    assert str(index.select({}).digest) == digest_of("a")


def test_annotations_and_platform_select_too_and_model_metadata_wins() -> None:
    index = index_of(
        entry("a", platform={"os": "linux", "architecture": "amd64"},
              annotations={"org.opencontainers.image.ref.name": "q4", "quantization": "q8_0"},
              modelMetadata={"quantization": "q4_0"}),
        entry("b", platform={"os": "linux", "architecture": "arm64"},
              annotations={"org.opencontainers.image.ref.name": "q8"}),
    )
    assert str(index.select({"platform.architecture": "arm64"}).digest) == digest_of("b")
    assert str(index.select({"org.opencontainers.image.ref.name": "q4"}).digest) == digest_of("a")
    with pytest.raises(NotFoundError):  # the annotation of the same name does not count
        index.select({"quantization": "q8_0"})


# ============================================================================================
# Through the command line, against the real registry
# ============================================================================================

Q4 = b"q4 weights " * 1000
Q8 = b"q8 weights, twice as many bits " * 1000
LABELS = {"q4": {"quantization": "q4_0", "vram": "6GB", "activeParameters": 7000000000},
          "q8": {"quantization": "q8_0", "vram": "12GB", "activeParameters": 7000000000}}


def push_variant(pusher: Pusher, repository: str, name: str, weights: bytes) -> Push:
    """A one-model ModelKit pushed by digest only (no tag), as ``kit`` puts a kit in an index."""
    path = f"models/model-{name}.gguf"
    model = tar_layer("model", {path: weights}, path)
    return push_entries(pusher, f"{pusher.host}/{repository}",
                        [Entry("model", {"name": name, "path": path, "format": "gguf"}, model)],
                        package={"name": f"m-{name}"}, artifact_type=KIT_ARTIFACT, by_digest=True)


class Pushed:
    def __init__(self, registry: Registry, pusher: Pusher) -> None:
        self.repo = f"{registry.host}/team/indexed"
        repository = "team/indexed"
        self.q4 = push_variant(pusher, repository, "q4", Q4)
        self.q8 = push_variant(pusher, repository, "q8", Q8)
        _, self.index_digest = pusher.push_index(f"{self.repo}:all", [
            self.q4.index_entry(LABELS["q4"], platform={"os": "linux", "architecture": "amd64"},
                                annotations={"org.opencontainers.image.ref.name": "q4"}),
            self.q8.index_entry(LABELS["q8"], platform={"os": "linux", "architecture": "arm64"},
                                annotations={"org.opencontainers.image.ref.name": "q8"}),
        ])
        self.ref = f"{self.repo}:all"
        _, self.single_digest = pusher.push_index(f"{self.repo}:only-q8", [
            self.q8.index_entry(LABELS["q8"])])


@pytest.fixture(scope="module")
def pushed(registry: Registry, pusher: Pusher) -> Pushed:
    return Pushed(registry, pusher)


def ls_paths(kitfs: Any, *args: str) -> set[str]:
    return {e["path"] for e in json.loads(kitfs("ls", "--json", *args).text)}


def test_the_registry_serves_the_index_as_pushed(pushed: Pushed, registry: Registry) -> None:
    """The index was stored as an OCI image index whose entries are the kits' digests."""
    import urllib.request

    request = urllib.request.Request(f"http://{registry.host}/v2/team/indexed/manifests/all",
                                     headers={"Accept": OCI_INDEX})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"] == OCI_INDEX
        assert response.headers["Docker-Content-Digest"] == pushed.index_digest
        body = json.loads(response.read())
    assert [m["digest"] for m in body["manifests"]] == [pushed.q4.digest, pushed.q8.digest]
    assert body["manifests"][0]["modelMetadata"]["quantization"] == "q4_0"


@pytest.mark.parametrize(("selectors", "variant"), [
    (["quantization=q8_0"], "q8"),
    (["quantization=q4_0"], "q4"),
    (["quantization=q4_0", "vram=6GB"], "q4"),
    (["platform.architecture=arm64"], "q8"),
    (["org.opencontainers.image.ref.name=q4"], "q4"),
    (["vram=12GB", "activeParameters=7000000000"], "q8"),
])
def test_select_picks_the_entry(kitfs: Any, pushed: Pushed, selectors: list[str],
                                variant: str) -> None:
    args = [a for s in selectors for a in ("--select", s)]
    assert ls_paths(kitfs, pushed.ref, *args) == {
        "Kitfile", "models", f"models/model-{variant}.gguf"}
    data = kitfs("cat", pushed.ref, f"models/model-{variant}.gguf", *args).stdout
    assert data == (Q4 if variant == "q4" else Q8)


def test_select_with_an_index_named_by_digest(kitfs: Any, pushed: Pushed) -> None:
    ref = f"{pushed.repo}@{pushed.index_digest}"
    assert "models/model-q8.gguf" in ls_paths(kitfs, "--select", "quantization=q8_0", ref)


def test_inspect_shows_the_selected_manifest_digest(kitfs: Any, pushed: Pushed) -> None:
    for variant, push in (("q4", pushed.q4), ("q8", pushed.q8)):
        selector = f"quantization={LABELS[variant]['quantization']}"
        info = json.loads(kitfs("inspect", "--json", pushed.ref, "--select", selector).text)
        assert info["digest"] == push.digest
        assert info["digest"] != pushed.index_digest
        assert info["artifactType"] == KIT_ARTIFACT
        assert [layer["digest"] for layer in info["layers"]] == [push.layers[0].digest]
        text = kitfs("inspect", pushed.ref, "--select", selector).text
        assert f"digest     {push.digest}" in text


def test_no_select_on_an_index_of_two_is_a_usage_error_listing_them(kitfs: Any,
                                                                      pushed: Pushed) -> None:
    result = kitfs("ls", pushed.ref, check=False)
    assert result.returncode == 64, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == b""
    assert "choose one with --select KEY=VALUE" in result.stderr
    for push, labels in ((pushed.q4, LABELS["q4"]), (pushed.q8, LABELS["q8"])):
        assert str(push.digest) in result.stderr
        assert f"quantization={labels['quantization']}" in result.stderr
    assert str(pushed.q4.digest) in kitfs("inspect", pushed.ref, "--select", "vram=6GB").text


@pytest.mark.parametrize("selectors", [["quantization=q2_K"], ["quantization=q4_0", "vram=12GB"],
                                       ["nosuchlabel=x"]])
def test_unknown_selection_is_not_found_listing_the_index(kitfs: Any, pushed: Pushed,
                                                          selectors: list[str]) -> None:
    args = [a for s in selectors for a in ("--select", s)]
    result = kitfs("ls", pushed.ref, *args, check=False)
    assert result.returncode == 66, result.stderr
    assert "Traceback" not in result.stderr
    assert "no entry of the index has" in result.stderr
    assert str(pushed.q4.digest) in result.stderr and str(pushed.q8.digest) in result.stderr


def test_an_index_of_one_needs_no_select(kitfs: Any, pushed: Pushed) -> None:
    assert "models/model-q8.gguf" in ls_paths(kitfs, f"{pushed.repo}:only-q8")
    info = json.loads(kitfs("inspect", "--json", f"{pushed.repo}:only-q8").text)
    assert info["digest"] == pushed.q8.digest


def test_malformed_select_is_a_usage_error(kitfs: Any, pushed: Pushed) -> None:
    result = kitfs("ls", pushed.ref, "--select", "no-equals-sign", check=False)
    assert result.returncode == 64
    assert "KEY=VALUE" in result.stderr and "Traceback" not in result.stderr
