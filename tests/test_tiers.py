"""The test tiers (README "Tests"): the fast tier, ``-m "not mount and not registry"``, selects
no test that uses FUSE or the registry, is collected on a machine without FUSE, and a test
outside both marks cannot start a registry or a mount; a run that selects mount tests still
fails at once without FUSE; the unit files load neither ``kitfs.demo`` nor oras.

Without FUSE is played by a PATH without ``fusermount3``: conftest wants both it and
``/dev/fuse``, and ``/dev/fuse`` cannot be taken from this root test process.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kitfs_cli import kitfs_argv

ROOT = Path(__file__).resolve().parent.parent
FAST_TIER = ["-m", "not mount and not registry"]
# the fixtures that put a test in a tier, and those built on them that the suite shares
SERVICE_FIXTURES = {"fuse", "docker_registry", "mounter", "registry", "pusher"}


def without_fuse() -> dict[str, str]:
    """This environment with no ``fusermount3`` on PATH."""
    fusermount = shutil.which("fusermount3")
    assert fusermount is not None  # this machine has FUSE: the test takes it away
    path = [d for d in os.environ["PATH"].split(os.pathsep)
            if d and not (Path(d) / "fusermount3").exists()]
    return {**os.environ, "PATH": os.pathsep.join(path)}


def pytest_run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_the_fast_tier_is_collected_without_fuse_and_uses_no_service_fixture() -> None:
    done = pytest_run("--fixtures-per-test", "-q", *FAST_TIER, env=without_fuse())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    sections = re.split(r"^-+ fixtures used by ", done.stdout, flags=re.M)[1:]
    used = {section.split(" ", 1)[0]: set(re.findall(r"^(\w+) -- ", section, flags=re.M))
            for section in sections}
    assert len(used) > 300, len(used)  # the unit files, property tests and fakes are all here
    assert {"test_scanner_accepts_partial_feeds",
            "test_mutated_archives_scan_or_raise_format_error"} <= set(used)
    offenders = {test: fixtures & SERVICE_FIXTURES for test, fixtures in used.items()
                 if fixtures & SERVICE_FIXTURES}
    assert offenders == {}


def test_without_fuse_a_run_selecting_mount_tests_fails_before_any_test() -> None:
    done = pytest_run("-q", "tests/test_demo.py", env=without_fuse())
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert "the mount tests need fusermount3 (apt install fuse3)" in done.stderr
    assert "passed" not in done.stdout and "failed" not in done.stdout


def test_unit_files_load_neither_the_demo_nor_oras() -> None:
    script = ("import sys, pytest\n"
              "code = pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_unit_filter.py', "
              "'tests/test_hosts_toml.py'])\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] == 'oras' "
              "or m.startswith('kitfs.demo')))\n"
              "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=without_fuse(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize(("command", "needs"), [
    (["/usr/bin/docker-registry", "serve", "config.yml"], "registry"),
    (["fusermount3", "-u", "/mnt"], "mount"),
    (["mount", "-t", "fuse.kitfs", "r.io/a:b", "/mnt"], "mount"),
    (kitfs_argv("mount", "r.io/a:b", "/mnt"), "mount"),
    (kitfs_argv("demo"), "mount and registry"),
])
def test_a_fast_tier_test_cannot_start_a_registry_or_a_mount(command: list[str], needs: str) -> None:
    with pytest.raises(AssertionError, match=f"which needs {needs}: request"):
        subprocess.run(command, check=False)


def test_a_fast_tier_test_may_ask_any_command_for_its_help() -> None:
    """``kitfs mount --help`` prints and exits: it needs no FUSE, so the guard lets it run."""
    done = subprocess.run(kitfs_argv("mount", "--help"), capture_output=True, text=True,
                          check=False, cwd=ROOT)
    assert done.returncode == 0 and "mountpoint" in done.stdout
