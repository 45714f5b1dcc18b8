"""Operating kitfs: systemd (Type=notify and the unit file), mount(8) and fstab, the errno
boundary when a handler fails unexpectedly."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyfuse3
import pytest

from kitfs.demo import Pusher, Registry
from kitfs.errors import IntegrityError, UsageError
from kitfs.format.tree import Node, Tree
from kitfs.mount.filesystem import KitFilesystem
from kitfs.mount.fstab import mount_options_to_argv
from tests.kitfs_cli import kitfs_argv, run_kitfs
from tests.mounts import Mounter, wait_gone
from tests.test_mount import push_mount_kit

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "kitfs@.service"
HELPER = Path("/sbin/mount.fuse.kitfs")


@pytest.fixture(scope="module")
def kit(registry: Registry, pusher: Pusher) -> str:
    return push_mount_kit(pusher, f"{registry.host}/team/opskit:v1")


def test_unit_file_passes_systemd_analyze(tmp_path: Path) -> None:
    # The unit as installed, with ExecStart pointing at this checkout's kitfs.
    unit = tmp_path / "kitfs@demo.service"
    kitfs = Path(sys.executable).parent / "kitfs"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/kitfs", str(kitfs)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_foreground_daemon_notifies_systemd_ready_only_once_mounted(
        mounter: Mounter, kit: str, tmp_path: Path) -> None:
    # What systemd does for Type=notify: a datagram socket in $NOTIFY_SOCKET.
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        notify.settimeout(60)
        path = mounter.mountpoint()
        log_file = tmp_path / "daemon.log"
        env = mounter.env(NOTIFY_SOCKET=address)
        # The unit's ExecStart: kitfs mount --foreground REF MOUNTPOINT $KITFS_OPTIONS
        with open(log_file, "wb") as log_stream:
            daemon = subprocess.Popen(
                kitfs_argv("mount", "--foreground", kit, str(path), "--cache-size", "1G"),
                env=env, stdout=log_stream, stderr=log_stream)
        try:
            message = notify.recv(4096).decode()
            assert "READY=1" in message.splitlines()
            assert sorted(os.listdir(path)) == ["Kitfile", "README.md", "data", "models", "src"]
            mounter.adopt(kit, path, log_file)
            daemon.send_signal(signal.SIGTERM)  # systemctl stop
            assert "STOPPING=1" in notify.recv(4096).decode().splitlines()
            assert daemon.wait(15) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()


def test_a_failed_start_never_notifies_ready(mounter: Mounter, registry: Registry,
                                             tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        notify.setblocking(False)
        done = run_kitfs("mount", "-f", f"{registry.host}/team/absent:v1",
                         str(mounter.mountpoint()), env=mounter.env(NOTIFY_SOCKET=address),
                         timeout_s=60)
        assert done.returncode == 66, done.stderr
        with pytest.raises(BlockingIOError):
            notify.recv(4096)


def test_mount_helper_translates_mount_options() -> None:
    assert mount_options_to_argv("r.io/a:b", "/mnt/x", "ro,allow_other,uid=5,cache_size=2G,_netdev,"
                                 "noauto,x-systemd.automount,verify=strict") == [
        "mount", "r.io/a:b", "/mnt/x", "--allow-other", "--uid", "5", "--cache-size", "2G",
        "--verify", "strict"]
    with pytest.raises(UsageError, match="unknown mount option 'bogus'"):
        mount_options_to_argv("r.io/a:b", "/mnt/x", "bogus")


def test_mount_t_fuse_kitfs_and_an_fstab_line(mounter: Mounter, kit: str, tmp_path: Path) -> None:
    assert HELPER.exists(), f"{HELPER} is missing: .ci/install links it (see README)"
    path = mounter.mountpoint("by-mount")
    log_file = tmp_path / "by-mount.log"
    options = f"allow_other,cache_dir={mounter.cache_dir},log_file={log_file}"
    subprocess.run(["mount", "-t", "fuse.kitfs", kit, str(path), "-o", options], check=True,
                   env=mounter.env(), timeout=120)
    mount = mounter.adopt(kit, path, log_file)
    assert (path / "README.md").read_bytes() == b"# Mount kit\n"
    subprocess.run(["umount", str(path)], check=True)
    assert wait_gone(mount.pid) and not mount.mounted

    fstab = tmp_path / "fstab"
    path = mounter.mountpoint("by-fstab")
    log_file = tmp_path / "by-fstab.log"
    fstab.write_text(f"{kit} {path} fuse.kitfs ro,noauto,_netdev,cache_dir={mounter.cache_dir},"
                     f"log_file={log_file} 0 0\n")
    subprocess.run(["mount", "-T", str(fstab), str(path)], check=True, env=mounter.env(), timeout=120)
    mount = mounter.adopt(kit, path, log_file)
    assert sorted(os.listdir(path)) == ["Kitfile", "README.md", "data", "models", "src"]
    subprocess.run(["umount", str(path)], check=True)
    assert wait_gone(mount.pid)


class _FailingSession:
    """A KitSession stand-in whose lookups fail the way a bug would, or with a kitfs error."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def lookup(self, kit: Any, directory: Node, name: str) -> Node:
        raise self.error


class _Kit:
    def __init__(self) -> None:
        self.tree = Tree(Node("", True, 0o755))
        self.layers: list[Any] = []


@pytest.mark.parametrize(("error", "expected"), [
    (RuntimeError("a bug"), errno.EIO),
    (IntegrityError("layer sha256:x does not match its digest"), errno.EIO),
    (UsageError("nonsense"), errno.EINVAL),
    (PermissionError(errno.EACCES, "denied"), errno.EACCES),
])
async def test_every_handler_error_becomes_an_errno_and_is_logged(
        error: Exception, expected: int, caplog: pytest.LogCaptureFixture) -> None:
    fs = KitFilesystem(_FailingSession(error), _Kit(), uid=0, gid=0, mtime_ns=0)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO), pytest.raises(pyfuse3.FUSEError) as caught:
        await fs.lookup(pyfuse3.ROOT_INODE, b"x", None)
    assert caught.value.errno == expected
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    if isinstance(error, RuntimeError):  # unexpected: logged with its traceback
        assert any(r.exc_info for r in caplog.records)
    assert fs.counters.errors == 1


def test_mount_helper_is_installed_next_to_kitfs() -> None:
    assert shutil.which("mount.fuse.kitfs", path=str(Path(sys.executable).parent))
