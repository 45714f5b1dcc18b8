"""OCI descriptors, image manifests and image indexes, parsed and validated from bytes.

Accepts what KitOps has written over time: manifests with or without ``mediaType`` and
``artifactType`` fields, and the 2026 ModelKit index (an OCI image index whose entries carry
``modelMetadata`` labels). Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kitfs.errors import FormatError, NotFoundError, UsageError
from kitfs.format.digest import Digest
from kitfs.format.mediatypes import DOCKER_MANIFEST_LIST, OCI_INDEX

# A manifest or index larger than this is refused before it is read whole: the distribution
# registry refuses to store bigger ones, and kit (oras-go's defaultMaxMetadataBytes) refuses to
# fetch them. 4 MiB holds some 20,000 layer descriptors.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
# A config (the Kitfile as JSON) larger than its descriptor says is never fetched; one whose
# descriptor says more than this is refused before the fetch.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# JSON nested deeper than this is refused: no manifest, index or Kitfile needs it, and the
# renderers that walk ``parameters`` and index labels recurse once per level.
MAX_JSON_DEPTH = 100


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: Digest
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    artifact_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: object, where: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise FormatError(f"{where}: descriptor is not an object")
        media_type = obj.get("mediaType")
        size = obj.get("size")
        digest = obj.get("digest")
        annotations = obj.get("annotations") or {}
        if not isinstance(media_type, str) or not media_type:
            raise FormatError(f"{where}: descriptor has no mediaType")
        if not isinstance(digest, str):
            raise FormatError(f"{where}: descriptor has no digest")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise FormatError(f"{where}: descriptor size {size!r} is not a non-negative integer")
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise FormatError(f"{where}: annotations must map strings to strings")
        try:
            parsed = Digest.parse(digest)
        except FormatError as exc:
            raise FormatError(f"{where}: {exc}") from None
        artifact_type = obj.get("artifactType")
        extra = {k: v for k, v in obj.items() if k not in _DESCRIPTOR_KEYS}
        return cls(media_type, parsed, size, dict(annotations),
                   artifact_type if isinstance(artifact_type, str) else None, extra)


_DESCRIPTOR_KEYS = {"mediaType", "digest", "size", "annotations", "artifactType"}


@dataclass(frozen=True)
class Manifest:
    """An OCI image manifest (the ModelKit itself)."""

    config: Descriptor
    layers: tuple[Descriptor, ...]
    artifact_type: str | None
    annotations: dict[str, str]


@dataclass(frozen=True)
class Index:
    """An OCI image index; for ModelKits, entries are told apart by ``modelMetadata`` labels.

    Selection follows ``kit`` (KitOps ``pkg/lib/index/select.go``): an entry is chosen when it
    carries every ``KEY=VALUE`` asked for; exactly one entry must match, so an index of one
    entry needs no selector. ``modelMetadata`` is a flat object of labels whose values are any
    JSON; a string value is compared unquoted, any other value as its JSON text (``7000000000``,
    ``["cuda","metal"]``, ``true``). kitfs also lets an entry be picked by its annotations and
    by ``platform.KEY`` (``platform.architecture=amd64``), so a plain OCI index is selectable
    too; a ``modelMetadata`` label wins over an annotation of the same name.
    """

    manifests: tuple[Descriptor, ...]
    artifact_type: str | None

    def select(self, labels: dict[str, str]) -> Descriptor:
        """Pick the one entry whose labels match all of ``labels``.

        Raises:
            NotFoundError: the index is empty, or no entry matches (the message lists them all).
            UsageError: several entries match (the message lists them: add ``--select``).
        """
        if not self.manifests:
            raise NotFoundError("the index contains no ModelKits")
        matches: list[Descriptor] = []
        for d in self.manifests:
            if _labels_match(d, labels) and all(m.digest != d.digest for m in matches):
                matches.append(d)
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise NotFoundError(
                f"no entry of the index has {describe_selector(labels)}; the index contains:\n"
                + describe_entries(self.manifests)
            )
        if labels:
            what = f"{len(matches)} entries of the index match {describe_selector(labels)}"
        else:
            what = f"the index holds {len(matches)} ModelKits"
        raise UsageError(f"{what}; choose one with --select KEY=VALUE:\n"
                         + describe_entries(matches))


class _JsonFloat(float):
    """A JSON number with a fraction or exponent that remembers how it was written.

    ``kit`` compares label values by their JSON text (``1e3`` stays ``1e3``); Python's float
    would print ``1000.0``.
    """

    text: str

    def __new__(cls, text: str) -> _JsonFloat:
        value = super().__new__(cls, text)
        value.text = text
        return value


def label_value(value: object) -> str:
    """A label value as ``kit`` shows and compares it: strings unquoted, else compact JSON."""
    if isinstance(value, str):
        return value
    return _json_text(value)


def _json_text(value: object) -> str:
    if isinstance(value, _JsonFloat):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k), ensure_ascii=False)}:{_json_text(v)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_json_text(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def entry_labels(descriptor: Descriptor) -> dict[str, str]:
    """All the labels an index entry can be selected by, flattened to strings.

    Annotations, then ``platform.KEY``, then ``modelMetadata`` labels (which win on a clash).
    """
    labels: dict[str, str] = dict(descriptor.annotations)
    platform = descriptor.extra.get("platform")
    if isinstance(platform, dict):
        labels.update({f"platform.{k}": label_value(v) for k, v in platform.items()})
    metadata = descriptor.extra.get("modelMetadata")
    if isinstance(metadata, dict):
        labels.update({str(k): label_value(v) for k, v in metadata.items()})
    return labels


def describe_labels(descriptor: Descriptor) -> str:
    labels = entry_labels(descriptor)
    if not labels:
        return "(no labels)"
    return "(" + ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) + ")"


def describe_entries(entries: tuple[Descriptor, ...] | list[Descriptor]) -> str:
    """One line per entry: its digest and its labels."""
    return "\n".join(f"  {d.digest}  {describe_labels(d)}" for d in entries)


def describe_selector(labels: dict[str, str]) -> str:
    if not labels:
        return "no labels"
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _labels_match(descriptor: Descriptor, wanted: dict[str, str]) -> bool:
    labels = entry_labels(descriptor)
    return all(k in labels and labels[k] == v for k, v in wanted.items())


def load_json_object(data: bytes, what: str, limit_bytes: int) -> dict[str, Any]:
    """Decode a JSON object, refusing oversized or non-object documents with a clear error."""
    if len(data) > limit_bytes:
        raise FormatError(f"{what} is {len(data)} bytes, more than the {limit_bytes} allowed")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:  # ValueError: also integers of > 4300 digits
        raise FormatError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{what} is not a JSON object")
    if _depth(obj) > MAX_JSON_DEPTH:
        raise FormatError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
    return obj


def _depth(value: object) -> int:
    """How deeply ``value`` nests lists and objects (a scalar is 0), without recursing."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > MAX_JSON_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_document(data: bytes, content_type: str | None) -> Manifest | Index:
    """Parse a manifest-endpoint document into a ``Manifest`` or an ``Index``.

    The JSON ``mediaType`` field wins over the HTTP ``Content-Type``; old ModelKits have neither
    set to anything useful, and a document with ``manifests`` and no ``layers`` is an index.

    Raises:
        FormatError: malformed JSON, wrong schemaVersion, bad descriptors.
    """
    obj = load_json_object(data, "manifest", MAX_MANIFEST_BYTES)
    if obj.get("schemaVersion") != 2:
        raise FormatError(f"manifest schemaVersion is {obj.get('schemaVersion')!r}, expected 2")
    media_type = obj.get("mediaType") or content_type
    is_index = media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST) or (
        "manifests" in obj and "layers" not in obj
    )
    artifact_type = obj.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise FormatError("manifest artifactType is not a string")
    if is_index:
        # again, keeping each fractional number's JSON text for label values (see _JsonFloat)
        obj = json.loads(data, parse_float=_JsonFloat)
        entries = obj.get("manifests")
        if not isinstance(entries, list):
            raise FormatError("index has no manifests list")
        return Index(
            tuple(Descriptor.from_json(e, f"index entry {i}") for i, e in enumerate(entries)),
            artifact_type,
        )
    layers = obj.get("layers")
    if not isinstance(layers, list):
        raise FormatError("manifest has no layers list")
    annotations = obj.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise FormatError("manifest annotations are not an object")
    return Manifest(
        config=Descriptor.from_json(obj.get("config"), "manifest config"),
        layers=tuple(Descriptor.from_json(d, f"layer {i}") for i, d in enumerate(layers)),
        artifact_type=artifact_type,
        annotations={str(k): str(v) for k, v in annotations.items()},
    )
