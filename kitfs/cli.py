"""The ``kitfs`` command line: argv and environment in, output and an exit code out.

Commands: ``ls``, ``cat``, ``inspect``, ``cache stats|gc|verify|clear``, ``mount``, ``umount``,
``status``, ``demo``; ``pull``, ``diff`` and ``cache pins|unpin`` are in ``kitfs.commands``.
Every ``KitfsError`` becomes ``kitfs: <message>`` on stderr and the error's exit code (see
``kitfs.errors``); a traceback is shown only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from kitfs import __version__, audit
from kitfs.cache.store import ChunkStore, default_cache_dir
from kitfs.commands import (
    add_cache_commands,
    add_commands,
    add_filter_option,
    cache_pins,
    cache_unpin,
    diff_command,
    pull_command,
)
from kitfs.core.modelkit import KitSession, SessionOptions, open_session
from kitfs.core.reader import VerifyMode
from kitfs.errors import KitfsError, NotInstalledError, UsageError
from kitfs.format import sizes
from kitfs.format.filter import Selection
from kitfs.format.reference import Reference
from kitfs.format.tree import shell_quoted
from kitfs.mount.auditing import audit_log_path, record_event
from kitfs.mount.status import all_mounts, runtime_dir, sd_notify
from kitfs.remote.hostsdir import DEFAULT_HOSTS_DIR

log = logging.getLogger("kitfs")

CAT_READ_BYTES = 16 * 1024 * 1024
METRICS_LISTEN = "127.0.0.1:9464"  # kitfs metrics' default (9464: unassigned in Prometheus' list)
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
    remote.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="give up on an unresponsive registry after this long (default 30)")
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
    verify.add_argument("--verify", choices=[m.value for m in VerifyMode], default="eventual",
                        help="strict: never return unverified bytes; eventual (default): verify "
                        "when a layer is complete; off: benchmarks only")

    parser = argparse.ArgumentParser(prog="kitfs", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kitfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("ls", parents=[common, remote], help="list the tree kit unpack would write")
    p.add_argument("reference")
    p.add_argument("path", nargs="?", default="", help="a directory or file inside the kit")
    p.add_argument("--json", action="store_true", help="one JSON array of entries")
    p = sub.add_parser("cat", parents=[common, remote, verify], help="write a file of the kit to stdout")
    p.add_argument("reference")
    p.add_argument("path")
    p = sub.add_parser("inspect", parents=[common, remote],
                       help="manifest digest, layers, kinds, compression, verification state")
    p.add_argument("reference")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("demo", help="a loopback registry with a sample kit: kitfs ls/cat on it, "
                       "then the kit mounted and listed (left mounted)")
    p.add_argument("--mountpoint", type=Path, default=None,
                   help="where to mount the sample kit (default: a new temporary directory)")
    p.add_argument("--cleanup", action="store_true",
                   help="unmount and stop the registry at the end instead of leaving them running")
    p = sub.add_parser("mount", parents=[common, remote, verify, audited],
                       help="mount a kit read-only at MOUNTPOINT (returns when the mount is ready)")
    p.add_argument("reference")
    p.add_argument("mountpoint", type=Path)
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
    p.add_argument("mountpoint", type=Path)
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
        journald = "JOURNAL_STREAM" in os.environ  # journald stamps time and pid itself
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
            _require_pyfuse3()
            from kitfs.mount.daemon import unmount

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
            return _demo(args)
        return trio.run(_run_async, args)
    except KitfsError as exc:
        if getattr(args, "debug", False):
            log.exception("failed")
        print(f"kitfs: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def _options(args: argparse.Namespace) -> SessionOptions:
    return SessionOptions(
        cache_dir=args.cache_dir or default_cache_dir(),
        cache_size_bytes=args.cache_size,
        verify=VerifyMode(getattr(args, "verify", "eventual")),
        plain_http=args.plain_http,
        ca_file=args.ca_file,
        timeout_s=args.timeout,
        select=_labels(args.select),
        hosts_dir=args.hosts_dir or DEFAULT_HOSTS_DIR,
        offline=args.offline,
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
    try:
        while offset < node.size:
            data = await session.read_file(kit, node, offset, CAT_READ_BYTES)
            out.write(data)
            offset += len(data)
        out.flush()
    except BrokenPipeError:  # `kitfs cat … | head -c 8`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


async def _inspect(session: KitSession, args: argparse.Namespace) -> int:
    kit = await session.open(Reference.parse(args.reference))
    layers = []
    for source in sorted(kit.layers, key=lambda s: (str(s.reference), s.placement.index)):
        p = source.placement
        state = session.store.blob_state(source.content.key)
        verified = {None: "not fetched", 0: "unverified", 1: "verified", -1: "FAILED"}[
            state.verified if state else None]
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
    from kitfs.mount.daemon import MountOptions, run_foreground, start_background

    if not args.foreground:
        log_file = args.log_file or runtime_dir() / (
            str(args.mountpoint.absolute()).strip("/").replace("/", "-") + ".log")
        return start_background(args.argv, log_file.absolute(), timeout_s=2 * args.timeout + 30)
    options = MountOptions(
        reference=str(reference) if reference.digest or reference.tag else args.reference,
        mountpoint=args.mountpoint, session=_options(args),
        uid=os.getuid() if args.uid is None else args.uid,
        gid=os.getgid() if args.gid is None else args.gid,
        allow_other=args.allow_other, debug=args.debug, audit_log=audit_log_path(args.audit_log),
        selection=Selection.parse(args.filter),
    )
    return run_foreground(options, args.ready_fd)


def _status(args: argparse.Namespace) -> int:
    mounts = all_mounts()
    if args.json:
        print(json.dumps(mounts, indent=1))
        return 0
    if not mounts:
        print("no kitfs mounts")
    for record in mounts:
        print(f"{record['mountpoint']}  {record['reference']}")
        if record.get("pid") is None:
            print("    (its daemon runs as another user or with another runtime directory)")
            continue
        fetched, served = record["bytes_fetched"], record["bytes_served"]
        print(f"    digest {record['digest']}  pid {record['pid']}  verify {record['verify']}")
        ratio = record.get("cache_hit_ratio")
        print(f"    fetched {fetched} bytes in {record['registry_requests']} requests, served "
              f"{served} bytes in {record['reads']} reads, {record['errors']} errors, cache hits "
              f"{'-' if ratio is None else f'{100 * ratio:.0f} %'}")
        for blob in record["blobs"]:
            print(f"    {blob['digest']}  {blob['state']:<11} {shell_quoted(blob['path'])}")
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


def _demo(args: argparse.Namespace) -> int:
    """The quick start: a loopback registry with the sample kit, the CLI on it, then a mount."""
    import subprocess
    import tempfile

    _require_pyfuse3()
    from kitfs.demo import Pusher, Registry, sample_kit
    from kitfs.mount.daemon import STATUS_INTERVAL_S, unmount

    workdir = Path(tempfile.mkdtemp(prefix="kitfs-demo-"))
    registry = Registry(workdir / "registry").start()
    mountpoint = args.mountpoint or workdir / "mnt"
    mounted = False
    try:
        weights = os.urandom(64 * 1024 * 1024)
        reference = f"{registry.host}/demo/sample:v1"
        total = sum(len(layer.data) for layer in sample_kit(Pusher(registry.host), reference,
                                                              weights).layers)
        cache = str(workdir / "cache")
        pid = registry.process.pid if registry.process else None
        print(f"# a loopback registry ({registry.host}, pid {pid}) holds {reference}: "
              f"{total} bytes of layers\n")
        mark = registry.log_mark()
        for command in (["ls", reference], ["inspect", reference],
                        ["cat", reference, "Kitfile"], ["cat", reference, "data/train/part-003.csv"]):
            print(f"$ kitfs {' '.join(command)}", flush=True)
            status = main([*command, "--cache-dir", cache])
            sys.stdout.flush()
            if status != 0:
                return status
            print()
        fetched = registry.blob_bytes_served(mark)
        print(f"# the registry served {fetched} of {total} layer bytes ({100 * fetched / total:.1f} %)\n")

        mountpoint.mkdir(parents=True, exist_ok=True)
        print(f"$ kitfs mount {reference} {mountpoint}", flush=True)
        status = main(["mount", reference, str(mountpoint), "--cache-dir", cache,
                       "--log-file", str(workdir / "mount.log")])
        if status != 0:
            return status
        mounted = True
        for command in (["ls", "-lR", str(mountpoint)],
                        ["head", "-c", "60", str(mountpoint / "data/train/part-003.csv")]):
            print(f"\n$ {' '.join(command)}", flush=True)
            subprocess.run(command, check=True)
        time.sleep(STATUS_INTERVAL_S + 0.1)  # let the daemon publish its counters
        print(f"\n$ kitfs status\n{_status_text()}")
        if args.cleanup:
            return 0
        print(f"# {reference} stays mounted at {mountpoint} (daemon log: {workdir / 'mount.log'}).\n"
              f"# Clean up with: kitfs umount {mountpoint} && kill {pid}")
        mounted = False  # leave it mounted, with its registry
        registry.process = None
    finally:
        if mounted:
            unmount(mountpoint)
        registry.stop()
    return 0


def _status_text() -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        _status(argparse.Namespace(json=False))
    return out.getvalue()


# Options of mount(8) and fstab that mean nothing to a read-only FUSE daemon.
_IGNORED_MOUNT_OPTIONS = {"ro", "rw", "defaults", "auto", "noauto", "user", "nouser", "users",
                          "_netdev", "nofail", "exec", "noexec", "suid", "nosuid", "dev", "nodev",
                          "atime", "noatime", "relatime", "strictatime", "nodiratime", "sync",
                          "async"}
# -o NAME=VALUE (or bare NAME) → kitfs mount option.
_VALUE_MOUNT_OPTIONS = {"uid": "--uid", "gid": "--gid", "cache_dir": "--cache-dir",
                        "cache_size": "--cache-size", "verify": "--verify", "timeout": "--timeout",
                        "ca_file": "--ca-file", "log_file": "--log-file", "select": "--select",
                        "hosts_dir": "--hosts-dir", "audit_log": "--audit-log"}
_FLAG_MOUNT_OPTIONS = {"allow_other": "--allow-other", "plain_http": "--plain-http",
                       "debug": "--debug", "offline": "--offline"}


def mount_options_to_argv(source: str, mountpoint: str, options: str) -> list[str]:
    """Translate ``mount -t fuse.kitfs SOURCE DIR -o OPTS`` into ``kitfs mount`` arguments."""
    argv = ["mount", source, mountpoint]
    for option in (o for o in options.split(",") if o):
        name, sep, value = option.partition("=")
        if name in _IGNORED_MOUNT_OPTIONS or name.startswith(("x-", "comment=")):
            if name == "rw":
                log.warning("kitfs mounts are read-only; 'rw' ignored")
            continue
        if name in _FLAG_MOUNT_OPTIONS and not sep:
            argv.append(_FLAG_MOUNT_OPTIONS[name])
        elif name in _VALUE_MOUNT_OPTIONS and sep:
            argv += [_VALUE_MOUNT_OPTIONS[name], value]
        else:
            raise UsageError(f"unknown mount option {option!r} (kitfs takes: "
                             f"{', '.join(sorted([*_FLAG_MOUNT_OPTIONS, *_VALUE_MOUNT_OPTIONS]))})")
    return argv


def mount_helper(argv: Sequence[str] | None = None) -> int:
    """``mount.fuse.kitfs SOURCE MOUNTPOINT [-o OPTIONS] [-n] [-s] [-f] [-v]``, run by mount(8)."""
    parser = argparse.ArgumentParser(prog="mount.fuse.kitfs")
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", action="append", default=[])
    for flag in ("-n", "-s", "-f", "-v"):  # no mtab, sloppy, fake, verbose: nothing to do
        parser.add_argument(flag, action="store_true")
    args = parser.parse_args(argv)
    try:
        kitfs_argv = mount_options_to_argv(args.source, args.mountpoint, ",".join(args.options))
    except UsageError as exc:
        print(f"mount.fuse.kitfs: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.f:
        return 0
    return main(kitfs_argv)


if __name__ == "__main__":
    sys.exit(main())

