"""Fuzzing the pure parsers with hypothesis: hostile bytes either parse or raise ``FormatError``.

A manifest, a config or a tar layer comes from a registry kitfs does not trust. Whatever the
bytes, the parsers in ``kitfs.format`` must either return values or raise the project's
``FormatError`` (``UnsafeEntryError`` is one); any other exception would be a traceback on the
command line and a logged "failed unexpectedly" EIO under FUSE. Targets:

- ``TarScanner``: arbitrary bytes, and real archives (tarfile) mutated in their headers with
  the checksum fixed up so that the mutation reaches the parser, fed in random pieces; then
  the members through ``TreeBuilder`` (kit's path and type rules).
- ``parse_document``: arbitrary bytes, arbitrary JSON, and valid manifests and indexes mutated
  one node at a time (also ``Index.select`` on what parses).
- ``plan_layout`` (with ``parse_kitfile`` and ``render_kitfile`` inside): a valid ModelKit or
  ModelPack manifest and config, one of them mutated, then the claims put into a tree.
- ``parse_kitfile``/``render_kitfile`` on arbitrary JSON, ``parse_pax_records``, ``Digest``.

Budget: every property has a fixed ``max_examples`` (1,000; 3,000 for the tar scanner) and no
deadline; the file runs in about 25 s on the CI machine. ``KITFS_FUZZ_EXAMPLES=20000`` makes a
longer hunt (about 11 minutes; pass ``-p no:timeout``). What it found is fixed in the parsers,
each with its own regression test in test_unit_tar.py or test_unit_format.py: two scans that
never returned (a negative octal size, an empty extended header), OverflowError on a PAX mtime
of 1e400 and on a raw layer mode of 1e400, ValueError on a 5,000-digit integer, TypeError and
AttributeError on configs whose fields have the wrong JSON types.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kitfs.errors import FormatError, KitfsError, NotFoundError, UsageError
from kitfs.format.digest import Digest
from kitfs.format.kitfile import parse_kitfile, render_kitfile
from kitfs.format.layout import check_entry_path, plan_layout
from kitfs.format.oci import Index, Manifest, parse_document
from kitfs.format.tar import BLOCK, TarMember, TarScanner, parse_number, parse_pax_records
from kitfs.format.tree import Tree, TreeBuilder
from tests.test_unit_tar import FORMATS, Spec, build

# Failing examples are shown whole; some hold 5,000-digit PAX numbers, which is the point.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

EXAMPLES = int(os.environ.get("KITFS_FUZZ_EXAMPLES", "1000"))  # raise it for a long hunt
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_TAR = settings(FUZZ, max_examples=3 * EXAMPLES)


T = TypeVar("T")


def parses_or_format_error(parse: Callable[[], T]) -> T | None:
    """What ``parse`` returns, or None when it raised ``FormatError``; anything else fails."""
    try:
        return parse()
    except FormatError:
        return None


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- tar ------------------------------------------------------------------------------------


def scan(archive: bytes, extra_per_feed: list[int]) -> list[TarMember]:
    """Drive the scanner as the index builder does: from the offset it wants, sometimes more
    bytes than it asked for (extra > 0), or fewer (extra < 0: it buffers and asks for the
    rest). A scan that stops making progress fails the test."""
    scanner = TarScanner(len(archive))
    members: list[TarMember] = []
    steps = 0
    while (want := scanner.wants()) is not None:
        offset, length = want
        assert 0 <= offset < len(archive) and length > 0 and offset + length <= len(archive)
        extra = extra_per_feed[steps % len(extra_per_feed)] if extra_per_feed else 0
        members.extend(scanner.feed(archive[offset : offset + max(1, length + extra)]))
        steps += 1  # every feed hands over at least one new byte, so this bounds the steps
        assert steps <= len(archive) + 2, "the scanner does not make progress"
    for member in members:
        assert member.data_offset % BLOCK == 0
        assert member.size >= 0 and member.data_offset + member.size <= len(archive)
        assert 0 <= member.mode <= 0o7777
    return members


def tree_of(members: list[TarMember], prefix: str) -> Tree:
    builder = TreeBuilder(b"manifestVersion: 1.0.0\n")
    builder.add_tar_members(members, 0, prefix, sha(b"layer"))
    return builder.build()


def check_tree(tree: Tree) -> None:
    """What a mount can ever show: clean relative paths, files and directories only."""
    for node in tree.walk():
        if node.path:
            assert check_entry_path(node.path, "fuzz") == node.path
            assert "\0" not in node.path
        assert node.mode == node.mode & 0o777
        assert node.is_dir or not node.children


def fix_checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


_HEADER_FIELDS = [(0, 100), (100, 8), (124, 12), (136, 12), (156, 1), (157, 100),
                  (257, 8), (345, 155)]
_HOSTILE_PAX = st.sampled_from([
    b"size=-1", b"size=99999999999999999999999999", b"size=1e3", b"size=", b"size=0x10",
    b"mtime=1e400", b"mtime=-1e400", b"mtime=nan", b"mtime=inf", b"mtime=" + b"9" * 5000,
    b"path=../../etc/passwd", b"path=/abs", b"path=a\0b", b"path=", b"path=a/../../b",
    b"path=new\nline", b"path=\xff\xfe", b"linkpath=/etc/shadow", b"size=" + b"1" * 5000,
])
_FIELD_VALUES = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([b"\x80" + b"\xff" * 11, b"\xff" * 12, b"\xc0" + b"\x00" * 11,
                     b"77777777777\0", b"-1", b"0x1f", b"1_0", b" 0o17", b"9" * 12]),
    st.sampled_from([b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"x", b"g", b"L", b"K",
                     b"S", b"V", b"\0"]),
)


def pax_block(records: list[bytes], name: bytes = b"./PaxHeaders/x") -> bytes:
    body = b""
    for record in records:
        text = b" " + record + b"\n"
        length = len(text) + 1
        while len(str(length)) + len(text) != length:  # the length counts its own digits
            length = len(str(length)) + len(text)
        body += str(length).encode() + text
    header = bytearray(BLOCK)
    header[0 : len(name)] = name
    header[100:108] = b"0000644\0"
    header[124:136] = b"%011o\0" % len(body)
    header[156:157] = b"x"
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    fix_checksum(header)
    return bytes(header) + body + b"\0" * (-len(body) % BLOCK)


_NAMES = st.one_of(
    st.text(st.sampled_from("ab/é.-"), min_size=1, max_size=12).filter(lambda n: n.strip("/")),
    st.builds(lambda n: "d/" * n + "x" * 90, st.integers(1, 40)),  # past USTAR: PAX or GNU long
)


@st.composite
def small_specs(draw: st.DrawFn) -> list[Spec]:
    """Up to 4 members (files, directories, symlinks) with short bodies: small examples."""
    specs = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["file", "file", "dir", "symlink"]))
        specs.append(Spec(kind, draw(_NAMES), draw(st.integers(0, 0o7777)), 0,
                          draw(st.binary(max_size=700)) if kind == "file" else b"",
                          draw(_NAMES) if kind == "symlink" else ""))
    return specs


@st.composite
def mutated_archives(draw: st.DrawFn) -> bytes:
    """A real archive, then a few header mutations (checksum fixed up or not), hostile PAX
    records before a member, and perhaps a cut or some garbage at the end."""
    archive = bytearray(build(draw(small_specs()), FORMATS[draw(st.sampled_from(["gnu", "pax"]))]))
    for _ in range(draw(st.integers(0, 4))):
        if len(archive) < BLOCK:
            break
        header = draw(st.integers(0, len(archive) // BLOCK - 1)) * BLOCK
        block = bytearray(archive[header : header + BLOCK])
        start, width = draw(st.sampled_from(_HEADER_FIELDS))
        value = draw(_FIELD_VALUES)[:width]
        block[start : start + len(value)] = value
        if draw(st.integers(0, 9)):  # mostly: a bad checksum stops the scan at this header
            fix_checksum(block)
        archive[header : header + BLOCK] = block
    if draw(st.booleans()):  # hostile PAX records (or none: an empty 'x' header) before a member
        records = draw(st.lists(_HOSTILE_PAX, max_size=3))
        at = draw(st.integers(0, len(archive) // BLOCK)) * BLOCK
        archive[at:at] = pax_block(records)
    cut = draw(st.sampled_from(["none", "cut", "garbage"]))
    if cut == "cut" and archive:
        archive = archive[: draw(st.integers(0, len(archive)))]
    elif cut == "garbage":
        archive += draw(st.binary(max_size=1100))
    return bytes(archive)


_FEEDS = st.lists(st.sampled_from([0, 0, 1, 511, 512, 1024, 4096, -1, -300]), max_size=4)


@FUZZ_TAR
@given(archive=st.binary(max_size=4096), feeds=_FEEDS)
def test_arbitrary_bytes_scan_or_raise_format_error(archive: bytes, feeds: list[int]) -> None:
    members = parses_or_format_error(lambda: scan(archive, feeds))
    if isinstance(members, list):
        tree = parses_or_format_error(lambda: tree_of(members, ""))
        if isinstance(tree, Tree):
            check_tree(tree)


@FUZZ_TAR
@given(archive=mutated_archives(), feeds=_FEEDS, prefix=st.sampled_from(["", "data", "a/b"]))
def test_mutated_archives_scan_or_raise_format_error(archive: bytes, feeds: list[int],
                                                     prefix: str) -> None:
    members = parses_or_format_error(lambda: scan(archive, feeds))
    if isinstance(members, list):
        tree = parses_or_format_error(lambda: tree_of(members, prefix))
        if isinstance(tree, Tree):
            check_tree(tree)


@FUZZ
@given(body=st.one_of(st.binary(max_size=300),
                      st.lists(_HOSTILE_PAX, max_size=4).map(lambda r: pax_block(r)[BLOCK:])))
def test_pax_records_parse_or_raise_format_error(body: bytes) -> None:
    records = parses_or_format_error(lambda: parse_pax_records(body))
    assert records is None or isinstance(records, dict)


@FUZZ
@given(field=st.binary(min_size=1, max_size=12))
def test_numeric_fields_parse_or_raise_format_error(field: bytes) -> None:
    value = parses_or_format_error(lambda: parse_number(field, "size"))
    assert value is None or (isinstance(value, int) and value >= 0)


# --- JSON documents -------------------------------------------------------------------------

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(10**400), 10**400), st.floats(),
    st.text(max_size=20),
    st.sampled_from(["sha256:" + "a" * 64, "sha256:A", "sha512:" + "b" * 128, "md5:x", "",
                     "../../etc/passwd", "/abs", "a\0b", "model..bin", "x/y:z", "h/r:t@sha256:1",
                     "127.0.0.1:5000/kit/self:v1", "application/vnd.kitops.modelkit.model.v1.tar",
                     "application/vnd.kitops.modelkit.code.v1.raw+zstd", "application/x-unknown",
                     '{"mode": 1e400}', '{"mode": "rwx"}', '{"mode": 420}', "[]"]),
)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=20,
)


def paths_in(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every node's path in a JSON value (keys and list positions)."""
    found = [here]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths_in(item, (*here, key))
    elif isinstance(value, list):
        for position, item in enumerate(value):
            found += paths_in(item, (*here, position))
    return found


@st.composite
def mutated(draw: st.DrawFn, document: Any) -> Any:
    """``document`` with one to three nodes replaced by arbitrary JSON, or deleted."""
    document = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths_in(document)))
        if not path:
            document = draw(JSON_VALUES)
            continue
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        if isinstance(parent, dict | list) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    return document


KIT = "application/vnd.kitops.modelkit"


def kit_documents(legacy: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """A valid ModelKit manifest and config (tar model, raw code, gzip dataset, docs)."""
    blobs = {name: name.encode() * 3 for name in ("model", "code", "data", "docs")}
    types = {"model": f"{KIT}.model.v1.tar", "code": f"{KIT}.code.v1.raw",
             "data": f"{KIT}.dataset.v1.tar+gzip", "docs": f"{KIT}.docs.v1.tar"}
    paths = {"model": "models/m.bin", "code": "src/a.py", "data": "data/train", "docs": "README.md"}
    layers = [{"mediaType": types[n], "digest": sha(b), "size": len(b),
               "annotations": {"org.cncf.model.filepath": paths[n],
                               **({"org.cncf.model.file.metadata+json": '{"mode": 493}'}
                                  if n == "code" else {})}}
              for n, b in blobs.items()]
    def entry(name: str) -> dict[str, Any]:
        base: dict[str, Any] = {"path": paths[name]}
        if not legacy:
            base |= {"digest": sha(blobs[name]), "diffId": sha(blobs[name])}
        return base
    config = {"manifestVersion": "1.0.0", "package": {"name": "p", "authors": ["a", "b"]},
              "model": {**entry("model"), "name": "m", "parameters": {"k": [1, 2.5, "x"]},
                        "parts": []},
              "code": [entry("code")], "datasets": [{**entry("data"), "name": "d"}],
              "docs": [entry("docs")]}
    config_bytes = json.dumps(config).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "artifactType": f"{KIT}.manifest.v1+json",
                "config": {"mediaType": f"{KIT}.config.v1+json", "digest": sha(config_bytes),
                           "size": len(config_bytes)},
                "layers": layers, "annotations": {"org.opencontainers.image.created": "2024"}}
    return manifest, config


def modelpack_documents() -> tuple[dict[str, Any], dict[str, Any]]:
    weight = b"weights"
    config = {"descriptor": {"name": "x"}, "config": {}, "modelfs": {"type": "layers",
                                                                     "diffIds": [sha(weight)]}}
    manifest = {"schemaVersion": 2, "artifactType": "application/vnd.cncf.model.manifest.v1+json",
                "config": {"mediaType": "application/vnd.cncf.model.config.v1+json",
                           "digest": sha(b"{}"), "size": 2},
                "layers": [{"mediaType": "application/vnd.cncf.model.weight.v1.raw",
                            "digest": sha(weight), "size": len(weight),
                            "annotations": {"org.cncf.model.filepath": "w/model.bin"}}]}
    return manifest, config


def index_document() -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": sha(str(i).encode()), "size": 100 + i,
                           "modelMetadata": {"size": 7e9, "backends": ["cuda", "metal"]},
                           "platform": {"architecture": "amd64"},
                           "annotations": {"quant": f"q{i}"}} for i in range(2)]}


def document_or_none(data: bytes, content_type: str | None = None) -> Manifest | Index | None:
    parsed = parses_or_format_error(lambda: parse_document(data, content_type))
    assert parsed is None or isinstance(parsed, Manifest | Index)
    return parsed


def select_or_refuse(index: Index, labels: dict[str, str]) -> None:
    """Choosing an entry may find none or several: those are the only errors it gives."""
    try:
        index.select(labels)
    except (NotFoundError, UsageError):
        pass


_CONTENT_TYPES = st.sampled_from([None, "application/vnd.oci.image.index.v1+json",
                                  "application/vnd.oci.image.manifest.v1+json", "text/plain"])


@FUZZ
@given(data=st.binary(max_size=600), content_type=_CONTENT_TYPES)
def test_arbitrary_bytes_as_a_manifest(data: bytes, content_type: str | None) -> None:
    document_or_none(data, content_type)


@FUZZ
@given(value=JSON_VALUES, content_type=_CONTENT_TYPES)
def test_arbitrary_json_as_a_manifest(value: Any, content_type: str | None) -> None:
    document_or_none(json.dumps(value).encode(), content_type)


@FUZZ
@given(data=st.data(), which=st.sampled_from(["kit", "legacy", "modelpack", "index"]))
def test_mutated_manifests_and_indexes(data: st.DataObject, which: str) -> None:
    if which == "index":
        original: dict[str, Any] = index_document()
    elif which == "modelpack":
        original = modelpack_documents()[0]
    else:
        original = kit_documents(which == "legacy")[0]
    document = document_or_none(json.dumps(data.draw(mutated(original))).encode())
    if isinstance(document, Index):
        labels = data.draw(st.dictionaries(st.sampled_from(["quant", "size", "backends",
                                                             "platform.architecture"]),
                                           st.sampled_from(["q0", "7000000000", "amd64", "x"]),
                                           max_size=2))
        select_or_refuse(document, labels)


@FUZZ
@given(data=st.data(), which=st.sampled_from(["kit", "legacy", "modelpack"]),
       target=st.sampled_from(["config", "manifest", "both"]))
def test_mutated_kits_plan_or_raise_format_error(data: st.DataObject, which: str,
                                                 target: str) -> None:
    manifest_obj, config_obj = (modelpack_documents() if which == "modelpack"
                                else kit_documents(which == "legacy"))
    if target in ("manifest", "both"):
        manifest_obj = data.draw(mutated(manifest_obj))
    if target in ("config", "both"):
        config_obj = data.draw(mutated(config_obj))
    manifest = document_or_none(json.dumps(manifest_obj).encode())
    if not isinstance(manifest, Manifest):
        return
    plan = parses_or_format_error(lambda: plan_layout(manifest, json.dumps(config_obj).encode()))
    if plan is None:
        return
    builder = TreeBuilder(plan.kitfile)
    for placement in plan.placements:
        assert placement.claim == "" or check_entry_path(placement.claim, "fuzz") == placement.claim
        if placement.raw_path is not None:
            assert check_entry_path(placement.raw_path, "fuzz") == placement.raw_path
            assert 0 <= placement.raw_mode <= 0o777
        claim = placement.claim
        parses_or_format_error(lambda: builder.add_parents(claim, "fuzz"))  # noqa: B023
    check_tree(builder.build())


@FUZZ
@given(value=st.dictionaries(st.sampled_from(["manifestVersion", "package", "model", "code",
                                              "datasets", "docs", "prompts", "mcpServers"]),
                             JSON_VALUES, max_size=5))
def test_arbitrary_kitfile_configs_parse_and_render_or_raise_format_error(
        value: dict[str, Any]) -> None:
    info = parses_or_format_error(lambda: parse_kitfile(value))
    if info is not None:
        rendered = parses_or_format_error(lambda: render_kitfile(value))
        assert rendered is None or isinstance(rendered, bytes)


@FUZZ
@given(text=st.one_of(st.text(max_size=140),
                      st.builds(lambda a, h: f"{a}:{h}", st.sampled_from(["sha256", "sha512", "x"]),
                                st.text("0123456789abcdefABCDEF", max_size=130))))
def test_digests_parse_or_raise_format_error(text: str) -> None:
    digest = parses_or_format_error(lambda: Digest.parse(text))
    assert digest is None or str(digest) == text


def test_the_fuzz_harness_fails_on_other_exceptions() -> None:
    """The harness itself: an exception other than FormatError is not swallowed."""
    for error in (ValueError("x"), OverflowError("x"), KitfsError("x")):
        def boom(error: Exception = error) -> None:
            raise error
        try:
            parses_or_format_error(boom)
        except type(error):
            continue
        raise AssertionError(f"{error!r} was swallowed")


def test_a_real_tar_still_scans_under_the_fuzz_driver() -> None:
    """The driver feeds extra bytes the way the index builder does and still finds every member."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(5):
            info = tarfile.TarInfo(f"d/f{i}")
            info.size = 700 * i
            tar.addfile(info, io.BytesIO(b"x" * info.size))
    members = scan(buffer.getvalue(), [0, 1024, 1])
    assert [m.name for m in members] == [f"d/f{i}" for i in range(5)]
