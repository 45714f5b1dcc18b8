"""The control side of mounts, run by the ``kitfs`` commands and never by a daemon: start a
mount daemon in the background and wait until it is ready, unmount and wait for the daemon
to exit. Nothing here imports pyfuse3 (``kitfs.mount.daemon`` does), so ``kitfs umount``
works where the ``mount`` extra is not installed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from kitfs.errors import KitfsError, UsageError
from kitfs.mount import status
from kitfs.mount.readiness import wait_ready

UNMOUNT_TIMEOUT_S = 20.0  # how long ``kitfs umount`` waits for the daemon to exit
FAILED_EXIT_TIMEOUT_S = 5.0  # how long a daemon that reported its failure gets to exit


def start_background(argv: list[str], log_file: Path, timeout_s: float) -> int:
    """Start ``kitfs mount --foreground`` detached; return once it is ready (exit code 0) or
    has failed (its exit code, with its message on stderr)."""
    read_fd, write_fd = os.pipe()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log_stream, open(os.devnull, "rb") as devnull:
        child = subprocess.Popen(
            [sys.executable, "-m", "kitfs", *argv, "--foreground", "--ready-fd", str(write_fd)],
            stdin=devnull, stdout=log_stream, stderr=log_stream, pass_fds=(write_fd,),
            start_new_session=True, close_fds=True,
        )
    os.close(write_fd)
    outcome = wait_ready(read_fd, timeout_s)
    if outcome is not None and outcome.exit_code == 0:
        return 0
    if outcome is not None:
        print(f"kitfs: {outcome.message}", file=sys.stderr)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(FAILED_EXIT_TIMEOUT_S)
        return outcome.exit_code
    if child.poll() is None:
        child.terminate()
        print(f"kitfs: the mount daemon (pid {child.pid}) was not ready within {timeout_s:.0f} s; "
              f"stopped it. Its log: {log_file}", file=sys.stderr)
    else:
        print(f"kitfs: the mount daemon exited with code {child.returncode} before it was ready; "
              f"its log: {log_file}", file=sys.stderr)
    return 1


def unmount(mountpoint: Path, lazy: bool = False, timeout_s: float = UNMOUNT_TIMEOUT_S) -> int:
    """``kitfs umount``: end the FUSE session and wait for the daemon to exit."""
    mountpoint = mountpoint.absolute()
    mount = status.find_mount(mountpoint)
    if mount is None or mount.fstype != status.FSTYPE:
        raise UsageError(f"{str(mountpoint)!r} is not a kitfs mount")
    pids = [r.pid for r in status.daemon_records() if r.mountpoint == str(mountpoint)]
    command = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        reason = done.stderr.strip().removeprefix("fusermount3: ")
        raise KitfsError(f"cannot unmount {str(mountpoint)!r}: {reason}")
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        status.wait_exit(pid, max(0.0, deadline - time.monotonic()))
    return 0
