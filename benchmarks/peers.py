"""The commands kitfs is compared with, timed: curl of a blob (whole, to a file or to
/dev/null; ranges on one keep-alive connection; N at once) and what users do today, pull+untar
(curl the blob to a file, then ``tar -x``, as ``kit unpack`` does) and ``curl|tar`` (streamed).
Each returns its figures as a dict; ``Bench.metered`` adds their CPU.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from common import first_data_watch, mb_per_s, percentile


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
