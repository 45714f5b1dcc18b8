"""The remote-registry profile: the same registry, reached over a slow, capped link.

What it owns: a private network namespace (``unshare -n``) whose loopback is capped by the
kernel's token bucket (``tc qdisc … tbf``, 100 MB/s ≈ 0.8 Gbit/s), the delaying proxy
(benchmarks/delayproxy.py: +20 ms on every answer) listening inside it and forwarding to the
registry on the host's loopback, and the ``remote`` workload, whose kitfs daemons and curls run
inside the namespace (``nsenter --net``), so every byte they fetch crosses the capped link
and every request waits the proxy's delay. The reader (this process) reads the FUSE mount as
usual: mounts are not in the network namespace. netem is not in this kernel, so the latency
comes from the proxy, per request, not per packet.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from bench import Bench
from common import drop_caches, find_stat, log, read_sequential, run_quiet
from mounts import KitfsMount
from peers import curl_ranges, curl_to
from workloads import isolated_reads

from kitfs.mount.status import wait_exit

LINK_BYTES_PER_S = 100_000_000  # 0.8 Gbit/s: a fast network, well below loopback
DELAY_MS = 20.0
TBF_BURST_BYTES = 1 << 20  # ≥ rate / HZ, or tbf cannot reach its rate
TBF_QUEUE_MS = 50


class NetNamespace:
    """A network namespace held by ``unshare -n sleep infinity`` (stopped by its PID), its
    loopback up and capped with tbf. ``prefix`` runs a command inside it."""

    def __init__(self, rate_bytes_per_s: int) -> None:
        self.rate_bytes_per_s = rate_bytes_per_s
        self.holder: subprocess.Popen[bytes] | None = None

    @property
    def path(self) -> str:
        assert self.holder is not None
        return f"/proc/{self.holder.pid}/ns/net"

    @property
    def prefix(self) -> tuple[str, ...]:
        return ("nsenter", f"--net={self.path}")

    def __enter__(self) -> NetNamespace:
        self.holder = subprocess.Popen(["unshare", "-n", "sleep", "infinity"], stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        try:
            own = os.readlink("/proc/self/ns/net")
            for _ in range(500):  # unshare has exec'd sleep once the namespace differs from ours
                try:
                    if os.readlink(self.path) != own:
                        break
                except FileNotFoundError:
                    pass
                time.sleep(0.01)
            else:
                raise RuntimeError("unshare -n made no network namespace")
            run_quiet([*self.prefix, "ip", "link", "set", "lo", "up"])
            run_quiet([*self.prefix, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
                       "rate", f"{self.rate_bytes_per_s * 8}bit", "burst", str(TBF_BURST_BYTES),
                       "latency", f"{TBF_QUEUE_MS}ms"])
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.holder is not None:
            self.holder.terminate()
            self.holder.wait(timeout=10)
            self.holder = None


class DelayProxy:
    """benchmarks/delayproxy.py as a child process, listening in ``netns``; stopped by its PID."""

    def __init__(self, upstream: str, delay_ms: float, netns: str) -> None:
        self.upstream = upstream
        self.delay_ms = delay_ms
        self.netns = netns
        self.process: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def __enter__(self) -> DelayProxy:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("delayproxy.py")), self.upstream,
             "--delay-ms", str(self.delay_ms), "--netns", self.netns],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            self.__exit__(None, None, None)
            raise RuntimeError(f"the delaying proxy did not start: {line!r}")
        self.port = int(line)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process is not None:
            self.process.terminate()
            if not wait_exit(self.process.pid, 10):
                self.process.kill()
            self.process.wait()
            self.process = None


def remote_profile(b: Bench) -> None:
    """On the remote profile: a cold sequential read of the model file against one curl of the
    whole blob; isolated 4 KiB reads against curls of the same ranges (the round trip); the
    first ``find`` over the small-files layer against a curl of that layer. kitfs is mounted
    against the proxy's address with ``--plain-http``; CPU of the daemon or curl, the registry
    and the proxy."""
    kit, w = b.kit, "remote"
    log(f"workload: remote registry profile (+{DELAY_MS:.0f} ms per answer, "
        f"{LINK_BYTES_PER_S / 1e6:.0f} MB/s link)")
    with NetNamespace(LINK_BYTES_PER_S) as net, DelayProxy(b.registry.host, DELAY_MS, net.path) as proxy:
        host = f"127.0.0.1:{proxy.port}"
        reference = f"{host}/{kit.repository}:v1"

        def url(blob_digest: str) -> str:
            return f"http://{host}/v2/{kit.repository}/blobs/{blob_digest}"

        def mount(cache: Path) -> KitfsMount:
            return b.kitfs(cache, "--plain-http", name="remote-mnt", reference=reference, prefix=net.prefix)

        def curl_whole(blob_digest: str, variant: str) -> None:
            runs = []
            for _ in range(b.repeat):
                drop_caches()
                runs.append(b.metered(lambda: curl_to(url(blob_digest), "/dev/null", net.prefix),
                                      children=True, proxy_cpu=proxy.pid))
            b.record(w, "curl→/dev/null", variant, runs)

        def seq() -> None:
            runs = []
            for _ in range(b.repeat):
                with mount(b.fresh_cache()) as m:
                    drop_caches()
                    mark = b.mark()
                    r = b.metered(lambda m=m: read_sequential(m.path / kit.model_path).as_dict(),
                                  pid=m.pid, proxy_cpu=proxy.pid)
                    runs.append(r | b.fetched(mark, r["size_bytes"]) | {"mount_s": m.mount_s})
            b.record(w, "kitfs", "cold sequential", runs)

        def listing() -> None:
            runs = []
            for _ in range(b.repeat):
                with mount(b.fresh_cache()) as m:
                    drop_caches()
                    mark = b.mark()
                    r = b.metered(lambda m=m: find_stat(m.path / kit.dataset_path), pid=m.pid,
                                  proxy_cpu=proxy.pid)
                    runs.append(r | b.fetched(mark, kit.dataset.size_bytes) | {"mount_s": m.mount_s})
            b.record(w, "kitfs", "first find, small-files layer", runs)

        def round_trip() -> None:
            runs = []
            for _ in range(b.repeat):
                drop_caches()
                offset = kit.model.size_bytes // 2 // 4096 * 4096
                runs.append(curl_ranges(url(kit.model.digest), [offset], 4096, net.prefix))
            b.record(w, "curl→/dev/null", "one 4 KiB range, new connection", runs)

        b.guarded(w, "curl seq", lambda: curl_whole(kit.model.digest, "whole model blob, cold"))
        b.guarded(w, "kitfs seq", seq)
        b.guarded(w, "curl round trip", round_trip)
        isolated_reads(b, w, mount, url(kit.model.digest), net.prefix)
        b.guarded(w, "curl listing", lambda: curl_whole(kit.dataset.digest, "whole small-files layer, cold"))
        b.guarded(w, "kitfs listing", listing)
