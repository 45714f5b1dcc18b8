"""Which kitfs mounts exist on this machine, and what each daemon reports about itself.

Two sources, joined by mountpoint:

- the kernel's mount table (``/proc/self/mountinfo``): every mount of type ``fuse.kitfs``,
  whoever made it. This is the truth about what is mounted;
- one status file per daemon, ``<runtime dir>/<pid>.json``, rewritten (atomically) every
  second while it runs and removed when it stops: reference, digest, counters, the
  verification state of each blob. A file whose process is gone is stale and ignored.

The records are typed (``kitfs.mount.record``). The runtime directory is
``kitfs.environment.runtime_dir``; ``make_runtime_dir`` creates it 0700, once, where a
process is about to write there (a daemon starting, ``kitfs mount``'s log): reading the
status of the mounts creates nothing.

``sd_notify`` lives here too (systemd's readiness protocol: the daemon and ``kitfs metrics``
use it), so that what does not mount never imports pyfuse3.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from kitfs.environment import notify_socket, runtime_dir
from kitfs.mount.record import MountEntry, MountStatus

log = logging.getLogger(__name__)

FSTYPE = "fuse.kitfs"
MOUNTINFO = Path("/proc/self/mountinfo")


def make_runtime_dir() -> Path:
    """The runtime directory (``kitfs.environment.runtime_dir``), created 0700 if missing."""
    path = runtime_dir()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class KernelMount:
    """One line of the mount table."""

    mountpoint: str
    source: str
    fstype: str
    device: str  # "major:minor", which names the mount's bdi in /sys/class/bdi
    options: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[KernelMount]:
    """Parse /proc/PID/mountinfo (see proc(5)): ``id parent maj:min root mountpoint opts
    [optional fields...] - fstype source superopts``."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields:
            continue
        dash = fields.index("-")
        if dash < 6 or len(fields) < dash + 3:
            continue
        mounts.append(KernelMount(
            mountpoint=_unescape(fields[4]), source=_unescape(fields[dash + 2]),
            fstype=fields[dash + 1], device=fields[2], options=fields[5],
        ))
    return mounts


def kernel_mounts(fstype: str | None = FSTYPE) -> list[KernelMount]:
    mounts = parse_mountinfo(MOUNTINFO.read_text())
    return [m for m in mounts if fstype is None or m.fstype == fstype]


def find_mount(mountpoint: Path | str) -> KernelMount | None:
    """The topmost mount at ``mountpoint`` (of any type), if there is one."""
    wanted = os.path.abspath(mountpoint)
    found = None
    for mount in kernel_mounts(None):
        if mount.mountpoint == wanted:
            found = mount  # later lines are mounted on top of earlier ones
    return found


def write_status(record: MountStatus) -> None:
    """Replace the daemon's status file, atomically (the runtime directory is made again if
    it was removed under a running daemon)."""
    directory = runtime_dir()
    tmp = directory / f".{record.pid}.json.tmp"
    text = json.dumps(record.to_json(), indent=1)
    try:
        tmp.write_text(text)
    except FileNotFoundError:
        make_runtime_dir()
        tmp.write_text(text)
    tmp.rename(directory / f"{record.pid}.json")


def remove_status(pid: int) -> None:
    (runtime_dir() / f"{pid}.json").unlink(missing_ok=True)


def wait_exit(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` no longer runs (``process_alive``); False if it still does after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while process_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def daemon_records() -> list[MountStatus]:
    """The status records of running daemons (stale files of dead ones, and files that are
    no such record, are skipped)."""
    records = []
    for path in sorted(runtime_dir().glob("*.json")):
        try:
            record = MountStatus.from_json(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            log.debug("%s skipped: %s", path, exc)
            continue
        if process_alive(record.pid):
            records.append(record)
    return records


def all_mounts() -> list[MountEntry]:
    """Every kitfs mount in the mount table, with its daemon's record where there is one."""
    by_mountpoint = {r.mountpoint: r for r in daemon_records()}
    return [MountEntry(mount.mountpoint, mount.source, by_mountpoint.get(mount.mountpoint))
            for mount in kernel_mounts()]


def sd_notify(message: str) -> None:
    """Send ``message`` to systemd's notification socket, if this process has one."""
    address = notify_socket()
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as exc:
            log.warning("could not notify systemd: %s", exc)
