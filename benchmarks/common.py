"""Shared helpers of the benchmark suite: timing, the page cache, the machine, readers.

Everything here is plain measurement plumbing: no kitfs internals are imported, so the suite
measures kitfs the way a user sees it (a mount, files, the registry's own log).
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
READ_BLOCK_BYTES = 1 * MiB  # what the sequential reader asks for per read(2), like dd bs=1M
REPO_ROOT = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    """Progress on stderr, with the wall-clock time (the run takes a while)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def drop_caches() -> None:
    """sync, then drop the page cache, dentries and inodes (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# Enough for a 4 GiB cold read: the FUSE file's pages, the registry's blob pages and a
# cache file's, with room to spare (the machine has 24 GiB).
TOUCHED_MEMORY_GIB = 12


def touch_guest_memory(gib: int = TOUCHED_MEMORY_GIB) -> float:
    """Write every page of ``gib`` GiB of anonymous memory in a child process that then exits;
    returns how long it took. This VM hands memory the guest frees back to its host (virtio
    balloon free page reporting, order 9, and a DAMON ``pageout`` scheme), so the first write
    to a page after ``drop_caches`` costs a host fault, charged to whichever process touches
    it: on a 4 GiB cold read the 3rd and 4th GiB cost the daemon 4.9 CPU s each against 2.6
    for the 1st (the registry 3.1 against 1.15), and touching 12 GiB took 25 s the first
    time, 8 s right after. The diagnostic rows measured after this show the software apart
    from the hypervisor; the target rows are measured without it."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"b = b'\\x01' * ({gib} << 30)"], check=True)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def mb_per_s(size_bytes: float, elapsed_s: float) -> float:
    """Decimal megabytes per second (MB/s, 10^6), as curl and dd report."""
    return size_bytes / elapsed_s / 1e6 if elapsed_s > 0 else float("nan")


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per numeric key, the median over the runs (non-numeric keys are taken from the first)."""
    out: dict[str, Any] = {}
    if not runs:
        return out
    for key in runs[0]:
        values = [r[key] for r in runs if key in r]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = median([float(v) for v in values])
        else:
            out[key] = values[0]
    return out


# --- reading ------------------------------------------------------------------------------


@dataclass
class SeqRead:
    size_bytes: int
    elapsed_s: float
    first_byte_s: float  # from open() to the first byte in hand

    def as_dict(self) -> dict[str, float]:
        return {"size_bytes": self.size_bytes, "elapsed_s": self.elapsed_s,
                "first_byte_s": self.first_byte_s, "mb_s": mb_per_s(self.size_bytes, self.elapsed_s)}


def read_sequential(path: Path, block_bytes: int = READ_BLOCK_BYTES) -> SeqRead:
    """Read a whole file front to back with read(2) into one reused buffer."""
    buffer = bytearray(block_bytes)
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    first = 0.0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            n = os.readv(fd, [view])
            if n == 0:
                break
            if total == 0:
                first = time.perf_counter() - start
            total += n
    finally:
        os.close(fd)
    return SeqRead(total, time.perf_counter() - start, first)


def read_many_concurrently(paths: list[Path]) -> dict[str, float]:
    """One thread per file, each reading its file sequentially (read(2) releases the GIL)."""
    results: list[SeqRead | None] = [None] * len(paths)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = read_sequential(paths[i])
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(paths))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed_s = time.perf_counter() - start
    if errors:
        raise errors[0]
    total = sum(r.size_bytes for r in results if r)
    slowest = max(r.elapsed_s for r in results if r)
    return {"readers": len(paths), "size_bytes": total, "elapsed_s": elapsed_s,
            "mb_s": mb_per_s(total, elapsed_s), "slowest_reader_s": slowest}


def random_offsets(size_bytes: int, block_bytes: int, count: int, seed: int) -> list[int]:
    """``count`` block-aligned offsets, uniform over the file, from a fixed seed."""
    rng = random.Random(seed)
    last_block = (size_bytes - block_bytes) // block_bytes
    return [rng.randint(0, last_block) * block_bytes for _ in range(count)]


def isolated_offsets(size_bytes: int, count: int, seed: int, block_bytes: int = 4096) -> list[int]:
    """``count`` block-aligned offsets, one in the middle half of each of ``count`` equal slots
    of the file, in shuffled order: neighbours are at least half a slot apart, so no read can be
    served by what an earlier one fetched (unless a fetch spans half a slot), and the order does
    not look sequential."""
    rng = random.Random(seed)
    slot = size_bytes // count
    offsets = [(i * slot + rng.randint(slot // 4, 3 * slot // 4 - block_bytes)) // block_bytes * block_bytes
               for i in range(count)]
    rng.shuffle(offsets)
    return offsets


def random_reads(path: Path, offsets: list[int], block_bytes: int) -> dict[str, float]:
    """os.pread of ``block_bytes`` at each offset, one after another; latency per read."""
    latencies_s = []
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.perf_counter()
        for offset in offsets:
            t0 = time.perf_counter()
            data = os.pread(fd, block_bytes, offset)
            latencies_s.append(time.perf_counter() - t0)
            total += len(data)
        elapsed_s = time.perf_counter() - start
    finally:
        os.close(fd)
    return {"reads": len(offsets), "block_bytes": block_bytes, "size_bytes": total,
            "elapsed_s": elapsed_s, "ops_s": len(offsets) / elapsed_s,
            "p50_ms": percentile(latencies_s, 50) * 1e3, "p99_ms": percentile(latencies_s, 99) * 1e3,
            "mean_ms": statistics.fmean(latencies_s) * 1e3, "mb_s": mb_per_s(total, elapsed_s)}


def open_to_first_byte(path: Path, offset: int = 0, size_bytes: int = 4096) -> dict[str, float]:
    """Time from open() (which includes the lookup) to ``size_bytes`` read at ``offset``."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size_bytes, offset)
        elapsed_s = time.perf_counter() - start
    finally:
        os.close(fd)
    assert data, f"nothing read from {path} at {offset}"
    return {"first_byte_ms": elapsed_s * 1e3, "offset": offset, "size_bytes": len(data)}


def find_stat(directory: Path) -> dict[str, float]:
    """``find DIR -printf '%s %m\\n'``: walks the tree and stats every entry (size, mode)."""
    start = time.perf_counter()
    done = subprocess.run(["find", str(directory), "-printf", "%s %m\n"], capture_output=True,
                          check=True)
    elapsed_s = time.perf_counter() - start
    return {"entries": done.stdout.count(b"\n"), "elapsed_s": elapsed_s}


# --- processes and files ------------------------------------------------------------------


CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
CPU_SETTLE_S = 5.0  # how long a meter waits at most for its processes to go idle


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (``/proc/PID/stat`` utime and
    stime); 0.0 once it has exited."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = text.rpartition(")")[2].split()  # fields[0] is field 3 (state) of proc(5)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's children that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds used while a block runs, per name: processes by PID (``/proc``), and
    optionally this process's children waited for meanwhile (``getrusage(RUSAGE_CHILDREN)``:
    curl, tar) under ``children_as``.

    After the block it waits (up to ``CPU_SETTLE_S``) until the processes stop using CPU, so
    work a daemon finishes after the last read returned (hashing, writing chunks) is counted.
    ``fields(size_bytes)`` gives ``{name}_s`` and ``{name}_s_per_gib`` for each name.
    """

    def __init__(self, pids: dict[str, int], children_as: str | None = None) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self.children_as = children_as
        self.cpu_s: dict[str, float] = {}
        self._start: dict[str, float] = {}
        self._children_start = 0.0

    def _now(self) -> dict[str, float]:
        return {name: process_cpu_s(pid) for name, pid in self.pids.items()}

    def __enter__(self) -> CpuMeter:
        self._start = self._now()
        self._children_start = children_cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        deadline = time.monotonic() + CPU_SETTLE_S
        now = self._now()
        while self.pids and time.monotonic() < deadline:
            time.sleep(0.2)
            later = self._now()
            settled = sum(later.values()) - sum(now.values()) <= 2 / CLOCK_TICKS_PER_S
            now = later
            if settled:
                break
        self.cpu_s = {name: max(0.0, now[name] - self._start[name]) for name in self.pids}
        if self.children_as:
            self.cpu_s[self.children_as] = children_cpu_s() - self._children_start

    def fields(self, size_bytes: float | None) -> dict[str, float]:
        out = {}
        for name, seconds in self.cpu_s.items():
            out[f"{name}_s"] = seconds
            if size_bytes:
                out[f"{name}_s_per_gib"] = seconds / (size_bytes / GiB)
        return out



def vm_hwm_bytes(pid: int) -> int:
    """Peak resident set size (VmHWM) of a process, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_bytes(directory: Path) -> int:
    """Sum of the sizes of the regular files under ``directory`` (0 if it is missing)."""
    total = 0
    stack = [directory]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except FileNotFoundError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue  # a chunk evicted while we looked
    return total


class Sampler:
    """Calls ``probe()`` every ``interval_s`` in a thread and keeps the maximum."""

    def __init__(self, probe: Callable[[], int], interval_s: float = 0.2) -> None:
        self.probe = probe
        self.interval_s = interval_s
        self.maximum = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.maximum = max(self.maximum, self.probe())
                self.samples += 1
            except OSError:
                pass
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.maximum = max(self.maximum, self.probe())


def wait_for_file_data(path: Path, stop: threading.Event, start: float) -> list[float]:
    """Poll (1 ms) until ``path`` exists with data; return [seconds since ``start``] or []."""
    while not stop.is_set():
        try:
            if path.stat().st_size > 0:
                return [time.perf_counter() - start]
        except FileNotFoundError:
            pass
        time.sleep(0.001)
    try:
        return [time.perf_counter() - start] if path.stat().st_size > 0 else []
    except FileNotFoundError:
        return []


@contextmanager
def first_data_watch(path: Path, start: float) -> Iterator[list[float]]:
    """Watch ``path`` in a thread while the body runs; the yielded list gets the time at which
    it first held data (seconds after ``start``)."""
    found: list[float] = []
    stop = threading.Event()
    thread = threading.Thread(target=lambda: found.extend(wait_for_file_data(path, stop, start)),
                              daemon=True)
    thread.start()
    try:
        yield found
    finally:
        stop.set()
        thread.join()


def run_quiet(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, raise with its stderr when it fails."""
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done


# --- the machine --------------------------------------------------------------------------


def _first(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(data_dir: Path) -> dict[str, Any]:
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    mem_total_bytes = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_total_bytes = int(line.split()[1]) * 1024
    source_fstype = _first(["findmnt", "-no", "SOURCE,FSTYPE", "-T", str(data_dir)])
    device = source_fstype.split()[0] if source_fstype else ""
    disk = _first(["lsblk", "-dno", "NAME,SIZE,ROTA,MODEL", device]) if device.startswith("/dev/") else ""
    stat = os.statvfs(data_dir)
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "ram_bytes": mem_total_bytes,
        "kernel": platform.release(),
        "os": _first(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "data_dir": str(data_dir),
        "data_fs": source_fstype,
        "disk": disk,  # lsblk NAME SIZE ROTA MODEL
        "data_fs_free_bytes": stat.f_bavail * stat.f_frsize,
        "curl": _first(["curl", "--version"]).splitlines()[0] if _first(["curl", "--version"]) else "",
        "registry": _first(["/usr/bin/docker-registry", "--version"]),
        "fuse_read_ahead_note": "kitfs sets read_ahead_kb=1024 on its bdi as root",
    }


def git_info() -> dict[str, Any]:
    sha = _first(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    status = _first(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "kitfs"])
    return {"sha": sha, "kitfs_dirty": bool(status),
            "note": "kitfs_dirty: kitfs/ had uncommitted changes when this ran" if status else ""}


def snapshot_kitfs(dest: Path, source: str) -> dict[str, Any]:
    """Copy the kitfs package the run measures into ``dest``/kitfs, so that it cannot change
    under the run (kitfs is installed editable and is being worked on while benchmarks run).

    ``source`` is ``HEAD`` (the committed tree, via ``git archive``: a version named by its
    sha) or ``worktree`` (the files as they are now, uncommitted edits included). Every kitfs
    process of the run is started with ``PYTHONPATH=dest`` and ``cwd=dest``.
    """
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    sha = _first(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    if source == "HEAD":
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "HEAD", "kitfs"],
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
    elif source == "worktree":
        shutil.copytree(REPO_ROOT / "kitfs", dest / "kitfs",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        raise ValueError(f"unknown kitfs source {source!r}")
    digest = hashlib.sha256()
    for path in sorted((dest / "kitfs").rglob("*.py")):
        digest.update(str(path.relative_to(dest)).encode() + b"\0" + path.read_bytes())
    modified = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "kitfs"],
                              capture_output=True, text=True, check=False).stdout
    return {"source": source, "git_sha": sha, "tree_sha256": digest.hexdigest(),
            "worktree_changes_not_measured" if source == "HEAD" else "worktree_changes_measured":
            modified.splitlines()}
