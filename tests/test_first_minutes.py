"""What a new user meets in the first minutes, through the real ``kitfs`` command line (README
"Command line"): ``--help`` says what kitfs does and what each argument is; a reader that stops
early (``| head``) ends ``ls`` and ``cat`` quietly; a registry that refuses the connection is
reported on stderr while it is being retried, not only when kitfs gives up; ``kitfs mount`` by
a user who may not open ``/dev/fuse`` names the device and its permissions and exits 77.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kitfs as kitfs_package
from kitfs.demo import Pusher, Registry, free_port, sample_kit, tar_layer
from kitfs.errors import NotInstalledError
from kitfs.mount.device import FUSE_DEVICE, check_fuse_device
from tests.test_hostile import push_one_layer_kit

PIPE_BUFFER_BYTES = 64 * 1024  # Linux's default pipe capacity
MANY_FILES = 8000


@pytest.fixture(scope="module")
def many_files(registry: Registry, pusher: Pusher) -> str:
    """A kit whose listing is several pipe buffers long, so ``| head`` closes it mid-listing."""
    files = {f"data/shard-{i:05d}.txt": b"x\n" for i in range(MANY_FILES)}
    reference = f"{registry.host}/team/many-files:v1"
    push_one_layer_kit(pusher, reference, tar_layer("dataset", files, "data"),
                       section="datasets", path="data")
    return reference


@pytest.fixture(scope="module")
def sample(registry: Registry, pusher: Pusher) -> str:
    reference = f"{registry.host}/team/first-minutes:v1"
    sample_kit(pusher, reference, os.urandom(6 * 1024 * 1024))
    return reference


def kitfs_into_head(cache_dir: Path, args: str, head: str) -> subprocess.CompletedProcess[bytes]:
    """``kitfs ARGS | head HEAD`` in bash; the exit status is kitfs' own (PIPESTATUS[0])."""
    env = dict(os.environ, KITFS_CACHE_DIR=str(cache_dir))
    return subprocess.run(
        ["bash", "-c", f'"$0" -m kitfs {args} | head {head}; exit "${{PIPESTATUS[0]}}"',
         sys.executable], capture_output=True, env=env, timeout=120, check=False)


# --- | head ------------------------------------------------------------------------------------


def test_ls_into_head_stops_quietly(kitfs: Any, many_files: str, cache_dir: Path) -> None:
    whole = kitfs("ls", many_files).stdout
    assert len(whole) > 4 * PIPE_BUFFER_BYTES  # so head closes the pipe while kitfs still writes
    for args in (f"ls {many_files}", f"ls --json {many_files}"):
        done = kitfs_into_head(cache_dir, args, "-n 3")
        assert done.returncode == 0, done.stderr.decode()
        assert done.stderr == b""  # no BrokenPipeError, no traceback, no exception group
        assert len(done.stdout.splitlines()) == 3


def test_cat_into_head_stops_quietly_with_kitfs_exit_0(sample: str, cache_dir: Path) -> None:
    done = kitfs_into_head(cache_dir, f"cat {sample} models/weights.safetensors", "-c 8")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    assert len(done.stdout) == 8


# --- a registry that refuses the connection ------------------------------------------------------


def test_a_refused_connection_is_reported_while_it_is_retried(cache_dir: Path) -> None:
    port = free_port()  # nothing listens there: every connect is refused
    reference = f"127.0.0.1:{port}/team/nowhere:v1"
    env = dict(os.environ, KITFS_CACHE_DIR=str(cache_dir))
    with subprocess.Popen([sys.executable, "-m", "kitfs", "ls", reference, "--timeout", "10"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                          text=True) as proc:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        still_running = proc.poll() is None  # the word came before kitfs gave up
        rest = proc.stderr.read()
        returncode = proc.wait(timeout=60)
    assert first.rstrip("\n") == (
        f"kitfs: WARNING: 127.0.0.1:{port}: manifest team/nowhere:v1: cannot connect to "
        f"127.0.0.1:{port}: Connection refused; retrying, giving up 10 s after the first "
        "attempt (--timeout)")
    assert still_running
    assert returncode == 69
    assert rest.count("WARNING") == 0  # once per operation, not once per retry
    assert rest.strip() == (f"kitfs: 127.0.0.1:{port}: manifest team/nowhere:v1: no answer within "
                            f"10 s (last problem: cannot connect to 127.0.0.1:{port}: "
                            "Connection refused)")


# --- --help ---------------------------------------------------------------------------------------


def test_help_says_what_kitfs_does_with_examples(kitfs: Any) -> None:
    text = kitfs("--help").text
    description = text.split("\n\n")[1]
    assert description.startswith("kitfs reads KitOps ModelKits")
    assert "argv and environment" not in text  # not the module's docstring for developers
    assert "examples:\n  kitfs ls registry.example.com/team/llama:v3\n" in text
    assert "77 permission denied (credentials\nrefused, /dev/fuse not accessible)" in text


def positional_help(text: str) -> dict[str, str]:
    """``positional arguments:`` of an argparse help: name -> its help, lines joined."""
    section = text.split("positional arguments:\n", 1)[1].split("\n\n", 1)[0]
    helps: dict[str, str] = {}
    name = ""
    for line in section.splitlines():
        match = re.match(r"  (\S+)\s*(.*)", line)
        if match:
            name = match[1]
            helps[name] = match[2]
        else:
            helps[name] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in helps.items()}


@pytest.mark.parametrize(("command", "names"), [
    (["ls"], ["reference", "path"]), (["cat"], ["reference", "path"]),
    (["inspect"], ["reference"]), (["mount"], ["reference", "mountpoint"]),
    (["pull"], ["reference"]), (["diff"], ["A", "B"]), (["umount"], ["mountpoint"]),
    (["cache", "unpin"], ["reference"]),
])
def test_every_positional_argument_has_a_help_text(kitfs: Any, command: list[str],
                                                   names: list[str]) -> None:
    helps = positional_help(kitfs(*command, "--help").text)
    assert list(helps) == names
    assert all(helps.values()), helps
    for name in ("reference", "A"):
        if name in helps and command != ["cache", "unpin"]:  # (that one: the reference as pulled)
            assert ("registry/repo:tag, registry/repo@sha256:<digest> or "
                    "registry/repo:tag@sha256:<digest>") in helps[name]
    if command == ["mount"]:
        assert "/dev/fuse" in helps["mountpoint"]


# --- /dev/fuse ------------------------------------------------------------------------------------


def _others_may_open(path: str) -> bool:
    mode = os.stat(path).st_mode
    return bool(mode & stat.S_IROTH and mode & stat.S_IWOTH)


@contextlib.contextmanager
def _traversable_by_others(paths: list[Path]) -> Iterator[None]:
    """Let other users through the directories above ``paths`` (a clone made under a 0700
    ``mktemp -d`` is root's alone), for the duration; their modes are put back after."""
    changed: list[tuple[Path, int]] = []
    try:
        for path in paths:
            for directory in [path, *path.parents]:
                mode = directory.stat().st_mode
                if not mode & stat.S_IXOTH:
                    changed.append((directory, stat.S_IMODE(mode)))
                    directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
        yield
    finally:
        for directory, mode in reversed(changed):
            directory.chmod(mode)


@pytest.fixture
def nobody_home() -> Iterator[Path]:
    """A directory the user ``nobody`` owns (pytest's tmp_path is root's alone)."""
    home = Path(tempfile.mkdtemp(prefix="kitfs-nobody-"))
    home.chmod(0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    try:
        yield home
    finally:
        shutil.rmtree(home)


def test_mount_without_access_to_dev_fuse_names_it_and_exits_77(
        sample: str, nobody_home: Path) -> None:
    """As the real unprivileged user ``nobody`` (``setpriv``), with /dev/fuse root's alone (mode
    0600 here). The venv's interpreter lives under /root, which nobody may not enter, so this runs
    the system's Python 3.11 on the venv's packages and this tree's kitfs: the same code, another
    3.11 build."""
    # what this test needs, failed loudly rather than skipped (a FUSE test never skips)
    assert os.geteuid() == 0, "the mount tests run as root (this one switches to nobody)"
    assert not _others_may_open(FUSE_DEVICE), \
        f"{FUSE_DEVICE} is open to other users here: nothing to refuse them"
    python = shutil.which("python3.11", path="/usr/bin")
    assert python is not None, "no system python3.11 the user nobody may run (apt install python3)"
    mountpoint = nobody_home / "mnt"
    mountpoint.mkdir()
    os.chown(mountpoint, pwd.getpwnam("nobody").pw_uid, -1)
    tree = str(Path(kitfs_package.__file__).resolve().parents[1])
    env = {"PATH": "/usr/bin:/bin", "HOME": str(nobody_home),
           "XDG_RUNTIME_DIR": str(nobody_home), "KITFS_CACHE_DIR": str(nobody_home / "cache"),
           "PYTHONPATH": f"{tree}:{sysconfig.get_paths()['purelib']}"}
    with _traversable_by_others([Path(tree), Path(sysconfig.get_paths()["purelib"])]):
        done = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
             python, "-m", "kitfs", "mount", sample, str(mountpoint)],
            capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 77, done.stderr
    mode = stat.filemode(os.stat(FUSE_DEVICE).st_mode)
    assert done.stderr.startswith(f"kitfs: cannot open {FUSE_DEVICE}: Permission denied (mode "
                                  f"{mode} owner root:root; you are nobody); kitfs mount needs "
                                  "read and write access to it"), done.stderr
    assert "fuse_session_mount" not in done.stderr
    assert not os.path.ismount(mountpoint)


def test_a_missing_fuse_device_is_named(tmp_path: Path) -> None:
    """The same check on a device path that does not exist (a container without FUSE)."""
    missing = str(tmp_path / "fuse")
    with pytest.raises(NotInstalledError) as raised:
        check_fuse_device(missing)
    assert str(raised.value).startswith(f"{missing} does not exist: kitfs mount needs FUSE")
    assert raised.value.exit_code == 69
