"""py-spy profiles of the daemon (a cold sequential read, the first ``find`` over the
small-files layer) and the summary of its collapsed stacks that the report shows.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import Bench
from common import drop_caches, find_stat, log, read_sequential


def profile_seq(b: Bench, out_dir: Path) -> dict[str, Any]:
    """One cold sequential read of the model file with py-spy attached to the daemon, twice:
    the raw collapsed stacks (summarised as the top frames) and a flame graph (SVG). Native
    frames (C: hashlib, pyfuse3, the kernel boundary) are sampled too where py-spy can."""
    log("profile: py-spy on a cold sequential read")
    summary: dict[str, Any] = {}
    for fmt, out in (("raw", out_dir / "profile-seq.txt"), ("flamegraph", out_dir / "profile-seq.svg")):
        for native in (True, False):
            read, err = _profiled_read(b, fmt, out, native)
            if out.exists() and out.stat().st_size > 0:
                summary[f"{fmt}_read"] = read | {"native": native}
                break
            log(f"  py-spy {'--native ' if native else ''}wrote nothing: {err[-300:]}")
        else:
            raise RuntimeError(f"py-spy wrote no {out.name}")
    summary |= summarise_collapsed(out_dir / "profile-seq.txt")
    return summary


def profile_find(b: Bench, out_dir: Path) -> dict[str, Any]:
    """The first ``find`` over the small-files layer on a fresh cache, with py-spy attached to
    the daemon (collapsed stacks with native frames, ``profile-find.txt``)."""
    log("profile: py-spy on the first find over the small-files layer")
    out = out_dir / "profile-find.txt"
    out.unlink(missing_ok=True)
    py_spy = str(Path(sys.executable).parent / "py-spy")
    with b.kitfs(b.fresh_cache()) as m:
        drop_caches()
        spy = subprocess.Popen([py_spy, "record", "--pid", str(m.pid), "--rate", "100", "--threads",
                                "--native", "--format", "raw", "-o", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        found = find_stat(m.path / b.kit.dataset_path)
        spy.send_signal(2)
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
    if not out.exists():
        raise RuntimeError(f"py-spy wrote no {out.name}: {err[-500:]}")
    return {"find": found} | summarise_collapsed(out)


def _profiled_read(b: Bench, fmt: str, out: Path, native: bool) -> tuple[dict[str, float], str]:
    py_spy = str(Path(sys.executable).parent / "py-spy")
    out.unlink(missing_ok=True)
    with b.kitfs(b.fresh_cache()) as m:
        target = m.path / b.kit.model_path
        target.stat()
        drop_caches()
        spy = subprocess.Popen([py_spy, "record", "--pid", str(m.pid), "--rate", "100", "--threads",
                                *(["--native"] if native else []), "--format", fmt, "-o", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # py-spy attaches
        read = read_sequential(target).as_dict()
        spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
    return read, err


def _function(frame: str) -> str:
    """``name (file.py:123)`` → ``name (file.py)``: one entry per function, not per line."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rstrip(')')})" if where else name


_OUTER = ("<module> (", "main (kitfs/cli.py)", "_mount (", "run_foreground (")


def summarise_collapsed(path: Path, top: int = 15) -> dict[str, Any]:
    """From py-spy's collapsed stacks (``--format raw``), as shares of all samples:

    - ``top_python``: the deepest Python function of each sample (time in it and in the C code
      it calls: hashing, syscalls), per function;
    - ``top_native``: the leaf frame of each sample (with ``--native``: the C function or syscall);
    - ``top_inclusive``: kitfs and pyfuse3 functions, inclusive of everything below them.
    """
    python: dict[str, int] = {}
    native: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";")
                  if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if any(f.startswith("WorkerThread._work") for f in frames) and any(
                f.startswith("PyThread_acquire_lock") for f in frames):
            idle += count  # an idle trio worker thread waiting for a job: not work
            continue
        total += count
        native[frames[-1]] = native.get(frames[-1], 0) + count
        py_frames = [f for f in frames if ".py)" in f]
        if py_frames:
            python[py_frames[-1]] = python.get(py_frames[-1], 0) + count
        for frame in set(py_frames):
            if ("kitfs/" in frame or "pyfuse3" in frame) and not frame.startswith(_OUTER):
                inclusive[frame] = inclusive.get(frame, 0) + count

    def top_of(counts: dict[str, int]) -> list[dict[str, Any]]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [{"frame": f, "samples": c, "share": c / total if total else 0.0} for f, c in ranked]

    return {"samples": total, "idle_worker_samples": idle, "top_python": top_of(python),
            "top_native": top_of(native), "top_inclusive": top_of(inclusive)}
