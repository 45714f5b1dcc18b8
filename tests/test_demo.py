"""The README's first quick-start command, `kitfs demo`, does what the README says."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from kitfs.mount.status import find_mount
from tests.kitfs_cli import run_kitfs
from tests.mounts import wait_gone


def test_demo_ends_with_the_sample_kit_mounted_and_listed(
        tmp_path: Path, fuse: None, docker_registry: str) -> None:
    """(``kitfs demo`` starts its own registry and mounts: the two fixtures mark the test.)"""
    mountpoint = tmp_path / "mnt"
    env = dict(os.environ, KITFS_RUNTIME_DIR=str(tmp_path / "run"))
    done = run_kitfs("demo", "--mountpoint", str(mountpoint), env=env, timeout_s=300)
    cleanup = re.search(r"Clean up with: kitfs umount (\S+) && kill (\d+)", done.text)
    try:
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        assert f"$ ls -lR {mountpoint}" in done.text
        assert "weights.safetensors" in done.text.split(f"$ ls -lR {mountpoint}")[1]
        assert "id,value\n3,9\n" in done.text
        assert cleanup is not None, done.text
        # still mounted after the demo returned, and readable
        found = find_mount(mountpoint)
        assert found is not None and found.fstype == "fuse.kitfs"
        assert (mountpoint / "data/train/part-003.csv").read_text() == "id,value\n3,9\n"
    finally:
        if cleanup is not None:  # exactly what the demo tells the user to run
            run_kitfs("umount", cleanup.group(1), env=env)
            os.kill(int(cleanup.group(2)), signal.SIGTERM)
            assert wait_gone(int(cleanup.group(2)))
        elif find_mount(mountpoint) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)
    assert find_mount(mountpoint) is None
