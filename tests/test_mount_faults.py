"""A registry that lies or dies and a cache under stress, seen through real mounts.

Each test mounts a kit with the real ``kitfs mount`` (through ``tests/faultproxy.py`` where
a fault is injected on the wire, straight from the real registry otherwise), breaks one thing,
and checks what a program on the mount sees: the right bytes through transient faults; EIO
within ``--timeout`` (and a log line saying why) when the fault lasts, then the same open file
reading right once the fault is gone, without remounting; never wrong bytes from a full read;
and a cache that ``kitfs cache verify`` finds clean afterwards.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from kitfs.cache.store import BUSY_BACKOFF_S
from kitfs.sample import Pusher, Registry, tar_layer, with_layer_info
from tests.faultproxy import FaultProxy, running
from tests.mounts import Mount, Mounter

MiB = 1 << 20
CHUNK = 4 * MiB
WEIGHTS = os.urandom(12 * MiB + 777)  # the model layer: four chunks
SHARDS = {f"data/shard-{i}.bin": os.urandom(3 * MiB + 1000 * i) for i in range(8)}  # ~24 MiB
CODE = {"src/train.py": b"print('train')\n", "src/util/io.py": b"def load():\n    pass\n"}
README = b"# Fault kit\n"
FILES = {"models/weights.bin": WEIGHTS, **SHARDS, **CODE, "README.md": README}


@dataclass(frozen=True)
class Kit:
    reference: str
    digests: dict[str, str]  # Kitfile path of each layer -> its digest


def push_fault_kit(pusher: Pusher, reference: str) -> Kit:
    model = tar_layer("model", {"models/weights.bin": WEIGHTS}, "models/weights.bin")
    dataset = tar_layer("dataset", SHARDS, "data")
    code = tar_layer("code", CODE, "src")
    docs = tar_layer("docs", {"README.md": README}, "README.md")
    kitfile: dict[str, Any] = {
        "manifestVersion": "1.0.0",
        "package": {"name": "fault-kit", "version": "1.0.0"},
        "model": {"name": "m", "path": "models/weights.bin"},
        "datasets": [{"name": "shards", "path": "data"}],
        "code": [{"path": "src"}],
        "docs": [{"path": "README.md"}],
    }
    with_layer_info(kitfile, [(kitfile["model"], model), (kitfile["datasets"][0], dataset),
                              (kitfile["code"][0], code), (kitfile["docs"][0], docs)])
    pusher.push_kit(reference, kitfile, [model, dataset, code, docs])
    return Kit(reference, {"models/weights.bin": model.digest, "data": dataset.digest,
                           "src": code.digest, "README.md": docs.digest})


@pytest.fixture(scope="module")
def kit(registry: Registry, pusher: Pusher) -> Kit:
    return push_fault_kit(pusher, f"{registry.host}/faults/mounted:v1")


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with running(FaultProxy(registry.host)) as started:
        yield started


def cache_verify(mounter: Mounter) -> str:
    """``kitfs cache verify`` on the test's cache: must exit 0 with nothing dropped."""
    done = mounter.kitfs("cache", "verify", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith(", 0 dropped"), done.stdout
    assert "dropping chunk" not in done.stderr, done.stderr
    return done.stdout


def read_all(mount: Mount) -> None:
    for path, data in FILES.items():
        assert (mount.path / path).read_bytes() == data, path


# --- the cache database ---------------------------------------------------------------------


def layer_states(mounter: Mounter, reference: str) -> dict[str, str]:
    """``kitfs inspect --json``: each layer's verification state, by its Kitfile path."""
    layers = json.loads(mounter.kitfs("inspect", "--json", reference).stdout)["layers"]
    return {layer["path"]: layer["verification"] for layer in layers}


def test_reads_go_on_while_another_process_holds_the_database_locked(
        mounter: Mounter, kit: Kit) -> None:
    """Another program holds a write transaction on kitfs.db: every read through the mount
    still answers right (and before the lock is released), uncached; once the lock is gone
    and the back-off is over, the cache records again, and it verifies clean."""
    mount = mounter.mount(kit.reference)
    assert (mount.path / "README.md").read_bytes() == README
    holder = sqlite3.connect(mounter.cache_dir / "kitfs.db", isolation_level=None, timeout=30)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        for path in ("models/weights.bin", *CODE):
            assert (mount.path / path).read_bytes() == FILES[path], path
        assert holder.in_transaction  # all of it answered while the lock was held
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    locked = [line for line in mount.log().splitlines() if "not recorded" in line]
    assert locked and all("locked by another process" in line for line in locked), mount.log()
    time.sleep(BUSY_BACKOFF_S)
    for path in SHARDS:
        assert (mount.path / path).read_bytes() == SHARDS[path], path
    assert layer_states(mounter, kit.reference)["data"] == "verified"  # recorded again
    cache_verify(mounter)


def wait_for_line(mount: Mount, text: str, timeout_s: float = 15) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [line for line in mount.log().splitlines() if text in line]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no log line with {text!r} in {mount.log_file}:\n{mount.log()}")


def test_the_database_deleted_under_running_mounts(mounter: Mounter, kit: Kit) -> None:
    """``rm kitfs.db`` under two running mounts: reads go on right; both daemons move to a
    new database (the first to notice may have to wait for the other to let go of the deleted
    one), so other processes can use the cache again; a new mount works; gc and verify."""
    one = mounter.mount(kit.reference, name="one")
    two = mounter.mount(kit.reference, name="two")
    assert (one.path / "data/shard-0.bin").read_bytes() == SHARDS["data/shard-0.bin"]
    assert (two.path / "models/weights.bin").read_bytes() == WEIGHTS
    (mounter.cache_dir / "kitfs.db").unlink()
    read_all(one)
    for mount in (one, two):
        wait_for_line(mount, "was deleted or replaced under this process")
        wait_for_line(mount, "now using the database")
    read_all(two)
    cache_verify(mounter)  # another process opens the cache again
    three = mounter.mount(kit.reference, name="three")
    read_all(three)
    mounter.kitfs("cache", "gc")
    cache_verify(mounter)
    read_all(one)
