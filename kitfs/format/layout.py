"""Where each layer's files go: the layer → path mapping of ``kit unpack``, and path safety.

Given a manifest and its config, ``plan_layout`` says for every layer that ``kit unpack`` would
extract: how to read it (tar or raw, compression), under which directory its tar names land,
and for raw layers the file path and mode. The four cases of the ModelKit format:

1. KitOps >= v0.5: config entries record their layer ``digest``. Entries are paired with layers
   by (digest, ``org.cncf.model.filepath``), then by order, because two layers may share one
   digest. Tar names are relative to the context root.
2. KitOps < v0.5 (no digests): layers are walked in manifest order with one counter per type;
   tar names are relative to the *parent* of the entry's path.
3. ModelPack with no Kitfile: every layer needs ``org.cncf.model.filepath``; no Kitfile is shown.
4. ModelPack packed by kit: the Kitfile comes from the ``ml.kitops.modelkit.kitfile``
   annotation, then as case 1.

``check_entry_path`` applies kit's ``VerifySubpath`` rules to every name. Pure: no I/O.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections import deque
from dataclasses import dataclass
from typing import Any

from kitfs.errors import FormatError, UnsafeEntryError
from kitfs.format.digest import Digest
from kitfs.format.kitfile import Entry, KitfileInfo, parse_kitfile, render_kitfile
from kitfs.format.mediatypes import Family, Kind, LayerType, Layout, config_family, parse_layer_type
from kitfs.format.oci import MAX_CONFIG_BYTES, Descriptor, Manifest, load_json_object

FILEPATH_ANNOTATIONS = ("org.cncf.model.filepath", "org.cnai.model.filepath")
METADATA_ANNOTATIONS = ("org.cncf.model.file.metadata+json", "org.cnai.model.file.metadata+json")
KITFILE_ANNOTATION = "ml.kitops.modelkit.kitfile"
CREATED_ANNOTATION = "org.opencontainers.image.created"

_KIND_SECTION = {
    Kind.MODEL: "model",
    Kind.MODELPART: "parts",
    Kind.DATASET: "datasets",
    Kind.CODE: "code",
    Kind.DOCS: "docs",
    Kind.PROMPT: "prompts",
    Kind.MCPB: "mcpServers",
}


@dataclass(frozen=True)
class Placement:
    """One layer to show, and where."""

    index: int  # position in manifest.layers
    descriptor: Descriptor
    layer_type: LayerType
    prefix: str  # directory the tar names are relative to ("" = mount root)
    raw_path: str | None  # raw layers: the file's path
    raw_mode: int  # raw layers: permission bits
    diff_id: Digest | None  # digest of the uncompressed bytes, when recorded
    # Where the layer's files sit in the tree, from its Kitfile entry or path annotation ("" when
    # unknown: the whole tree). kit pack puts a layer's files at and under this path, which is
    # what lets a mount index a layer only when something at or above that path is looked at.
    claim: str = ""
    entry: Entry | None = None  # the Kitfile entry it belongs to (what --filter matches)


@dataclass(frozen=True)
class LayoutPlan:
    family: Family
    placements: tuple[Placement, ...]
    kitfile: bytes | None  # the rendered Kitfile, or None for foreign ModelPacks
    parent_model_reference: str | None  # model.path naming another ModelKit
    unplaced: tuple[int, ...]  # layer indexes no Kitfile entry claims (kit skips them)
    # the Kitfile as the config (or a ModelPack's Kitfile annotation) holds it, for the Python API
    kitfile_data: dict[str, Any] | None = None


def check_entry_path(name: str, where: str) -> str:
    """Clean a tar or annotation path and apply kit's VerifySubpath rules.

    Returns the cleaned relative path ("" for the root itself).

    Raises:
        UnsafeEntryError: absolute paths, NUL bytes, ``..`` anywhere (kit refuses even
            ``model..bin``, because it looks for ``..`` in the relative path).
    """
    cleaned, problem = clean_entry_path(name)
    if problem is not None:
        raise UnsafeEntryError(f"{where}: {problem}")
    return cleaned


# A path that is clean already (relative, no NUL, no empty or "." component, no trailing
# slash): normpath would return it unchanged, so the hot loop skips it (with no ".." in it).
_CLEAN_PATH = re.compile(r"(?!\.(?:/|\Z))[^/\0]+(?:/(?!\.(?:/|\Z))[^/\0]+)*")


def all_clean(names: list[str]) -> bool:
    """Whether ``clean_entry_path`` would return every one of ``names`` unchanged and refuse
    none (False says nothing about which): a few substring searches over the batch joined,
    instead of a call and a regular-expression match per name, for the hot loop of indexing
    a layer of many files. With the names joined by "/" between two more "/", a name is
    clean exactly when it adds no empty component ("//"), no "." component ("/./") and no
    ".." anywhere (kit refuses even ``model..bin``); a NUL in a name, or an empty name (the
    kit root), makes it False."""
    if not names:
        return True
    joined = "\0".join(names)
    if joined.count("\0") != len(names) - 1:
        return False
    slashed = "/" + joined.replace("\0", "/") + "/"
    return "//" not in slashed and "/./" not in slashed and ".." not in slashed


def clean_entry_path(name: str) -> tuple[str, str | None]:
    """``check_entry_path`` without the exception: the cleaned path and why kit refuses it
    (None if it does not). For hot loops, which format their error context only on error."""
    if ".." not in name and _CLEAN_PATH.fullmatch(name):
        return name, None
    if "\0" in name:
        return "", f"path {name!r} contains a NUL byte"
    if name.startswith("/"):
        return "", f"absolute path {name!r} (kit refuses absolute paths)"
    cleaned = posixpath.normpath(name) if name else "."
    if cleaned == ".":
        return "", None
    if ".." in cleaned:
        return "", f"path {name!r} leaves the kit or contains '..' (kit refuses both)"
    return cleaned, None


def _filepath_annotation(descriptor: Descriptor) -> str | None:
    for key in FILEPATH_ANNOTATIONS:
        if key in descriptor.annotations:
            return descriptor.annotations[key]
    return None


def _raw_mode(descriptor: Descriptor) -> int:
    for key in METADATA_ANNOTATIONS:
        if key in descriptor.annotations:
            try:
                meta = json.loads(descriptor.annotations[key])
                mode = int(meta.get("mode", 0o644))
            except (ValueError, TypeError, AttributeError, OverflowError, RecursionError):
                raise FormatError(
                    f"layer {descriptor.digest}: annotation {key} is not valid file metadata"
                ) from None
            return mode & 0o777
    return 0o644


def _digest_or_none(text: object) -> Digest | None:
    """A recorded diffId, or None when there is none or it is no digest (it is optional)."""
    if not text or not isinstance(text, str):
        return None
    try:
        return Digest.parse(text)
    except FormatError:
        return None


def plan_layout(manifest: Manifest, config: bytes) -> LayoutPlan:
    """Decide where every layer of a ModelKit or ModelPack goes, as ``kit unpack`` would.

    Args:
        manifest: the parsed, digest-checked manifest.
        config: the digest-checked config blob.

    Raises:
        FormatError: the config is malformed, an entry names a layer that is not there, a raw
            layer has no file path, or a layer type is unknown.
        UnsafeEntryError: a path annotation escapes the kit.
    """
    family = config_family(manifest.artifact_type, manifest.config.media_type)
    config_obj = load_json_object(config, "config", MAX_CONFIG_BYTES)
    types = [parse_layer_type(d.media_type, d.annotations) for d in manifest.layers]

    kitfile_obj: dict[str, Any] | None
    if family is Family.KITOPS:
        kitfile_obj = config_obj
    elif KITFILE_ANNOTATION in manifest.annotations:
        kitfile_obj = load_json_object(
            manifest.annotations[KITFILE_ANNOTATION].encode(), "Kitfile annotation", MAX_CONFIG_BYTES
        )
    else:
        kitfile_obj = None

    if kitfile_obj is None:
        placements = _plan_modelpack(manifest, types, config_obj)
        return LayoutPlan(family, placements, None, None, ())

    info = parse_kitfile(kitfile_obj)
    if info.has_layer_info:
        placements = _plan_by_digest(manifest, types, info)
    else:
        placements = _plan_legacy(manifest, types, info)
    parent = next((e.path for e in info.entries if e.section == "model" and e.remote), None)
    placed = {p.index for p in placements}
    unplaced = tuple(i for i in range(len(manifest.layers)) if i not in placed)
    return LayoutPlan(family, placements, render_kitfile(kitfile_obj), parent, unplaced,
                      kitfile_obj)


def _make_placement(
    index: int, descriptor: Descriptor, layer_type: LayerType, entry: Entry | None, legacy: bool
) -> Placement:
    where = f"layer {descriptor.digest}"
    annotated = _filepath_annotation(descriptor)
    if layer_type.layout is Layout.RAW:
        path = annotated if annotated is not None else None
        if path is None:
            raise FormatError(f"{where}: raw layer has no org.cncf.model.filepath annotation")
        raw_path = check_entry_path(path, where)
        if not raw_path:
            raise UnsafeEntryError(f"{where}: raw layer path {path!r} names the kit root")
        return Placement(index, descriptor, layer_type, "", raw_path, _raw_mode(descriptor),
                         _digest_or_none(entry.diff_id if entry else None), raw_path, entry)
    prefix = ""
    if legacy and entry is not None:
        prefix = check_entry_path(posixpath.dirname(entry.path.rstrip("/")), where)
    claim_text = entry.path if entry is not None else annotated
    return Placement(index, descriptor, layer_type, prefix, None, 0,
                     _digest_or_none(entry.diff_id if entry else None), _claim(claim_text, where),
                     entry)


def _claim(path: str | None, where: str) -> str:
    """The cleaned path a tar layer's files sit under; "" (everywhere) when it is unsafe or
    missing: the tar's own entries are checked when the layer is indexed."""
    if not path:
        return ""
    try:
        return check_entry_path(path, where)
    except UnsafeEntryError:
        return ""


def _plan_by_digest(
    manifest: Manifest, types: list[LayerType], info: KitfileInfo
) -> tuple[Placement, ...]:
    # Each entry takes the first unused layer of its digest whose path annotation is the
    # entry's path, else the first unused layer of its digest. Queues in manifest order, with
    # used layers skipped as they come up: linear even for 10,000 layers of one digest.
    by_digest: dict[str, deque[int]] = {}
    by_path: dict[tuple[str, str | None], deque[int]] = {}
    for i, d in enumerate(manifest.layers):
        by_digest.setdefault(str(d.digest), deque()).append(i)
        by_path.setdefault((str(d.digest), _filepath_annotation(d)), deque()).append(i)
    used: set[int] = set()
    placements = []
    for entry in info.entries:
        if entry.remote:
            continue
        wanted = posixpath.normpath(entry.path) if entry.path else "."
        index = _first_unused(by_path.get((entry.digest or "", wanted)), used)
        if index is None:
            index = _first_unused(by_digest.get(entry.digest or ""), used)
        if index is None:
            raise FormatError(
                f"Kitfile {entry.section} entry {entry.path!r} names layer {entry.digest}, "
                "which is not in the manifest"
            )
        used.add(index)
        placements.append(_make_placement(index, manifest.layers[index], types[index], entry, False))
    return tuple(placements)


def _first_unused(queue: deque[int] | None, used: set[int]) -> int | None:
    while queue and queue[0] in used:
        queue.popleft()
    return queue[0] if queue else None


def _plan_legacy(
    manifest: Manifest, types: list[LayerType], info: KitfileInfo
) -> tuple[Placement, ...]:
    queues: dict[str, list[Entry]] = {}
    for entry in info.entries:
        if not entry.remote:
            queues.setdefault(entry.section, []).append(entry)
    placements = []
    for index, (descriptor, layer_type) in enumerate(zip(manifest.layers, types, strict=True)):
        section = _KIND_SECTION[layer_type.kind]
        queue = queues.get(section) or []
        if not queue:
            raise FormatError(
                f"layer {descriptor.digest} ({descriptor.media_type}) has no matching "
                f"{section} entry in the Kitfile"
            )
        entry = queue.pop(0)
        if entry.digest and entry.digest != str(descriptor.digest):
            raise FormatError(
                f"digest in config and manifest do not match: {entry.digest} != {descriptor.digest}"
            )
        placements.append(_make_placement(index, descriptor, layer_type, entry, True))
    return tuple(placements)


def _plan_modelpack(
    manifest: Manifest, types: list[LayerType], config_obj: dict[str, Any]
) -> tuple[Placement, ...]:
    modelfs = config_obj.get("modelfs") or {}
    if not isinstance(modelfs, dict):
        raise FormatError("ModelPack config: modelfs is not an object")
    diff_ids = modelfs.get("diffIds") or modelfs.get("diff_ids") or []
    if not isinstance(diff_ids, list):
        raise FormatError("ModelPack config: modelfs.diffIds is not a list")
    if diff_ids and len(diff_ids) != len(manifest.layers):
        raise FormatError(
            f"ModelPack config lists {len(diff_ids)} diffIds for {len(manifest.layers)} layers"
        )
    placements = []
    for index, (descriptor, layer_type) in enumerate(zip(manifest.layers, types, strict=True)):
        path = _filepath_annotation(descriptor)
        if path is None:
            raise FormatError(
                f"ModelPack layer {descriptor.digest} has no org.cncf.model.filepath annotation"
            )
        diff_id = _digest_or_none(diff_ids[index] if diff_ids else None)
        entry = Entry(_KIND_SECTION[layer_type.kind], path, str(descriptor.digest),
                      str(diff_id) if diff_id else None)
        placements.append(_make_placement(index, descriptor, layer_type, entry, False))
    return tuple(placements)
