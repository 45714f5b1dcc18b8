"""Real kitfs mounts for tests: start them with the real CLI, find their daemons, always unmount.

``Mounter.mount`` runs ``kitfs mount`` exactly as a user would (background daemon, returns when
ready) with this test's cache and runtime directory; ``Mounter.close`` unmounts whatever is
still mounted with ``fusermount3 -u``, waits for each daemon (by PID) to exit, and fails the
test when a daemon log holds an ERROR line or a traceback that the test did not declare with
``Mount.expect_error``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kitfs.mount.status import find_mount, wait_exit
from tests.kitfs_cli import Result, run_kitfs

DAEMON_EXIT_S = 15.0


@dataclass
class Mount:
    reference: str
    path: Path
    log_file: Path
    runtime_dir: Path
    pid: int
    expected_errors: list[str] = field(default_factory=list)

    def expect_error(self, pattern: str) -> None:
        """Declare that ERROR log lines matching ``pattern`` (a regex) are this test's point."""
        self.expected_errors.append(pattern)

    def status(self) -> dict[str, Any]:
        """This daemon's own status record (what ``kitfs status --json`` shows for it)."""
        time.sleep(1.2)  # the daemon rewrites its record every second
        record: dict[str, Any] = json.loads((self.runtime_dir / f"{self.pid}.json").read_text())
        return record

    def settled_status(self, field: str, tries: int = 5) -> dict[str, Any]:
        """The status record once ``field`` stopped moving between two records (a busy daemon
        may write its record late: one read just after a read ends can miss its tail)."""
        record = self.status()
        for _ in range(tries):
            again = self.status()
            if again[field] == record[field]:
                return again
            record = again
        return record

    @property
    def mounted(self) -> bool:
        found = find_mount(self.path)
        return found is not None and found.fstype == "fuse.kitfs"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


def wait_gone(pid: int, timeout_s: float = DAEMON_EXIT_S) -> bool:
    """``kitfs.mount.status.wait_exit`` with the tests' default bound."""
    return wait_exit(pid, timeout_s)


class Mounter:
    def __init__(self, workdir: Path, cache_dir: Path) -> None:
        self.workdir = workdir
        self.cache_dir = cache_dir
        self.runtime_dir = workdir / "run"
        self.mounts: list[Mount] = []
        self.extra_env: dict[str, str] = {}  # for every kitfs command and daemon this starts

    def env(self, **extra: str) -> dict[str, str]:
        return dict(os.environ, KITFS_RUNTIME_DIR=str(self.runtime_dir),
                    KITFS_CACHE_DIR=str(self.cache_dir), **self.extra_env, **extra)

    def kitfs(self, *args: str, check: bool = True, timeout_s: float = 120) -> Result:
        """``kitfs ARGS`` with this mounter's cache and runtime directory."""
        return run_kitfs(*args, env=self.env(), check=check, timeout_s=timeout_s)

    def mountpoint(self, name: str = "mnt") -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def mount(self, reference: str, *args: str, name: str = "mnt", at: Path | None = None) -> Mount:
        """``kitfs mount REF DIR``; DIR is ``at`` or a directory ``name`` in the workdir."""
        path = at or self.mountpoint(name)
        log_file = self.workdir / f"{name}.log"
        self.kitfs("mount", reference, str(path), "--log-file", str(log_file), *args)
        return self.adopt(reference, path, log_file)

    def adopt(self, reference: str, path: Path, log_file: Path) -> Mount:
        """Track a mount made some other way (mount(8), a foreground daemon) for cleanup."""
        pid = self.daemon_pid(path)
        mount = Mount(reference, path, log_file, self.runtime_dir, pid)
        self.mounts.append(mount)
        assert mount.mounted, f"{path} is not a kitfs mount after kitfs mount returned"
        return mount

    def adopt_when_ready(self, reference: str, path: Path, log_file: Path,
                         daemon: subprocess.Popen[bytes]) -> Mount:
        """Wait for a foreground daemon started by the test to have mounted, then track it."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if daemon.poll() is not None:
                raise AssertionError(f"daemon exited {daemon.returncode}: {log_file.read_text()}")
            found = find_mount(path)
            if found is not None and found.fstype == "fuse.kitfs" and any(
                    self.runtime_dir.glob("*.json")):
                return self.adopt(reference, path, log_file)
            time.sleep(0.05)
        raise AssertionError(f"{path} was not mounted within 60 s")

    def daemon_pid(self, path: Path) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for record_file in self.runtime_dir.glob("*.json"):
                try:
                    record = json.loads(record_file.read_text())
                except ValueError:
                    continue
                if record.get("mountpoint") == str(path.absolute()):
                    return int(record["pid"])
            time.sleep(0.05)
        raise AssertionError(f"no daemon status record for {path} in {self.runtime_dir}")

    def close(self) -> None:
        problems = []
        for mount in self.mounts:
            if mount.mounted:
                subprocess.run(["fusermount3", "-u", "-z", str(mount.path)], check=False)
            if not wait_gone(mount.pid):
                os.kill(mount.pid, 9)
                problems.append(f"daemon {mount.pid} of {mount.path} did not exit after unmount")
            unexpected = [
                line for line in mount.log().splitlines()
                if (" ERROR " in line or "Traceback" in line)
                and not any(re.search(p, line) for p in mount.expected_errors)
            ]
            if unexpected:
                problems.append(f"unexpected errors in {mount.log_file}:\n" + "\n".join(unexpected))
        self.mounts.clear()
        assert not problems, "\n".join(problems)
