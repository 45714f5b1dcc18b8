"""The ``kitfs`` command line: argv and environment in, output and an exit code out.

Owns the parser (``build_parser``: the user's description and examples, every command's
options) and the commands ``ls``, ``cat``, ``inspect``, ``cache stats|gc|verify|clear``,
``mount``, ``umount``, ``status`` and ``metrics`` (served by ``kitfs.mount.metrics``);
``pull``, ``diff`` and ``cache pins|unpin`` are in ``kitfs.commands``, ``demo`` in
``kitfs.quickstart``, and ``mount.fuse.kitfs`` (``mount_helper``) translates mount(8)'s
arguments with ``kitfs.mount.fstab``. Every ``KitfsError`` becomes ``kitfs: <message>`` on
stderr and the error's exit code (see ``kitfs.errors``); a traceback is shown only with
``--debug``. A reader that stops reading (``kitfs ls … | head``) ends the command quietly, with
exit 0, as it does ``cat``'s.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import trio

from kitfs import __version__, audit
from kitfs.cache.store import ChunkStore
from kitfs.commands import (
    REFERENCE_HELP,
    add_cache_commands,
    add_commands,
    add_filter_option,
    cache_pins,
    cache_unpin,
    diff_command,
    pull_command,
)
from kitfs.core.modelkit import (
    DEFAULT_VERIFY,
    KitSession,
    SessionOptions,
    open_session,
    verification_label,
)
from kitfs.core.reader import VerifyMode
from kitfs.core.verify import VerifyState
from kitfs.environment import default_cache_dir, under_journald
from kitfs.errors import KitfsError, NotInstalledError, UsageError
from kitfs.format import sizes
from kitfs.format.filter import Selection
from kitfs.format.reference import Reference
from kitfs.format.tree import shell_quoted
from kitfs.mount.auditing import audit_log_path, record_event
from kitfs.mount.control import start_background, unmount
from kitfs.mount.device import check_fuse_device
from kitfs.mount.fstab import helper_argv_to_kitfs
from kitfs.mount.status import all_mounts, make_runtime_dir, sd_notify
from kitfs.remote.registry import DEFAULT_TIMEOUT_S, RegistryConfig

log = logging.getLogger("kitfs")

CAT_READ_BYTES = 16 * 1024 * 1024
METRICS_LISTEN = "127.0.0.1:9464"  # kitfs metrics' default (9464: unassigned in Prometheus' list)
DESCRIPTION = """\
kitfs reads KitOps ModelKits (and CNCF ModelPacks) straight from an OCI registry, lazily: it
shows exactly the tree `kit unpack` would write and fetches only the byte ranges a read needs,
into a local cache shared by every kitfs process, every byte checked against its digest. List,
read and inspect a kit with no mount at all, or mount it read-only with FUSE."""
EPILOG = """\
A REFERENCE always names its registry: registry/repo:tag, registry/repo@sha256:<64 hex>, or
registry/repo:tag@sha256:<64 hex> (the digest is what is fetched); registry/repo alone means
registry/repo:latest.

examples:
  kitfs ls registry.example.com/team/llama:v3
  kitfs cat registry.example.com/team/llama:v3 models/config.json | head
  kitfs mount registry.example.com/team/llama:v3 /mnt/llama
  kitfs umount /mnt/llama
  kitfs pull registry.example.com/team/llama:v3 --filter model --pin
  kitfs demo                  (a loopback registry with a sample kit, listed, read, mounted)

`kitfs COMMAND --help` shows a command's options. Exit codes: 0 ok, 64 bad usage or
reference, 65 malformed or unverifiable content, 66 not found, 69 registry unavailable or a
missing part (pyfuse3, /dev/fuse), 74 cache unusable, 77 permission denied (credentials
refused, /dev/fuse not accessible)."""
PYFUSE3_MISSING = ("kitfs mount needs pyfuse3, which is not installed: pip install 'kitfs[mount]' "
                   "(pyfuse3 builds against libfuse: apt install fuse3 libfuse3-dev pkg-config)")


def parse_size(text: str) -> int:
    """``10G``, ``512MiB``, ``1.5T``, ``4096`` → bytes (``kitfs.format.sizes``), for argparse."""
    try:
        return sizes.parse_size(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--select takes KEY=VALUE, not {item!r}")
        if key in labels:
            raise UsageError(f"--select {key} given twice")
        labels[key] = value
    return labels


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", type=Path, default=None,
                        help="cache directory (default: $KITFS_CACHE_DIR, /var/cache/kitfs for "
                        "root, else $XDG_CACHE_HOME/kitfs)")
    common.add_argument("--cache-size", type=parse_size, default=None, metavar="SIZE",
                        help="cache quota, e.g. 20G; least recently used chunks are evicted")
    common.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--plain-http", action="store_true", default=None,
                        help="talk HTTP, not HTTPS (the default for loopback registries)")
    remote.add_argument("--ca-file", default=None, help="extra CA bundle for TLS")
    remote.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help="give up on an unresponsive registry after this long "
                        f"(default {DEFAULT_TIMEOUT_S:g})")
    remote.add_argument("--select", action="append", default=[], metavar="KEY=VALUE",
                        help="pick an image-index entry by label (repeatable)")
    remote.add_argument("--hosts-dir", type=Path, default=None, metavar="DIR",
                        help="containerd registry host configuration (mirrors): "
                        "DIR/<registry>/hosts.toml (default /etc/containerd/certs.d)")
    audited = argparse.ArgumentParser(add_help=False)
    audited.add_argument("--audit-log", type=Path, default=None, metavar="FILE",
                         help="where the event is recorded (default: $KITFS_AUDIT_LOG, else "
                         "/var/log/kitfs/audit.jsonl for root, else RUNTIME_DIR/audit.jsonl)")
    remote.add_argument("--offline", action="store_true",
                        help="never contact a registry: use what the cache holds (a tag: the "
                        "digest it last resolved to)")
    verify = argparse.ArgumentParser(add_help=False)
    verify.add_argument("--verify", choices=[m.value for m in VerifyMode], default=DEFAULT_VERIFY.value,
                        help="strict: never return unverified bytes; eventual (default): verify "
                        "when a layer is complete; off: benchmarks only")

    parser = argparse.ArgumentParser(prog="kitfs", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kitfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("ls", parents=[common, remote], help="list the tree kit unpack would write")
    p.add_argument("reference", help=REFERENCE_HELP)
    p.add_argument("path", nargs="?", default="",
                   help="a directory or file inside the kit, as `kit unpack` would write it "
                   "(default: the whole kit)")
    p.add_argument("--json", action="store_true", help="one JSON array of entries")
    p = sub.add_parser("cat", parents=[common, remote, verify], help="write a file of the kit to stdout")
    p.add_argument("reference", help=REFERENCE_HELP)
    p.add_argument("path", help="a file inside the kit, as `kit unpack` would write it "
                   "(e.g. models/config.json)")
    p = sub.add_parser("inspect", parents=[common, remote],
                       help="manifest digest, layers, kinds, compression, verification state")
    p.add_argument("reference", help=REFERENCE_HELP)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("demo", help="a loopback registry with a sample kit: kitfs ls/cat on it, "
                       "then the kit mounted and listed (left mounted)")
    p.add_argument("--mountpoint", type=Path, default=None,
                   help="where to mount the sample kit (default: a new temporary directory)")
    p.add_argument("--cleanup", action="store_true",
                   help="unmount and stop the registry at the end instead of leaving them running")
    p = sub.add_parser("mount", parents=[common, remote, verify, audited],
                       help="mount a kit read-only at MOUNTPOINT (returns when the mount is ready)")
    p.add_argument("reference", help=REFERENCE_HELP)
    p.add_argument("mountpoint", type=Path, help="an existing directory to mount the kit "
                   "on (mounting needs read and write access to /dev/fuse)")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="be the daemon: stay in the foreground, log to stderr (systemd, debugging)")
    p.add_argument("--uid", type=int, default=None, help="owner of every file (default: you)")
    p.add_argument("--gid", type=int, default=None, help="group of every file (default: yours)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users (and containers) read the mount; off by default")
    p.add_argument("--log-file", type=Path, default=None,
                   help="where the background daemon logs (default: RUNTIME_DIR/<mountpoint>.log)")
    add_filter_option(p)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p = sub.add_parser("umount", help="unmount a kitfs mount and wait for its daemon to exit")
    p.add_argument("mountpoint", type=Path, help="the directory a kit is mounted on")
    p.add_argument("-z", "--lazy", action="store_true", help="detach now even if busy")
    p = sub.add_parser("status", help="every kitfs mount on this machine")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("metrics", help="serve Prometheus metrics of every kitfs mount on this "
                       "machine and of their caches, until stopped")
    p.add_argument("--listen", default=METRICS_LISTEN, metavar="HOST:PORT",
                   help=f"where to serve /metrics (default {METRICS_LISTEN})")
    p.add_argument("--cache-dir", type=Path, action="append", default=[],
                   help="a cache to report besides those of the running mounts (repeatable; "
                   "default: the default cache, when it exists)")
    p.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    cache = sub.add_parser("cache", help="look after the local cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    p = cache_sub.add_parser("stats", parents=[common], help="size, quota, blobs, chunks")
    p.add_argument("--json", action="store_true")
    cache_sub.add_parser("gc", parents=[common], help="remove orphans, evict down to --cache-size")
    cache_sub.add_parser("verify", parents=[common], help="check every cached chunk's checksums")
    cache_sub.add_parser("clear", parents=[common, audited], help="delete everything in the cache")
    add_cache_commands(cache_sub, common, audited)
    add_commands(sub, common, remote, audited)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the background mount re-runs itself with the same arguments
    debug = getattr(args, "debug", False)
    if (args.command == "mount" and args.foreground) or args.command == "metrics":
        # a daemon (the mount's, or the metrics server): one line per event
        journald = under_journald()  # journald stamps time and pid itself
        logging.basicConfig(
            level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
            format=("" if journald else "%(asctime)s kitfs[%(process)d]: ")
            + "%(levelname)s %(name)s: %(message)s",
        )
    else:
        logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                            format="kitfs: %(levelname)s: %(message)s")
    try:
        if args.command == "mount":
            return _mount(args)
        if args.command == "umount":
            return unmount(args.mountpoint, lazy=args.lazy)
        if args.command == "status":
            return _status(args)
        if args.command == "metrics":  # prometheus_client is imported for this command only
            from kitfs.mount.metrics import serve as serve_metrics

            return serve_metrics(args.listen, args.cache_dir or [default_cache_dir()],
                                 on_ready=lambda: sd_notify("READY=1"))
        if args.command == "cache":
            return _cache(args)
        if args.command == "demo":
            _require_pyfuse3()
            from kitfs.quickstart import run_demo

            return run_demo(args.mountpoint, args.cleanup, main)
        return trio.run(_run_async, args)
    except KitfsError as exc:
        if getattr(args, "debug", False):
            log.exception("failed")
        print(f"kitfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except (BrokenPipeError, BaseExceptionGroup) as exc:
        if not _reader_went_away(exc):
            raise
        return 0


def _reader_went_away(exc: BaseException) -> bool:
    """Whether ``exc`` is only stdout's reader having gone (``kitfs ls … | head``: a
    ``BrokenPipeError``, alone or grouped by a nursery); if so, stdout is pointed at /dev/null
    so that the interpreter's last flush at exit does not fail on the closed pipe too."""
    if isinstance(exc, BaseExceptionGroup):
        broken, rest = exc.split(BrokenPipeError)
        if broken is None or rest is not None:
            return False
    elif not isinstance(exc, BrokenPipeError):
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return True


def _options(args: argparse.Namespace) -> SessionOptions:
    registry = RegistryConfig(plain_http=args.plain_http, ca_file=args.ca_file,
                              timeout_s=args.timeout, offline=args.offline)
    return SessionOptions(
        cache_dir=args.cache_dir or default_cache_dir(),
        cache_size_bytes=args.cache_size,
        verify=VerifyMode(args.verify) if hasattr(args, "verify") else DEFAULT_VERIFY,
        select=_labels(args.select),
        registry=replace(registry, hosts_dir=args.hosts_dir) if args.hosts_dir else registry,
    )


async def _run_async(args: argparse.Namespace) -> int:
    commands: dict[str, Callable[[KitSession, argparse.Namespace], Awaitable[int]]] = {
        "ls": _ls, "cat": _cat, "inspect": _inspect, "pull": pull_command, "diff": diff_command,
    }
    async with open_session(_options(args)) as session:
        return await commands[args.command](session, args)


def _mode_string(is_dir: bool, mode: int) -> str:
    return stat.filemode((stat.S_IFDIR if is_dir else stat.S_IFREG) | mode)


async def _ls(session: KitSession, args: argparse.Namespace) -> int:
    kit = await session.open(Reference.parse(args.reference))
    top = await session.resolve(kit, args.path)
    nodes = [n async for n in session.walk(kit, top) if n.path]
    if args.json:
        entries = [{"path": n.path, "type": "directory" if n.is_dir else "file",
                    "mode": f"{n.mode:04o}", "size": n.size} for n in nodes]
        print(json.dumps(entries, indent=1))
    else:
        for node in nodes:
            print(f"{_mode_string(node.is_dir, node.mode)} {node.size:>14} "
                  f"{shell_quoted(node.path)}{'/' if node.is_dir else ''}")
    if kit.refused_layers:  # listed what we could; the refusal is the answer's other half
        raise next(iter(kit.refused_layers.values()))
    return 0


async def _cat(session: KitSession, args: argparse.Namespace) -> int:
    kit = await session.open(Reference.parse(args.reference))
    node = await session.resolve(kit, args.path)
    if node.is_dir:
        raise UsageError(f"{args.path!r} is a directory")
    out = sys.stdout.buffer
    offset = 0
    while offset < node.size:  # a reader that goes away (`| head -c 8`): see _reader_went_away
        data = await session.read_file(kit, node, offset, CAT_READ_BYTES)
        out.write(data)
        offset += len(data)
    out.flush()
    return 0


async def _inspect(session: KitSession, args: argparse.Namespace) -> int:
    kit = await session.open(Reference.parse(args.reference))
    layers = []
    for source in sorted(kit.layers, key=lambda s: (str(s.reference), s.placement.index)):
        p = source.placement
        verified = verification_label(VerifyState.of(session.store.blob_state(source.content.key)))
        layers.append({
            "digest": str(p.descriptor.digest), "mediaType": p.descriptor.media_type,
            "kind": p.layer_type.kind.value, "layout": p.layer_type.layout.value,
            "compression": p.layer_type.compression.value, "size": p.descriptor.size,
            "path": p.claim or ".",
            "diffId": str(p.diff_id) if p.diff_id else None, "verification": verified,
            "from": str(source.reference),
        })
    info = {
        "reference": str(kit.reference), "digest": str(kit.reference.digest),
        "format": kit.plan.family.value, "artifactType": kit.manifest.artifact_type,
        "config": str(kit.config_digest), "created": kit.created, "layers": layers,
        "unplacedLayers": list(kit.plan.unplaced),
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"reference  {info['reference']}")
    print(f"digest     {info['digest']}")
    print(f"format     {info['format']}  artifactType {info['artifactType'] or '-'}")
    print(f"config     {info['config']}")
    print(f"created    {info['created'] or '-'}")
    for layer in layers:
        print(f"layer      {layer['digest']}  {layer['kind']:<9} {layer['layout']}"
              f"+{layer['compression']:<4} {layer['size']:>12}  {layer['verification']:<11} "
              f"{shell_quoted(str(layer['path']))}")
    return 0


def _require_pyfuse3() -> None:
    """The mount (``kitfs.mount.daemon``) needs pyfuse3: the ``mount`` extra."""
    if importlib.util.find_spec("pyfuse3") is None:
        raise NotInstalledError(PYFUSE3_MISSING)


def _mount(args: argparse.Namespace) -> int:
    reference = Reference.parse(args.reference)  # a bad reference fails here, before forking
    Selection.parse(args.filter)  # and so does a bad --filter
    _require_pyfuse3()
    check_fuse_device()  # and a /dev/fuse this user may not open, with a message to act on
    from kitfs.mount.daemon import MountOptions, run_foreground

    if not args.foreground:
        log_file = args.log_file or make_runtime_dir() / (
            str(args.mountpoint.absolute()).strip("/").replace("/", "-") + ".log")
        return start_background(args.argv, log_file.absolute(), timeout_s=2 * args.timeout + 30)
    owner = {name: value for name, value in (("uid", args.uid), ("gid", args.gid))
             if value is not None}  # else MountOptions' defaults: the mounting user's
    options = MountOptions(
        reference=str(reference), mountpoint=args.mountpoint, session=_options(args),
        allow_other=args.allow_other, audit_log=audit_log_path(args.audit_log),
        selection=Selection.parse(args.filter), **owner,
    )
    return run_foreground(options, args.ready_fd)


def _status(args: argparse.Namespace) -> int:
    mounts = all_mounts()
    if args.json:
        print(json.dumps([m.to_json() for m in mounts], indent=1))
        return 0
    if not mounts:
        print("no kitfs mounts")
    for mount in mounts:
        record = mount.status
        print(f"{mount.mountpoint}  {record.reference if record else mount.reference}")
        if record is None:
            print("    (its daemon runs as another user or with another runtime directory)")
            continue
        print(f"    digest {record.digest}  pid {record.pid}  verify {record.verify}")
        ratio = record.cache_hit_ratio
        print(f"    fetched {record.bytes_fetched} bytes in {record.registry_requests} requests, "
              f"served {record.bytes_served} bytes in {record.reads} reads, {record.errors} "
              f"errors, cache hits {'-' if ratio is None else f'{100 * ratio:.0f} %'}")
        for blob in record.blobs:
            print(f"    {blob.digest}  {blob.state:<11} {shell_quoted(blob.path)}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    store = ChunkStore(args.cache_dir or default_cache_dir(), args.cache_size)
    try:
        if args.cache_command == "stats":
            stats = store.statistics()
            if args.json:
                print(json.dumps(stats.__dict__, indent=1))
            else:
                for key, value in stats.__dict__.items():
                    print(f"{key:<15} {value}")
        elif args.cache_command == "gc":
            removed = store.collect_garbage()
            print(f"removed {removed} orphan files; {store.used_bytes()} bytes in use")
        elif args.cache_command == "verify":
            good, dropped = store.verify_chunks()
            print(f"{good} chunks good, {dropped} dropped")
            return 1 if dropped else 0
        elif args.cache_command == "clear":
            store.clear()
            record_event(args.audit_log, audit.CACHE_CLEAR, cache_dir=str(store.directory.absolute()))
            print(f"cleared {store.directory}")
        elif args.cache_command == "pins":
            return cache_pins(store, args)
        elif args.cache_command == "unpin":
            return cache_unpin(store, args)
    finally:
        store.close()
    return 0


def mount_helper(argv: Sequence[str] | None = None) -> int:
    """``mount.fuse.kitfs SOURCE MOUNTPOINT [-o OPTIONS] [-n] [-s] [-f] [-v]``, run by mount(8):
    its arguments translated (``kitfs.mount.fstab``), then ``kitfs mount``."""
    try:
        kitfs_argv = helper_argv_to_kitfs(argv)
    except UsageError as exc:
        print(f"mount.fuse.kitfs: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0 if kitfs_argv is None else main(kitfs_argv)


if __name__ == "__main__":
    sys.exit(main())

