"""Shared fixtures: the real registry on loopback, kits pushed to it, a fresh cache per test.

A missing ``docker-registry`` fails the run loudly; nothing is skipped for lack of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kitfs.demo import Pusher, Registry
from tests.mounts import Mounter


def pytest_sessionstart(session: pytest.Session) -> None:
    """FUSE tests never skip: without /dev/fuse or fusermount3 the run fails here, loudly."""
    missing = [what for what, ok in (("/dev/fuse", os.path.exists("/dev/fuse")),
                                      ("fusermount3", shutil.which("fusermount3") is not None))
               if not ok]
    if missing:
        raise pytest.UsageError(f"the mount tests need {' and '.join(missing)} (apt install fuse3)")


@pytest.fixture(scope="session", autouse=True)
def audit_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every kitfs the tests start appends its audit events here (``$KITFS_AUDIT_LOG``), not
    to root's ``/var/log/kitfs/audit.jsonl`` on this machine; tests that check the audit log
    give their own ``--audit-log`` (or, for the default, a private mount namespace)."""
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KITFS_AUDIT_LOG", str(path))
        yield path


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def pusher(registry: Registry) -> Pusher:
    return Pusher(registry.host)


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout.decode()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def kitfs(cache_dir: Path):  # type: ignore[no-untyped-def]
    """Run the real ``kitfs`` command line in a subprocess, with this test's cache."""

    def run(*args: str, check: bool = True, timeout: float = 120,
            env: dict[str, str] | None = None) -> Result:
        """``env``: extra environment variables for this run."""
        environ = {**os.environ, "KITFS_CACHE_DIR": str(cache_dir), **(env or {})}
        proc = subprocess.run([sys.executable, "-m", "kitfs", *args], capture_output=True,
                              env=environ, timeout=timeout)
        result = Result(proc.returncode, proc.stdout, proc.stderr.decode())
        if check and proc.returncode != 0:
            raise AssertionError(f"kitfs {' '.join(args)} exited {proc.returncode}: {result.stderr}")
        if check:
            assert "Traceback" not in result.stderr, result.stderr
        return result

    return run


@pytest.fixture
def mounter(tmp_path: Path, cache_dir: Path) -> Iterator[Mounter]:
    """Real mounts through the CLI; unmounted, daemons reaped and logs checked at the end."""
    mounts = Mounter(tmp_path / "mounts", cache_dir)
    try:
        yield mounts
    finally:
        mounts.close()
