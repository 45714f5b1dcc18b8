"""``kitfs metrics``: one Prometheus endpoint for every kitfs mount of a node, and their caches.

kitfs runs one daemon per mount, and a node wants one scrape target. Each daemon already
rewrites its status record (``RUNTIME_DIR/<pid>.json``, ``kitfs.mount.status``) every second;
it carries the daemon's figures (``kitfs.mount.record.MountFigures``). ``kitfs metrics`` reads the
records of the running daemons at each scrape and renders them with ``prometheus_client``
(a custom collector: nothing is registered globally). Why files and not a socket per daemon:
a scrape never waits on a daemon (a busy or stuck one cannot hold it up), a dead daemon's
record is skipped by its PID, nothing new listens in the daemons, and the runtime directory's
permissions (0700) already say who may read the figures. The price: figures are up to a
second old.

Per mount (labels ``mountpoint`` and ``digest``, the pinned manifest digest: one series set
per mount, so the label sets are bounded by the mounts): ``kitfs_mount_info`` (also
``reference``), ``kitfs_fetched_bytes_total`` (by ``host``: the mirror or registry that
answered; bounded by hosts.toml), ``kitfs_served_bytes_total``, ``kitfs_requests_total`` (FUSE
requests by ``outcome``: ``ok`` or the errno's name), ``kitfs_read_duration_seconds``
(histogram), ``kitfs_cache_hits_total``, ``kitfs_cache_misses_total``,
``kitfs_verification_failures_total``, ``kitfs_registry_requests_total``,
``kitfs_registry_retries_total``, ``kitfs_registry_fallbacks_total`` (a mirror failed or was
cold and the next host was asked), ``kitfs_fetches_in_flight``.

Per cache directory (label ``cache_dir``): ``kitfs_cache_used_bytes`` (read from the cache at
each scrape), ``kitfs_cache_quota_bytes`` (the smallest ``--cache-size`` its daemons enforce,
absent when none has one), ``kitfs_cache_pinned_bytes`` (what the references ``kitfs pull --pin``
pinned hold now), ``kitfs_cache_evictions_total`` and ``kitfs_cache_evicted_bytes_total``
(what the daemons evicted: each daemon counts its own, and this process adds up the last
figure of every daemon it has seen, so the total never goes down when one exits; evictions
by a daemon that came and went between two scrapes are not seen).
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from kitfs.cache.store import CacheStatistics, ChunkStore
from kitfs.errors import KitfsError, UsageError
from kitfs.mount.record import MountStatus
from kitfs.mount.status import daemon_records

log = logging.getLogger(__name__)

MOUNT_LABELS = ["mountpoint", "digest"]


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` → (host, port).

    Raises:
        UsageError: anything else.
    """
    host, colon, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen takes HOST:PORT (e.g. 127.0.0.1:9464), not {text!r}")
    return host, int(port)


class KitfsCollector(Collector):
    """Renders the running daemons' records and their caches at each scrape."""

    def __init__(self, cache_dirs: Iterable[Path] = ()) -> None:
        self.cache_dirs = list(cache_dirs)  # besides those of the daemons
        # (cache dir, pid) -> (files, bytes) evicted, as that daemon last reported them
        self._evictions: dict[tuple[str, int], tuple[int, int]] = {}

    def collect(self) -> Iterator[Metric]:
        records = daemon_records()
        yield from self._mount_metrics(records)
        yield from self._cache_metrics(records)

    def _mount_metrics(self, records: list[MountStatus]) -> Iterator[Metric]:
        info = GaugeMetricFamily("kitfs_mount_info", "A kitfs mount: its reference as mounted",
                                 labels=[*MOUNT_LABELS, "reference"])
        fetched = CounterMetricFamily(
            "kitfs_fetched_bytes", "Blob bytes fetched, by the registry host (mirror or "
            "registry) that answered", labels=[*MOUNT_LABELS, "host"])
        requests = CounterMetricFamily("kitfs_requests", "FUSE requests answered, by outcome "
                                       "(ok, or the errno's name)", labels=[*MOUNT_LABELS, "outcome"])
        latency = HistogramMetricFamily("kitfs_read_duration_seconds", "Time to answer a FUSE "
                                        "read (reads the page cache answers never reach kitfs)",
                                        labels=MOUNT_LABELS)
        counters = {name: CounterMetricFamily(f"kitfs_{name}", text, labels=MOUNT_LABELS)
                    for name, text in _MOUNT_COUNTERS.items()}
        in_flight = GaugeMetricFamily("kitfs_fetches_in_flight", "Blob range fetches under way",
                                      labels=MOUNT_LABELS)
        for record in records:
            figures = record.metrics
            labels = [record.mountpoint, record.digest]
            info.add_metric([*labels, record.reference], 1)
            for host, count in sorted(figures.fetched_bytes_by_host.items()):
                fetched.add_metric([*labels, host], count)
            for outcome, count in sorted(figures.requests_by_outcome.items()):
                requests.add_metric([*labels, outcome], count)
            histogram = figures.read_seconds
            cumulative, buckets = 0, []
            for bound, count in zip([*histogram.bounds, "+Inf"], histogram.counts, strict=True):
                cumulative += count
                buckets.append((str(bound), cumulative))
            latency.add_metric(labels, buckets, histogram.sum)
            for name, family in counters.items():
                family.add_metric(labels, getattr(figures, name))
            in_flight.add_metric(labels, figures.fetches_in_flight)
        yield from (info, fetched, requests, latency, *counters.values(), in_flight)

    def _cache_metrics(self, records: list[MountStatus]) -> Iterator[Metric]:
        used = GaugeMetricFamily("kitfs_cache_used_bytes", "Bytes of chunks and checkpoint "
                                 "indexes in the cache (what the quota counts)", labels=["cache_dir"])
        quota = GaugeMetricFamily("kitfs_cache_quota_bytes", "The smallest --cache-size the "
                                  "cache's running daemons enforce", labels=["cache_dir"])
        pinned = GaugeMetricFamily("kitfs_cache_pinned_bytes", "Bytes pinned in the cache (kept "
                                   "out of eviction)", labels=["cache_dir"])
        evictions = CounterMetricFamily("kitfs_cache_evictions", "Chunks and checkpoint indexes "
                                        "evicted by the cache's daemons", labels=["cache_dir"])
        evicted = CounterMetricFamily("kitfs_cache_evicted_bytes", "Bytes evicted by the cache's "
                                      "daemons", labels=["cache_dir"])
        quotas: dict[str, int] = {}
        for record in records:
            directory, figures = record.cache_dir, record.metrics
            self._evictions[(directory, record.pid)] = (figures.cache_evicted_files,
                                                        figures.cache_evicted_bytes)
            if figures.cache_quota_bytes is not None:
                quotas[directory] = min(quotas.get(directory, figures.cache_quota_bytes),
                                        figures.cache_quota_bytes)
        directories = sorted({*(str(d) for d in self.cache_dirs),
                              *(r.cache_dir for r in records)})
        for directory in directories:
            statistics = _statistics(Path(directory))
            if statistics is not None:
                used.add_metric([directory], statistics.used_bytes)
                pinned.add_metric([directory], statistics.pinned_bytes)
            if directory in quotas:
                quota.add_metric([directory], quotas[directory])
            seen = [v for (d, _), v in self._evictions.items() if d == directory]
            evictions.add_metric([directory], sum(files for files, _ in seen))
            evicted.add_metric([directory], sum(count for _, count in seen))
        yield from (used, quota, pinned, evictions, evicted)


# name (after kitfs_, before _total; the field of MountFigures too) -> help
_MOUNT_COUNTERS = {
    "served_bytes": "Bytes answered to FUSE reads",
    "cache_hits": "Chunk accesses answered from the cache",
    "cache_misses": "Chunk accesses that needed a registry fetch (theirs or one under way)",
    "verification_failures": "Verification failures met (a layer's digest, a piece's identity); "
                             "the same failure answered again is not counted again",
    "registry_requests": "HTTP requests sent to registry hosts (mirrors included)",
    "registry_retries": "Requests to a registry host tried again",
    "registry_fallbacks": "Times a mirror failed or was cold and the next host was asked",
}


def _statistics(directory: Path) -> CacheStatistics | None:
    """The cache's figures, or None when it is not a kitfs cache (never creates one)."""
    if not (directory / "kitfs.db").exists():
        return None
    try:
        store = ChunkStore(directory)
    except KitfsError as exc:
        log.warning("cache %s left out of the metrics: %s", directory, exc)
        return None
    try:
        return store.statistics()
    finally:
        store.close()


def serve(listen: str, cache_dirs: Iterable[Path],
          on_ready: Callable[[], None] | None = None) -> int:
    """Serve ``/metrics`` on ``listen`` until SIGTERM, SIGINT or SIGHUP; returns 0.

    Raises:
        UsageError: a bad ``listen``, or an address that cannot be listened on.
    """
    host, port = parse_listen(listen)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KitfsCollector(cache_dirs))
    stop = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # the server's threads inherit the mask
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except (OSError, socket.gaierror) as exc:
        raise UsageError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    log.info("serving metrics on http://%s/metrics", listen)
    if on_ready is not None:
        on_ready()
    signum = signal.sigwait(stop)
    log.info("%s: stopping", signal.Signals(signum).name)
    server.shutdown()
    server.server_close()
    return 0
