"""Load through a real mount: many readers at once, many opens, readers cancelled mid-read.

Each test mounts a kit from the real registry with the real ``kitfs mount``, drives it from
threads or processes for a bounded time, checks every byte read against what was packed,
and prints its figures (the README's Reliability section quotes them). Reads are made to
reach the daemon, not the kernel's page cache (``POSIX_FADV_DONTNEED`` before reads), and
the cache quota is smaller than the data, so chunks are evicted and fetched again meanwhile.
The ``mounter`` fixture fails a test whose daemon logged an ERROR.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kitfs.demo import Pusher, Registry, tar_layer, with_layer_info
from tests.mounts import Mount, Mounter

MiB = 1 << 20
# 8 files of 8 MiB in two layers (a model and a dataset), 64 MiB in all
BIG = {f"models/part-{i}.bin": os.urandom(8 * MiB + 4096 * i) for i in range(4)}
BIG |= {f"data/shard-{i}.bin": os.urandom(8 * MiB + 512 * i) for i in range(4)}
# 1,200 small files (1-4 KiB) in one dataset layer
_rng = random.Random(5)
SMALL = {f"files/d{i % 12}/f{i}.txt": _rng.randbytes(_rng.randint(1024, 4096))
         for i in range(1200)}
READERS = 64
READ_FOR_S = 12.0
MAX_DAEMON_RSS_BYTES = 300 * MiB  # the daemon's VmHWM under this load (README: Reliability)


@pytest.fixture(scope="module")
def kit(registry: Registry, pusher: Pusher) -> str:
    models = tar_layer("model", {k: v for k, v in BIG.items() if k.startswith("models/")},
                       "models")
    shards = tar_layer("dataset", {k: v for k, v in BIG.items() if k.startswith("data/")}, "data")
    small = tar_layer("dataset", SMALL, "files")
    kitfile: dict[str, Any] = {
        "manifestVersion": "1.0.0",
        "model": {"name": "parts", "path": "models"},
        "datasets": [{"name": "shards", "path": "data"}, {"name": "small", "path": "files"}],
    }
    with_layer_info(kitfile, [(kitfile["model"], models), (kitfile["datasets"][0], shards),
                              (kitfile["datasets"][1], small)])
    reference = f"{registry.host}/load/kit:v1"
    pusher.push_kit(reference, kitfile, [models, shards, small])
    return reference


def daemon_peak_rss_bytes(mount: Mount) -> int:
    """The daemon's peak resident set (VmHWM), from /proc."""
    for line in Path(f"/proc/{mount.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {mount.pid}")


def drop_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@dataclass
class Tally:
    reads: int = 0
    bytes: int = 0
    wrong: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def test_64_readers_over_8_files(mounter: Mounter, kit: str) -> None:
    """64 threads read random ranges (1 byte to 1 MiB, a quarter of them 4 KiB) of 8 files
    (64 MiB) for 12 s through one mount with a 32 MiB cache, each range checked; the daemon
    stays under its memory bound, answers afterwards, and the cache verifies clean."""
    mount = mounter.mount(kit, "--cache-size", "32M")
    paths = sorted(BIG)
    for path in paths:
        os.stat(mount.path / path)  # index the layers before the clock starts
    tally = Tally()
    deadline = time.monotonic() + READ_FOR_S

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        fds = {path: os.open(mount.path / path, os.O_RDONLY) for path in paths}
        try:
            while time.monotonic() < deadline:
                path = rng.choice(paths)
                expected = BIG[path]
                size = 4096 if rng.random() < 0.25 else rng.randint(1, MiB)
                offset = rng.randrange(0, len(expected))
                if rng.random() < 0.05:
                    os.posix_fadvise(fds[path], 0, 0, os.POSIX_FADV_DONTNEED)
                data = os.pread(fds[path], size, offset)
                ok = data == expected[offset : offset + size]
                with tally.lock:
                    tally.reads += 1
                    tally.bytes += len(data)
                    if not ok:
                        tally.wrong.append(f"{path} {offset}+{size}")
        except BaseException as exc:  # reported by the test thread
            with tally.lock:
                tally.errors.append(exc)
        finally:
            for fd in fds.values():
                os.close(fd)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(READERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(READ_FOR_S + 120)
    assert not any(thread.is_alive() for thread in threads), "readers still blocked: deadlock?"
    peak = daemon_peak_rss_bytes(mount)
    served = mount.status()
    print(f"\n64 readers x {READ_FOR_S:g} s: {tally.reads} reads, {tally.bytes / MiB:.0f} MiB, "
          f"all checked; daemon served {served['bytes_served'] / MiB:.0f} MiB in "
          f"{served['reads']} FUSE reads, fetched {served['bytes_fetched'] / MiB:.0f} MiB; "
          f"peak RSS {peak / MiB:.0f} MiB")
    assert not tally.errors, tally.errors[:3]
    assert not tally.wrong, tally.wrong[:10]
    assert tally.reads > READERS
    assert served["bytes_fetched"] > 64 * MiB  # the 32 MiB cache made it fetch again
    assert peak < MAX_DAEMON_RSS_BYTES, peak
    for path in paths:  # and it answers afterwards
        drop_pages(mount.path / path)
        assert (mount.path / path).read_bytes() == BIG[path], path
    verify = mounter.kitfs("cache", "verify")
    assert verify.text.strip().endswith(", 0 dropped"), verify.text


def test_a_thousand_opens_of_small_files(mounter: Mounter, kit: str) -> None:
    """1,200 small files opened, read and closed, three times over (3,600 opens; the first
    pass also looks each one up and fetches the layer), from 4 threads: every byte right."""
    mount = mounter.mount(kit)
    paths = sorted(SMALL)
    opened = [0]
    wrong: list[str] = []
    lock = threading.Lock()

    def worker(part: list[str]) -> None:
        for path in part:
            with open(mount.path / path, "rb") as f:
                ok = f.read() == SMALL[path]
            with lock:
                opened[0] += 1
                if not ok:
                    wrong.append(path)

    rates = []
    for _ in range(3):
        started = time.monotonic()
        threads = [threading.Thread(target=worker, args=(paths[i::4],)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        rates.append(len(paths) / (time.monotonic() - started))
    print(f"\nopens of small files per second, pass by pass: {[round(r) for r in rates]} "
          f"({opened[0]} opens, all checked)")
    assert opened[0] == 3 * len(paths)
    assert not wrong, wrong[:10]


def test_cat_interrupted_mid_read(mounter: Mounter, kit: str) -> None:
    """``cat`` of an 8 MiB file stopped with SIGINT (Ctrl-C) once 1 MiB has come out, five
    times, each time on a file not read before (its chunks are being fetched as it reads),
    with a 16 MiB cache; afterwards every file reads right and the daemon logged no error."""
    mount = mounter.mount(kit, "--cache-size", "16M")
    names = sorted(BIG)
    for name in names[:5]:
        cat = subprocess.Popen(["cat", str(mount.path / name)], stdout=subprocess.PIPE)
        assert cat.stdout is not None
        got = 0
        while got < MiB:
            piece = cat.stdout.read(64 * 1024)
            assert piece, "cat ended before it was interrupted"
            got += len(piece)
        cat.send_signal(signal.SIGINT)
        cat.stdout.close()
        assert cat.wait(30) in (-signal.SIGINT, 1, -signal.SIGPIPE), cat.returncode
    for name in names:
        drop_pages(mount.path / name)
        assert (mount.path / name).read_bytes() == BIG[name], name
    assert " ERROR " not in mount.log()
