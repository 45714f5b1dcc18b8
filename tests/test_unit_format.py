"""Pure unit tests for kitfs.format: references, ranges, Kitfile rendering, layout and tree."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import posixpath
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kitfs.errors import (
    FormatError,
    InvalidReferenceError,
    KitfsError,
    UnsafeEntryError,
)
from kitfs.format import gzindex
from kitfs.format.digest import Digest
from kitfs.format.kitfile import go_format_float, render_kitfile
from kitfs.format.layout import check_entry_path, clean_entry_path, plan_layout
from kitfs.format.mediatypes import (
    KIT_CONFIG,
    MODELPACK_ARTIFACT,
    MODELPACK_CONFIG,
    OCI_MANIFEST,
    Compression,
    Family,
    Kind,
    Layout,
)
from kitfs.format.oci import Manifest, parse_document
from kitfs.format.ranges import chunk_count, chunk_span, chunks_covering
from kitfs.format.reference import Reference
from kitfs.format.tar import TarMember
from kitfs.format.tree import DEFAULT_DIR_MODE, KITFILE_NAME, FileSource, Node, Tree, TreeBuilder

SETTINGS = settings(max_examples=200, deadline=None)
FIXTURES = Path("/work/shared/fixtures/modelkit-format")

HEX = "a" * 64
DIGEST = f"sha256:{HEX}"


def sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# ============================================================================================
# reference.py
# ============================================================================================


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("127.0.0.1:5000/team/llama:v3", "127.0.0.1:5000", "team/llama", "v3", None),
        (f"host/repo@{DIGEST}", "host", "repo", None, DIGEST),
        (f"host/repo:tag@{DIGEST}", "host", "repo", "tag", DIGEST),
        ("host/repo", "host", "repo", "latest", None),
        ("localhost:5000/a/b/c:1.0-rc_1", "localhost:5000", "a/b/c", "1.0-rc_1", None),
        ("ghcr.io/org/my-model__x.y:latest", "ghcr.io", "org/my-model__x.y", "latest", None),
        ("[::1]:5000/repo:t", "[::1]:5000", "repo", "t", None),
    ],
)
def test_reference_parse_valid(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = Reference.parse(text)
    assert ref.registry == registry
    assert ref.repository == repository
    assert ref.tag == tag
    assert (str(ref.digest) if ref.digest else None) == digest
    expected_text = text if tag != "latest" or text.endswith(":latest") else f"{text}:latest"
    assert str(ref) == expected_text
    assert Reference.parse(str(ref)) == ref


def test_reference_loopback_and_pinned() -> None:
    assert Reference.parse("127.0.0.1:5000/team/llama:v3").is_loopback
    assert Reference.parse("localhost/x").is_loopback
    assert Reference.parse("[::1]:5000/x").is_loopback
    assert not Reference.parse("ghcr.io/x:y").is_loopback
    pinned = Reference.parse("host/repo:v1").pinned(Digest.parse(DIGEST))
    assert str(pinned) == f"host/repo:v1@{DIGEST}"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("llama", "expected registry/repository"),
        ("llama:v3", "expected registry/repository"),
        ("host/Team/llama", "bad repository 'Team/llama'"),
        ("host/repo:-bad", "bad tag '-bad'"),
        ("host/repo:", "bad tag ''"),
        ("host/repo:" + "t" * 129, "bad tag"),
        ("host/repo:a+b", "bad tag"),
        ("host//repo", "bad repository"),
        ("host/repo/", "bad repository"),
        ("bad_host!/repo", "bad registry"),
        ("", "empty or contains spaces"),
        ("host/re po", "empty or contains spaces"),
    ],
)
def test_reference_parse_invalid(text: str, reason: str) -> None:
    with pytest.raises(InvalidReferenceError, match="invalid reference") as info:
        Reference.parse(text)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    "digest_text",
    ["sha256:abc", f"sha256:{HEX.upper()}", f"md5:{HEX}", "sha256", f"SHA256:{HEX}"],
)
def test_reference_bad_digest_is_a_kitfs_error_naming_the_digest(digest_text: str) -> None:
    # NB: Reference.parse lets Digest.parse's FormatError through (exit 65, EIO) instead of an
    # InvalidReferenceError (exit 64, usage error); the user still gets a KitfsError that names
    # the bad digest.
    with pytest.raises(KitfsError) as info:
        Reference.parse(f"host/repo:tag@{digest_text}")
    assert digest_text in str(info.value)


@pytest.mark.parametrize("text", ["host/repo@", "host/repo:tag@"])
def test_reference_empty_digest_is_refused(text: str) -> None:
    # A trailing '@' with nothing after it is not a reference; it must not mean ':latest'.
    with pytest.raises(InvalidReferenceError):
        Reference.parse(text)


_ALNUM = st.text("abcxyz0189", min_size=1, max_size=6)
_SEPARATOR = st.sampled_from([".", "_", "__", "-", "--"])
_COMPONENT = st.builds(
    lambda first, rest: first + "".join(sep + part for sep, part in rest),
    _ALNUM,
    st.lists(st.tuples(_SEPARATOR, _ALNUM), max_size=3),
)


@SETTINGS
@given(
    registry=st.sampled_from(["localhost:5000", "127.0.0.1:5000", "ghcr.io", "reg-1.example.com"]),
    components=st.lists(_COMPONENT, min_size=1, max_size=4),
    tag=st.none()
    | st.builds(str.__add__, st.sampled_from("aZ9_"), st.text("aZ9_.-", max_size=20)),
    digest=st.none() | st.binary(max_size=8).map(lambda b: Digest.of(b)),
)
def test_reference_round_trip(
    registry: str, components: list[str], tag: str | None, digest: Digest | None
) -> None:
    text = f"{registry}/{'/'.join(components)}"
    if tag is not None:
        text += f":{tag}"
    if digest is not None:
        text += f"@{digest}"
    ref = Reference.parse(text)
    assert ref.registry == registry
    assert ref.repository == "/".join(components)
    assert ref.digest == digest
    assert ref.tag == (tag if tag is not None or digest is not None else "latest")
    assert Reference.parse(str(ref)) == ref


# ============================================================================================
# ranges.py
# ============================================================================================


@SETTINGS
@given(
    offset=st.integers(-50, 5000),
    length=st.integers(-10, 5000),
    blob_size=st.integers(0, 4000),
    chunk=st.integers(1, 700),
)
def test_chunks_covering_matches_set_model(
    offset: int, length: int, blob_size: int, chunk: int
) -> None:
    spans = chunks_covering(offset, length, blob_size, chunk)
    if offset < 0 or length <= 0:
        wanted: set[int] = set()
    else:
        wanted = set(range(offset, min(offset + length, blob_size)))
    expected_indexes = sorted({b // chunk for b in wanted})
    assert [s.index for s in spans] == expected_indexes
    covered: set[int] = set()
    for previous, span in itertools.pairwise(spans):
        assert span.index == previous.index + 1
        assert span.start == previous.end  # contiguous, in order
    for span in spans:
        assert span == chunk_span(span.index, blob_size, chunk)
        assert span.start == span.index * chunk
        assert span.end == min(span.start + chunk, blob_size)
        assert 0 < span.length <= chunk
        span_bytes = set(range(span.start, span.end))
        assert span_bytes & wanted  # no chunk that holds none of the requested bytes
        covered |= span_bytes
    assert wanted <= covered
    assert all(0 <= b < blob_size for b in covered)
    if spans:
        assert spans[-1].index < chunk_count(blob_size, chunk)


@SETTINGS
@given(blob_size=st.integers(0, 10_000), chunk=st.integers(1, 999))
def test_chunk_count_and_spans_tile_the_blob(blob_size: int, chunk: int) -> None:
    count = chunk_count(blob_size, chunk)
    spans = [chunk_span(i, blob_size, chunk) for i in range(count)]
    assert sum(s.length for s in spans) == blob_size
    assert all(s.length > 0 for s in spans)
    assert chunks_covering(0, blob_size, blob_size, chunk) == spans


# ============================================================================================
# kitfile.py
# ============================================================================================

KITFILE_CONFIG: dict[str, Any] = {
    # keys deliberately out of struct order, plus fields kit drops
    "docs": [{"path": "README.md", "description": "line one\nline two", "digest": DIGEST}],
    "code": [{"description": "yes", "path": "src", "digest": DIGEST, "diffId": DIGEST}],
    "model": {
        "parameters": {"b": 1200, "a": 1e6, "c": "yes", "t": "true", "f": 0.5},
        "digest": DIGEST,
        "diffId": DIGEST,
        "path": "model.gguf",
        "name": "llama",
        "version": "1.0",
    },
    "package": {
        "authors": ["Jane Doe", "bob"],
        "version": "1.0",
        "name": "llama",
        "license": "Apache-2.0",
        "unknown": "dropped",
    },
    "manifestVersion": "1.0",
    "datasets": [{"name": "train", "path": "data/train.csv", "parameters": {"z": True, "n": None}}],
}

KITFILE_YAML = """\
manifestVersion: "1.0"
package:
  name: llama
  version: "1.0"
  license: Apache-2.0
  authors: [Jane Doe, bob]
model:
  name: llama
  path: model.gguf
  version: "1.0"
  parameters:
    a: 1e+06
    b: 1200
    c: "yes"
    f: 0.5
    t: "true"
code:
  - path: src
    description: "yes"
datasets:
  - name: train
    path: data/train.csv
    parameters:
      "n": null
      z: true
docs:
  - path: README.md
    description: |-
      line one
      line two
"""


def test_render_kitfile_like_go_yaml_v3() -> None:
    assert render_kitfile(KITFILE_CONFIG).decode() == KITFILE_YAML


def test_render_kitfile_drops_digests_and_unknown_fields() -> None:
    text = render_kitfile(KITFILE_CONFIG).decode()
    assert "digest" not in text
    assert "diffId" not in text
    assert "unknown" not in text
    assert "sha256" not in text


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("1.0", '"1.0"'),
        ("true", '"true"'),
        ("yes", '"yes"'),
        ("No", '"No"'),
        ("off", '"off"'),
        ("null", '"null"'),
        ("~", '"~"'),
        ("123", '"123"'),
        ("0x1F", '"0x1F"'),
        ("1e3", '"1e3"'),
        (".inf", '".inf"'),
        ("v1.0", "v1.0"),
        ("hello world", "hello world"),
        ("", None),  # omitempty: the field is dropped
        ("a: b", "'a: b'"),
        ("#x", "'#x'"),
        ("it's", "it's"),
        (" padded", "' padded'"),
    ],
)
def test_render_kitfile_string_quoting(value: str, rendered: str | None) -> None:
    text = render_kitfile({"manifestVersion": "1.0", "package": {"version": value}}).decode()
    if rendered is None:
        assert text == 'manifestVersion: "1.0"\n'
    else:
        assert text == f'manifestVersion: "1.0"\npackage:\n  version: {rendered}\n'


def test_render_kitfile_authors_flow_style_quotes_items() -> None:
    text = render_kitfile(
        {"manifestVersion": "1.0", "package": {"authors": ["a", "b", "yes", "x, y"]}}
    ).decode()
    assert text.splitlines()[2] == "  authors: [a, b, \"yes\", 'x, y']"


@pytest.mark.parametrize(
    ("description", "block"),
    [
        ("a\nb", ["  description: |-", "    a", "    b"]),
        ("a\nb\n", ["  description: |", "    a", "    b"]),
        ("a\n\nb", ["  description: |-", "    a", "", "    b"]),
    ],
)
def test_render_kitfile_multiline_literal_block(description: str, block: list[str]) -> None:
    text = render_kitfile({"manifestVersion": "1.0", "package": {"description": description}})
    assert text.decode().splitlines()[2:] == block


def test_render_kitfile_parameters_sorted_nested() -> None:
    obj = {
        "manifestVersion": "1.0",
        "model": {"path": "m", "parameters": {"z": {"b": 2, "a": [1, 2.5]}, "a": []}},
    }
    assert render_kitfile(obj).decode() == (
        'manifestVersion: "1.0"\n'
        "model:\n"
        "  path: m\n"
        "  parameters:\n"
        "    a: []\n"
        "    z:\n"
        "      a:\n"
        "        - 1\n"
        "        - 2.5\n"
        "      b: 2\n"
    )


def test_render_kitfile_mapping_inside_parameters_list() -> None:
    # go-yaml v3 (indent 2) writes a mapping that is a sequence item as "- key: value" with its
    # other keys aligned under the first one.
    obj = {"manifestVersion": "1.0", "model": {"path": "m", "parameters": {"layers": [
        {"name": "a", "size": 1}, 7,
    ]}}}
    assert render_kitfile(obj).decode() == (
        'manifestVersion: "1.0"\n'
        "model:\n"
        "  path: m\n"
        "  parameters:\n"
        "    layers:\n"
        "      - name: a\n"
        "        size: 1\n"
        "      - 7\n"
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"package": {"authors": 5}}, "authors is not a list"),  # was TypeError
        ({"package": {"authors": "ann"}}, "authors is not a list"),  # was rendered a, n, n
        ({"model": {"parameters": {"big": 10**400}}}, "beyond the range of a float64"),  # Overflow
    ],
)
def test_render_kitfile_refuses_what_kit_cannot_decode(config: dict[str, Any], message: str) -> None:
    """Found by tests/test_fuzz_parsers.py; kit's Go structs refuse these configs too."""
    with pytest.raises(FormatError, match=message):
        render_kitfile(config)


def test_render_kitfile_list_of_empty_struct_and_docs_path_not_omitted() -> None:
    obj = {"manifestVersion": "1.0", "code": [{}], "docs": [{"path": ""}]}
    assert render_kitfile(obj).decode() == (
        'manifestVersion: "1.0"\ncode:\n  - {}\ndocs:\n  - path: ""\n'
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1200, "1200"),
        (1e6, "1e+06"),
        (123456, "123456"),
        (1234567, "1.234567e+06"),
        (100000, "100000"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (0.000123, "0.000123"),
        (0.1, "0.1"),
        (1.5, "1.5"),
        (-2.5, "-2.5"),
        (1e21, "1e+21"),
        (1e100, "1e+100"),
        (2**53, "9.007199254740992e+15"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (0.0, "0"),
        (-0.0, "-0"),
        (math.inf, ".inf"),
        (-math.inf, "-.inf"),
        (math.nan, ".nan"),
    ],
)
def test_go_format_float_table(value: float, text: str) -> None:
    assert go_format_float(float(value)) == text


_GO_E = re.compile(r"^-?[1-9](\.[0-9]*[1-9])?e[-+][0-9]{2,3}$")
_GO_F = re.compile(r"^-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?$")


@SETTINGS
@given(value=st.floats(allow_nan=False, allow_infinity=False))
def test_go_format_float_property(value: float) -> None:
    text = go_format_float(value)
    assert float(text) == value  # round-trips
    if value == 0:
        return
    exp10 = Decimal(repr(value)).adjusted()
    digits = Decimal(repr(value)).normalize().as_tuple().digits
    if exp10 < -4 or exp10 >= 6:
        assert _GO_E.match(text), text
        assert int(text.split("e")[1]) == exp10
    else:
        assert _GO_F.match(text), text
    # shortest digits, like Go's precision -1
    mantissa = text.lstrip("-").split("e")[0].replace(".", "").lstrip("0")
    assert mantissa.rstrip("0") == "".join(map(str, digits)).rstrip("0")


# ============================================================================================
# layout.py
# ============================================================================================


def _descriptor(media_type: str, digest: str, size: int = 10,
                annotations: dict[str, str] | None = None) -> dict[str, Any]:
    desc: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if annotations:
        desc["annotations"] = annotations
    return desc


def _manifest(
    layers: list[dict[str, Any]],
    config_type: str = KIT_CONFIG,
    artifact_type: str | None = None,
    annotations: dict[str, str] | None = None,
) -> Manifest:
    obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _descriptor(config_type, sha("config")),
        "layers": layers,
    }
    if artifact_type:
        obj["artifactType"] = artifact_type
    if annotations:
        obj["annotations"] = annotations
    parsed = parse_document(json.dumps(obj).encode(), None)
    assert isinstance(parsed, Manifest)
    return parsed


FILEPATH = "org.cncf.model.filepath"
KIT_MODEL_TAR = "application/vnd.kitops.modelkit.model.v1.tar"
KIT_CODE_TAR = "application/vnd.kitops.modelkit.code.v1.tar"
KIT_CODE_RAW = "application/vnd.kitops.modelkit.code.v1.raw"
KIT_DATASET_TAR = "application/vnd.kitops.modelkit.dataset.v1.tar+gzip"


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("kitops-manifest-tar-layers.json", "sha256:configA"),
        ("kitops-manifest-raw-layers-dup-digest.json", "sha256:configA"),
    ],
)
def test_kitops_fixtures_with_placeholder_digests_are_refused(name: str, bad: str) -> None:
    with pytest.raises(FormatError, match=re.escape(repr(bad))):
        parse_document((FIXTURES / name).read_bytes(), None)


def test_kitops_fixture_layer_placeholder_digest_named() -> None:
    obj = json.loads((FIXTURES / "kitops-manifest-tar-layers.json").read_bytes())
    obj["config"]["digest"] = sha("config")
    with pytest.raises(FormatError, match=r"layer 0: invalid digest 'sha256:layer1'"):
        parse_document(json.dumps(obj).encode(), None)


def _dup_digest_manifest() -> Manifest:
    """kitops-manifest-raw-layers-dup-digest.json with real digests."""
    obj = json.loads((FIXTURES / "kitops-manifest-raw-layers-dup-digest.json").read_bytes())
    real = {"sha256:configA": sha("config"), "sha256:layer1": sha("model"),
            "sha256:layer2": sha("code"), "sha256:layer4": sha("")}
    obj["config"]["digest"] = real[obj["config"]["digest"]]
    for layer in obj["layers"]:
        layer["digest"] = real[layer["digest"]]
    parsed = parse_document(json.dumps(obj).encode(), None)
    assert isinstance(parsed, Manifest)
    return parsed


@pytest.mark.parametrize("order", [["pkg_a", "pkg_b"], ["pkg_b", "pkg_a"]])
def test_plan_layout_dup_digest_raw_layers_map_to_both_paths(order: list[str]) -> None:
    manifest = _dup_digest_manifest()
    assert manifest.layers[2].digest == manifest.layers[3].digest
    config = {
        "manifestVersion": "1.0",
        "model": {"path": "model", "digest": sha("model")},
        "code": [{"path": "src", "digest": sha("code")}]
        + [
            {"path": f"{pkg}/__init__.py", "digest": sha(""), "diffId": sha(f"diff-{pkg}")}
            for pkg in order
        ],
    }
    plan = plan_layout(manifest, json.dumps(config).encode())
    assert plan.family is Family.KITOPS
    assert plan.unplaced == ()
    by_index = {p.index: p for p in plan.placements}
    assert sorted(by_index) == [0, 1, 2, 3]
    assert by_index[0].layer_type.kind is Kind.MODEL
    assert by_index[0].raw_path is None
    assert by_index[0].prefix == ""
    assert by_index[1].layer_type.layout is Layout.TAR
    assert by_index[2].raw_path == "pkg_a/__init__.py"
    assert by_index[3].raw_path == "pkg_b/__init__.py"
    assert by_index[2].raw_mode == by_index[3].raw_mode == 0o644
    # each layer was paired with the entry of its own path (seen through the entry's diffId)
    assert str(by_index[2].diff_id) == sha("diff-pkg_a")
    assert str(by_index[3].diff_id) == sha("diff-pkg_b")
    assert plan.kitfile is not None
    assert b"pkg_a/__init__.py" in plan.kitfile
    assert b"digest" not in plan.kitfile


def test_plan_layout_pairs_10000_layers_of_one_digest_by_path() -> None:
    """Pairing was quadratic (38 s for this kit); each entry still gets the layer of its path."""
    layers = [_descriptor(KIT_CODE_RAW, sha("x"), annotations={FILEPATH: f"layers/f{i:05d}.bin"})
              for i in range(10_000)]
    config = {"code": [{"path": f"layers/f{i:05d}.bin", "digest": sha("x")}
                       for i in reversed(range(10_000))]}
    plan = plan_layout(_manifest(layers), json.dumps(config).encode())
    assert len(plan.placements) == 10_000 and plan.unplaced == ()
    assert all(p.raw_path == f"layers/f{p.index:05d}.bin" for p in plan.placements)


def test_plan_layout_entry_naming_missing_layer_is_format_error() -> None:
    manifest = _dup_digest_manifest()
    config = {"model": {"path": "model", "digest": sha("other")}}
    with pytest.raises(FormatError, match="not in the manifest"):
        plan_layout(manifest, json.dumps(config).encode())


def test_plan_layout_some_digests_missing_is_format_error() -> None:
    manifest = _dup_digest_manifest()
    config = {"model": {"path": "model", "digest": sha("model")}, "code": [{"path": "src"}]}
    with pytest.raises(FormatError, match="some entries have a layer digest"):
        plan_layout(manifest, json.dumps(config).encode())


def test_plan_layout_raw_layer_mode_from_metadata_and_unsafe_path() -> None:
    meta = "org.cncf.model.file.metadata+json"
    manifest = _manifest([
        _descriptor(KIT_CODE_RAW, sha("x"), annotations={FILEPATH: "bin/run.sh", meta: '{"mode": 2541}'}),
    ])
    config = json.dumps({"code": [{"path": "bin/run.sh", "digest": sha("x")}]}).encode()
    (placement,) = plan_layout(manifest, config).placements
    assert placement.raw_mode == 2541 & 0o777

    evil = _manifest([_descriptor(KIT_CODE_RAW, sha("x"), annotations={FILEPATH: "../etc/passwd"})])
    with pytest.raises(UnsafeEntryError, match=re.escape(sha("x"))):
        plan_layout(evil, json.dumps({"code": [{"path": "p", "digest": sha("x")}]}).encode())


def test_modelpack_fixture_parses() -> None:
    manifest = parse_document((FIXTURES / "modelpack-manifest-example.json").read_bytes(), None)
    assert isinstance(manifest, Manifest)
    assert manifest.artifact_type == MODELPACK_ARTIFACT
    assert manifest.config.media_type == MODELPACK_CONFIG
    assert manifest.config.size == 301
    assert [d.size for d in manifest.layers] == [30327160, 5018536960, 106, 23040]
    assert all(d.annotations == {} for d in manifest.layers)


def test_modelpack_fixture_plan_layout_is_refused() -> None:
    manifest = parse_document((FIXTURES / "modelpack-manifest-example.json").read_bytes(), None)
    assert isinstance(manifest, Manifest)
    config = (FIXTURES / "modelpack-config-example.json").read_bytes()
    # The fixture config lists 2 diffIds for the 4 layers, which is refused first.
    with pytest.raises(FormatError, match="2 diffIds for 4 layers"):
        plan_layout(manifest, config)
    # With diffIds consistent, the missing filepath annotation is what kit (and kitfs) refuse.
    obj = json.loads(config)
    obj["modelfs"]["diffIds"] = [sha(str(i)) for i in range(4)]
    with pytest.raises(FormatError, match=r"no org\.cncf\.model\.filepath annotation"):
        plan_layout(manifest, json.dumps(obj).encode())
    del obj["modelfs"]["diffIds"]
    with pytest.raises(FormatError, match=re.escape(str(manifest.layers[0].digest))):
        plan_layout(manifest, json.dumps(obj).encode())


def test_modelpack_with_filepaths_is_planned() -> None:
    layers = [
        _descriptor("application/vnd.cncf.model.weight.v1.raw", sha("w"), annotations={FILEPATH: "w.bin"}),
        _descriptor("application/vnd.cncf.model.doc.v1.tar+zstd", sha("d"), annotations={FILEPATH: "docs"}),
    ]
    manifest = _manifest(layers, MODELPACK_CONFIG, MODELPACK_ARTIFACT)
    config = json.dumps({"modelfs": {"diffIds": [sha("w"), sha("du")]}}).encode()
    plan = plan_layout(manifest, config)
    assert plan.family is Family.MODELPACK
    assert plan.kitfile is None
    first, second = plan.placements
    assert (first.raw_path, first.layer_type.kind) == ("w.bin", Kind.MODEL)
    assert second.layer_type.compression is Compression.ZSTD
    assert str(second.diff_id) == sha("du")


# Found by tests/test_fuzz_parsers.py: each raised something other than FormatError.


def test_json_with_an_integer_of_5000_digits_is_a_format_error() -> None:
    """Python refuses to convert it (ValueError, not a JSONDecodeError)."""
    body = b'{"schemaVersion": 2, "layers": [], "x": ' + b"7" * 5000 + b"}"
    with pytest.raises(FormatError, match="manifest is not valid JSON"):
        parse_document(body, None)


@pytest.mark.parametrize("where", ["model.parameters", "index modelMetadata"])
def test_json_nested_more_than_100_levels_is_a_format_error(where: str) -> None:
    """Python's JSON parser takes ~990 levels, but the Kitfile renderer and the index labels
    recurse once per level: from a deep enough stack (a FUSE handler's) they failed."""
    deep = "[" * 300 + "]" * 300
    if where == "model.parameters":
        manifest = _manifest([_descriptor(KIT_MODEL_TAR, sha("m"))])
        config = f'{{"model": {{"path": "m", "digest": "{sha("m")}", "parameters": {deep}}}}}'
        with pytest.raises(FormatError, match="config is nested more than 100 levels deep"):
            plan_layout(manifest, config.encode())
    else:
        entry = _descriptor(OCI_MANIFEST, sha("m"))
        body = json.dumps({"schemaVersion": 2, "manifests": [entry]}).encode()
        body = body.replace(b'"size": 10', b'"size": 10, "modelMetadata": {"a": ' + deep.encode() + b"}")
        with pytest.raises(FormatError, match="manifest is nested more than 100 levels deep"):
            parse_document(body, None)
    shallow = "[" * 98 + "]" * 98  # inside {"model": {"parameters": ...}}: 100 levels
    manifest = _manifest([_descriptor(KIT_MODEL_TAR, sha("m"))])
    config = f'{{"model": {{"path": "m", "digest": "{sha("m")}", "parameters": {shallow}}}}}'
    assert plan_layout(manifest, config.encode()).kitfile is not None


def test_modelpack_config_with_odd_modelfs_or_diff_ids() -> None:
    """modelfs that is no object raised AttributeError, a diffId that is no string TypeError."""
    layers = [_descriptor("application/vnd.cncf.model.weight.v1.raw", sha("w"),
                          annotations={FILEPATH: "w.bin"})]
    manifest = _manifest(layers, MODELPACK_CONFIG, MODELPACK_ARTIFACT)
    with pytest.raises(FormatError, match="modelfs is not an object"):
        plan_layout(manifest, json.dumps({"modelfs": 7}).encode())
    (placement,) = plan_layout(manifest, json.dumps({"modelfs": {"diffIds": [7]}}).encode()).placements
    assert placement.raw_path == "w.bin" and placement.diff_id is None  # a diffId is optional


@pytest.mark.parametrize("metadata", ['{"mode": 1e400}', '{"mode": "rwx"}', "[1]", "[" * 5000])
def test_raw_layer_metadata_that_is_no_mode_names_the_layer(metadata: str) -> None:
    """A mode of 1e400 raised OverflowError."""
    meta = "org.cncf.model.file.metadata+json"
    manifest = _manifest([_descriptor(KIT_CODE_RAW, sha("x"),
                                      annotations={FILEPATH: "run.sh", meta: metadata})])
    config = json.dumps({"code": [{"path": "run.sh", "digest": sha("x")}]}).encode()
    with pytest.raises(FormatError, match=re.escape(f"layer {sha('x')}: annotation {meta}")):
        plan_layout(manifest, config)


def test_plan_layout_legacy_maps_by_type_order_with_parent_prefix() -> None:
    layers = [
        _descriptor(KIT_MODEL_TAR, sha("model")),
        _descriptor(KIT_CODE_TAR, sha("code1")),
        _descriptor(KIT_DATASET_TAR, sha("data")),
        _descriptor(KIT_CODE_TAR, sha("code2")),
    ]
    config = {
        "manifestVersion": "1.0",
        "package": {"name": "old"},
        "model": {"name": "m", "path": "models/llama/model.gguf"},
        "code": [{"path": "src/app"}, {"path": "lib/"}],
        "datasets": [
            {"name": "remote", "remotePath": "s3://bucket/x"},  # no layer
            {"name": "train", "path": "data/train/train.csv"},
        ],
    }
    plan = plan_layout(_manifest(layers), json.dumps(config).encode())
    assert [(p.index, p.prefix) for p in plan.placements] == [
        (0, "models/llama"),
        (1, "src"),
        (2, "data/train"),
        (3, ""),
    ]
    assert all(p.raw_path is None for p in plan.placements)
    assert plan.placements[2].layer_type.compression is Compression.GZIP
    assert plan.kitfile is not None
    assert plan.kitfile.startswith(b'manifestVersion: "1.0"\npackage:\n  name: old\n')


def test_plan_layout_legacy_layer_without_entry_is_format_error() -> None:
    layers = [_descriptor(KIT_CODE_TAR, sha("c1")), _descriptor(KIT_CODE_TAR, sha("c2"))]
    config = {"code": [{"path": "src"}]}
    with pytest.raises(FormatError, match=re.escape(sha("c2"))):
        plan_layout(_manifest(layers), json.dumps(config).encode())


def test_plan_layout_remote_parent_model_reference() -> None:
    layers = [_descriptor(KIT_CODE_TAR, sha("c"))]
    config = {
        "model": {"path": "registry.example.com/org/base:v1"},
        "code": [{"path": "src", "digest": sha("c")}],
    }
    plan = plan_layout(_manifest(layers), json.dumps(config).encode())
    assert plan.parent_model_reference == "registry.example.com/org/base:v1"
    assert [p.index for p in plan.placements] == [0]


@pytest.mark.parametrize(
    "name",
    ["/etc/passwd", "..", "../x", "a/../../b", "model..bin", "a/..b", "a\0b", "/"],
)
def test_check_entry_path_refuses(name: str) -> None:
    with pytest.raises(UnsafeEntryError, match="layer sha256:x") as info:
        check_entry_path(name, "layer sha256:x")
    assert repr(name) in str(info.value)


@pytest.mark.parametrize(
    ("name", "cleaned"),
    [
        ("./a//b", "a/b"),
        ("a/b/", "a/b"),
        ("a/./b", "a/b"),
        ("a/x/../b", "a/b"),
        ("", ""),
        (".", ""),
        ("./", ""),
        ("weights/model.safetensors", "weights/model.safetensors"),
        ("über/日本.bin", "über/日本.bin"),
    ],
)
def test_check_entry_path_cleans(name: str, cleaned: str) -> None:
    assert check_entry_path(name, "w") == cleaned


# ============================================================================================
# tree.py
# ============================================================================================

LAYER_DIGEST = sha("layer")


def member(name: str, typeflag: bytes = b"0", mode: int = 0o644, size: int = 0,
           data_offset: int = 512, linkname: str = "") -> TarMember:
    return TarMember(name, typeflag, mode, size, data_offset, data_offset - 512, linkname)


def node_at(tree: Tree, path: str) -> Node:
    """The node at ``path`` of ``tree`` ('' or '/' is the root), as a listing finds it."""
    node = tree.root
    for part in (p for p in path.strip("/").split("/") if p):
        node = node.children[part]
    return node


def test_tree_directories_merge_across_layers() -> None:
    builder = TreeBuilder(b"kitfile\n")
    builder.add_tar_members(
        [member("models/", b"5", 0o700), member("models/a.bin", size=3, data_offset=1024)],
        0, "", sha("l0"),
    )
    builder.add_tar_members(
        [member("models/", b"5", 0o755), member("models/b.bin", size=4, data_offset=1536)],
        1, "", sha("l1"),
    )
    tree = builder.build()
    models = node_at(tree, "models")
    assert models.is_dir
    assert sorted(models.children) == ["a.bin", "b.bin"]
    assert models.mode == 0o700  # the first explicit mode is kept
    b = node_at(tree, "/models/b.bin")
    assert (b.size, b.source) == (4, FileSource(1, 1536))
    kitfile = node_at(tree, KITFILE_NAME)
    assert kitfile.source == FileSource(-1, 0, b"kitfile\n")
    assert kitfile.size == 8
    assert [n.path for n in tree.walk()] == [
        "", KITFILE_NAME, "models", "models/a.bin", "models/b.bin"
    ]


def test_tree_missing_parents_synthesised_0755_then_explicit_mode_applies() -> None:
    builder = TreeBuilder(None)
    builder.add_tar_members([member("a/b/c.txt", mode=0o600)], 0, "", LAYER_DIGEST)
    tree = builder.build()
    assert KITFILE_NAME not in tree.root.children
    for path in ("a", "a/b"):
        node = node_at(tree, path)
        assert node.is_dir
        assert node.mode == DEFAULT_DIR_MODE == 0o755
        assert not node.explicit
    assert node_at(tree, "a/b/c.txt").mode == 0o600
    builder.add_tar_members([member("a/b", b"5", 0o750)], 1, "", sha("l1"))
    assert node_at(builder.build(), "a/b").mode == 0o750


def test_tree_legacy_prefix_is_applied() -> None:
    builder = TreeBuilder(None)
    builder.add_tar_members([member("model.gguf", size=9)], 0, "models/llama", LAYER_DIGEST)
    node = node_at(builder.build(), "models/llama/model.gguf")
    assert node.size == 9
    assert node.path == "models/llama/model.gguf"


def test_tree_file_twice_is_format_error() -> None:
    builder = TreeBuilder(None)
    builder.add_tar_members([member("x/f.bin")], 0, "", sha("l0"))
    with pytest.raises(FormatError, match=r"'x/f\.bin' conflicts with another file"):
        builder.add_tar_members([member("./x/f.bin")], 1, "", sha("l1"))


def test_tree_file_and_directory_conflict_is_format_error() -> None:
    builder = TreeBuilder(None)
    builder.add_tar_members([member("x")], 0, "", sha("l0"))
    with pytest.raises(FormatError, match="file"):
        builder.add_tar_members([member("x/y")], 1, "", sha("l1"))
    with pytest.raises(FormatError, match="directory"):
        builder.add_tar_members([member("x/", b"5")], 1, "", sha("l1"))
    builder2 = TreeBuilder(None)
    builder2.add_tar_members([member("d/", b"5")], 0, "", sha("l0"))
    with pytest.raises(FormatError, match="conflicts with a directory"):
        builder2.add_tar_members([member("d")], 1, "", sha("l1"))


def test_tree_kitfile_in_layer_conflicts() -> None:
    builder = TreeBuilder(b"x")
    with pytest.raises(FormatError, match="conflicts"):
        builder.add_tar_members([member("Kitfile")], 0, "", LAYER_DIGEST)


@pytest.mark.parametrize(
    ("typeflag", "kind"),
    [
        (b"1", "hard link"),
        (b"2", "symbolic link"),
        (b"3", "character device"),
        (b"4", "block device"),
        (b"6", "FIFO"),
        (b"S", "sparse file"),
    ],
)
def test_tree_links_devices_fifos_are_unsafe(typeflag: bytes, kind: str) -> None:
    builder = TreeBuilder(None)
    with pytest.raises(UnsafeEntryError) as info:
        builder.add_tar_members(
            [member("ok.txt"), member("weights/evil", typeflag, linkname="/etc/passwd")],
            3, "", LAYER_DIGEST,
        )
    message = str(info.value)
    assert LAYER_DIGEST in message
    assert "'weights/evil'" in message
    assert kind in message


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/../../b", "model..bin"])
def test_tree_unsafe_names_name_layer_and_entry(name: str) -> None:
    builder = TreeBuilder(None)
    with pytest.raises(UnsafeEntryError) as info:
        builder.add_tar_members([member(name)], 0, "", LAYER_DIGEST)
    assert LAYER_DIGEST in str(info.value)
    assert repr(name) in str(info.value)


def test_tree_setuid_setgid_sticky_stripped() -> None:
    builder = TreeBuilder(None)
    builder.add_tar_members(
        [member("bin/", b"5", 0o1777), member("bin/tool", mode=0o6755), member("c", b"7", 0o4644)],
        0, "", LAYER_DIGEST,
    )
    tree = builder.build()
    assert node_at(tree, "bin").mode == 0o777
    assert node_at(tree, "bin/tool").mode == 0o755
    assert node_at(tree, "c").mode == 0o644  # '7' (contiguous) is a regular file


def test_tree_root_directory_entry_is_ignored() -> None:
    builder = TreeBuilder(None)
    builder.add_tar_members([member("./", b"5", 0o700), member("f")], 0, "", LAYER_DIGEST)
    tree = builder.build()
    assert tree.root.mode == 0o755
    assert sorted(tree.root.children) == ["f"]


def test_tree_add_file_for_raw_layer() -> None:
    builder = TreeBuilder(None)
    builder.add_file("pkg/__init__.py", 0o100644, 0, FileSource(2, 0), "layer x")
    with pytest.raises(UnsafeEntryError):
        builder.add_file("", 0o644, 0, FileSource(3, 0), "layer y")
    node = node_at(builder.build(), "pkg/__init__.py")
    assert (node.mode, node.size, node.source) == (0o644, 0, FileSource(2, 0))


# --- gzip checkpoint indexes (GZIDX) ----------------------------------------------------------


def gzidx(points: list[tuple[int, int, int, bytes | None]], *, version: int = 1,
          compressed: int = 10_000, uncompressed: int = 40_000) -> bytes:
    """A GZIDX file as indexed_gzip writes it (little-endian machine)."""
    head = b"GZIDX" + bytes([version, 0]) + compressed.to_bytes(8, "little") + \
        uncompressed.to_bytes(8, "little") + (65536).to_bytes(4, "little") + \
        (32768).to_bytes(4, "little") + len(points).to_bytes(4, "little")
    table = b"".join(c.to_bytes(8, "little") + u.to_bytes(8, "little") + bytes([bits, w is not None])
                     for c, u, bits, w in points)
    return head + table + b"".join(w for *_, w in points if w is not None)


def test_gzidx_table_locates_windows_and_the_checkpoints_around_a_range() -> None:
    w1, w2 = b"\1" * 32768, b"\2" * 32768
    data = gzidx([(10, 0, 0, None), (3000, 16_000, 3, w1), (6000, 33_000, 0, w2),
                  (10_000, 40_000, 5, None)])
    table = gzindex.parse_table(data)
    assert gzindex.parse_header(data[:gzindex.HEADER_BYTES]).table_bytes == 35 + 4 * 18
    starts = [p.window_at for p in table.points]
    assert starts == [None, 35 + 72, 35 + 72 + 32768, None]
    assert data[35 + 72 :][:32768] == w1 and data[35 + 72 + 32768 :][:32768] == w2
    before, after = table.around(16_000, 20_000)
    assert (before.uncompressed_offset, before.first_byte, before.bits) == (16_000, 2999, 3)
    assert after is not None and after.uncompressed_offset == 33_000
    before, after = table.around(39_000, 40_000)
    assert before.uncompressed_offset == 33_000 and after is not None and after.bits == 5
    # a subset with two of them is again a well-formed index with their windows
    sub = gzindex.subset(table, [(table.points[1], w1), (table.points[2], None)])
    again = gzindex.parse_table(sub)
    assert [(p.compressed_offset, p.uncompressed_offset, p.bits) for p in again.points] == [
        (3000, 16_000, 3), (6000, 33_000, 0)]
    assert again.points[1].window_at is None and sub.endswith(w1)


@pytest.mark.parametrize(("data", "message"), [
    (b"GZIDX\1", "truncated in its header"),
    (b"NOTIT" + bytes(30), "no GZIDX magic"),
    (gzidx([], version=2), "version 2"),
    (gzidx([(10, 0, 0, None), (20, 5, 0, None)])[:-1], "truncated in its table"),
    (gzidx([(3000, 16_000, 0, None), (10, 20_000, 0, None)]), "checkpoint 1 is malformed"),
    (gzidx([(10, 0, 9, None)]), "checkpoint 0 is malformed"),
    (gzidx([(10, 50_000, 0, None)]), "checkpoint 0 is malformed"),
])
def test_gzidx_malformed_indexes_are_format_errors(data: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        gzindex.parse_table(data)


@settings(max_examples=3000, deadline=None)
@given(name=st.text(st.sampled_from("ab./\0\n"), max_size=12))
def test_clean_entry_path_fast_path_agrees_with_normpath(name: str) -> None:
    """The already-clean shortcut gives what normpath and the refusals give."""
    cleaned, problem = clean_entry_path(name)
    if "\0" in name or name.startswith("/"):
        assert (cleaned, problem is None) == ("", False)
        return
    normal = posixpath.normpath(name) if name else "."
    if normal == ".":
        assert (cleaned, problem) == ("", None)
    elif ".." in normal:
        assert cleaned == "" and problem is not None
    else:
        assert (cleaned, problem) == (normal, None)
