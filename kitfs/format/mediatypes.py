"""Layer, config and manifest media types of KitOps ModelKits and CNCF ModelPacks.

A layer media type tells three things: which Kitfile section the layer belongs to (``kind``), how
its bytes are laid out (``tar`` or ``raw``) and how they are compressed (none, gzip, zstd).
Recognised families:

- KitOps: ``application/vnd.kitops.modelkit.<base>.v1.<format>[+<compression>]``
  with base model, modelpart, dataset, code, docs, mcpb.
- CNCF ModelPack: ``application/vnd.cncf.model.<base>.v1.<format>[+<compression>]``
  with base weight, weight.config, dataset, code, doc.
- Legacy ModelPack (before the CNCF donation): ``application/vnd.cnai.model.…`` likewise.

Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from kitfs.errors import FormatError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

KIT = "application/vnd.kitops.modelkit"  # the prefix of every KitOps media type
KIT_CONFIG = f"{KIT}.config.v1+json"
KIT_ARTIFACT = f"{KIT}.manifest.v1+json"
KIT_INDEX_ARTIFACT = f"{KIT}.index.v1+json"
MODELPACK_CONFIG = "application/vnd.cncf.model.config.v1+json"
MODELPACK_ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
LEGACY_MODELPACK_CONFIG = "application/vnd.cnai.model.config.v1+json"
LEGACY_MODELPACK_ARTIFACT = "application/vnd.cnai.model.manifest.v1+json"

# Accept header for manifest GETs: everything kitfs can read.
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])


class Kind(Enum):
    """The Kitfile section a layer belongs to (the KitOps names)."""

    MODEL = "model"
    MODELPART = "modelpart"
    DATASET = "dataset"
    CODE = "code"
    DOCS = "docs"
    PROMPT = "prompt"  # a code layer carrying ml.kitops.modelkit.layer-subtype=prompt
    MCPB = "mcpb"


class Layout(Enum):
    """How a layer's (uncompressed) bytes hold its files."""

    TAR = "tar"
    RAW = "raw"  # the blob is the bytes of one file


class Compression(Enum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


class Family(Enum):
    KITOPS = "kitops"
    MODELPACK = "modelpack"


@dataclass(frozen=True)
class LayerType:
    """What a layer media type says."""

    family: Family
    kind: Kind
    layout: Layout
    compression: Compression


_KIT_BASES = {
    "model": Kind.MODEL,
    "modelpart": Kind.MODELPART,
    "dataset": Kind.DATASET,
    "code": Kind.CODE,
    "docs": Kind.DOCS,
    "mcpb": Kind.MCPB,
}
_MODELPACK_BASES = {
    "weight": Kind.MODEL,
    "weight.config": Kind.MODELPART,
    "dataset": Kind.DATASET,
    "code": Kind.CODE,
    "doc": Kind.DOCS,
}
_KIT_RE = re.compile(r"^application/vnd\.kitops\.modelkit\.(\w+)\.v1\.(tar|raw)(?:\+(gzip|zstd))?$")
_MODELPACK_RE = re.compile(
    r"^application/vnd\.(?:cncf|cnai)\.model\.(weight\.config|weight|dataset|code|doc)\.v1\."
    r"(tar|raw)(?:\+(gzip|zstd))?$"
)

PROMPT_SUBTYPE_ANNOTATION = "ml.kitops.modelkit.layer-subtype"


def parse_layer_type(media_type: str, annotations: dict[str, str] | None = None) -> LayerType:
    """Classify a layer media type.

    Args:
        media_type: the descriptor's ``mediaType``.
        annotations: the descriptor's annotations; a code layer with the prompt subtype is a
            ``Kind.PROMPT`` layer.

    Raises:
        FormatError: for a media type that is neither KitOps nor ModelPack.
    """
    if match := _KIT_RE.match(media_type):
        base, layout, compression = match.groups()
        if base not in _KIT_BASES:
            raise FormatError(f"unknown KitOps layer type {base!r} in media type {media_type!r}")
        kind, family = _KIT_BASES[base], Family.KITOPS
    elif match := _MODELPACK_RE.match(media_type):
        base, layout, compression = match.groups()
        kind, family = _MODELPACK_BASES[base], Family.MODELPACK
    else:
        raise FormatError(f"unsupported layer media type {media_type!r}")
    if kind is Kind.CODE and (annotations or {}).get(PROMPT_SUBTYPE_ANNOTATION) == "prompt":
        kind = Kind.PROMPT
    return LayerType(family, kind, Layout(layout), Compression(compression or "none"))


def config_family(artifact_type: str | None, config_media_type: str) -> Family:
    """Tell a ModelKit from a ModelPack as kit does: by ``artifactType`` or by the config type.

    Raises:
        FormatError: when neither names a known format.
    """
    if artifact_type == KIT_ARTIFACT or config_media_type == KIT_CONFIG:
        return Family.KITOPS
    if artifact_type in (MODELPACK_ARTIFACT, LEGACY_MODELPACK_ARTIFACT) or config_media_type in (
        MODELPACK_CONFIG,
        LEGACY_MODELPACK_CONFIG,
    ):
        return Family.MODELPACK
    raise FormatError(
        f"not a ModelKit or ModelPack: artifactType {artifact_type!r}, "
        f"config mediaType {config_media_type!r}"
    )
