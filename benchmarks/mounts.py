"""Mounts the benchmarks read through: a real ``kitfs mount``, the ratarmount peer and the
minimal pyfuse3 pass-through (benchmarks/passfs.py, the ceiling of a pyfuse3 filesystem).

All are context managers that always unmount (``kitfs umount``, else ``fusermount3 -u``) and
wait for their own daemon, by PID, to exit. A daemon that will not exit is killed by its PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from common import run_quiet, vm_hwm_bytes

from kitfs.mount.status import find_mount, process_alive, wait_exit

KITFS = [sys.executable, "-m", "kitfs"]
EXIT_WAIT_S = 20.0


def mounted_fstype(path: Path) -> str | None:
    """The fstype of the topmost mount at ``path``, if any."""
    found = find_mount(path)
    return found.fstype if found is not None else None


def wait_fuse_ready(process: subprocess.Popen[bytes], path: Path, name: str, log_file: Path,
                    timeout_s: float, ready: Callable[[], object]) -> bool:
    """Wait until the child ``process`` has ``path`` mounted as FUSE and ``ready()`` (a listing
    or a stat) no longer raises OSError: the mount shows before FUSE INIT is answered. False
    after ``timeout_s``; a child that exits first is an error with its log's tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited {process.returncode}: "
                               f"{log_file.read_text(errors='replace')[-1500:]}")
        if (mounted_fstype(path) or "").startswith("fuse"):
            try:
                ready()
                return True
            except OSError:
                pass
        time.sleep(0.01)
    return False


def stop_child(process: subprocess.Popen[bytes], path: Path, *, terminate: bool) -> None:
    """Unmount ``path`` (``fusermount3 -u``), wait ``EXIT_WAIT_S`` for the child to exit, then
    end it by its PID (SIGTERM first with ``terminate``, then SIGKILL)."""
    if mounted_fstype(path) is not None:
        subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, check=False)
    signals = [signal.SIGTERM, signal.SIGKILL] if terminate else [signal.SIGKILL]
    try:
        process.wait(timeout=EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        for number in signals:
            process.send_signal(number)
            try:
                process.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        process.wait()
    force_unmount(path)


def force_unmount(path: Path) -> None:
    if mounted_fstype(path) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)


class KitfsMount:
    """``kitfs mount REF DIR --cache-dir CACHE`` (a background daemon), unmounted on exit.

    kitfs runs from ``src_dir`` (``PYTHONPATH`` and working directory), a snapshot taken at the
    start of the run, not from the editable install, whose files may change meanwhile.

    ``pid`` comes from ``kitfs status --json``; ``mount_s`` is how long ``kitfs mount`` took.
    ``prefix`` goes before the mount command (``nsenter --net=…``: the daemon then lives in
    that network namespace).
    """

    def __init__(self, reference: str, mountpoint: Path, cache_dir: Path, runtime_dir: Path,
                 log_file: Path, src_dir: Path, extra_args: tuple[str, ...] = (),
                 prefix: tuple[str, ...] = ()) -> None:
        self.src_dir = src_dir  # the snapshot of the kitfs package this run measures
        self.reference = reference
        self.path = mountpoint
        self.cache_dir = cache_dir
        self.runtime_dir = runtime_dir
        self.log_file = log_file
        self.extra_args = extra_args
        self.prefix = prefix
        self.pid = 0
        self.mount_s = 0.0

    def env(self) -> dict[str, str]:
        return dict(os.environ, KITFS_RUNTIME_DIR=str(self.runtime_dir), PYTHONPATH=str(self.src_dir))

    def __enter__(self) -> KitfsMount:
        self.path.mkdir(parents=True, exist_ok=True)
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        run_quiet([*self.prefix, *KITFS, "mount", self.reference, str(self.path),
                   "--cache-dir", str(self.cache_dir), "--log-file", str(self.log_file), *self.extra_args],
                  env=self.env(), cwd=self.src_dir, timeout=300)
        self.mount_s = time.perf_counter() - start
        self.pid = self._daemon_pid()
        return self

    def _daemon_pid(self) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done = run_quiet([*KITFS, "status", "--json"], env=self.env(), cwd=self.src_dir, timeout=30)
            for record in json.loads(done.stdout):
                if record.get("mountpoint") == str(self.path.absolute()) and record.get("pid"):
                    return int(record["pid"])
            time.sleep(0.1)
        raise RuntimeError(f"no kitfs status record for {self.path}")

    def status(self) -> dict[str, object]:
        """The daemon's own record (counters are rewritten every second)."""
        record: dict[str, object] = json.loads((self.runtime_dir / f"{self.pid}.json").read_text())
        return record

    def peak_rss_bytes(self) -> int:
        return vm_hwm_bytes(self.pid) if self.pid and process_alive(self.pid) else 0

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if mounted_fstype(self.path) == "fuse.kitfs":
            done = subprocess.run([*KITFS, "umount", str(self.path)], capture_output=True, text=True,
                                  env=self.env(), cwd=self.src_dir, timeout=60, check=False)
            if done.returncode != 0:
                force_unmount(self.path)
        if self.pid and not wait_exit(self.pid, EXIT_WAIT_S):
            os.kill(self.pid, signal.SIGKILL)
            wait_exit(self.pid, 5)
        force_unmount(self.path)


class Ratarmount:
    """``ratarmount -f URL_OR_FILE DIR`` in the foreground as a child (ratarmount refuses to
    daemonize while its fsspec HTTP thread runs), ready when the mount appears."""

    def __init__(self, source: str, mountpoint: Path, index_dir: Path, log_file: Path,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.source = source
        self.path = mountpoint
        self.index_dir = index_dir
        self.log_file = log_file
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self.mount_s = 0.0

    def __enter__(self) -> Ratarmount:
        self.path.mkdir(parents=True, exist_ok=True)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        binary = str(Path(sys.executable).parent / "ratarmount")
        start = time.perf_counter()
        with open(self.log_file, "ab") as log_stream:
            self.process = subprocess.Popen(
                [binary, "-f", "--index-folders", str(self.index_dir), *self.extra_args,
                 self.source, str(self.path)],
                stdin=subprocess.DEVNULL, stdout=log_stream, stderr=log_stream, start_new_session=True)
        if not wait_fuse_ready(self.process, self.path, "ratarmount", self.log_file, 600,
                               lambda: os.listdir(self.path)):
            self.__exit__(None, None, None)
            raise RuntimeError("ratarmount did not mount within 600 s")
        self.mount_s = time.perf_counter() - start
        return self

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def peak_rss_bytes(self) -> int:
        return vm_hwm_bytes(self.process.pid) if self.process and self.process.poll() is None else 0

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process is not None:
            stop_child(self.process, self.path, terminate=True)
            self.process = None
        force_unmount(self.path)


def set_read_ahead(mountpoint: Path, read_ahead_kb: int) -> None:
    """Set the read-ahead of the mount's backing device info (root only), as kitfs does."""
    device = os.stat(mountpoint).st_dev
    Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb").write_text(
        f"{read_ahead_kb}\n")


class Passthrough:
    """``benchmarks/passfs.py BACKING DIR`` as a child process, read-ahead raised to 1 MiB as
    kitfs raises its own; the file is ``DIR/file``. ``pid`` is the filesystem's process.
    With ``tree``, ``passfs.py --tree``: ``DIR`` shows the tree of the directory ``BACKING``."""

    READ_AHEAD_KB = 1024

    def __init__(self, backing: Path, mountpoint: Path, log_file: Path, tree: bool = False) -> None:
        self.backing = backing
        self.path = mountpoint
        self.tree = tree
        self.file = mountpoint if tree else mountpoint / "file"
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def __enter__(self) -> Passthrough:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log_stream:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("passfs.py")),
                 *(["--tree"] if self.tree else []), str(self.backing), str(self.path)],
                stdin=subprocess.DEVNULL, stdout=log_stream, stderr=log_stream,
                start_new_session=True)
        self.pid = self.process.pid
        # --tree first reads the whole tree
        if not wait_fuse_ready(self.process, self.path, "passfs", self.log_file, 120, self.file.stat):
            self.__exit__(None, None, None)
            raise RuntimeError("passfs did not mount within 120 s")
        set_read_ahead(self.path, self.READ_AHEAD_KB)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process is not None:
            stop_child(self.process, self.path, terminate=False)
            self.process = None
        force_unmount(self.path)
