"""Security properties a user can check: a private cache, and nothing from a kit that becomes a
device, a FIFO, a link or a setuid file on the mount.

The cache holds what the user's credentials fetched, so it is created 0700 and every file in
it 0600 (chunks, the database and its -wal and -shm, the lock, temporary files), wherever it
is: ``$KITFS_CACHE_DIR``, or the default, ``/var/cache/kitfs`` for root (checked in a private
mount namespace with a tmpfs on /var/cache, so the machine's own is not touched).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from kitfs.demo import Layer, Pusher, Registry, kit_tar, tar_layer, with_layer_info
from kitfs.environment import default_cache_dir
from kitfs.format.mediatypes import KIT
from tests.mounts import Mounter


def modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and of everything under it."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_private(root: Path, database_open: bool = True) -> None:
    """Directories 0700, files 0600; with the database open, its -wal and -shm exist too
    (SQLite removes them when the last connection closes)."""
    found = modes(root)
    wrong = {name: f"{mode:04o}" for name, mode in found.items()
             if mode != (0o700 if (root / name).is_dir() else 0o600)}
    assert not wrong, wrong
    expected = {"kitfs.db", "lock", "tmp", "chunks"}
    assert expected | ({"kitfs.db-wal", "kitfs.db-shm"} if database_open else set()) <= set(found)
    assert any(name.startswith("chunks/") and not (root / name).is_dir() for name in found)


@pytest.fixture(scope="module")
def kit(registry: Registry, pusher: Pusher) -> str:
    """A plain and a gzip layer: chunks of a blob and of a decompressed stream."""
    reference = f"{registry.host}/security/kit:v1"
    model = tar_layer("model", {"models/w.bin": os.urandom(5 << 20)}, "models/w.bin")
    docs = tar_layer("docs", {"README.md": b"# private\n"}, "README.md", compression="gzip")
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0", "model": {"path": "models/w.bin"},
                               "docs": [{"path": "README.md"}]}
    with_layer_info(kitfile, [(kitfile["model"], model), (kitfile["docs"][0], docs)])
    pusher.push_kit(reference, kitfile, [model, docs])
    return reference


def test_the_cache_is_0700_and_its_files_0600_after_real_reads(
        kitfs: Any, kit: str, cache_dir: Path, mounter: Mounter) -> None:
    kitfs("cat", kit, "models/w.bin")
    assert kitfs("cat", kit, "README.md").stdout == b"# private\n"
    mount = mounter.mount(kit)  # a daemon with the database open: -wal and -shm exist
    assert (mount.path / "README.md").read_bytes() == b"# private\n"
    assert_private(cache_dir)


def test_the_default_cache_of_root_is_var_cache_kitfs_and_private(kit: str) -> None:
    """As root, without KITFS_CACHE_DIR, on a fresh /var/cache (a tmpfs in a private mount
    namespace: the machine's /var/cache is not touched)."""
    assert os.geteuid() == 0
    env = {k: v for k, v in os.environ.items() if k != "KITFS_CACHE_DIR"}
    script = (f"mount -t tmpfs tmpfs /var/cache && {sys.executable} -m kitfs cat {kit} README.md"
              " && find /var/cache -printf '%m %y %P\\n'")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert lines[0] == "# private"
    found = {line.split(" ", 2)[2]: (line.split()[0], line.split()[1]) for line in lines[1:]}
    assert found["kitfs"] == ("700", "d")
    cache = {name: value for name, value in found.items() if name.startswith("kitfs/")}
    assert cache and all(value == (("700", "d") if value[1] == "d" else ("600", "f"))
                         for value in cache.values()), cache
    assert {"kitfs/kitfs.db", "kitfs/lock", "kitfs/chunks"} <= set(cache)


def test_the_default_cache_of_another_user_is_under_their_home(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Not run as another user: the interpreter lives under /root (0700) on this machine."""
    monkeypatch.delenv("KITFS_CACHE_DIR", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == tmp_path / ".cache/kitfs"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg/kitfs"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_cache_dir() == Path("/var/cache/kitfs")


def test_a_looser_cache_directory_is_made_0700_with_a_warning(
        kitfs: Any, kit: str, cache_dir: Path) -> None:
    cache_dir.mkdir(mode=0o755)
    cache_dir.chmod(0o755)
    result = kitfs("cat", kit, "README.md")
    assert f"cache directory {cache_dir} was 0755, now 0700" in result.stderr
    assert_private(cache_dir, database_open=False)


# --- nothing from a kit becomes a device, a FIFO, a link or a setuid file ------------------------


def _entry(name: str, kind: bytes, mode: int = 0o644, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
    return info


HOSTILE = {
    "chr": (_entry("chr/null", tarfile.CHRTYPE), "character device"),
    "blk": (_entry("blk/disk", tarfile.BLKTYPE), "block device"),
    "fifo": (_entry("fifo/pipe", tarfile.FIFOTYPE), "FIFO"),
    "hard": (_entry("hard/passwd", tarfile.LNKTYPE, linkname="/etc/passwd"), "hard link"),
    "sym": (_entry("sym/shadow", tarfile.SYMTYPE, linkname="/etc/shadow"), "symbolic link"),
}


def test_no_device_fifo_link_or_setuid_file_appears_on_a_mount(
        mounter: Mounter, registry: Registry, pusher: Pusher) -> None:
    """One layer per kind of entry kit refuses, and a file packed setuid, setgid and sticky:
    the mount shows only directories and read-only regular files without those bits; each
    hostile layer's directory answers EIO and the log names the layer and the entry."""
    layers = {name: Layer(f"{KIT}.code.v1.tar", kit_tar({f"{name}/ok.txt": b"ok"}, name,
                                                        extra=[info]))
              for name, (info, _) in HOSTILE.items()}
    layers["suid"] = tar_layer("code", {"suid/run.sh": b"#!/bin/sh\n"}, "suid",
                               modes={"suid/run.sh": 0o7777})
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0",
                               "code": [{"path": name} for name in layers]}
    with_layer_info(kitfile, list(zip(kitfile["code"], layers.values(), strict=True)))
    reference = f"{registry.host}/security/hostile:v1"
    pusher.push_kit(reference, kitfile, list(layers.values()))
    mount = mounter.mount(reference)
    mount.expect_error("entries are not allowed in a ModelKit")
    assert sorted(os.listdir(mount.path)) == ["Kitfile", "suid"]
    for name in HOSTILE:
        with pytest.raises(OSError, match="Input/output error"):
            os.listdir(mount.path / name)
    for path in [mount.path, *mount.path.rglob("*")]:
        mode = path.lstat().st_mode
        assert stat.S_ISDIR(mode) or stat.S_ISREG(mode), path
        assert stat.S_IMODE(mode) & 0o7222 == 0, (path, oct(mode))
    assert stat.S_IMODE((mount.path / "suid/run.sh").stat().st_mode) == 0o555
    log = mount.log()
    for name, (info, kind) in HOSTILE.items():
        assert any(layers[name].digest in line and info.name in line and kind in line
                   for line in log.splitlines()), (name, log)
