"""A ModelKit with one part of every kind ``--filter`` knows, for the pull, filter and offline
tests: a model and a model part, two named datasets (one gzip), code, docs, a prompt and an MCP
server bundle, written as kit pack writes them (tar or raw layers, Kitfile entries with digests).
``FILTERS`` says which files each filter selects."""

from __future__ import annotations

import os
from dataclasses import dataclass

from kitfs.demo import Entry, Layer, Push, Pusher, push_entries, tar_layer
from kitfs.format.mediatypes import KIT

FILEPATH = "org.cncf.model.filepath"
PROMPT_SUBTYPE = {"ml.kitops.modelkit.layer-subtype": "prompt"}

MODEL = {"models/llama.gguf": os.urandom(9 * 1024 * 1024 + 77)}  # three chunks
PART = {"models/tokenizer.json": b'{"vocab": 32000}\n'}
TRAIN = {f"data/train/part-{i}.csv": f"id,x\n{i},{i * i}\n".encode() for i in range(5)}
VALIDATION = {"data/validation/all.csv": b"id,x\n" + b"".join(
    f"{i},{i % 7}\n".encode() for i in range(50_000))}
CODE = {"src/train.py": b"print('train')\n", "src/lib/io.py": b"def load(): ...\n"}
DOCS = {"README.md": b"# Every part\n"}
PROMPT = {"prompts/system.md": b"You are a careful assistant.\n"}
MCP = {"servers/fs.mcpb": b"PK\x03\x04 an MCP bundle\n"}

# --filter value -> the files it selects (the Kitfile as "Kitfile")
FILTERS: dict[str, set[str]] = {
    "kitfile": {"Kitfile"},
    "model": set(MODEL) | set(PART),
    "model:tokenizer": set(PART),
    "datasets": set(TRAIN) | set(VALIDATION),
    "datasets:validation": set(VALIDATION),
    "datasets:data/train": set(TRAIN),
    "code": set(CODE),
    "docs": set(DOCS),
    "prompts": set(PROMPT),
    "mcpservers": set(MCP),
}
ALL_FILES = {**MODEL, **PART, **TRAIN, **VALIDATION, **CODE, **DOCS, **PROMPT, **MCP}


@dataclass
class EveryPartKit:
    push: Push
    reference: str
    layers: dict[str, Layer]  # by part: model, part, train, validation, code, docs, prompt, mcp

    def files_of(self, part: str) -> dict[str, bytes]:
        return {"model": MODEL, "part": PART, "train": TRAIN, "validation": VALIDATION,
                "code": CODE, "docs": DOCS, "prompt": PROMPT, "mcp": MCP}[part]

    def digests_for(self, files: set[str]) -> set[str]:
        """The layer digests whose files are among ``files``."""
        return {layer.digest for part, layer in self.layers.items()
                if set(self.files_of(part)) <= files}


def push_every_part_kit(pusher: Pusher, reference: str) -> EveryPartKit:
    layers = {
        "model": tar_layer("model", MODEL, "models/llama.gguf"),
        "part": Layer(f"{KIT}.modelpart.v1.raw", PART["models/tokenizer.json"],
                      {FILEPATH: "models/tokenizer.json"}),
        "train": tar_layer("dataset", TRAIN, "data/train"),
        "validation": tar_layer("dataset", VALIDATION, "data/validation", "gzip"),
        "code": tar_layer("code", CODE, "src"),
        "docs": tar_layer("docs", DOCS, "README.md"),
        "prompt": tar_layer("code", PROMPT, "prompts/system.md"),
        "mcp": Layer(f"{KIT}.mcpb.v1.raw", MCP["servers/fs.mcpb"], {FILEPATH: "servers/fs.mcpb"}),
    }
    layers["prompt"].annotations.update(PROMPT_SUBTYPE)
    push = push_entries(pusher, reference, [
        Entry("model", {"name": "llama", "path": "models/llama.gguf"}, layers["model"]),
        Entry("parts", {"name": "tokenizer", "path": "models/tokenizer.json"}, layers["part"]),
        Entry("code", {"path": "src"}, layers["code"]),
        Entry("datasets", {"name": "training", "path": "data/train"}, layers["train"]),
        Entry("datasets", {"name": "validation", "path": "data/validation"}, layers["validation"]),
        Entry("docs", {"path": "README.md"}, layers["docs"]),
        Entry("prompts", {"name": "system", "path": "prompts/system.md"}, layers["prompt"]),
        Entry("mcpServers", {"name": "filesystem", "path": "servers/fs.mcpb"}, layers["mcp"]),
    ], package={"name": "every-part"}, layers=list(layers.values()))
    return EveryPartKit(push, reference, layers)
