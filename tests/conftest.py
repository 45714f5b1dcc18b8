"""Shared fixtures (the real registry on loopback, kits pushed to it, a fresh cache per test,
real mounts) and the test tiers.

Tiers come from fixtures, never from hand-written marks: a test whose fixtures include
``fuse`` (``mounter`` does) is marked ``mount``, one whose fixtures include ``docker_registry``
(``registry`` and ``pusher`` do) is marked ``registry``. The fast tier,
``pytest -m "not mount and not registry"``, is every other test: no FUSE, no registry. A test
outside both marks that starts ``docker-registry``, ``fusermount3``, a FUSE mount(8) or
``kitfs mount``/``kitfs demo`` fails at once (the tier guard), so no test lands in the fast tier
by mistake. When the selected tests include mount tests, a missing ``/dev/fuse`` or
``fusermount3`` fails the run before any test runs; a missing ``docker-registry`` fails the
first registry test loudly. Nothing is skipped for lack of them.

``kitfs.demo`` (the registry launcher and the pusher, and oras with them) is imported only by the
fixtures that need it, so a fast-tier run of the unit files never loads it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.kitfs_cli import Kitfs, kitfs_runner
from tests.mounts import Mounter

if TYPE_CHECKING:
    from kitfs.demo import Pusher, Registry

# fixture -> the mark every test using it (directly or through other fixtures) gets
TIER_FIXTURES = {"fuse": "mount", "docker_registry": "registry"}
TIER_MARKS = frozenset(TIER_FIXTURES.values())


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by mark
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, mark in TIER_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(mark)


def pytest_collection_finish(session: pytest.Session) -> None:
    """FUSE tests never skip: when any selected test mounts, a missing /dev/fuse or fusermount3
    fails the whole run here, loudly, before any test runs."""
    if not any(item.get_closest_marker("mount") for item in session.items):
        return
    missing = [what for what, ok in (("/dev/fuse", os.path.exists("/dev/fuse")),
                                      ("fusermount3", shutil.which("fusermount3") is not None))
               if not ok]
    if missing:
        raise pytest.UsageError(
            f"the mount tests need {' and '.join(missing)} (apt install fuse3); "
            'run the fast tier with -m "not mount and not registry"')


def _needs(argv: Any) -> set[str]:
    """The tier marks a command needs: ``registry`` for docker-registry, ``mount`` for FUSE."""
    args = [os.fsdecode(a) for a in ([argv] if isinstance(argv, str | bytes | os.PathLike)
                                     else argv)]
    program = os.path.basename(args[0]) if args else ""
    if program == "docker-registry":
        return {"registry"}
    if program in ("fusermount3", "mount.fuse.kitfs") or (
            program == "mount" and any("fuse" in arg for arg in args)):
        return {"mount"}
    as_module = args[1:3] == ["-m", "kitfs"]
    with_prelude = args[1:2] == ["-c"] and "kitfs.cli" in "".join(args[2:3])  # kitfs_argv's
    kitfs_at = 3 if as_module or with_prelude else 1 if program == "kitfs" else None
    rest = args[kitfs_at:] if kitfs_at else []
    if "--help" in rest or "-h" in rest:  # argparse prints and exits: nothing is started
        return set()
    command = [a for a in rest if not a.startswith("-")][:1]
    return {"mount"} if command == ["mount"] else {"mount", "registry"} if command == ["demo"] else set()


@pytest.fixture(autouse=True)
def tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test marked neither ``mount`` nor ``registry`` may not start what those marks stand for."""
    if any(request.node.get_closest_marker(mark) for mark in TIER_MARKS):
        return
    import subprocess

    class Guarded(subprocess.Popen):  # type: ignore[type-arg]
        def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
            needs = _needs(args)
            if needs:
                fixtures = " and ".join(f"`{f}`" for f, m in TIER_FIXTURES.items() if m in needs)
                raise AssertionError(
                    f"{request.node.nodeid} runs {args!r}, which needs {' and '.join(sorted(needs))}: "
                    f"request {fixtures} (or a fixture built on it) so the test is marked so")
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", Guarded)


@pytest.fixture(scope="session")
def fuse() -> None:
    """Marks its users ``mount`` (FUSE itself is checked once, before the first test)."""


@pytest.fixture(scope="session")
def docker_registry() -> str:
    """The CNCF distribution registry's binary; its users are marked ``registry``."""
    from kitfs.demo.registry import REGISTRY_BINARY

    if not os.path.exists(REGISTRY_BINARY):
        pytest.fail("the registry tests need docker-registry (apt install docker-registry)",
                    pytrace=False)
    return REGISTRY_BINARY


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
def registry(tmp_path_factory: pytest.TempPathFactory, docker_registry: str) -> Iterator[Registry]:
    from kitfs.demo import Registry

    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def pusher(registry: Registry) -> Pusher:
    from kitfs.demo import Pusher

    return Pusher(registry.host)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def kitfs(cache_dir: Path) -> Kitfs:
    """Run the real ``kitfs`` command line in a subprocess, with this test's cache."""
    return kitfs_runner(KITFS_CACHE_DIR=str(cache_dir))


@pytest.fixture
def mounter(tmp_path: Path, cache_dir: Path, fuse: None) -> Iterator[Mounter]:
    """Real mounts through the CLI; unmounted, daemons reaped and logs checked at the end."""
    mounts = Mounter(tmp_path / "mounts", cache_dir)
    try:
        yield mounts
    finally:
        mounts.close()
