"""The workloads: each reads the same bytes through kitfs and through its comparisons.

Every workload appends result records to ``Bench.results``::

    {"workload": "seq", "system": "kitfs", "variant": "cold", "runs": [{...}, ...], "median": {...}}

``system`` is one of: ``kitfs``; the limits ``curl→/dev/null``, ``curl→file``, ``local file``,
``verifying floor`` (benchmarks/floor.py) and ``pyfuse3 pass-through`` (benchmarks/passfs.py);
what users do today, ``pull+untar`` (curl the blob to a file, then ``tar -x``, as ``kit unpack``
does) and ``curl|tar`` (streamed); the peer ``ratarmount (HTTP)``.
How runs are repeated, what "cold" means and the CPU beside each figure: benchmarks/bench.py.
The commands compared with: benchmarks/peers.py; the profiles: benchmarks/profiles.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import Bench
from common import (
    GiB,
    MiB,
    Sampler,
    drop_caches,
    find_stat,
    isolated_offsets,
    log,
    mb_per_s,
    open_to_first_byte,
    random_offsets,
    random_reads,
    read_many_concurrently,
    read_sequential,
    run_quiet,
    touch_guest_memory,
    tree_bytes,
)
from kits import Blob, remove
from mounts import KitfsMount, Passthrough
from peers import curl_parallel, curl_ranges, curl_to, pull_untar

RATARMOUNT = "ratarmount (HTTP)"
FLOOR = "verifying floor"
PASSTHROUGH = "pyfuse3 pass-through"
MEMORY_TOUCHED = "cold, guest memory touched first (diagnostic)"
ISOLATED_READS = 50  # isolated random reads per run, fewer on a small file (one per 16 MiB)


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

    def kitfs_cold(variant: str, *args: str, touch_memory: bool = False) -> None:
        """A diagnostic, not a target: the cold read on a fresh cache and mount, with
        ``args`` (the targets are measured by ``kitfs`` above)."""
        runs = []
        for _ in range(b.repeat):
            with b.kitfs(b.fresh_cache(), *args) as m:
                r = b.measured_read(lambda m=m: read_sequential(m.path / kit.model_path).as_dict(),
                                    pid=m.pid, touch_memory=touch_memory)
                runs.append(r | {"peak_rss_mib": m.peak_rss_bytes() / MiB})
        b.record(w, "kitfs", variant, runs)

    def kitfs_verify_off() -> None:
        """Without any digest check: what verification costs."""
        kitfs_cold("cold, --verify off (diagnostic)", "--verify", "off")

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

    def memory_touched() -> None:
        """kitfs cold and the verifying floor, each right after ``touch_guest_memory`` (this
        VM's host faults on memory the guest freed, apart)."""
        kitfs_cold(MEMORY_TOUCHED, touch_memory=True)
        verifying_floor(b, w, kit.model, touched=True)

    b.guarded(w, "kitfs", kitfs)
    b.guarded(w, "kitfs --verify off", kitfs_verify_off)
    b.guarded(w, RATARMOUNT, peer)
    b.guarded(w, FLOOR, lambda: verifying_floor(b, w, kit.model))
    b.guarded(w, PASSTHROUGH, lambda: passthrough(b, w, kit.local["model"]))
    b.guarded(w, "guest memory touched", memory_touched)


def verifying_floor(b: Bench, workload: str, blob: Blob, touched: bool = False) -> None:
    """benchmarks/floor.py on ``blob`` after the page cache is dropped: the fastest verified
    cold read in pure Python here (2 workers, 4 MiB ranges, one SHA-256, pwrite to a file next
    to the kitfs caches). Its CPU is its own (``os.times`` around the pipeline). ``touched``:
    ``touch_guest_memory`` first (a diagnostic row)."""
    runs = []
    for _ in range(b.repeat):
        cache_file = b.path("floor.cache")
        drop_caches()
        if touched:
            touch_guest_memory()
        done = b.metered(lambda cache_file=cache_file: json.loads(run_quiet(
            [sys.executable, str(Path(__file__).with_name("floor.py")), b.kit.blob_url(blob),
             str(blob.size_bytes), str(cache_file), "--workers", "2"]).stdout))
        remove(cache_file)
        if done["digest"] != blob.digest:
            raise RuntimeError(f"floor read {done['digest']}, the blob is {blob.digest}")
        cpu_s = done.pop("cpu_s")  # the pipeline's own, without the interpreter's start
        runs.append(done | {"cpu_s": cpu_s, "cpu_s_per_gib": cpu_s / (blob.size_bytes / GiB),
                            "mb_s": mb_per_s(blob.size_bytes, done["elapsed_s"])})
    b.record(workload, FLOOR, MEMORY_TOUCHED if touched else "cold, 2 workers, sha256 + pwrite",
             runs)


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
