"""``--filter``: which parts of a kit to show or pull, with the grammar and meaning of
``kit unpack --filter`` (KitOps ``pkg/lib/kitfile/filter.go``).

Grammar: ``<type>[,<type>…][:<id>[,<id>…]]``; more than one ``:`` is an error. Types:
``kitfile``, ``model`` (the model and its parts), ``datasets``, ``code``, ``prompts``, ``docs``,
``mcpservers``. Ids are compared by exact string equality with an entry's ``name`` or ``path``
(``code`` and ``docs`` entries have no name: path only). The flag repeats, and an entry is
selected when any filter matches it; no filter at all selects everything, the Kitfile
included, which otherwise appears only when a filter lists ``kitfile``. The layers a
``model.path`` reference brings in are kept by the filters that list ``model``, narrowed to
``model`` (with no filter at all: ``model``), as ``kit unpack`` keeps them.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kitfs.errors import UsageError
from kitfs.format.kitfile import Entry

FILTER_TYPES = ("kitfile", "model", "datasets", "code", "prompts", "docs", "mcpservers")
# Kitfile section (``kitfs.format.kitfile.Entry.section``) -> the filter type that selects it.
_SECTION_TYPE = {"model": "model", "parts": "model", "datasets": "datasets", "code": "code",
                 "prompts": "prompts", "docs": "docs", "mcpServers": "mcpservers"}
_PATH_ONLY = {"code", "docs"}  # sections whose entries have no name


@dataclass(frozen=True)
class FilterConf:
    """One ``--filter`` value: the types it names and, when it has a ``:``, the ids."""

    types: tuple[str, ...]
    ids: tuple[str, ...] | None = None  # None: every entry of those types

    def matches(self, filter_type: str, field: str) -> bool:
        return filter_type in self.types and (self.ids is None or field in self.ids)


def parse_filter(text: str) -> FilterConf:
    """Parse one ``--filter`` value as kit does.

    Raises:
        UsageError: more than one ``:``, or a type kit does not know (an empty one too).
    """
    parts = text.split(":")
    if len(parts) > 2:
        raise UsageError(f"--filter {text!r}: invalid filter: should be in format "
                         "<type1>,<type2>[:<filter1>,<filter2>]")
    types = parts[0].split(",")
    for name in types:
        if name not in FILTER_TYPES:
            raise UsageError(f"--filter {text!r}: invalid filter type {name!r} (must be one of "
                             f"{', '.join(FILTER_TYPES)})")
    return FilterConf(tuple(types), tuple(parts[1].split(",")) if len(parts) == 2 else None)


@dataclass(frozen=True)
class Selection:
    """The filters of one command (``--filter``, repeatable): what of a kit it selects."""

    filters: tuple[FilterConf, ...] = ()

    @classmethod
    def parse(cls, texts: Iterable[str]) -> Selection:
        return cls(tuple(parse_filter(text) for text in texts))

    @property
    def everything(self) -> bool:
        return not self.filters

    @property
    def wants_kitfile(self) -> bool:
        """Whether the Kitfile is shown (kit writes it only when a filter lists ``kitfile``)."""
        return self.everything or any("kitfile" in f.types for f in self.filters)

    def selects(self, entry: Entry | None) -> bool:
        """Whether a layer of this Kitfile entry is selected (an unknown entry: only with no
        filter)."""
        if self.everything:
            return True
        if entry is None or entry.section not in _SECTION_TYPE:
            return False
        filter_type = _SECTION_TYPE[entry.section]
        fields = [entry.path] if entry.section in _PATH_ONLY else [entry.name, entry.path]
        return any(f.matches(filter_type, field) for f in self.filters for field in fields)

    def for_parent(self) -> Selection | None:
        """What to take from a kit a ``model.path`` names: the filters that list ``model``,
        narrowed to it (``model`` alone when there are no filters); None when no filter lists
        ``model`` (nothing is taken, and the kit is not even fetched)."""
        if self.everything:
            return Selection((FilterConf(("model",)),))
        kept = tuple(FilterConf(("model",), f.ids) for f in self.filters if "model" in f.types)
        return Selection(kept) if kept else None

    def __str__(self) -> str:
        return " ".join(
            "--filter " + ",".join(f.types) + ("" if f.ids is None else ":" + ",".join(f.ids))
            for f in self.filters) or "everything"
