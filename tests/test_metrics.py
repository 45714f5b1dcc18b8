"""``kitfs metrics`` (README "Metrics"): one Prometheus endpoint for the node's mounts, scraped
over HTTP and parsed with prometheus_client's own parser; its counters against the registry's
own log, the daemons' logs and ``kitfs cache stats``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kitfs.demo import Entry, Pusher, Registry, free_port, push_entries, sample_kit, tar_layer
from tests.kitfs_cli import kitfs_argv
from tests.mounts import Mount, Mounter

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "kitfs-metrics.service"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class MetricsServer:
    def __init__(self, mounter: Mounter, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.log = mounter.workdir / f"metrics-{self.port}.log"
        mounter.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                kitfs_argv("metrics", "--listen", f"127.0.0.1:{self.port}", *args),
                env=env or mounter.env(), stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, self.log.read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "kitfs metrics did not listen within 30 s"
                time.sleep(0.05)

    def scrape(self) -> Samples:
        """Every sample, by (name, labels), as prometheus_client's parser reads the page."""
        with urllib.request.urlopen(self.url, timeout=30) as answer:
            assert answer.status == 200
            text = answer.read().decode()
        return {(sample.name, frozenset(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(15)


@pytest.fixture
def metrics(mounter: Mounter) -> Iterator[MetricsServer]:
    server = MetricsServer(mounter)
    try:
        yield server
    finally:
        server.stop()


def of_mount(samples: Samples, name: str, mount: Mount, **labels: str) -> float:
    """The value of ``name`` for ``mount`` (summed over labels not given, e.g. ``host``)."""
    status = mount.status()
    wanted = {"mountpoint": str(mount.path), "digest": status["digest"], **labels}
    found = [value for (sample, sample_labels), value in samples.items()
             if sample == name and wanted.items() <= dict(sample_labels).items()]
    assert found, f"no {name} for {mount.path} in the scrape"
    return sum(found)


def of_cache(samples: Samples, name: str, cache_dir: Path) -> float | None:
    return samples.get((name, frozenset({("cache_dir", str(cache_dir))})))


def near(value: float, expected: float, percent: float = 3.0) -> bool:
    return abs(value - expected) <= expected * percent / 100


def evicted_bytes_logged(*mounts: Mount) -> int:
    return sum(int(n) for mount in mounts
               for n in re.findall(r"evicted \d+ chunks and \d+ checkpoint indexes \((\d+) bytes\)",
                                   mount.log()))


def test_counters_agree_with_the_registry_log_the_daemon_logs_and_the_cache(
        mounter: Mounter, registry: Registry, pusher: Pusher, metrics: MetricsServer) -> None:
    """Two mounts sharing a cache under an 8 MiB quota, read while the endpoint is up: bytes
    and requests fetched agree with what the registry logged, bytes served with what was read,
    evictions with the daemons' own log lines, the cache's bytes with ``kitfs cache stats``;
    an unmounted mount's series go and the cache's eviction total does not go down."""
    weights = {name: os.urandom(12 * MiB + 1000) for name in ("a", "b")}
    references = {name: f"{registry.host}/metrics/{name}:v1" for name in weights}
    for name, reference in references.items():
        sample_kit(pusher, reference, weights[name])
    mark = registry.log_mark()
    mounts = {name: mounter.mount(reference, "--cache-size", "8M", name=name)
              for name, reference in references.items()}
    read_bytes = {}
    for name, mount in mounts.items():
        assert (mount.path / "models/weights.safetensors").read_bytes() == weights[name]
        parts = sorted((mount.path / "data/train").iterdir())
        read_bytes[name] = len(weights[name]) + sum(len(p.read_bytes()) for p in parts)
        assert not (mount.path / "no-such-file").exists()  # one ENOENT answered
    for mount in mounts.values():
        mount.settled_status("bytes_fetched")
    samples = metrics.scrape()

    fetched = sum(of_mount(samples, "kitfs_fetched_bytes_total", m, host=registry.host)
                  for m in mounts.values())
    requests = sum(of_mount(samples, "kitfs_registry_requests_total", m) for m in mounts.values())
    logged = registry.requests(mark, agent="kitfs/")
    logged_bytes = sum(n for method, uri, n in logged if method == "GET" and "/blobs/" in uri)
    print(f"\nfetched {fetched:.0f} bytes in {requests:.0f} requests; the registry logged "
          f"{logged_bytes} bytes of blobs in {len(logged)} requests")
    assert near(fetched, logged_bytes) and near(requests, len(logged))
    for name, mount in mounts.items():
        assert near(of_mount(samples, "kitfs_served_bytes_total", mount), read_bytes[name])
        assert of_mount(samples, "kitfs_requests_total", mount, outcome="ENOENT") >= 1
        assert of_mount(samples, "kitfs_requests_total", mount, outcome="ok") > 0
        reads = mount.status()["reads"]
        assert of_mount(samples, "kitfs_read_duration_seconds_count", mount) == reads
        assert of_mount(samples, "kitfs_read_duration_seconds_bucket", mount, le="+Inf") == reads
        assert of_mount(samples, "kitfs_cache_misses_total", mount) > 0
        assert of_mount(samples, "kitfs_fetches_in_flight", mount) == 0
        assert of_mount(samples, "kitfs_mount_info", mount, reference=references[name]) == 1
    cache = mounter.cache_dir
    stats = json.loads(mounter.kitfs("cache", "stats", "--json").stdout)
    assert of_cache(samples, "kitfs_cache_used_bytes", cache) == stats["used_bytes"]
    assert of_cache(samples, "kitfs_cache_quota_bytes", cache) == 8 * MiB
    assert of_cache(samples, "kitfs_cache_evicted_bytes_total", cache) == \
        evicted_bytes_logged(*mounts.values()) > 0
    evictions = of_cache(samples, "kitfs_cache_evictions_total", cache)
    assert evictions is not None and evictions > 0

    mounter.kitfs("umount", str(mounts["b"].path))
    after = metrics.scrape()
    assert not [key for key in after if ("mountpoint", str(mounts["b"].path)) in key[1]]
    assert of_mount(after, "kitfs_served_bytes_total", mounts["a"]) == \
        of_mount(samples, "kitfs_served_bytes_total", mounts["a"])
    assert of_cache(after, "kitfs_cache_evictions_total", cache) == evictions
    assert metrics.stop() == 0


def test_pinned_bytes_are_the_caches(mounter: Mounter, registry: Registry, pusher: Pusher,
                                     metrics: MetricsServer) -> None:
    reference = f"{registry.host}/metrics/pinned:v1"
    sample_kit(pusher, reference, os.urandom(5 * MiB))
    mounter.mount(reference)  # the endpoint lists the caches its daemons use
    mounter.kitfs("pull", reference, "--pin", "--progress", "none")
    stats = json.loads(mounter.kitfs("cache", "stats", "--json").stdout)
    assert stats["pinned_bytes"] > 5 * MiB
    samples = metrics.scrape()
    assert of_cache(samples, "kitfs_cache_pinned_bytes", mounter.cache_dir) == stats["pinned_bytes"]
    mounter.kitfs("cache", "unpin", reference)
    assert of_cache(metrics.scrape(), "kitfs_cache_pinned_bytes", mounter.cache_dir) == 0


def test_verification_failures_and_mirror_fallbacks_are_counted(
        mounter: Mounter, registry: Registry, pusher: Pusher, metrics: MetricsServer,
        tmp_path: Path) -> None:
    """A layer with one byte flipped in the registry, read twice: one verification failure
    (the same failure answered again is not counted again), two reads answered EIO. A mirror
    nobody listens on: each time the next host was asked counts, and every byte came from the
    registry (the ``host`` label)."""
    weights = os.urandom(6 * MiB)
    model = tar_layer("model", {"models/w.bin": weights}, "models/w.bin")
    docs = tar_layer("docs", {"README.md": b"# fine\n"}, "README.md")
    reference = f"{registry.host}/metrics/tampered:v1"
    push_entries(pusher, reference, [Entry("model", {"path": "models/w.bin"}, model),
                                     Entry("docs", {"path": "README.md"}, docs)])
    registry.flip_stored_byte(model.digest)
    dead = f"127.0.0.1:{free_port()}"
    hosts = tmp_path / "certs.d" / registry.host
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(f'[host."http://{dead}"]\ncapabilities = ["pull", "resolve"]\n')
    mount = mounter.mount(reference, "--hosts-dir", str(tmp_path / "certs.d"))
    mount.expect_error(rf"{model.digest} failed verification")
    for _ in range(2):
        with pytest.raises(OSError, match="Input/output error"):
            (mount.path / "models/w.bin").read_bytes()
    assert (mount.path / "README.md").read_bytes() == b"# fine\n"
    mount.settled_status("bytes_fetched")
    samples = metrics.scrape()
    assert of_mount(samples, "kitfs_verification_failures_total", mount) == 1
    assert of_mount(samples, "kitfs_requests_total", mount, outcome="EIO") >= 2
    assert of_mount(samples, "kitfs_registry_fallbacks_total", mount) >= 1
    hosts_seen = {dict(labels).get("host") for (name, labels) in samples
                  if name == "kitfs_fetched_bytes_total"}
    assert hosts_seen == {registry.host}


def test_a_bad_listen_address_is_refused(mounter: Mounter) -> None:
    done = mounter.kitfs("metrics", "--listen", "9464", check=False)
    assert (done.returncode, done.stderr) == (
        64, "kitfs: --listen takes HOST:PORT (e.g. 127.0.0.1:9464), not '9464'\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = mounter.kitfs("metrics", "--listen", f"127.0.0.1:{port}", check=False)
    assert done.returncode == 64
    assert done.stderr.endswith(f"kitfs: cannot listen on 127.0.0.1:{port}: Address already in use\n")


def test_the_unit_file_passes_systemd_analyze_and_the_server_notifies_ready(
        mounter: Mounter, tmp_path: Path) -> None:
    unit = tmp_path / "kitfs-metrics.service"
    kitfs = Path(sys.executable).parent / "kitfs"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/kitfs", str(kitfs)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    # Type=notify, as systemd runs it: READY=1 once it listens; SIGTERM: exit 0.
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        notify.settimeout(60)
        server = MetricsServer(mounter, env=mounter.env(NOTIFY_SOCKET=address))
        try:
            assert "READY=1" in notify.recv(4096).decode().splitlines()
            server.scrape()  # it answers
        finally:
            assert server.stop() == 0
