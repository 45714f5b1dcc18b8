"""kitfs installed without extras in a fresh venv built from this tree: no pyfuse3 there, and
``kitfs://`` reads still work (fsspec finds kitfs through the entry point, without an import of
kitfs), ``kitfs ls`` and ``kitfs umount`` too, and ``kitfs mount`` says which package to install.

Offline and quick: the wheel is built from a copy of this tree with the test venv's setuptools
and wheel (``pip wheel --no-deps --no-build-isolation --no-index``) and installed with
``--no-deps --no-index``. Its dependencies are the test venv's installed distributions that the
wheel's ``Requires-Dist`` lines without extras name, followed transitively, linked into one
directory that the fresh venv reads through a ``.pth`` file; nothing else of the test venv is
visible there. So pyfuse3 is absent unless a dependency of kitfs requires it, and then these
tests fail.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kitfs.cli import PYFUSE3_MISSING
from kitfs.demo import Pusher, Registry, sample_kit
from tests.mounts import Mounter, wait_gone

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = os.urandom(3 * 1024 * 1024 + 5)


@dataclass
class Bare:
    venv: Path
    dependencies: list[str]

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def env(self, cache_dir: Path) -> dict[str, str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        return {**environ, "PYTHONNOUSERSITE": "1", "KITFS_CACHE_DIR": str(cache_dir)}


def _run(command: list[str], env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False,
                          env=env, cwd=cwd)


def _closure(requirements: list[Requirement]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions these requirements need, transitively (no extras)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found[name] = importlib.metadata.distribution(requirement.name)
        for text in found[name].requires or []:
            nested = Requirement(text)
            if nested.marker is None or nested.marker.evaluate({"extra": ""}):
                todo.append(nested)
    return found


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Bare:
    work = tmp_path_factory.mktemp("bare")
    source = work / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    shutil.copytree(ROOT / "kitfs", source / "kitfs", ignore=shutil.ignore_patterns("__pycache__"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--no-index", "-q", "-w", str(work / "wheels"), str(source)])
    assert built.returncode == 0, built.stderr
    wheel = next((work / "wheels").glob("kitfs-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    requirements = [Requirement(line.split(":", 1)[1]) for line in lines
                    if line.startswith("Requires-Dist:")]
    venv = work / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert made.returncode == 0, made.stderr
    dependencies = work / "dependencies"
    dependencies.mkdir()
    closure = _closure(requirements)
    for distribution in closure.values():
        base = Path(str(distribution.locate_file("")))
        for top in {Path(f).parts[0] for f in distribution.files or []}:
            if top not in ("..", "__pycache__") and not (dependencies / top).exists():
                (dependencies / top).symlink_to(base / top)
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "kitfs-test-dependencies.pth").write_text(f"{dependencies}\n")
    # pip looks at what the fresh venv's python sees: not this tree (no PYTHONPATH), which
    # may hold a kitfs.egg-info that pip would take for kitfs installed already
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    installed = _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                      "install", "--no-deps", "--no-index", "-q", str(wheel)], env=clean_env,
                     cwd=work)
    assert installed.returncode == 0, installed.stderr
    assert next(site.glob("kitfs-*.dist-info/entry_points.txt")).exists()
    return Bare(venv, sorted(closure))


@pytest.fixture(scope="module")
def sample(registry: Registry, pusher: Pusher) -> str:
    reference = f"{registry.host}/team/bare:v1"
    sample_kit(pusher, reference, WEIGHTS)
    return reference


READ_SCRIPT = """
import hashlib, importlib.util, json, sys
import fsspec
registered = "kitfs" in fsspec.available_protocols()  # before anything imported kitfs
url = "kitfs://" + sys.argv[1]
with fsspec.open(url + "/models/weights.safetensors", "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
listing = fsspec.filesystem("kitfs").ls(url + "/src", detail=False)
import kitfs
print(json.dumps({"registered": registered, "digest": digest, "listing": listing,
                  "kitfs": kitfs.__file__, "pyfuse3": importlib.util.find_spec("pyfuse3") is not None,
                  "pyfuse3_loaded": "pyfuse3" in sys.modules}))
"""


def test_a_bare_install_has_no_pyfuse3_and_serves_kitfs_urls(
        bare: Bare, sample: str, cache_dir: Path) -> None:
    assert "pyfuse3" not in bare.dependencies and "fsspec" in bare.dependencies
    done = _run([str(bare.python), "-I", "-c", READ_SCRIPT, sample], env=bare.env(cache_dir),
                cwd=cache_dir.parent)  # -I: not this tree from the working directory either
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["registered"] is True  # the fsspec.specs entry point
    assert result["pyfuse3"] is False and result["pyfuse3_loaded"] is False
    assert result["digest"] == hashlib.sha256(WEIGHTS).hexdigest()
    assert result["listing"] == [f"{sample}/src/train.py", f"{sample}/src/util"]
    assert Path(result["kitfs"]).is_relative_to(bare.venv)  # the installed wheel, not this tree


def test_kitfs_mount_without_pyfuse3_says_which_package_to_install(
        bare: Bare, sample: str, cache_dir: Path, tmp_path: Path) -> None:
    env = bare.env(cache_dir)
    listed = _run([str(bare.venv / "bin" / "kitfs"), "ls", sample, "src"], env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split()[-1] == "src/util/io.py"
    for command in (["kitfs", "mount", sample, str(tmp_path)],
                    ["mount.fuse.kitfs", sample, str(tmp_path), "-o", "allow_other"],
                    ["kitfs", "demo", "--mountpoint", str(tmp_path)]):
        refused = _run([str(bare.venv / "bin" / command[0]), *command[1:]], env=env, cwd=tmp_path)
        assert (refused.returncode, refused.stderr) == (69, f"kitfs: {PYFUSE3_MISSING}\n"), command
        assert "pip install 'kitfs[mount]'" in refused.stderr
        assert not os.path.ismount(tmp_path)


def test_kitfs_umount_without_pyfuse3_unmounts_and_waits_for_the_daemon(
        bare: Bare, sample: str, cache_dir: Path, mounter: Mounter) -> None:
    """A mount made where the mount extra is installed is unmounted by ``kitfs umount`` of an
    install without it (a node's tooling, say): umount needs no FUSE library."""
    mount = mounter.mount(sample)
    env = {**bare.env(cache_dir), "KITFS_RUNTIME_DIR": str(mounter.runtime_dir)}
    done = _run([str(bare.venv / "bin" / "kitfs"), "umount", str(mount.path)], env=env,
                cwd=mounter.workdir)
    assert (done.returncode, done.stderr) == (0, "")
    assert not mount.mounted
    assert wait_gone(mount.pid, 0)  # kitfs umount returned after the daemon exited
