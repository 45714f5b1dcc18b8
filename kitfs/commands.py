"""``kitfs pull``, ``kitfs diff`` and ``kitfs cache pins|unpin``: their options, their output
(the pull's progress display included) and their exit codes; ``kitfs.cli`` builds the parser
and dispatches here.

Pull progress goes to stderr, the pull's summary to stdout: ``--progress=auto`` (the default)
draws one rich progress bar for the kit (bytes, rate, ETA, layers done) when stderr is a
terminal, and prints plain lines otherwise, one per layer done, as ``--progress=plain`` does;
``--progress=none`` prints no progress.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, TextIO

from kitfs import audit
from kitfs.cache.store import ChunkStore
from kitfs.core.diff import FileChange, FileSide, KitDiff, LayerChange, LayerSide, diff_kits
from kitfs.core.modelkit import KitSession, ModelKit
from kitfs.core.pull import PullLayer, PullResult, layers_to_pull, pull
from kitfs.errors import KitfsError, NotFoundError
from kitfs.format.filter import FILTER_TYPES, Selection
from kitfs.format.reference import Reference
from kitfs.format.tree import shell_quoted
from kitfs.mount.auditing import record_event

log = logging.getLogger("kitfs")


def add_filter_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--filter", action="append", default=[], metavar="TYPE[,TYPE…][:ID[,ID…]]",
        help=f"only these parts, as kit unpack --filter (types: {', '.join(FILTER_TYPES)}; "
        "repeatable; the Kitfile only with 'kitfile')")


# The forms of a kit reference, for the positional arguments' help (the registry is always named).
REFERENCE_FORMS = ("registry/repo:tag, registry/repo@sha256:<digest> or "
                   "registry/repo:tag@sha256:<digest>")
REFERENCE_HELP = f"the kit: {REFERENCE_FORMS}"


def add_commands(sub: Any, common: argparse.ArgumentParser, remote: argparse.ArgumentParser,
                 audited: argparse.ArgumentParser) -> None:
    p = sub.add_parser("pull", parents=[common, remote, audited],
                       help="fetch and verify a kit's layers (or those --filter selects) into "
                       "the cache")
    p.add_argument("reference", help=REFERENCE_HELP)
    add_filter_option(p)
    p.add_argument("--pin", action="store_true",
                   help="keep the pulled layers out of LRU eviction (they count in the quota)")
    p.add_argument("--progress", choices=["auto", "plain", "none"], default="auto",
                   help="a progress bar on a terminal, plain lines otherwise (auto); plain lines; "
                   "none")
    p = sub.add_parser("diff", parents=[common, remote],
                       help="layers and files added, removed or changed between two kits")
    p.add_argument("a", metavar="A", help=f"the old kit: {REFERENCE_FORMS}")
    p.add_argument("b", metavar="B", help="the new kit, in the same forms")
    p.add_argument("--content", action="store_true",
                   help="also compare the bytes of files whose size and mode are the same")
    p.add_argument("--json", action="store_true")


def add_cache_commands(cache_sub: Any, common: argparse.ArgumentParser,
                       audited: argparse.ArgumentParser) -> None:
    p = cache_sub.add_parser("pins", parents=[common], help="the references pinned by pull --pin")
    p.add_argument("--json", action="store_true")
    p = cache_sub.add_parser("unpin", parents=[common, audited],
                             help="let a pinned reference be evicted")
    p.add_argument("reference", help="the reference as pulled, or registry/repo@sha256:<digest> "
                   "for the pins of that repository at that digest")


# --- pull ------------------------------------------------------------------------------------


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


class NoProgress:
    def started(self, kit: ModelKit, layers: list[PullLayer], total_bytes: int) -> None:
        pass

    def advanced(self, done_bytes: int) -> None:
        pass

    def layer_done(self, layer: PullLayer, done_layers: int, done_bytes: int) -> None:
        pass

    def stopped(self) -> None:
        pass


class PlainProgress(NoProgress):
    """One line per layer done: which, and the kit's bytes, rate and ETA so far."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._started = time.monotonic()
        self._layers = 0
        self._total = 0

    def started(self, kit: ModelKit, layers: list[PullLayer], total_bytes: int) -> None:
        self._started, self._layers, self._total = time.monotonic(), len(layers), total_bytes
        print(f"pulling {kit.reference}: {_count(len(layers), 'layer')}, {_bytes(total_bytes)}",
              file=self._out, flush=True)

    def layer_done(self, layer: PullLayer, done_layers: int, done_bytes: int) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = done_bytes / elapsed
        eta = f"{(self._total - done_bytes) / rate:.0f} s" if rate > 0 else "-"
        print(f"layer {done_layers}/{self._layers} {layer.digest} {layer.kind} "
              f"{shell_quoted(layer.path)}: verified; {_bytes(done_bytes)} of "
              f"{_bytes(self._total)}, {_bytes(rate)}/s, ETA {eta}", file=self._out, flush=True)


class BarProgress(NoProgress):
    """One rich progress bar for the kit: bytes, rate, ETA and layers done."""

    def __init__(self, out: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.fields[layers]}"), console=Console(file=out), transient=False)
        self._task: Any = None
        self._layers = 0

    def started(self, kit: ModelKit, layers: list[PullLayer], total_bytes: int) -> None:
        self._layers = len(layers)
        self._task = self._progress.add_task(
            f"{kit.reference.repository}:{kit.reference.tag or ''}".rstrip(":"),
            total=total_bytes, layers=f"0/{len(layers)} layers")
        self._progress.start()

    def advanced(self, done_bytes: int) -> None:
        self._progress.update(self._task, completed=done_bytes)

    def layer_done(self, layer: PullLayer, done_layers: int, done_bytes: int) -> None:
        self._progress.update(self._task, completed=done_bytes,
                              layers=f"{done_layers}/{self._layers} layers")

    def stopped(self) -> None:
        self._progress.stop()


def progress_for(style: str, out: TextIO) -> NoProgress:
    if style == "none":
        return NoProgress()
    if style == "plain" or not out.isatty():
        return PlainProgress(out)
    return BarProgress(out)


async def pull_command(session: KitSession, args: argparse.Namespace) -> int:
    selection = Selection.parse(args.filter)
    reference = Reference.parse(args.reference)
    kit = await session.open(reference, selection)
    layers = [layer.digest for layer in layers_to_pull(kit)]
    if not layers:
        log.warning("%s selects no layer of %s", selection, kit.reference)
    try:
        result = await pull(session, kit, str(reference),
                            progress_for(args.progress, sys.stderr), pin=args.pin)
    except KitfsError as exc:
        record_event(args.audit_log, audit.PULL, reference=str(reference),
                     digest=str(kit.reference.digest), layers=layers, pinned=False,
                     outcome="failed", error=str(exc))
        raise
    record_event(args.audit_log, audit.PULL, reference=str(reference),
                 digest=str(kit.reference.digest), layers=layers, pinned=result.pinned,
                 outcome="verified", bytes=result.total_bytes, fetched_bytes=result.fetched_bytes)
    if result.pinned:
        record_event(args.audit_log, audit.PIN, reference=str(reference),
                     digest=str(kit.reference.digest), layers=layers)
    print(_pull_summary(result))
    return 0


def _pull_summary(result: PullResult) -> str:
    text = (f"pulled {result.kit.reference}: {_count(len(result.layers), 'layer')}, "
            f"{result.total_bytes} bytes verified ({result.fetched_bytes} fetched) in "
            f"{result.seconds:.1f} s")
    return text + ("; pinned" if result.pinned else "")


# --- diff ------------------------------------------------------------------------------------


async def diff_command(session: KitSession, args: argparse.Namespace) -> int:
    a = await session.open(Reference.parse(args.a))
    b = await session.open(Reference.parse(args.b))
    result = await diff_kits(session, a, b, content=args.content)
    if args.json:
        print(json.dumps(diff_json(result), indent=1))
    else:
        print("\n".join(diff_lines(result)))
    return 0


def _layer_json(side: LayerSide | None) -> dict[str, Any] | None:
    return None if side is None else {"digest": side.digest, "size": side.size_bytes}


def _file_json(side: FileSide | None) -> dict[str, Any] | None:
    if side is None:
        return None
    return {"size": side.size_bytes, "mode": f"{side.mode:04o}", "digest": side.digest}


def diff_json(diff: KitDiff) -> dict[str, Any]:
    return {
        "a": {"reference": str(diff.a.reference), "digest": str(diff.a.reference.digest)},
        "b": {"reference": str(diff.b.reference), "digest": str(diff.b.reference.digest)},
        "kitfileChanged": diff.kitfile_changed,
        "sharedLayers": diff.shared_layers,
        "layers": [{"change": c.change, "kind": c.kind, "path": c.path, "a": _layer_json(c.a),
                    "b": _layer_json(c.b)} for c in diff.layers],
        "files": [{"change": c.change, "path": c.path, "a": _file_json(c.a),
                   "b": _file_json(c.b)} for c in diff.files],
    }


_MARK = {"added": "A", "removed": "D", "changed": "M"}


def _layer_line(change: LayerChange) -> str:
    sides = " -> ".join(f"{s.digest} ({s.size_bytes} bytes)" for s in (change.a, change.b) if s)
    return f"{_MARK[change.change]} layer {change.kind} {shell_quoted(change.path)} {sides}"


def _file_line(change: FileChange) -> str:
    line = f"{_MARK[change.change]} {shell_quoted(change.path)}"
    a, b = change.a, change.b
    if a is None or b is None:
        side = a or b
        assert side is not None
        return f"{line} ({side.size_bytes} bytes)"
    what = []
    if a.size_bytes != b.size_bytes:
        what.append(f"size {a.size_bytes} -> {b.size_bytes}")
    if a.mode != b.mode:
        what.append(f"mode {a.mode:04o} -> {b.mode:04o}")
    if a.digest != b.digest and a.digest and b.digest:
        what.append(f"content {a.digest} -> {b.digest}")
    return f"{line} ({', '.join(what)})"


def diff_lines(diff: KitDiff) -> list[str]:
    lines = [f"--- {diff.a.reference}", f"+++ {diff.b.reference}"]
    if diff.kitfile_changed:
        lines.append("M Kitfile")
    lines += [_layer_line(c) for c in diff.layers]
    lines += [_file_line(c) for c in diff.files]
    lines.append(f"{_count(diff.shared_layers, 'layer')} shared (not read)")
    return lines


# --- cache pins | unpin ---------------------------------------------------------------------


def cache_pins(store: ChunkStore, args: argparse.Namespace) -> int:
    pins = store.pins.all()
    if args.json:
        print(json.dumps([{"reference": p.reference, "digest": p.digest, "layers": p.layer_count,
                           "keys": list(p.keys), "bytes": p.stored_bytes} for p in pins],
                         indent=1))
        return 0
    if not pins:
        print("no pins")
    for pin in pins:
        print(f"{pin.reference}  {pin.digest}  {_count(pin.layer_count, 'layer')}  "
              f"{pin.stored_bytes} bytes")
    print(f"pinned {store.pins.pinned_bytes()} bytes in all")
    return 0


def cache_unpin(store: ChunkStore, args: argparse.Namespace) -> int:
    """Unpin the reference as pulled, or every pin of that repository at that digest."""
    reference = Reference.parse(args.reference)
    text = str(reference)
    repository = f"{reference.registry}/{reference.repository}"
    found = [pin.reference for pin in store.pins.all()
             if pin.reference == text or (reference.digest is not None
                                          and pin.digest == str(reference.digest)
                                          and _repository_of(pin.reference) == repository)]
    if not found:
        raise NotFoundError(f"{text} is not pinned (kitfs cache pins lists the pins)")
    for pinned in found:
        store.pins.remove(pinned)
        record_event(args.audit_log, audit.UNPIN, reference=pinned)
        print(f"unpinned {pinned}")
    return 0


def _repository_of(text: str) -> str:
    reference = Reference.parse(text)
    return f"{reference.registry}/{reference.repository}"
