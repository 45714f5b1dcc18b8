"""``kitfs demo``, the README's quick start: a loopback registry (``kitfs.demo``) holding a
sample kit, the command line run on it (``ls``, ``inspect``, ``cat``) with what the registry
served, then the kit mounted, listed and read, and ``kitfs status``; left mounted, with the
commands that clean up, unless ``--cleanup``. Owns the demo's script only: each step is a real
``kitfs`` command, run through the ``run`` callable ``kitfs.cli`` passes in (its ``main``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kitfs.demo import Pusher, Registry, sample_kit
from kitfs.mount.control import unmount
from kitfs.mount.daemon import STATUS_INTERVAL_S

SAMPLE_WEIGHTS_BYTES = 64 * 1024 * 1024


def run_demo(mountpoint: Path | None, cleanup: bool, run: Callable[[list[str]], int]) -> int:
    """The quick start; ``run(argv)`` runs one ``kitfs`` command and returns its exit code."""
    workdir = Path(tempfile.mkdtemp(prefix="kitfs-demo-"))
    registry = Registry(workdir / "registry").start()
    mountpoint = mountpoint or workdir / "mnt"
    mounted = False
    try:
        weights = os.urandom(SAMPLE_WEIGHTS_BYTES)
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
            status = run([*command, "--cache-dir", cache])
            sys.stdout.flush()
            if status != 0:
                return status
            print()
        fetched = registry.blob_bytes_served(mark)
        print(f"# the registry served {fetched} of {total} layer bytes ({100 * fetched / total:.1f} %)\n")

        mountpoint.mkdir(parents=True, exist_ok=True)
        print(f"$ kitfs mount {reference} {mountpoint}", flush=True)
        status = run(["mount", reference, str(mountpoint), "--cache-dir", cache,
                      "--log-file", str(workdir / "mount.log")])
        if status != 0:
            return status
        mounted = True
        for command in (["ls", "-lR", str(mountpoint)],
                        ["head", "-c", "60", str(mountpoint / "data/train/part-003.csv")]):
            print(f"\n$ {' '.join(command)}", flush=True)
            subprocess.run(command, check=True)
        time.sleep(STATUS_INTERVAL_S + 0.1)  # let the daemon publish its counters
        print("\n$ kitfs status", flush=True)
        run(["status"])
        print()
        if cleanup:
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
