"""The Kitfile: parsed from the ModelKit config JSON, and rendered as ``kit unpack`` writes it.

``kit unpack`` does not write the original Kitfile bytes: it decodes the config JSON into Go
structs and re-encodes them with go-yaml v3 (two-space indent, struct field order, ``digest``
and ``diffId`` dropped, fields missing from the struct dropped). ``render_kitfile`` produces the
same text for the data kit writes; ``KitfileInfo`` holds just what the layer mapping needs.

Pure: no I/O.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from kitfs.errors import FormatError

# --- The Go struct layout, in field order: (json name, nested schema, omitempty) ------------

_Schema = list[tuple[str, Any, bool]]
_STR = "str"
_ANY = "any"
_FLOW_LIST = "flow-list"

_PACKAGE: _Schema = [
    ("name", _STR, True), ("version", _STR, True), ("description", _STR, True),
    ("license", _STR, True), ("authors", _FLOW_LIST, True),
]
_MODEL_PART: _Schema = [
    ("name", _STR, True), ("path", _STR, True), ("license", _STR, True), ("type", _STR, True),
]
_MODEL: _Schema = [
    ("name", _STR, True), ("path", _STR, True), ("license", _STR, True),
    ("framework", _STR, True), ("format", _STR, True), ("version", _STR, True),
    ("description", _STR, True), ("parts", [_MODEL_PART], True), ("parameters", _ANY, True),
]
_CODE: _Schema = [("path", _STR, True), ("description", _STR, True), ("license", _STR, True)]
_DATASET: _Schema = [
    ("name", _STR, True), ("path", _STR, True), ("remotePath", _STR, True),
    ("remoteHash", _STR, True), ("description", _STR, True), ("license", _STR, True),
    ("parameters", _ANY, True),
]
_DOCS: _Schema = [("path", _STR, False), ("description", _STR, True)]
_PROMPT: _Schema = [("name", _STR, True), ("path", _STR, True), ("description", _STR, True)]
_MCP: _Schema = [("name", _STR, True), ("path", _STR, True), ("description", _STR, True)]
KITFILE_SCHEMA: _Schema = [
    ("manifestVersion", _STR, False), ("package", _PACKAGE, True), ("model", _MODEL, True),
    ("code", [_CODE], True), ("datasets", [_DATASET], True), ("docs", [_DOCS], True),
    ("prompts", [_PROMPT], True), ("mcpServers", [_MCP], True),
]


@dataclass(frozen=True)
class Entry:
    """One Kitfile entry that may own a layer."""

    section: str  # model, parts, datasets, code, docs, prompts, mcpServers
    path: str
    digest: str | None
    diff_id: str | None
    remote: bool = False  # datasets with remotePath, or model.path that is a ModelKit reference
    name: str = ""  # the entry's ``name`` (model, parts, datasets, prompts, mcpServers have one)


@dataclass(frozen=True)
class KitfileInfo:
    """What the layer mapping needs from a Kitfile."""

    entries: tuple[Entry, ...]

    @property
    def has_layer_info(self) -> bool:
        """True when every local entry records its layer digest (kit >= v0.5.0).

        Raises:
            FormatError: when only some entries have digests (kit refuses such configs too).
        """
        local = [e for e in self.entries if not e.remote]
        with_digest = [e for e in local if e.digest]
        if with_digest and len(with_digest) != len(local):
            raise FormatError("Kitfile config: some entries have a layer digest and some do not")
        return bool(local) and len(with_digest) == len(local)


_REFERENCE_LIKE = re.compile(r"^[^/\s]+/[^\s]+[:@][^\s]+$")


def looks_like_modelkit_reference(path: str) -> bool:
    """kit treats a ``model.path`` containing ``:`` or ``@`` that parses as a reference as one."""
    return (":" in path or "@" in path) and bool(_REFERENCE_LIKE.match(path))


def parse_kitfile(obj: dict[str, Any]) -> KitfileInfo:
    """Read the entries of a Kitfile config (already decoded JSON).

    Raises:
        FormatError: when a section has the wrong JSON type.
    """
    entries: list[Entry] = []

    def take(section: str, item: object, remote: bool = False) -> None:
        if not isinstance(item, dict):
            raise FormatError(f"Kitfile config: {section} entry is not an object")
        path = item.get("path", "")
        digest = item.get("digest")
        diff_id = item.get("diffId")
        name = item.get("name")
        if not isinstance(path, str) or not isinstance(digest, str | None):
            raise FormatError(f"Kitfile config: {section} entry has a non-string path or digest")
        entries.append(Entry(section, path, digest or None,
                             diff_id if isinstance(diff_id, str) and diff_id else None, remote,
                             name if isinstance(name, str) else ""))

    model = obj.get("model")
    if model is not None:
        if not isinstance(model, dict):
            raise FormatError("Kitfile config: model is not an object")
        model_path = model.get("path") or ""
        if isinstance(model_path, str) and model_path and not looks_like_modelkit_reference(
            model_path
        ):
            take("model", model)
        elif isinstance(model_path, str) and model_path:
            take("model", model, remote=True)
        for part in _list(model, "parts"):
            take("parts", part)
    for section in ("datasets", "code", "docs", "prompts", "mcpServers"):
        for item in _list(obj, section):
            remote = section == "datasets" and isinstance(item, dict) and bool(
                item.get("remotePath")
            )
            take(section, item, remote)
    return KitfileInfo(tuple(entries))


def _list(obj: dict[str, Any], key: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise FormatError(f"Kitfile config: {key} is not a list")
    return value


# --- YAML rendering (go-yaml v3 encoder behaviour for this data) ------------------------------


def render_kitfile(obj: dict[str, Any]) -> bytes:
    """Render a Kitfile config as the YAML ``kit unpack`` writes to ``DIR/Kitfile``."""
    lines: list[str] = []
    _emit_struct(obj, KITFILE_SCHEMA, 0, lines)
    return ("\n".join(lines) + "\n").encode()


def _is_empty(value: Any, schema: Any) -> bool:
    if value is None:
        return True
    if isinstance(schema, list) and schema and isinstance(schema[0], tuple):  # a struct
        return isinstance(value, dict) and all(
            _is_empty(value.get(k), s) for k, s, _ in schema
        )
    if value in ("", 0, False) and not isinstance(value, float):
        return True
    return isinstance(value, list | dict) and len(value) == 0


def _emit_struct(obj: Any, schema: _Schema, indent: int, lines: list[str]) -> None:
    if not isinstance(obj, dict):
        obj = {}
    pad = " " * indent
    for key, sub, omitempty in schema:
        value = obj.get(key)
        if omitempty and _is_empty(value, sub):
            continue
        if sub == _STR:
            text = value if isinstance(value, str) else ("" if value is None else str(value))
            lines.extend(_scalar_lines(f"{pad}{key}:", text, indent))
        elif sub == _FLOW_LIST:
            if not isinstance(value, list | None):
                raise FormatError(f"Kitfile config: {key} is not a list")
            items = ", ".join(_flow_scalar(str(v)) for v in (value or []))
            lines.append(f"{pad}{key}: [{items}]")
        elif sub == _ANY:
            _emit_any(f"{pad}{key}:", value, indent, lines)
        elif isinstance(sub, list) and sub and isinstance(sub[0], list):  # list of structs
            if not isinstance(value, list | None):
                raise FormatError(f"Kitfile config: {key} is not a list")
            lines.append(f"{pad}{key}:")
            for item in value or []:
                start = len(lines)
                _emit_struct(item, sub[0], indent + 4, lines)
                if len(lines) == start:
                    lines.append(f"{pad}  - {{}}")
                else:
                    lines[start] = f"{pad}  - " + lines[start][indent + 4 :]
        else:  # nested struct
            start = len(lines)
            _emit_struct(value, sub, indent + 2, lines)
            if len(lines) == start:
                lines.append(f"{pad}{key}: {{}}")
            else:
                lines.insert(start, f"{pad}{key}:")


def _emit_any(prefix: str, value: Any, indent: int, lines: list[str]) -> None:
    """Arbitrary JSON (``parameters``): maps sorted by key, numbers as Go float64."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            lines.append(f"{prefix} {{}}")
            return
        lines.append(prefix)
        for key in sorted(value):
            _emit_any(f"{pad}  {_plain_or_quoted(str(key))}:", value[key], indent + 2, lines)
    elif isinstance(value, list):
        if not value:
            lines.append(f"{prefix} []")
            return
        lines.append(prefix)
        for item in value:
            if isinstance(item, dict) and item:
                start = len(lines)
                _emit_any(f"{pad}  __", item, indent + 2, lines)
                del lines[start]  # drop the placeholder key line, keep the mapping body
                lines[start] = f"{pad}  - " + lines[start][indent + 4 :]
            else:
                _emit_any(f"{pad}  -", item, indent + 2, lines)
    elif isinstance(value, str):
        lines.extend(_scalar_lines(prefix, value, indent))
    else:
        lines.append(f"{prefix} {_go_scalar(value)}")


def _go_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int | float):
        try:
            return go_format_float(float(value))
        except OverflowError:  # kit (Go) cannot decode it either: float64 out of range
            raise FormatError("Kitfile config: a number is beyond the range of a float64") from None
    return _plain_or_quoted(str(value))


def go_format_float(value: float) -> str:
    """``strconv.FormatFloat(v, 'g', -1, 64)`` as yaml.v3 writes float64 values."""
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    if value == 0:
        return "-0" if math.copysign(1, value) < 0 else "0"
    sign, digits_tuple, exponent = Decimal(repr(value)).normalize().as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digits_tuple))
    exp10 = len(digits) + exponent - 1  # decimal exponent of the leading digit
    minus = "-" if sign else ""
    # Go: with the shortest precision, %e is used when exp < -4 || exp >= 6.
    if exp10 < -4 or exp10 >= 6:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{minus}{mantissa}e{'-' if exp10 < 0 else '+'}{abs(exp10):02d}"
    if exp10 < 0:
        return f"{minus}0.{'0' * (-exp10 - 1)}{digits}"
    if len(digits) <= exp10 + 1:
        return f"{minus}{digits}{'0' * (exp10 + 1 - len(digits))}"
    return f"{minus}{digits[: exp10 + 1]}.{digits[exp10 + 1 :]}"


# Plain scalars that a YAML 1.1 or 1.2 reader would take for something other than a string;
# yaml.v3 double-quotes these.
_NON_STRING = re.compile(
    r"^(?:~|null|Null|NULL|true|True|TRUE|false|False|FALSE|y|Y|yes|Yes|YES|n|N|no|No|NO"
    r"|on|On|ON|off|Off|OFF"
    r"|[-+]?(?:0|[1-9][0-9_]*)|0o?[0-7_]+|0x[0-9a-fA-F_]+|0b[01_]+"
    r"|[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)|<<)$"
)
_PLAIN_FIRST_FORBIDDEN = set("-?:,[]{}#&*!|>'\"%@`")


def _plain_allowed(text: str) -> bool:
    if not text or text != text.strip() or _NON_STRING.match(text):
        return False
    # '-', '?' and ':' may start a plain scalar when followed by a non-space
    if text[0] in _PLAIN_FIRST_FORBIDDEN and not (
        text[0] in "-?:" and len(text) > 1 and text[1] != " "
    ):
        return False
    if ": " in text or " #" in text or text.endswith(":"):
        return False
    return all(c.isprintable() and c not in "\n\r\t" for c in text)


def _plain_or_quoted(text: str) -> str:
    if _plain_allowed(text):
        return text
    if text and (_NON_STRING.match(text) or not all(c.isprintable() for c in text)):
        return _double_quoted(text)
    if not text:
        return '""'
    return "'" + text.replace("'", "''") + "'"


def _flow_scalar(text: str) -> str:
    if _plain_allowed(text) and not any(c in text for c in ",[]{}"):
        return text
    return _plain_or_quoted(text) if not _plain_allowed(text) else "'" + text + "'"


def _double_quoted(text: str) -> str:
    out = []
    for c in text:
        if c == '"':
            out.append('\\"')
        elif c == "\\":
            out.append("\\\\")
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif not c.isprintable():
            out.append(f"\\x{ord(c):02X}" if ord(c) < 0x100 else f"\\u{ord(c):04X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _scalar_lines(prefix: str, text: str, indent: int) -> list[str]:
    if "\n" in text and all(c.isprintable() or c == "\n" for c in text) and text.strip("\n"):
        chomp = "-" if not text.endswith("\n") else ("" if not text.endswith("\n\n") else "+")
        body = text[:-1] if text.endswith("\n") and chomp == "" else text
        if chomp == "+":
            body = text[:-1]
        pad = " " * (indent + 2)
        return [f"{prefix} |{chomp}"] + [pad + line if line else "" for line in body.split("\n")]
    return [f"{prefix} {_plain_or_quoted(text)}"]
