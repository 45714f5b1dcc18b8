"""``mount -t fuse.kitfs`` and fstab: the arguments mount(8) gives ``mount.fuse.kitfs``
(``SOURCE MOUNTPOINT [-o OPTIONS] [-n] [-s] [-f] [-v]``) translated into ``kitfs mount``
arguments. Owns the table of ``-o`` options kitfs takes, and of those it ignores (mount(8)'s
generic options that mean nothing to a read-only FUSE daemon). Pure: argv in, argv out;
``kitfs.cli.mount_helper`` runs the result.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from kitfs.errors import UsageError

log = logging.getLogger("kitfs")

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


def helper_argv_to_kitfs(argv: Sequence[str] | None) -> list[str] | None:
    """``mount.fuse.kitfs``'s own arguments → ``kitfs`` arguments, or None for ``-f`` (mount(8)'s
    fake mount: nothing to do). A bad ``-o`` option is a ``UsageError``."""
    parser = argparse.ArgumentParser(prog="mount.fuse.kitfs")
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", action="append", default=[])
    for flag in ("-n", "-s", "-f", "-v"):  # no mtab, sloppy, fake, verbose: nothing to do
        parser.add_argument(flag, action="store_true")
    args = parser.parse_args(argv)
    kitfs_argv = mount_options_to_argv(args.source, args.mountpoint, ",".join(args.options))
    return None if args.f else kitfs_argv
