"""A registry that lies or dies and a cache under stress, seen through real mounts.

Each test mounts a kit with the real ``kitfs mount`` (through ``tests/faultproxy.py`` where
a fault is injected on the wire, straight from the real registry otherwise), breaks one thing,
and checks what a program on the mount sees: the right bytes through transient faults; EIO
within ``--timeout`` (and a log line saying why) when the fault lasts, then the same open file
reading right once the fault is gone, without remounting; never wrong bytes from a full read;
and a cache that ``kitfs cache verify`` finds clean afterwards.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kitfs.cache.database import BUSY_BACKOFF_S
from kitfs.demo import Entry, Pusher, Registry, push_entries, tar_layer, with_layer_info
from tests.faultproxy import FaultProxy, Rule, running
from tests.mounts import Mount, Mounter, wait_gone

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
    push_entries(pusher, reference, [
        Entry("model", {"name": "m", "path": "models/weights.bin"}, model),
        Entry("datasets", {"name": "shards", "path": "data"}, dataset),
        Entry("code", {"path": "src"}, code), Entry("docs", {"path": "README.md"}, docs),
    ], package={"name": "fault-kit", "version": "1.0.0"})
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
    assert done.returncode == 0, done.text + done.stderr
    assert done.text.strip().endswith(", 0 dropped"), done.text
    assert "dropping chunk" not in done.stderr, done.stderr
    return done.text


def drop_page_cache(mount: Mount) -> None:
    """Have the kernel forget the pages of every file of the mount, so reads reach kitfs."""
    for path in FILES:
        fd = os.open(mount.path / path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(mount: Mount) -> None:
    for path, data in FILES.items():
        assert (mount.path / path).read_bytes() == data, path


def wait_for_line(mount: Mount, *texts: str, timeout_s: float = 15) -> str:
    """The first line of the daemon's log holding every one of ``texts``, once there is one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [line for line in mount.log().splitlines() if all(t in line for t in texts)]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no log line with {texts!r} in {mount.log_file}:\n{mount.log()}")


# --- the registry dies, stalls or lies -------------------------------------------------------


def pread(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def kill_9(registry: Registry) -> None:
    assert registry.process is not None
    os.kill(registry.process.pid, signal.SIGKILL)
    registry.process.wait()
    registry.stop()


def push_model_kit(pusher: Pusher, reference: str, weights: bytes) -> str:
    """A kit of one model file (one layer)."""
    model = tar_layer("model", {"models/weights.bin": weights}, "models/weights.bin")
    push_entries(pusher, reference, [Entry("model", {"path": "models/weights.bin"}, model)])
    return reference


def test_registry_killed_mid_read_and_restarted(mounter: Mounter, tmp_path: Path) -> None:
    """kill -9 of the registry while a file is being read. Back within --timeout: the read
    waits and gets the right bytes. Gone for longer: EIO within the bound, a log line naming
    the registry, and once it is back the same open file reads right, without remounting.
    (Reads far apart in a 40 MiB file: no read-ahead has fetched them before the kill.)"""
    weights = os.urandom(40 * MiB)
    own = Registry(tmp_path / "registry").start()
    try:
        reference = push_model_kit(Pusher(own.host), f"{own.host}/faults/killed:v1", weights)
        mount = mounter.mount(reference, "--timeout", "4")
        mount.expect_error(rf"{own.host}: blob .*no answer within 4 s")
        fd = os.open(mount.path / "models/weights.bin", os.O_RDONLY)
        try:
            assert os.pread(fd, MiB, 10 * MiB) == weights[10 * MiB : 11 * MiB]
            kill_9(own)
            results: dict[str, bytes] = {}
            reader = threading.Thread(target=lambda: results.update(
                rest=os.pread(fd, 2 * MiB, 20 * MiB)))
            reader.start()
            time.sleep(1)
            assert reader.is_alive()  # waiting for the registry
            own = Registry(tmp_path / "registry", port=own.port).start()
            reader.join(30)
            assert results["rest"] == weights[20 * MiB : 22 * MiB]  # waited, then right
            kill_9(own)
            started = time.monotonic()
            with pytest.raises(OSError, match="Input/output error") as caught:
                os.pread(fd, MiB, 30 * MiB)
            assert caught.value.errno == errno.EIO
            elapsed_s = time.monotonic() - started
            print(f"\nregistry killed, --timeout 4: EIO after {elapsed_s:.1f} s")
            assert elapsed_s < 4 + 10
            assert f"{own.host}: blob" in wait_for_line(mount, "no answer within 4 s")
            own = Registry(tmp_path / "registry", port=own.port).start()
            assert os.pread(fd, MiB, 30 * MiB) == weights[30 * MiB : 31 * MiB]
        finally:
            os.close(fd)
        assert (mount.path / "models/weights.bin").read_bytes() == weights
    finally:
        mounter.close()
        own.stop()


# Each fault lasts until the test takes it away: the proxy's rule, what the log line says.
LASTING_FAULTS: dict[str, tuple[dict[str, Any], str]] = {
    "503": ({"action": "status", "status": 503}, "HTTP 503"),
    "reset": ({"action": "reset"}, "Connection reset by peer"),
    "truncate": ({"action": "truncate"}, "closed by the server in the middle of a body"),
    "wrong Content-Range": ({"action": "wrong_range"}, "Content-Range"),
    "stall": ({"action": "stall", "delay_s": 60}, "no answer within 2 s"),
    "1 byte/s": ({"action": "trickle", "bytes_per_s": 1},
                 "answered HTTP 206, but the answer was still arriving after 2 s"),
}


@pytest.mark.parametrize("fault", list(LASTING_FAULTS))
def test_a_lasting_fault_gives_eio_in_time_and_the_same_file_reads_right_after(
        mounter: Mounter, kit: Kit, proxy: FaultProxy, registry: Registry, fault: str) -> None:
    spec, reason = LASTING_FAULTS[fault]
    mount = mounter.mount(kit.reference.replace(registry.host, proxy.host), "--timeout", "2")
    digest = kit.digests["models/weights.bin"]
    mount.expect_error(rf"read: .*{digest}")
    fd = os.open(mount.path / "models/weights.bin", os.O_RDONLY)  # indexed: chunks 0 and 3
    try:
        rule = proxy.add(Rule(path=digest, times=None, **spec))
        started = time.monotonic()
        with pytest.raises(OSError, match="Input/output error") as caught:
            os.pread(fd, MiB, 5 * MiB)
        assert caught.value.errno == errno.EIO
        elapsed_s = time.monotonic() - started
        print(f"\n{fault}, --timeout 2: EIO after {elapsed_s:.1f} s, {rule.hits} requests")
        assert elapsed_s < 2 + 10
        assert rule.hits >= 1
        line = wait_for_line(mount, f"blob {digest}", " ERROR ")  # (after a retry WARNING)
        assert reason in line and proxy.host in line, line
        proxy.rules.clear()
        assert os.pread(fd, MiB, 5 * MiB) == WEIGHTS[5 * MiB : 6 * MiB]
    finally:
        os.close(fd)
    assert (mount.path / "models/weights.bin").read_bytes() == WEIGHTS


def test_transient_faults_on_every_fetch_still_give_the_right_bytes(
        mounter: Mounter, kit: Kit, proxy: FaultProxy, registry: Registry) -> None:
    """The blob requests, in turn, meet one fault each: 500, 502, 503, 429 with Retry-After,
    a reset, a truncated body, a 200 with the whole blob, a redirect to another host (the
    first ones all on the same request, retried through them); reading the whole kit
    through the mount gives the right bytes, no error."""
    def faults() -> list[Rule]:
        return [Rule("status", status=500), Rule("status", status=502),
                Rule("status", status=503), Rule("status", status=429, retry_after="1"),
                Rule("reset"), Rule("truncate"), Rule("ignore_range"), Rule("redirect")]

    rules = faults()
    for rule in rules:
        proxy.add(rule)
    mount = mounter.mount(kit.reference.replace(registry.host, proxy.host))
    read_all(mount)
    assert all(rule.hits == 1 for rule in rules), [(r.action, r.status, r.hits) for r in rules]
    assert proxy.storage_seen  # the redirect was followed


def test_bearer_tokens_expiring_mid_read(
        mounter: Mounter, kit: Kit, proxy: FaultProxy, registry: Registry, tmp_path: Path) -> None:
    """Every token expires half a second after it is issued, and one is revoked in the middle
    of a file: reading the whole kit through the mount (index windows and read-ahead fetch
    in parallel, so several requests meet each expiry at once) gives the right bytes."""
    proxy.require_bearer("bob", "hunter2", lifetime_s=0.5)
    docker_config = tmp_path / "docker"
    docker_config.mkdir()
    auth = base64.b64encode(b"bob:hunter2").decode()
    (docker_config / "config.json").write_text(json.dumps({"auths": {proxy.host: {"auth": auth}}}))
    mounter.extra_env = {"DOCKER_CONFIG": str(docker_config)}
    mount = mounter.mount(kit.reference.replace(registry.host, proxy.host))
    with open(mount.path / "models/weights.bin", "rb") as f:
        assert f.read(MiB) == WEIGHTS[:MiB]
        proxy.revoke_tokens()  # gone in the middle of this file
        assert f.read() == WEIGHTS[MiB:]
    for _ in range(3):
        time.sleep(0.5)
        mounter.kitfs("cache", "clear")  # so that everything is fetched again
        drop_page_cache(mount)
        read_all(mount)
    expired = [s for s in proxy.seen if s.status == 401
               and s.headers.get("authorization", "").startswith("Bearer ")]
    print(f"\nbearer: {len(expired)} requests met an expired token, "
          f"{len(proxy.tokens_issued)} tokens issued")
    assert len(expired) >= 4 and len(proxy.tokens_issued) >= 4, (len(expired), proxy.tokens_issued)


def read_every_file(root: Path, paths: list[str]) -> None:
    for path in paths:
        (root / path).read_bytes()


def test_a_flipped_byte_in_a_small_file_gives_eio(
        mounter: Mounter, registry: Registry, pusher: Pusher) -> None:
    """A small file's layer is fetched whole by its first read and checked: EIO, every
    time, with a log line naming the layer; the other layers still read right."""
    script = b"print(%r)\n" % os.urandom(8).hex()
    code = tar_layer("code", {"src/run.py": script}, "src")
    docs = tar_layer("docs", {"README.md": README}, "README.md")
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0", "code": [{"path": "src"}],
                               "docs": [{"path": "README.md"}]}
    with_layer_info(kitfile, [(kitfile["code"][0], code), (kitfile["docs"][0], docs)])
    reference = f"{registry.host}/faults/flipped-small:v1"
    pusher.push_kit(reference, kitfile, [code, docs])
    registry.flip_stored_byte(code.digest, code.data.index(script) + 3, 0x01)
    mount = mounter.mount(reference)
    mount.expect_error(rf"{code.digest}.*failed verification")
    for _ in range(2):
        with pytest.raises(OSError, match="Input/output error") as caught:
            (mount.path / "src/run.py").read_bytes()
        assert caught.value.errno == errno.EIO
    assert f"layer {code.digest} failed verification" in mount.log()
    assert (mount.path / "README.md").read_bytes() == README


def test_a_flipped_byte_in_a_dataset_layer(
        mounter: Mounter, registry: Registry, pusher: Pusher) -> None:
    """A dataset layer of three 20 MiB files, one byte flipped in the second one.
    strict: its first read fails. eventual (the default): bytes are served as they arrive
    (README, Verification), so the file read alone, with most of its layer not fetched,
    comes back with the flipped byte; reading the whole dataset fails with EIO once the
    layer is (nearly) complete and checked, and so does every read of that layer after."""
    shards = {f"data/big-{i}.bin": os.urandom(20 * MiB) for i in range(3)}
    dataset = tar_layer("dataset", shards, "data")
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0",
                               "datasets": [{"name": "big", "path": "data"}]}
    with_layer_info(kitfile, [(kitfile["datasets"][0], dataset)])
    reference = f"{registry.host}/faults/flipped-dataset:v1"
    pusher.push_kit(reference, kitfile, [dataset])
    victim = "data/big-1.bin"
    registry.flip_stored_byte(dataset.digest, dataset.data.index(shards[victim][:64]) + 7 * MiB, 0x01)

    strict = mounter.mount(reference, "--verify", "strict", name="strict")
    strict.expect_error(rf"{dataset.digest}.*failed verification")
    with pytest.raises(OSError, match="Input/output error"):
        (strict.path / victim).read_bytes()
    mounter.kitfs("umount", str(strict.path))
    mounter.kitfs("cache", "clear")  # forget the failure

    eventual = mounter.mount(reference, name="eventual")
    eventual.expect_error(rf"{dataset.digest}.*failed verification")
    served = (eventual.path / victim).read_bytes()
    assert served != shards[victim]
    assert sum(a != b for a, b in zip(served, shards[victim], strict=True)) == 1
    with pytest.raises(OSError, match="Input/output error"):
        read_every_file(eventual.path, sorted(shards))  # like cp -r data
    wait_for_line(eventual, "the kernel's cached pages of its")
    for path in shards:
        with pytest.raises(OSError, match="Input/output error"):
            (eventual.path / path).read_bytes()
    assert f"layer {dataset.digest} failed verification" in eventual.log()


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


# --- the cache under kill -9, quota pressure, a full disk, rot -----------------------------


def cache_stats(mounter: Mounter) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(mounter.kitfs("cache", "stats", "--json").stdout)
    return stats


def chunk_files(mounter: Mounter, digest: str) -> int:
    algo, hex_ = digest.split(":")
    directory = mounter.cache_dir / "chunks" / algo / hex_[:2] / hex_
    return len(list(directory.iterdir())) if directory.exists() else 0


@pytest.fixture(scope="module")
def big_kit(registry: Registry, pusher: Pusher) -> tuple[str, bytes, str]:
    """One 64 MiB model file (16 chunks): (reference, its bytes, the layer digest)."""
    weights = os.urandom(64 * MiB)
    reference = push_model_kit(pusher, f"{registry.host}/faults/big:v1", weights)
    model = tar_layer("model", {"models/weights.bin": weights}, "models/weights.bin")
    return reference, weights, model.digest


def start_reading(path: Path) -> threading.Thread:
    """Read ``path`` whole in a thread; its fate (a dead mount) is not the test's point."""
    def read() -> None:
        try:
            path.read_bytes()
        except OSError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


def kill_daemon_when(mount: Mount, fired: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not fired() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert fired(), "the moment to kill never came"
    os.kill(mount.pid, signal.SIGKILL)
    assert wait_gone(mount.pid)


@pytest.mark.parametrize("when", ["fetch", "eviction"])
def test_kill_9_of_the_daemon_then_a_fresh_mount_on_the_same_cache(
        mounter: Mounter, big_kit: tuple[str, bytes, str], when: str) -> None:
    """kill -9 of the mount daemon in the middle of a fetch (a new chunk file just landed),
    or while it evicts under a quota much smaller than the file (at its first "evicted"
    line), three times; after each, the cache verifies clean; then a fresh mount on the
    same cache reads the whole file right."""
    reference, weights, digest = big_kit
    quota = ["--cache-size", "12M"] if when == "eviction" else []
    for round_ in range(3):
        mount = mounter.mount(reference, *quota, name=f"round-{round_}")
        before = chunk_files(mounter, digest)
        reader = start_reading(mount.path / "models/weights.bin")
        if when == "fetch":
            kill_daemon_when(mount, lambda: chunk_files(mounter, digest) > before)  # noqa: B023
        else:
            kill_daemon_when(mount, lambda: "evicted" in mount.log())  # noqa: B023
        reader.join(10)
        cache_verify(mounter)
    fresh = mounter.mount(reference, *quota, name="fresh")
    assert (fresh.path / "models/weights.bin").read_bytes() == weights
    cache_verify(mounter)
    mounter.kitfs("cache", "gc")  # the orphans the kills left (files in tmp/, unrecorded)
    cache_verify(mounter)


def test_two_mounts_evicting_one_cache_under_a_quota_smaller_than_they_read(
        mounter: Mounter, kit: Kit) -> None:
    """Two daemons share one cache with an 8 MiB quota and read the kit's 36 MiB at once,
    twice (the second time not from the page cache): every byte right, the cache verifies
    clean, and once both are done it is within the quota."""
    one = mounter.mount(kit.reference, "--cache-size", "8M", name="one")
    two = mounter.mount(kit.reference, "--cache-size", "8M", name="two")
    failures: list[BaseException] = []

    def read(mount: Mount, order: list[str]) -> None:
        try:
            for path in order:
                assert (mount.path / path).read_bytes() == FILES[path], path
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    for _ in range(2):
        drop_page_cache(one)
        drop_page_cache(two)
        readers = [threading.Thread(target=read, args=(one, list(FILES))),
                   threading.Thread(target=read, args=(two, list(reversed(FILES))))]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(120)
        assert not failures, failures
    assert "evicted" in one.log() and "evicted" in two.log()
    assert cache_stats(mounter)["used_bytes"] <= 8 * MiB
    cache_verify(mounter)


def fill_up(directory: Path) -> Path:
    """Write a file in ``directory`` until its file system has no space left."""
    filler = directory / "filler"
    free_bytes = shutil.disk_usage(directory).free
    with open(filler, "wb") as f:
        f.write(b"\0" * free_bytes)
    with open(filler, "ab") as f, pytest.raises(OSError, match="No space left on device"):
        f.write(b"\0" * 65536)  # not even one block more
    return filler


def test_a_full_cache_disk_under_a_mount(mounter: Mounter, kit: Kit, tmp_path: Path) -> None:
    """The cache on a 4 MiB tmpfs: chunks do not fit, so the whole kit reads right
    through the mount uncached, with one warning. Then a second mount, with the disk filled
    to the last byte, so that the database cannot grow either (indexes, documents, access
    times): every file still reads right, and the cache verifies once there is room."""
    small = tmp_path / "small-disk"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        mounter.cache_dir = small / "cache"
        mount = mounter.mount(kit.reference, name="one")
        read_all(mount)
        drop_page_cache(mount)
        read_all(mount)
        assert sum("is full" in line for line in mount.log().splitlines()) == 1
        mounter.kitfs("umount", str(mount.path))
        mounter.kitfs("cache", "clear")
        full = mounter.mount(kit.reference, name="full")
        filler = fill_up(small)
        read_all(full)
        assert "is full" in full.log()
        mounter.kitfs("umount", str(full.path))
        filler.unlink()
        cache_verify(mounter)
    finally:
        try:
            mounter.close()  # the daemons let go of the small disk
        finally:
            subprocess.run(["umount", str(small)], check=True)


def test_a_chunk_corrupted_at_rest_under_a_mount(
        mounter: Mounter, kit: Kit, registry: Registry) -> None:
    """A cached chunk of the dataset with one bit flipped on disk: the next mount reads the
    right bytes (the chunk is dropped, logged, and fetched again), and the cache verifies."""
    mount = mounter.mount(kit.reference)
    read_all(mount)
    mounter.kitfs("umount", str(mount.path))
    algo, hex_ = kit.digests["data"].split(":")
    victim = mounter.cache_dir / "chunks" / algo / hex_[:2] / hex_ / "3"
    data = bytearray(victim.read_bytes())
    data[12345] ^= 0x10
    victim.write_bytes(bytes(data))
    again = mounter.mount(kit.reference)
    mark = registry.log_mark()
    read_all(again)
    assert "dropping chunk 3" in again.log()
    assert registry.blob_bytes_served(mark) == CHUNK  # that chunk, and only it, again
    cache_verify(mounter)
