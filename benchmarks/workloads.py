"""The workloads: each reads the same bytes through kitfs and through its comparisons.

Every workload appends result records to ``Bench.results``::

    {"workload": "seq", "system": "kitfs", "variant": "cold", "runs": [{...}, ...], "median": {...}}

``system`` is one of: ``kitfs``; the limits ``curl→/dev/null``, ``curl→file``, ``local file``,
``verifying floor`` (benchmarks/floor.py) and ``pyfuse3 pass-through`` (benchmarks/passfs.py);
what users do today, ``pull+untar`` (curl the blob to a file, then ``tar -x``, as ``kit unpack``
does) and ``curl|tar`` (streamed); the peer ``ratarmount (HTTP)``.
Every timing is repeated ``Bench.repeat`` times (fresh kitfs cache for each cold run) and the
median is reported. "Cold" means: fresh cache and mount, then ``sync; echo 3 > drop_caches``;
the registry's own blob file is cold too, for kitfs and for the comparisons alike.

Next to every throughput figure is the CPU it cost (``Bench.metered``): ``cpu_s`` and
``cpu_s_per_gib`` of the row's own process (the kitfs daemon, curl, ratarmount, the floor, the
pass-through) and ``registry_cpu_s(_per_gib)`` of the registry, which shares the two cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    CpuMeter,
    GiB,
    MiB,
    Sampler,
    drop_caches,
    find_stat,
    first_data_watch,
    isolated_offsets,
    log,
    mb_per_s,
    medians,
    open_to_first_byte,
    percentile,
    random_offsets,
    random_reads,
    read_many_concurrently,
    read_sequential,
    run_quiet,
    tree_bytes,
)
from kits import Blob, Kit, remove
from mounts import KitfsMount, Passthrough, Ratarmount

from kitfs.demo import Registry

RATARMOUNT = "ratarmount (HTTP)"
FLOOR = "verifying floor"
PASSTHROUGH = "pyfuse3 pass-through"
ISOLATED_READS = 50  # isolated random reads per run, fewer on a small file (one per 16 MiB)


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
                      drop: bool = True, read_bytes: float | None = None) -> dict[str, Any]:
        """``measure()`` (page cache dropped first with ``drop``): its CPU (``pid``'s,
        ``metered``) and the bytes the registry served for it (``fetched``, against
        ``read_bytes``, default what it read)."""
        if drop:
            drop_caches()
        mark = self.mark()
        r = self.metered(measure, pid=pid)
        return r | self.fetched(mark, r["size_bytes"] if read_bytes is None else read_bytes)

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


# --- limits and what users do today ---------------------------------------------------------


def curl_to(url: str, out: Path | str, prefix: tuple[str, ...] = ()) -> dict[str, float]:
    """``curl -o OUT URL`` (after ``prefix``), timed by curl itself (time_total, time_starttransfer)."""
    done = subprocess.run([*prefix, "curl", "-sSf", "-o", str(out), "-w",
                           "%{time_total} %{size_download} %{time_starttransfer}", url],
                          capture_output=True, text=True, check=True)
    total_s, size, first_s = done.stdout.split()
    return {"elapsed_s": float(total_s), "size_bytes": int(size), "first_byte_ms": float(first_s) * 1e3,
            "mb_s": mb_per_s(int(size), float(total_s))}


def curl_ranges(url: str, offsets: list[int], size_bytes: int,
                prefix: tuple[str, ...] = ()) -> dict[str, float]:
    """One curl (after ``prefix``) fetching the range of ``size_bytes`` at each offset, one after
    another on one keep-alive connection (``--next``); latency per range from curl's
    ``time_total``, which also holds the first one's connect."""
    args = [*prefix, "curl", "-sSf"]
    for i, offset in enumerate(offsets):
        args += [*(["--next"] if i else []), "-r", f"{offset}-{offset + size_bytes - 1}", "-o", "/dev/null",
                 "-w", "%{time_total} %{size_download} %{num_connects}\n", url]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    rows = [line.split() for line in done.stdout.splitlines()]
    latencies_ms = [float(total_s) * 1e3 for total_s, _, _ in rows]
    return {"reads": len(rows), "block_bytes": size_bytes, "size_bytes": sum(int(n) for _, n, _ in rows),
            "connects": sum(int(c) for _, _, c in rows), "p50_ms": percentile(latencies_ms, 50),
            "p99_ms": percentile(latencies_ms, 99), "mean_ms": sum(latencies_ms) / len(latencies_ms)}


def curl_parallel(urls: list[str]) -> dict[str, float]:
    """N curls to /dev/null at once; wall time until the last one is done."""
    start = time.perf_counter()
    procs = [subprocess.Popen(["curl", "-sSf", "-o", "/dev/null", "-w", "%{size_download}", u],
                              stdout=subprocess.PIPE, text=True) for u in urls]
    sizes = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"curl exited {p.returncode}")
        sizes.append(int(out))
    elapsed_s = time.perf_counter() - start
    return {"readers": len(urls), "size_bytes": sum(sizes), "elapsed_s": elapsed_s,
            "mb_s": mb_per_s(sum(sizes), elapsed_s)}


def pull_untar(url: str, out_dir: Path, wanted: str, *, gzip: bool, streamed: bool,
               blob_file: Path) -> dict[str, float]:
    """Fetch the whole blob and extract it, timed to the first byte of ``wanted`` on disk and to
    the end. ``streamed``: ``curl URL | tar -x``; else curl to a file, then ``tar -xf`` (what
    ``kit unpack`` does: pull to local storage, then unpack)."""
    out_dir.mkdir(parents=True)
    tar_flags = "-xzf" if gzip else "-xf"
    start = time.perf_counter()
    with first_data_watch(out_dir / wanted, start) as first:
        if streamed:
            curl = subprocess.Popen(["curl", "-sSf", url], stdout=subprocess.PIPE)
            tar = subprocess.run(["tar", tar_flags, "-", "-C", str(out_dir)], stdin=curl.stdout,
                                 capture_output=True, check=False)
            assert curl.stdout is not None
            curl.stdout.close()
            curl.wait()
            if curl.returncode or tar.returncode:
                raise RuntimeError(f"curl|tar failed: {tar.stderr.decode(errors='replace')}")
            pulled_s = float("nan")
        else:
            subprocess.run(["curl", "-sSf", "-o", str(blob_file), url], check=True)
            pulled_s = time.perf_counter() - start
            subprocess.run(["tar", tar_flags, str(blob_file), "-C", str(out_dir)], check=True)
        elapsed_s = time.perf_counter() - start
    size = (out_dir / wanted).stat().st_size
    return {"elapsed_s": elapsed_s, "pull_s": pulled_s,
            "first_byte_ms": first[0] * 1e3 if first else float("nan"), "wanted_bytes": size,
            "mb_s": mb_per_s(size, elapsed_s)}


def _limits(b: Bench, workload: str, blob: Blob, local_file: Path | None) -> None:
    """curl of the blob to /dev/null and to a file next to the cache; the local copy cold/warm."""
    url = b.kit.blob_url(blob)

    def curl_devnull() -> None:
        runs = []
        for _ in range(b.repeat):
            drop_caches()
            runs.append(b.metered(lambda: curl_to(url, "/dev/null"), children=True))
        b.record(workload, "curl→/dev/null", "cold registry", runs)

    def curl_file() -> None:
        runs = []
        for _ in range(b.repeat):
            out = b.path("curl.out")
            drop_caches()
            runs.append(b.metered(lambda out=out: curl_to(url, out), children=True))
            remove(out)
        b.record(workload, "curl→file", "cache's filesystem", runs)

    b.guarded(workload, "curl→/dev/null", curl_devnull)
    b.guarded(workload, "curl→file", curl_file)
    if local_file is not None:
        b.local_file(workload, lambda: read_sequential(local_file).as_dict())


def _users(b: Bench, workload: str, blob: Blob, wanted: str, *, gzip: bool) -> None:
    url = b.kit.blob_url(blob)

    def users() -> None:
        for streamed in (False, True):
            runs = []
            for _ in range(b.repeat):
                out_dir, blob_file = b.path("untar"), b.path("pulled.blob")
                drop_caches()
                try:
                    runs.append(b.metered(
                        lambda out_dir=out_dir, blob_file=blob_file, streamed=streamed: pull_untar(
                            url, out_dir, wanted, gzip=gzip, streamed=streamed, blob_file=blob_file),
                        children=True, size_key="wanted_bytes"))
                finally:
                    remove(out_dir)
                    remove(blob_file)
            b.record(workload, "curl|tar" if streamed else "pull+untar", "to the wanted file", runs)

    b.guarded(workload, "pull+untar", users)


# --- workloads ------------------------------------------------------------------------------


def seq(b: Bench) -> None:
    """Sequential read of the 4 GiB model file: cold, from kitfs' disk cache, from page cache."""
    kit, w = b.kit, "seq"
    log("workload: sequential read of the model file")
    _limits(b, w, kit.model, kit.local["model"])
    _users(b, w, kit.model, kit.model_path, gzip=False)

    def kitfs() -> None:
        b.kitfs_three_ways(w, lambda m: read_sequential(m.path / kit.model_path).as_dict(),
                           mount_time=True)

    def kitfs_verify_off() -> None:
        """Diagnostic, not a target: the same cold read without any digest check, which
        shows what verification costs (the targets are measured with it on)."""
        runs = []
        for _ in range(b.repeat):
            with b.kitfs(b.fresh_cache(), "--verify", "off") as m:
                r = b.measured_read(lambda m=m: read_sequential(m.path / kit.model_path).as_dict(),
                                    pid=m.pid)
                runs.append(r | {"peak_rss_mib": m.peak_rss_bytes() / MiB})
        b.record(w, "kitfs", "cold, --verify off (diagnostic)", runs)

    def peer() -> None:
        runs = []
        for _ in range(b.repeat):
            with b.ratarmount(kit.model, b.path("rindex")) as m:
                r = b.measured_read(lambda m=m: read_sequential(m.path / kit.model_path).as_dict(),
                                    pid=m.pid)
                r["mount_s"] = m.mount_s
                r["peak_rss_mib"] = m.peak_rss_bytes() / MiB
                runs.append(r)
        b.record(w, RATARMOUNT, "cold", runs)

    b.guarded(w, "kitfs", kitfs)
    b.guarded(w, "kitfs --verify off", kitfs_verify_off)
    b.guarded(w, RATARMOUNT, peer)
    b.guarded(w, FLOOR, lambda: verifying_floor(b, w, kit.model))
    b.guarded(w, PASSTHROUGH, lambda: passthrough(b, w, kit.local["model"]))


def verifying_floor(b: Bench, workload: str, blob: Blob) -> None:
    """benchmarks/floor.py on ``blob`` after the page cache is dropped: the fastest verified
    cold read in pure Python here (2 workers, 4 MiB ranges, one SHA-256, pwrite to a file next
    to the kitfs caches). Its CPU is its own (``os.times`` around the pipeline)."""
    runs = []
    for _ in range(b.repeat):
        cache_file = b.path("floor.cache")
        drop_caches()
        done = b.metered(lambda cache_file=cache_file: json.loads(run_quiet(
            [sys.executable, str(Path(__file__).with_name("floor.py")), b.kit.blob_url(blob),
             str(blob.size_bytes), str(cache_file), "--workers", "2"]).stdout))
        remove(cache_file)
        if done["digest"] != blob.digest:
            raise RuntimeError(f"floor read {done['digest']}, the blob is {blob.digest}")
        cpu_s = done.pop("cpu_s")  # the pipeline's own, without the interpreter's start
        runs.append(done | {"cpu_s": cpu_s, "cpu_s_per_gib": cpu_s / (blob.size_bytes / GiB),
                            "mb_s": mb_per_s(blob.size_bytes, done["elapsed_s"])})
    b.record(workload, FLOOR, "cold, 2 workers, sha256 + pwrite", runs)


def floors_parallel(b: Bench, blobs: list[Blob]) -> dict[str, float]:
    """One verifying floor (``floor.py``) per blob, all at once: what N verified cold reads
    reach here without FUSE; wall time to the last, CPU of all their pipelines together."""
    start = time.perf_counter()
    procs = [(blob, b.path(f"floor-{i}.cache"), subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("floor.py")), b.kit.blob_url(blob),
         str(blob.size_bytes), str(b.path(f"floor-{i}.cache")), "--workers", "2"],
        stdout=subprocess.PIPE, text=True)) for i, blob in enumerate(blobs)]
    cpu_s = 0.0
    for blob, cache_file, proc in procs:
        out, _ = proc.communicate()
        remove(cache_file)
        if proc.returncode != 0:
            raise RuntimeError(f"floor.py exited {proc.returncode}")
        done = json.loads(out)
        if done["digest"] != blob.digest:
            raise RuntimeError(f"floor read {done['digest']}, the blob is {blob.digest}")
        cpu_s += done["cpu_s"]
    elapsed_s = time.perf_counter() - start
    size_bytes = sum(blob.size_bytes for blob in blobs)
    return {"readers": len(blobs), "size_bytes": size_bytes, "elapsed_s": elapsed_s,
            "mb_s": mb_per_s(size_bytes, elapsed_s), "cpu_s": cpu_s,
            "cpu_s_per_gib": cpu_s / (size_bytes / GiB)}


def passthrough(b: Bench, workload: str, local_file: Path) -> None:
    """benchmarks/passfs.py over the local copy (read-ahead 1 MiB): a sequential read with the
    page cache dropped, then again from the page cache; the CPU of its process."""
    cold, page = [], []
    for _ in range(b.repeat):
        with Passthrough(local_file, b.scratch / "pmnt", b.scratch / "logs" / "passfs.log") as m:
            for runs, drop in ((cold, True), (page, False)):
                if drop:
                    drop_caches()
                runs.append(b.metered(lambda m=m: read_sequential(m.file).as_dict(), pid=m.pid))
    b.record(workload, PASSTHROUGH, "page cache dropped", cold)
    b.record(workload, PASSTHROUGH, "page cache warm", page)


def quota(b: Bench) -> None:
    """Stream the model file through a mount whose cache quota is smaller than the file:
    the cache's peak size (sampled every 0.1 s) and the daemon's peak RSS."""
    kit, w = b.kit, "quota"
    log(f"workload: streaming under a {b.quota_bytes / MiB:.0f} MiB cache quota")

    def kitfs() -> None:
        runs = []
        for _ in range(b.repeat):
            cache = b.fresh_cache()
            with b.kitfs(cache, "--cache-size", f"{b.quota_bytes // MiB}M") as m:
                drop_caches()
                mark = b.mark()
                chunks_dir = cache / "chunks"
                with Sampler(lambda d=chunks_dir: tree_bytes(d), 0.1) as chunks, \
                        Sampler(lambda d=cache: tree_bytes(d), 0.1) as whole:
                    r = b.metered(lambda m=m: read_sequential(m.path / kit.model_path).as_dict(),
                                  pid=m.pid)
                r |= b.fetched(mark, r["size_bytes"])
                r |= {"quota_bytes": b.quota_bytes, "peak_chunks_bytes": chunks.maximum,
                      "peak_cache_dir_bytes": whole.maximum, "samples": chunks.samples,
                      "peak_rss_mib": m.peak_rss_bytes() / MiB}
                runs.append(r)
        b.record(w, "kitfs", f"--cache-size {b.quota_bytes // MiB}M", runs)

    b.guarded(w, "kitfs", kitfs)


def ttfb(b: Bench) -> None:
    """Time from open() to the first 4 KiB, with the layer index not cached and cached; and what
    a lone 4 KiB read in the middle of the layer fetches."""
    kit, w = b.kit, "ttfb"
    log("workload: open to first byte")
    size = kit.local["model"].stat().st_size
    middle = (size // 2) // 4096 * 4096
    other = (size // 4) // 4096 * 4096

    def kitfs() -> None:
        first_mount, mid_read, cached_index, cached_all = [], [], [], []
        for _ in range(b.repeat):
            cache = b.fresh_cache()
            with b.kitfs(cache) as m:
                target = m.path / kit.model_path
                drop_caches()
                mark = b.mark()
                r = open_to_first_byte(target, 0)
                first_mount.append(r | b.fetched(mark, r["size_bytes"]))
                mark = b.mark()
                r = open_to_first_byte(target, middle)
                mid_read.append(r | b.fetched(mark, r["size_bytes"]))
            with b.kitfs(cache) as m:
                target = m.path / kit.model_path
                drop_caches()
                mark = b.mark()
                r = open_to_first_byte(target, other)
                cached_index.append(r | b.fetched(mark, r["size_bytes"]))
                drop_caches()
                mark = b.mark()
                r = open_to_first_byte(target, 0)
                cached_all.append(r | b.fetched(mark, r["size_bytes"]))
        b.record(w, "kitfs", "index not cached", first_mount)
        b.record(w, "kitfs", "4 KiB mid-layer read", mid_read)
        b.record(w, "kitfs", "index cached", cached_index)
        b.record(w, "kitfs", "index+chunk cached", cached_all)

    def limits() -> None:
        url = kit.blob_url(kit.model)
        curl_runs, local_runs = [], []
        for _ in range(b.repeat):
            drop_caches()
            done = subprocess.run(["curl", "-sSf", "-r", f"{middle}-{middle + 4095}", "-o", "/dev/null",
                                   "-w", "%{time_starttransfer} %{time_total}", url],
                                  capture_output=True, text=True, check=True)
            first_s, total_s = (float(x) for x in done.stdout.split())
            curl_runs.append({"first_byte_ms": first_s * 1e3, "elapsed_ms": total_s * 1e3})
            drop_caches()
            local_runs.append(open_to_first_byte(kit.local["model"], middle))
        b.record(w, "curl→/dev/null", "4 KiB range", curl_runs)
        b.record(w, "local file", "page cache dropped", local_runs)

    def peer() -> None:
        runs = []
        for _ in range(b.repeat):
            with b.ratarmount(kit.model, b.path("rindex")) as m:
                drop_caches()
                mark = b.mark()
                r = open_to_first_byte(m.path / kit.model_path, middle)
                runs.append(r | b.fetched(mark, r["size_bytes"]) | {"mount_s": m.mount_s})
        b.record(w, RATARMOUNT, "after mount", runs)

    b.guarded(w, "kitfs", kitfs)
    b.guarded(w, "limits", limits)
    b.guarded(w, RATARMOUNT, peer)


def random_io(b: Bench) -> None:
    """Random 4 KiB and 1 MiB os.pread over the model file (fixed seed)."""
    kit = b.kit
    log(f"workload: {b.random_read_count} random reads of 4 KiB and 1 MiB")
    file_size = kit.local["model"].stat().st_size
    for block in (4096, MiB):
        label = "4KiB" if block == 4096 else "1MiB"
        offsets = random_offsets(file_size, block, b.random_read_count, seed=42)

        def kitfs(block: int = block, label: str = label, offsets: list[int] = offsets) -> None:
            b.kitfs_three_ways(  # the layer indexed first (a stat): this measures the reads
                f"random-{label}", lambda m: random_reads(m.path / kit.model_path, offsets, block),
                before=lambda m: (m.path / kit.model_path).stat())

        def peer(block: int = block, label: str = label, offsets: list[int] = offsets) -> None:
            runs = []
            for _ in range(b.repeat):
                with b.ratarmount(kit.model, b.path("rindex")) as m:
                    target = m.path / kit.model_path
                    target.stat()
                    runs.append(b.measured_read(
                        lambda target=target, offsets=offsets, block=block: random_reads(
                            target, offsets, block), pid=m.pid))
            b.record(f"random-{label}", RATARMOUNT, "cold", runs)

        b.guarded(f"random-{label}", "kitfs", kitfs)
        b.local_file(f"random-{label}", lambda block=block, offsets=offsets: random_reads(
            kit.local["model"], offsets, block))
        b.guarded(f"random-{label}", RATARMOUNT, peer)
    isolated_reads(b, "random-4KiB", b.kitfs, kit.blob_url(kit.model))


def isolated_reads(b: Bench, workload: str, mount: Callable[[Path], KitfsMount], url: str,
                   prefix: tuple[str, ...] = ()) -> None:
    """Isolated 4 KiB reads of the model file, cold: a fresh cache, the layer indexed, the page
    cache dropped, then one read in each of ``ISOLATED_READS`` equal slots of the file (at most
    one per 16 MiB) in shuffled order, so none is served by what another fetched: bytes fetched
    per read (the registry's log), p50/p99; against one curl (after ``prefix``) of the same
    4 KiB ranges on one keep-alive connection, page cache dropped."""
    size = b.kit.local["model"].stat().st_size
    offsets = isolated_offsets(size, max(2, min(ISOLATED_READS, size // (16 * MiB))), seed=43)

    def kitfs() -> None:
        runs = []
        for _ in range(b.repeat):
            with mount(b.fresh_cache()) as m:
                target = m.path / b.kit.model_path
                target.stat()  # index the layer first: this measures the reads
                r = b.measured_read(lambda target=target: random_reads(target, offsets, 4096),
                                    pid=m.pid)
                runs.append(r | {"fetched_per_read_kib": r["fetched_bytes"] / len(offsets) / 1024})
        b.record(workload, "kitfs", "isolated reads, cold", runs)

    def curl() -> None:
        runs = []
        for _ in range(b.repeat):
            drop_caches()
            runs.append(curl_ranges(url, offsets, 4096, prefix))
        b.record(workload, "curl→/dev/null", "same 4 KiB ranges, keep-alive", runs)

    b.guarded(workload, "kitfs isolated", kitfs)
    b.guarded(workload, "curl ranges", curl)


def find_dataset(b: Bench) -> None:
    """``find -printf '%s %m'`` (a stat of every entry) over the small-files dataset layer."""
    kit, w = b.kit, "find"
    log(f"workload: find + stat over {kit.dataset_entries} entries")
    _limits(b, w, kit.dataset, None)

    def kitfs() -> None:
        first, warm, remount = [], [], []
        for _ in range(b.repeat):
            cache = b.fresh_cache()
            with b.kitfs(cache) as m:
                r = b.measured_read(lambda m=m: find_stat(m.path / kit.dataset_path), pid=m.pid,
                                    read_bytes=kit.dataset.size_bytes)
                r |= {"mount_s": m.mount_s, "peak_rss_mib": m.peak_rss_bytes() / MiB}
                first.append(r)
                mark = b.mark()
                r = find_stat(m.path / kit.dataset_path)
                warm.append(r | b.fetched(mark, kit.dataset.size_bytes))
            with b.kitfs(cache) as m:
                r = b.measured_read(lambda m=m: find_stat(m.path / kit.dataset_path), pid=m.pid,
                                    read_bytes=kit.dataset.size_bytes)
                r |= {"mount_s": m.mount_s, "peak_rss_mib": m.peak_rss_bytes() / MiB}
                remount.append(r)
        b.record(w, "kitfs", "first mount", first)
        b.record(w, "kitfs", "same mount again", warm)
        b.record(w, "kitfs", "remount (index cached)", remount)

    def users() -> None:
        runs = []
        url = kit.blob_url(kit.dataset)
        for _ in range(b.repeat):
            out_dir, blob_file = b.path("untar"), b.path("pulled.blob")
            drop_caches()
            try:
                r = pull_untar(url, out_dir, "data/files/d000/f000000.bin", gzip=False, streamed=False,
                               blob_file=blob_file)
                found = find_stat(out_dir / kit.dataset_path)
                runs.append({"elapsed_s": r["elapsed_s"] + found["elapsed_s"], "pull_s": r["pull_s"],
                             "entries": found["entries"]})
            finally:
                remove(out_dir)
                remove(blob_file)
        b.record(w, "pull+untar", "then find", runs)

    def peer() -> None:
        first, again = [], []
        for _ in range(b.repeat):
            index_dir = b.path("rindex")
            for runs in (first, again):
                drop_caches()
                mark = b.mark()
                with b.ratarmount(kit.dataset, index_dir) as m:
                    r = find_stat(m.path / kit.dataset_path)
                    r["find_s"] = r["elapsed_s"]
                    r["mount_s"] = m.mount_s
                    r["elapsed_s"] += m.mount_s  # ratarmount reads the whole tar to mount
                    r |= b.fetched(mark, kit.dataset.size_bytes)
                    runs.append(r)
        b.record(w, RATARMOUNT, "first mount (mount+find)", first)
        b.record(w, RATARMOUNT, "remount, index kept", again)

    def floor() -> None:
        """The pyfuse3 floor of this walk: the same tree answered from memory (passfs.py
        --tree, its attributes made at start), page cache, dentries and inodes dropped."""
        runs = []
        for _ in range(b.repeat):
            with Passthrough(kit.local["dataset"], b.scratch / "ptree",
                             b.scratch / "logs" / "passfs-tree.log", tree=True) as m:
                drop_caches()
                runs.append(b.metered(lambda m=m: find_stat(m.path), pid=m.pid))
        b.record(w, PASSTHROUGH, "tree from memory, page cache dropped", runs)

    b.guarded(w, "kitfs", kitfs)
    b.local_file(w, lambda: find_stat(kit.local["dataset"]))
    b.guarded(w, PASSTHROUGH, floor)
    b.guarded(w, "pull+untar", users)
    b.guarded(w, RATARMOUNT, peer)


def load_safetensors(path: Path) -> dict[str, float]:
    """Load every tensor of a safetensors file with ``safe_open`` (numpy)."""
    from safetensors import safe_open

    start = time.perf_counter()
    total = 0
    count = 0
    with safe_open(str(path), framework="numpy") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            total += f.get_tensor(name).nbytes
            count += 1
    elapsed_s = time.perf_counter() - start
    return {"tensors": count, "size_bytes": total, "elapsed_s": elapsed_s, "mb_s": mb_per_s(total, elapsed_s)}


def safetensors(b: Bench) -> None:
    kit, w = b.kit, "safetensors"
    log("workload: safe_open + get_tensor of every tensor")

    def kitfs() -> None:
        b.kitfs_three_ways(w, lambda m: load_safetensors(m.path / kit.model_path))

    b.guarded(w, "kitfs", kitfs)
    b.local_file(w, lambda: load_safetensors(kit.local["model"]))


def concurrent(b: Bench) -> None:
    """1, 2 and 4 readers at once, each reading a different part file front to back."""
    kit, w = b.kit, "concurrent"
    log("workload: concurrent readers of different files")
    for n in (1, 2, 4):
        if n > len(kit.parts):
            break

        def kitfs(n: int = n) -> None:
            runs = []
            for _ in range(b.repeat):
                with b.kitfs(b.fresh_cache()) as m:
                    paths = [m.path / kit.part_path(i) for i in range(n)]
                    # each reader's open() indexes its layer: counted and timed
                    r = b.measured_read(lambda paths=paths: read_many_concurrently(paths), pid=m.pid)
                    r["peak_rss_mib"] = m.peak_rss_bytes() / MiB
                    runs.append(r)
            b.record(w, "kitfs", f"{n} readers, cold", runs, readers=n)

        def limits(n: int = n) -> None:
            curl_runs, local_runs, floor_runs = [], [], []
            for _ in range(b.repeat):
                drop_caches()
                curl_runs.append(b.metered(lambda n=n: curl_parallel([kit.blob_url(kit.parts[i])
                                                                      for i in range(n)]), children=True))
                drop_caches()
                local_runs.append(read_many_concurrently([kit.local[f"part-{i}"] for i in range(n)]))
                drop_caches()
                floor_runs.append(floors_parallel(b, kit.parts[:n]))
            b.record(w, "curl→/dev/null", f"{n} readers", curl_runs, readers=n)
            b.record(w, "local file", f"{n} readers, page cache dropped", local_runs, readers=n)
            b.record(w, FLOOR, f"{n} readers", floor_runs, readers=n)

        b.guarded(w, "kitfs", kitfs)
        b.guarded(w, "limits", limits)

    def one_file() -> None:
        """4 readers of the same file at once: every fetch should be shared (fetched ÷ file)."""
        runs = []
        for _ in range(b.repeat):
            with b.kitfs(b.fresh_cache()) as m:
                path = m.path / kit.part_path(0)
                r = b.measured_read(lambda path=path: read_many_concurrently([path] * 4), pid=m.pid,
                                    read_bytes=kit.parts[0].size_bytes)
                runs.append(r | {"peak_rss_mib": m.peak_rss_bytes() / MiB})
        b.record(w, "kitfs", "4 readers of one file, cold", runs, readers=4)

    b.guarded(w, "kitfs one file", one_file)


def raw_layer(b: Bench) -> None:
    """Sequential read of the raw layer's file (the blob is the file)."""
    kit, w = b.kit, "raw"
    log("workload: raw layer")
    _limits(b, w, kit.raw, kit.local["raw"])

    def kitfs() -> None:
        b.kitfs_three_ways(w, lambda m: read_sequential(m.path / kit.raw_path).as_dict(),
                           memory=False)

    b.guarded(w, "kitfs", kitfs)


def _random_1mib_reads(path: Path, count: int, seed: int) -> dict[str, float]:
    size = path.stat().st_size
    return random_reads(path, random_offsets(size, MiB, count, seed), MiB)


def gzip_layer(b: Bench) -> None:
    """The gzip layer: the first read of its last file, then 1 MiB reads anywhere in it after
    the first pass (page cache dropped), after a remount, and after the cache evicted part of it."""
    kit, w = b.kit, "gzip"
    log("workload: gzip layer")
    last = f"{kit.text_path}/{kit.text_names[-1]}"
    middle = f"{kit.text_path}/{kit.text_names[len(kit.text_names) // 2]}"
    reads = 20
    _limits(b, w, kit.text, None)
    _users(b, w, kit.text, last, gzip=True)

    def local() -> None:
        runs = []
        for _ in range(b.repeat):
            drop_caches()
            runs.append(read_sequential(kit.local["text"] / kit.text_names[-1]).as_dict())
        b.record(w, "local file", "last file, page cache dropped", runs)

    def kitfs() -> None:
        first_pass, anywhere, remount = [], [], []
        for _ in range(b.repeat):
            cache = b.fresh_cache()
            with b.kitfs(cache) as m:
                first_pass.append(b.measured_read(
                    lambda m=m: read_sequential(m.path / last).as_dict(), pid=m.pid))
                drop_caches()
                mark = b.mark()
                r = _random_1mib_reads(m.path / middle, reads, seed=7)
                anywhere.append(r | b.fetched(mark, r["size_bytes"]))
            with b.kitfs(cache) as m:
                drop_caches()
                mark = b.mark()
                r = _random_1mib_reads(m.path / middle, reads, seed=8)
                remount.append(r | b.fetched(mark, r["size_bytes"]))
        b.record(w, "kitfs", "first read of the last file", first_pass)
        b.record(w, "kitfs", "1 MiB reads after first pass", anywhere)
        b.record(w, "kitfs", "1 MiB reads after remount", remount)

    def kitfs_quota() -> None:
        text_bytes = len(kit.text_names) * kit.local["text"].joinpath(kit.text_names[0]).stat().st_size
        quota_mib = max(8, text_bytes // MiB // 4)
        runs = []
        for _ in range(b.repeat):
            cache = b.fresh_cache()
            with b.kitfs(cache, "--cache-size", f"{quota_mib}M") as m:
                read_sequential(m.path / last)
            # A new daemon on the same cache, nothing of the layer in its memory, reads 1 MiB in
            # the middle of the middle file (half the layer before it): a chunk evicted under the
            # quota (not one holding a header, which the index scan touched again), so it must
            # be made again from a checkpoint, not by decompressing half the layer.
            with b.kitfs(cache, "--cache-size", f"{quota_mib}M") as m:
                drop_caches()
                mark = b.mark()
                inside = (m.path / middle).stat().st_size // 2 // 4096 * 4096
                r = open_to_first_byte(m.path / middle, inside, MiB)
                runs.append(r | b.fetched(mark, r["size_bytes"]) | {"quota_mib": quota_mib})
        b.record(w, "kitfs", "1 MiB read after eviction, new daemon", runs)

    def peer() -> None:
        first_pass, anywhere, remount = [], [], []
        for _ in range(b.repeat):
            index_dir = b.path("rindex")
            drop_caches()
            mark = b.mark()
            with b.ratarmount(kit.text, index_dir) as m:
                r = read_sequential(m.path / last).as_dict()
                r["elapsed_s"] += m.mount_s
                r["mount_s"] = m.mount_s
                r["mb_s"] = mb_per_s(r["size_bytes"], r["elapsed_s"])
                first_pass.append(r | b.fetched(mark, r["size_bytes"]))
                drop_caches()
                mark = b.mark()
                r = _random_1mib_reads(m.path / middle, reads, seed=7)
                anywhere.append(r | b.fetched(mark, r["size_bytes"]))
            with b.ratarmount(kit.text, index_dir) as m:
                drop_caches()
                mark = b.mark()
                r = _random_1mib_reads(m.path / middle, reads, seed=8)
                remount.append(r | b.fetched(mark, r["size_bytes"]) | {"mount_s": m.mount_s})
        b.record(w, RATARMOUNT, "mount + read last file", first_pass)
        b.record(w, RATARMOUNT, "1 MiB reads after first pass", anywhere)
        b.record(w, RATARMOUNT, "1 MiB reads after remount", remount)

    b.guarded(w, "local file", local)
    b.guarded(w, "kitfs", kitfs)
    b.guarded(w, "kitfs quota", kitfs_quota)
    b.guarded(w, RATARMOUNT, peer)


def profile_seq(b: Bench, out_dir: Path) -> dict[str, Any]:
    """One cold sequential read of the model file with py-spy attached to the daemon, twice:
    the raw collapsed stacks (summarised as the top frames) and a flame graph (SVG). Native
    frames (C: hashlib, pyfuse3, the kernel boundary) are sampled too where py-spy can."""
    log("profile: py-spy on a cold sequential read")
    summary: dict[str, Any] = {}
    for fmt, out in (("raw", out_dir / "profile-seq.txt"), ("flamegraph", out_dir / "profile-seq.svg")):
        for native in (True, False):
            read, err = _profiled_read(b, fmt, out, native)
            if out.exists() and out.stat().st_size > 0:
                summary[f"{fmt}_read"] = read | {"native": native}
                break
            log(f"  py-spy {'--native ' if native else ''}wrote nothing: {err[-300:]}")
        else:
            raise RuntimeError(f"py-spy wrote no {out.name}")
    summary |= summarise_collapsed(out_dir / "profile-seq.txt")
    return summary


def profile_find(b: Bench, out_dir: Path) -> dict[str, Any]:
    """The first ``find`` over the small-files layer on a fresh cache, with py-spy attached to
    the daemon (collapsed stacks with native frames, ``profile-find.txt``)."""
    log("profile: py-spy on the first find over the small-files layer")
    out = out_dir / "profile-find.txt"
    out.unlink(missing_ok=True)
    py_spy = str(Path(sys.executable).parent / "py-spy")
    with b.kitfs(b.fresh_cache()) as m:
        drop_caches()
        spy = subprocess.Popen([py_spy, "record", "--pid", str(m.pid), "--rate", "100", "--threads",
                                "--native", "--format", "raw", "-o", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        found = find_stat(m.path / b.kit.dataset_path)
        spy.send_signal(2)
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
    if not out.exists():
        raise RuntimeError(f"py-spy wrote no {out.name}: {err[-500:]}")
    return {"find": found} | summarise_collapsed(out)


def _profiled_read(b: Bench, fmt: str, out: Path, native: bool) -> tuple[dict[str, float], str]:
    py_spy = str(Path(sys.executable).parent / "py-spy")
    out.unlink(missing_ok=True)
    with b.kitfs(b.fresh_cache()) as m:
        target = m.path / b.kit.model_path
        target.stat()
        drop_caches()
        spy = subprocess.Popen([py_spy, "record", "--pid", str(m.pid), "--rate", "100", "--threads",
                                *(["--native"] if native else []), "--format", fmt, "-o", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # py-spy attaches
        read = read_sequential(target).as_dict()
        spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        try:
            _, err = spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
    return read, err


def _function(frame: str) -> str:
    """``name (file.py:123)`` → ``name (file.py)``: one entry per function, not per line."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rstrip(')')})" if where else name


_OUTER = ("<module> (", "main (kitfs/cli.py)", "_mount (", "run_foreground (")


def summarise_collapsed(path: Path, top: int = 15) -> dict[str, Any]:
    """From py-spy's collapsed stacks (``--format raw``), as shares of all samples:

    - ``top_python``: the deepest Python function of each sample (time in it and in the C code
      it calls: hashing, syscalls), per function;
    - ``top_native``: the leaf frame of each sample (with ``--native``: the C function or syscall);
    - ``top_inclusive``: kitfs and pyfuse3 functions, inclusive of everything below them.
    """
    python: dict[str, int] = {}
    native: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";")
                  if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if any(f.startswith("WorkerThread._work") for f in frames) and any(
                f.startswith("PyThread_acquire_lock") for f in frames):
            idle += count  # an idle trio worker thread waiting for a job: not work
            continue
        total += count
        native[frames[-1]] = native.get(frames[-1], 0) + count
        py_frames = [f for f in frames if ".py)" in f]
        if py_frames:
            python[py_frames[-1]] = python.get(py_frames[-1], 0) + count
        for frame in set(py_frames):
            if ("kitfs/" in frame or "pyfuse3" in frame) and not frame.startswith(_OUTER):
                inclusive[frame] = inclusive.get(frame, 0) + count

    def top_of(counts: dict[str, int]) -> list[dict[str, Any]]:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [{"frame": f, "samples": c, "share": c / total if total else 0.0} for f, c in ranked]

    return {"samples": total, "idle_worker_samples": idle, "top_python": top_of(python),
            "top_native": top_of(native), "top_inclusive": top_of(inclusive)}


WORKLOADS: dict[str, Callable[[Bench], None]] = {
    "seq": seq,
    "ttfb": ttfb,
    "random": random_io,
    "find": find_dataset,
    "safetensors": safetensors,
    "concurrent": concurrent,
    "raw": raw_layer,
    "gzip": gzip_layer,
    "quota": quota,
}
