"""``--filter``, as ``kit unpack --filter`` parses and applies it (kitfs.format.filter): the
grammar, kit's error messages, what each type selects, and the Kitfile entries a plan pairs
with each layer (what a filter is matched against)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from kitfs.errors import UsageError
from kitfs.format.filter import FILTER_TYPES, FilterConf, Selection, parse_filter
from kitfs.format.kitfile import Entry
from kitfs.format.layout import plan_layout
from kitfs.format.mediatypes import MODELPACK_ARTIFACT, MODELPACK_CONFIG
from kitfs.format.oci import Manifest, parse_document

KIT = "application/vnd.kitops.modelkit"


def sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# --- the grammar (KitOps filter_test.go's cases) -------------------------------------------


@pytest.mark.parametrize(("text", "types", "ids"), [
    ("model", ("model",), None),
    ("model:llama-7b,gpt-3", ("model",), ("llama-7b", "gpt-3")),
    ("model,datasets,code", ("model", "datasets", "code"), None),
    ("datasets:training-data,validation", ("datasets",), ("training-data", "validation")),
    ("kitfile,prompts,docs,mcpservers", ("kitfile", "prompts", "docs", "mcpservers"), None),
    ("datasets:", ("datasets",), ("",)),  # kit: one empty id, matching an empty name or path
])
def test_filters_parse_as_kit_parses_them(text: str, types: tuple[str, ...],
                                          ids: tuple[str, ...] | None) -> None:
    assert parse_filter(text) == FilterConf(types, ids)


@pytest.mark.parametrize(("text", "message"), [
    ("model:filter1:filter2:extra", "invalid filter: should be in format "
                                    "<type1>,<type2>[:<filter1>,<filter2>]"),
    ("invalidtype", "invalid filter type 'invalidtype' (must be one of kitfile, model, "
                    "datasets, code, prompts, docs, mcpservers)"),
    ("", "invalid filter type ''"),
    (":filter1,filter2", "invalid filter type ''"),
    ("parts", "invalid filter type 'parts'"),  # kit has no such type: model covers the parts
    ("Model", "invalid filter type 'Model'"),
    ("model,", "invalid filter type ''"),
])
def test_bad_filters_are_refused_with_kits_message(text: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_filter(text)
    assert str(caught.value).startswith(f"--filter {text!r}: {message}")
    assert caught.value.exit_code == 64


def test_the_types_are_kits() -> None:
    assert FILTER_TYPES == ("kitfile", "model", "datasets", "code", "prompts", "docs", "mcpservers")


# --- what a selection selects --------------------------------------------------------------

MODEL = Entry("model", "models/llama.gguf", None, None, name="llama")
PART = Entry("parts", "models/tokenizer.json", None, None, name="tokenizer")
TRAIN = Entry("datasets", "data/train", None, None, name="training")
VALIDATION = Entry("datasets", "data/validation", None, None, name="validation")
CODE = Entry("code", "src", None, None)
DOCS = Entry("docs", "README.md", None, None)
PROMPT = Entry("prompts", "skills/docx", None, None, name="docx")
MCP = Entry("mcpServers", "filesystem.mcpb", None, None, name="filesystem")
ALL = [MODEL, PART, TRAIN, VALIDATION, CODE, DOCS, PROMPT, MCP]


def selected(*texts: str) -> list[Entry]:
    selection = Selection.parse(texts)
    return [entry for entry in ALL if selection.selects(entry)]


def test_no_filter_selects_everything_and_the_kitfile() -> None:
    assert selected() == ALL
    assert Selection().wants_kitfile
    assert Selection().selects(None)


def test_each_type_selects_its_own_entries() -> None:
    assert selected("model") == [MODEL, PART]  # model covers its parts, as in kit
    assert selected("datasets") == [TRAIN, VALIDATION]
    assert selected("code") == [CODE]
    assert selected("docs") == [DOCS]
    assert selected("prompts") == [PROMPT]
    assert selected("mcpservers") == [MCP]
    assert selected("kitfile") == []


def test_ids_match_a_name_or_a_path_exactly() -> None:
    assert selected("datasets:validation") == [VALIDATION]  # by name
    assert selected("datasets:data/train") == [TRAIN]  # by path
    assert selected("datasets:./data/train", "datasets:Training") == []  # exact strings only
    assert selected("model:tokenizer") == [PART]
    assert selected("model:models/llama.gguf") == [MODEL]
    assert selected("prompts:docx") == [PROMPT]
    assert selected("mcpservers:filesystem.mcpb") == [MCP]


def test_code_and_docs_match_on_path_only() -> None:
    named_code = Entry("code", "src", None, None, name="src-by-name")
    assert Selection.parse(["code:src"]).selects(named_code)
    assert not Selection.parse(["code:src-by-name"]).selects(named_code)
    assert selected("docs:README.md") == [DOCS]


def test_filters_repeat_and_any_one_selects() -> None:
    assert selected("model", "datasets:validation") == [MODEL, PART, VALIDATION]
    assert selected("code,docs") == [CODE, DOCS]
    assert selected("datasets,code:src") == [CODE]  # ids apply to every type of the filter


def test_the_kitfile_only_when_a_filter_lists_it() -> None:
    assert not Selection.parse(["model", "datasets"]).wants_kitfile
    assert Selection.parse(["model", "kitfile"]).wants_kitfile
    assert Selection.parse(["kitfile:anything"]).wants_kitfile  # ids do not apply to it
    assert not Selection.parse(["kitfile"]).selects(MODEL)


def test_a_model_reference_keeps_what_model_filters_keep() -> None:
    assert Selection().for_parent() == Selection((FilterConf(("model",)),))
    assert Selection.parse(["datasets", "code"]).for_parent() is None  # the parent is not opened
    assert Selection.parse(["model:llama,x", "datasets", "kitfile,model"]).for_parent() == \
        Selection((FilterConf(("model",), ("llama", "x")), FilterConf(("model",))))
    parent = Selection.parse(["kitfile,model"]).for_parent()
    assert parent is not None and not parent.wants_kitfile


# --- the entry each planned layer belongs to -----------------------------------------------


def _manifest(layers: list[dict[str, Any]], config_type: str = f"{KIT}.config.v1+json",
              artifact_type: str | None = None) -> Manifest:
    obj: dict[str, Any] = {"schemaVersion": 2,
                           "config": {"mediaType": config_type, "digest": sha("c"), "size": 1},
                           "layers": layers}
    if artifact_type:
        obj["artifactType"] = artifact_type
    manifest = parse_document(json.dumps(obj).encode(), None)
    assert isinstance(manifest, Manifest)
    return manifest


def _layer(media_type: str, name: str, annotations: dict[str, str] | None = None
           ) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha(name), "size": 10,
            "annotations": annotations or {}}


def test_placements_carry_their_kitfile_entry_with_its_name() -> None:
    layers = [_layer(f"{KIT}.model.v1.tar", "m"), _layer(f"{KIT}.modelpart.v1.tar", "p"),
              _layer(f"{KIT}.dataset.v1.tar", "d"), _layer(f"{KIT}.code.v1.tar", "c"),
              _layer(f"{KIT}.code.v1.tar", "q", {"ml.kitops.modelkit.layer-subtype": "prompt"})]
    config = {"model": {"name": "llama", "path": "m.gguf", "digest": sha("m"),
                        "parts": [{"name": "tok", "path": "tok.json", "digest": sha("p")}]},
              "datasets": [{"name": "train", "path": "data", "digest": sha("d")}],
              "code": [{"path": "src", "digest": sha("c")}],
              "prompts": [{"name": "docx", "path": "skills/docx", "digest": sha("q")}]}
    plan = plan_layout(_manifest(layers), json.dumps(config).encode())
    entries = {p.index: p.entry for p in plan.placements}
    assert entries[0] == Entry("model", "m.gguf", sha("m"), None, name="llama")
    assert entries[1] == Entry("parts", "tok.json", sha("p"), None, name="tok")
    assert entries[2] is not None and entries[2].name == "train"
    assert entries[3] is not None and (entries[3].section, entries[3].name) == ("code", "")
    assert entries[4] is not None and entries[4].section == "prompts"
    assert [p.index for p in plan.placements
            if Selection.parse(["model:tok", "prompts:docx"]).selects(p.entry)] == [1, 4]


def test_legacy_kits_and_modelpacks_are_matched_by_their_entries_paths() -> None:
    legacy = plan_layout(_manifest([_layer(f"{KIT}.dataset.v1.tar", "a"),
                                    _layer(f"{KIT}.dataset.v1.tar", "b")]),
                         json.dumps({"datasets": [{"name": "one", "path": "data/one"},
                                                  {"name": "two", "path": "data/two"}]}).encode())
    assert [p.index for p in legacy.placements
            if Selection.parse(["datasets:two"]).selects(p.entry)] == [1]
    filepath = "org.cncf.model.filepath"
    pack = plan_layout(
        _manifest([_layer("application/vnd.cncf.model.weight.v1.raw", "w", {filepath: "w.bin"}),
                   _layer("application/vnd.cncf.model.doc.v1.tar", "d", {filepath: "docs"})],
                  MODELPACK_CONFIG, MODELPACK_ARTIFACT),
        json.dumps({"modelfs": {"diffIds": []}}).encode())
    assert [p.index for p in pack.placements
            if Selection.parse(["model:w.bin"]).selects(p.entry)] == [0]
    assert [p.index for p in pack.placements
            if Selection.parse(["docs:docs"]).selects(p.entry)] == [1]
