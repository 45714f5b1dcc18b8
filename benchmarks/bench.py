"""``Bench``: what every workload needs (the kit, the registry, the scratch directory, how many
runs) and where the results go.

Every workload appends result records to ``Bench.results``::

    {"workload": "seq", "system": "kitfs", "variant": "cold", "runs": [{...}, ...], "median": {...}}

Every timing is repeated ``Bench.repeat`` times (fresh kitfs cache for each cold run) and the
median is reported. "Cold" means: fresh cache and mount, then ``sync; echo 3 > drop_caches``;
the registry's own blob file is cold too, for kitfs and for the comparisons alike.

Next to every throughput figure is the CPU it cost (``Bench.metered``): ``cpu_s`` and
``cpu_s_per_gib`` of the row's own process (the kitfs daemon, curl, ratarmount, the floor, the
pass-through) and ``registry_cpu_s(_per_gib)`` of the registry, which shares the two cores.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import CpuMeter, MiB, drop_caches, log, medians, touch_guest_memory
from kits import Blob, Kit, remove
from mounts import KitfsMount, Ratarmount

from kitfs.demo import Registry


@dataclass
class Bench:
    """Everything a workload needs, and where the results go."""

    kit: Kit
    registry: Registry
    scratch: Path  # on the same filesystem as the kitfs cache: /var/tmp/...
    repeat: int
    random_read_count: int
    quota_bytes: int
    kitfs_src: Path  # the snapshot of the kitfs package that every mount runs
    results: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    _serial: int = 0

    # --- plumbing ---------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """A fresh, empty path in the scratch directory (removed if it was there)."""
        p = self.scratch / name
        remove(p)
        return p

    def fresh_cache(self) -> Path:
        cache = self.path("cache")
        cache.mkdir(parents=True)
        return cache

    def kitfs(self, cache: Path, *extra_args: str, name: str = "mnt", reference: str = "",
              prefix: tuple[str, ...] = ()) -> KitfsMount:
        """A ``kitfs mount`` of the kit (or of ``reference``), its command after ``prefix``."""
        self._serial += 1
        return KitfsMount(reference or self.kit.reference, self.scratch / name, cache, self.scratch / "run",
                          self.scratch / "logs" / f"kitfs-{self._serial:03d}-{name}.log", self.kitfs_src,
                          extra_args, prefix)

    def metered(self, body: Callable[[], dict[str, Any]], *, pid: int = 0, children: bool = False,
                size_key: str = "size_bytes", **other_pids: int) -> dict[str, Any]:
        """``body()``'s result plus the CPU it cost (``CpuMeter``): ``cpu_s``/``cpu_s_per_gib``
        of the row's own process (``pid``, or the children waited for meanwhile: curl, tar),
        ``registry_cpu_s``/``…_per_gib``, and ``{name}_s``/``…_per_gib`` per ``other_pids``."""
        registry_pid = self.registry.process.pid if self.registry.process else 0
        with CpuMeter({"cpu": pid, "registry_cpu": registry_pid, **other_pids},
                      "cpu" if children else None) as meter:
            result = body()
        return result | meter.fields(result.get(size_key))

    def ratarmount(self, blob: Blob, index_dir: Path, name: str = "rmnt") -> Ratarmount:
        self._serial += 1
        return Ratarmount(self.kit.blob_url(blob), self.scratch / name, index_dir,
                          self.scratch / "logs" / f"ratarmount-{self._serial:03d}.log")

    def mark(self) -> int:
        return self.registry.log_mark()

    def fetched(self, mark: int, read_bytes: float) -> dict[str, float]:
        """Bytes the registry served for blob GETs since ``mark`` (its own log), and ÷ read."""
        requests = [(m, u, n) for m, u, n in self.registry.requests(mark)
                    if m == "GET" and "/blobs/" in u]
        fetched_bytes = sum(n for _, _, n in requests)
        return {"fetched_bytes": fetched_bytes, "blob_requests": len(requests),
                "fetch_ratio": fetched_bytes / read_bytes if read_bytes else float("nan")}

    def record(self, workload: str, system: str, variant: str, runs: list[dict[str, Any]],
               **extra: Any) -> None:
        if not runs:
            return
        entry = {"workload": workload, "system": system, "variant": variant, "runs": runs,
                 "median": medians(runs), **extra}
        self.results.append(entry)
        m = entry["median"]
        shown = ", ".join(f"{k}={m[k]:.4g}" for k in ("mb_s", "elapsed_s", "first_byte_ms", "p50_ms",
                                                       "p99_ms", "fetch_ratio", "fetched_per_read_kib",
                                                       "cpu_s_per_gib", "registry_cpu_s_per_gib",
                                                       "peak_rss_mib")
                          if isinstance(m.get(k), float))
        log(f"  {workload:<12} {system:<18} {variant:<22} {shown}")

    def local_file(self, workload: str, measure: Callable[[], dict[str, Any]]) -> None:
        """The local-copy comparison: ``measure`` with the page cache dropped, then again warm."""

        def body() -> None:
            cold, warm = [], []
            for _ in range(self.repeat):
                drop_caches()
                cold.append(measure())
                warm.append(measure())
            self.record(workload, "local file", "page cache dropped", cold)
            self.record(workload, "local file", "page cache warm", warm)

        self.guarded(workload, "local file", body)

    def measured_read(self, measure: Callable[[], dict[str, Any]], *, pid: int,
                      drop: bool = True, touch_memory: bool = False,
                      read_bytes: float | None = None) -> dict[str, Any]:
        """``measure()`` (page cache dropped first with ``drop``; then, with ``touch_memory``,
        ``touch_guest_memory``, its time as ``touched_s``): its CPU (``pid``'s, ``metered``)
        and the bytes the registry served for it (``fetched``, against ``read_bytes``,
        default what it read)."""
        touched: dict[str, float] = {}
        if drop:
            drop_caches()
        if touch_memory:
            touched["touched_s"] = touch_guest_memory()
        mark = self.mark()
        r = self.metered(measure, pid=pid)
        return r | touched | self.fetched(mark, r["size_bytes"] if read_bytes is None else read_bytes)

    def kitfs_three_ways(self, workload: str, measure: Callable[[KitfsMount], dict[str, Any]], *,
                         before: Callable[[KitfsMount], object] | None = None,
                         memory: bool = True, mount_time: bool = False) -> None:
        """``measure(mount)`` three times on one fresh mount per repeat (after ``before``):
        cold (page cache dropped, kitfs' cache empty), from kitfs' disk cache (page cache
        dropped again), from the page cache. Each with its CPU and the registry's bytes;
        ``memory``: the daemon's peak RSS; ``mount_time``: how long the mount took."""
        cold: list[dict[str, Any]] = []
        disk: list[dict[str, Any]] = []
        page: list[dict[str, Any]] = []
        for _ in range(self.repeat):
            with self.kitfs(self.fresh_cache()) as m:
                if before is not None:
                    before(m)
                for runs, drop in ((cold, True), (disk, True), (page, False)):
                    r = self.measured_read(lambda m=m: measure(m), pid=m.pid, drop=drop)
                    if memory:
                        r["peak_rss_mib"] = m.peak_rss_bytes() / MiB
                    if mount_time:
                        r["mount_s"] = m.mount_s
                    runs.append(r)
        self.record(workload, "kitfs", "cold", cold)
        self.record(workload, "kitfs", "disk cache, page cache dropped", disk)
        self.record(workload, "kitfs", "page cache warm", page)

    def guarded(self, workload: str, system: str, body: Callable[[], None]) -> None:
        """Run one comparison; a failure is recorded (and the run goes on), not raised."""
        try:
            body()
        except Exception as exc:
            log(f"  {workload} {system} FAILED: {exc}")
            self.errors.append({"workload": workload, "system": system, "error": str(exc)[-2000:],
                                "traceback": traceback.format_exc()[-4000:]})
