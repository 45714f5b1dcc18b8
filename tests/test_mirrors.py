"""Registry mirrors (README "Mirrors"), with real components: the registry, a second
distribution registry as its pull-through cache (``proxy: remoteurl:``), and a hosts.toml
that names it. Both registries' own logs are the witnesses; requests kitfs made are told from
the mirror's own (to the registry) by their User-Agent.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from kitfs.demo import Entry, Layer, Pusher, Registry, push_entries, tar_layer
from kitfs.format.digest import Digest
from kitfs.format.hosts import parse_hosts_toml
from kitfs.format.mediatypes import KIT
from kitfs.remote.registry import RegistryClient, RegistryConfig
from tests.faultproxy import FaultProxy, Rule, issue, make_ca, running, server_context
from tests.mounts import Mounter

MiB = 1024 * 1024
PIECE = 128 * 1024
KITFS = "kitfs/"  # the User-Agent of kitfs' requests (a mirror's own requests have Go's)


@dataclass
class Kit:
    reference: str
    repository: str
    weights: bytes
    layers: list[Layer]

    @property
    def model(self) -> Layer:
        return self.layers[0]


def push_kit(pusher: Pusher, host: str, name: str, weights: bytes) -> Kit:
    """A raw weights file (one layer, read without any index) and a small tar of code."""
    model = Layer(f"{KIT}.model.v1.raw", weights, {"org.cncf.model.filepath": "model.bin"})
    code = tar_layer("code", {"src/train.py": b"print('train')\n"}, "src")
    repository = f"mirrors/{name}"
    push_entries(pusher, f"{host}/{repository}:v1", [Entry("model", {"path": "model.bin"}, model),
                                                     Entry("code", {"path": "src"}, code)],
                 package={})
    return Kit(f"{host}/{repository}:v1", repository, weights, [model, code])


@pytest.fixture
def mirror(registry: Registry, tmp_path: Path) -> Iterator[Registry]:
    """A pull-through cache of the test registry, empty (cold)."""
    own = Registry(tmp_path / "mirror", proxy_of=registry.host).start()
    try:
        yield own
    finally:
        own.stop()


def hosts_dir(tmp_path: Path, registry: str, mirror: str, capabilities: str = '"pull", "resolve"'
              ) -> Path:
    """A hosts directory where ``registry`` has ``mirror`` in front of it, as containerd reads it."""
    directory = tmp_path / "certs.d"
    (directory / registry).mkdir(parents=True, exist_ok=True)
    (directory / registry / "hosts.toml").write_text(
        f'server = "http://{registry}"\n\n'
        f'[host."http://{mirror}"]\n  capabilities = [{capabilities}]\n')
    return directory


def warm(mirror: Registry, repository: str, digest: str) -> None:
    """Have the mirror pull a blob through and store it (as a first node's pull would)."""
    with urllib.request.urlopen(f"http://{mirror.host}/v2/{repository}/blobs/{digest}",
                                timeout=30) as answer:
        answer.read()
    wait_until_stored(mirror, digest)


def wait_until_stored(mirror: Registry, digest: str) -> None:
    deadline = time.monotonic() + 30
    while not mirror.blob_file(digest).exists():
        assert time.monotonic() < deadline, f"the mirror did not store {digest} in 30 s"
        time.sleep(0.05)


def kitfs_blob_requests(registry: Registry, since: int) -> list[tuple[str, str, int]]:
    return [r for r in registry.requests(since, agent=KITFS) if "/blobs/" in r[1]]


def test_reads_go_through_the_mirror(mounter: Mounter, registry: Registry, pusher: Pusher,
                                     mirror: Registry, tmp_path: Path) -> None:
    """A mirror holding the kit serves all of it: the tag, the config and every layer byte;
    kitfs asks the registry nothing. Each request tells the mirror which registry it stands
    for (``?ns=``), as containerd does."""
    kit = push_kit(pusher, registry.host, "through", os.urandom(24 * MiB))
    for layer in kit.layers:
        warm(mirror, kit.repository, layer.digest)
    upstream, mirrored = registry.log_mark(), mirror.log_mark()
    mount = mounter.mount(kit.reference, "--hosts-dir", str(hosts_dir(tmp_path, registry.host,
                                                                     mirror.host)))
    assert (mount.path / "model.bin").read_bytes() == kit.weights
    assert (mount.path / "src/train.py").read_bytes() == b"print('train')\n"
    assert registry.requests(upstream, agent=KITFS) == []
    seen = mirror.requests(mirrored, agent=KITFS)
    assert any(uri.startswith(f"/v2/{kit.repository}/manifests/v1?") for _, uri, _ in seen)
    assert all(uri.endswith(f"?ns={registry.host}") for _, uri, _ in seen)
    served = sum(n for _, uri, n in seen if "/blobs/" in uri)
    layer_bytes = sum(len(layer.data) for layer in kit.layers)
    config_bytes = served - layer_bytes
    print(f"\nmirror served {served} blob bytes: {layer_bytes} of layers, {config_bytes} of config")
    assert 0 < config_bytes < 4096  # every layer byte once, and the config


def test_a_tag_is_resolved_only_by_a_host_trusted_to_resolve(
        kitfs: Any, registry: Registry, pusher: Pusher, mirror: Registry, tmp_path: Path) -> None:
    """``capabilities = ["pull"]``: the mirror serves content by digest, and never says what a
    tag names (containerd's docs: a public mirror should never be trusted to resolve)."""
    kit = push_kit(pusher, registry.host, "pull-only", os.urandom(MiB))
    warm(mirror, kit.repository, kit.model.digest)
    upstream, mirrored = registry.log_mark(), mirror.log_mark()
    directory = hosts_dir(tmp_path, registry.host, mirror.host, capabilities='"pull"')
    assert kitfs("cat", kit.reference, "model.bin", "--hosts-dir", str(directory)).stdout == \
        kit.weights
    asked_upstream = [uri for _, uri, _ in registry.requests(upstream, agent=KITFS)]
    assert asked_upstream == [f"/v2/{kit.repository}/manifests/v1"]
    asked_mirror = [uri for _, uri, _ in mirror.requests(mirrored, agent=KITFS)]
    assert not any("/manifests/v1" in uri for uri in asked_mirror)
    assert any(kit.model.digest in uri for uri in asked_mirror)


def test_a_mirror_killed_mid_read_falls_through_to_the_upstream(
        mounter: Mounter, registry: Registry, pusher: Pusher, mirror: Registry,
        tmp_path: Path) -> None:
    """kill -9 of the mirror in the middle of a file: the read goes on from the registry, with
    the right bytes and no error; the log says the mirror is left out for a while."""
    kit = push_kit(pusher, registry.host, "killed", os.urandom(48 * MiB))
    warm(mirror, kit.repository, kit.model.digest)
    mount = mounter.mount(kit.reference, "--timeout", "10", "--hosts-dir",
                          str(hosts_dir(tmp_path, registry.host, mirror.host)))
    mirrored = mirror.log_mark()
    with (mount.path / "model.bin").open("rb", buffering=0) as f:
        first = f.read(8 * MiB)
        assert mirror.blob_bytes_served(mirrored, agent=KITFS) >= 8 * MiB
        upstream = registry.log_mark()
        assert mirror.process is not None
        os.kill(mirror.process.pid, signal.SIGKILL)
        mirror.process.wait()
        rest = f.read()
    assert first + rest == kit.weights
    assert registry.blob_bytes_served(upstream, agent=KITFS) >= len(rest) // 2
    assert f"{mirror.host}" in mount.log() and "asking the next host" in mount.log()


def test_a_stalled_mirror_falls_through_within_the_timeout(
        kitfs: Any, registry: Registry, pusher: Pusher, tmp_path: Path) -> None:
    """A mirror that accepts connections and never answers: with ``--timeout 6`` it gets a
    share of the 6 s and the registry the rest, so the read succeeds (had the mirror taken
    the whole budget, nothing would be left for the registry); then it is left out for 10 s,
    so the blobs are not asked of it."""
    kit = push_kit(pusher, registry.host, "stalled", os.urandom(MiB))
    with running(FaultProxy(registry.host)) as stalled:
        stalled.add(Rule("stall", path="/v2/", delay_s=60, times=None))
        directory = hosts_dir(tmp_path, registry.host, stalled.host)
        done = kitfs("cat", kit.reference, "model.bin", "--timeout", "6", "--hosts-dir",
                     str(directory))
        assert done.stdout == kit.weights
        assert stalled.requests("/manifests/")  # it was asked first,
        assert not stalled.requests("/blobs/")  # then left out: not asked for the blobs
    assert f"{stalled.host}: manifest {kit.repository}:v1: no answer within 3 s" in done.stderr
    assert f"leaving {stalled.host} out for 10 s" in done.stderr


def test_a_tls_mirror_is_trusted_through_its_ca_or_skip_verify_and_gets_its_headers(
        kitfs: Any, registry: Registry, pusher: Pusher, tmp_path: Path) -> None:
    """``ca`` (a path relative to hosts.toml) or ``skip_verify`` let kitfs talk to a mirror
    whose certificate a private CA signed; its ``header`` goes with each request to it.
    Without either, the mirror is refused (named in a warning) and the registry serves."""
    kit = push_kit(pusher, registry.host, "tls", os.urandom(MiB))
    ca = make_ca(tmp_path / "tls", "mirror-ca")
    leaf = issue(ca, tmp_path / "tls", "mirror", ["127.0.0.1"])
    directory = tmp_path / "certs.d" / registry.host
    directory.mkdir(parents=True)
    shutil.copy(ca.cert, directory / "mirror-ca.crt")
    with running(FaultProxy(registry.host, context=server_context(leaf))) as tls_mirror:
        host = f'[host."https://{tls_mirror.host}"]'
        for run, settings in enumerate(('ca = "mirror-ca.crt"', "skip_verify = true", "")):
            (directory / "hosts.toml").write_text(
                f'{host}\n  capabilities = ["pull", "resolve"]\n  {settings}\n'
                f'{host[:-1]}.header]\n  x-fleet = ["a", "b"]\n')
            asked = len(tls_mirror.requests("/blobs/"))
            done = kitfs("cat", kit.reference, "model.bin", "--hosts-dir",
                         str(tmp_path / "certs.d"), "--cache-dir", str(tmp_path / f"cache-{run}"))
            assert done.stdout == kit.weights
            served = tls_mirror.requests("/blobs/")[asked:]
            if settings:
                assert served and all(seen.headers["x-fleet"] == "a, b" for seen in served)
            else:
                assert not served
                assert f"{tls_mirror.host}" in done.stderr and "is not trusted" in done.stderr


def test_a_mirror_serving_wrong_bytes_is_caught_by_the_digest(
        mounter: Mounter, registry: Registry, pusher: Pusher, mirror: Registry,
        tmp_path: Path) -> None:
    """One byte flipped in the mirror's stored copy of a layer: reading the file fails with
    EIO and the layer is named as failing verification; the registry's copy is intact."""
    kit = push_kit(pusher, registry.host, "forged", os.urandom(10 * MiB))
    warm(mirror, kit.repository, kit.model.digest)
    mirror.flip_stored_byte(kit.model.digest)
    mount = mounter.mount(kit.reference, "--hosts-dir",
                          str(hosts_dir(tmp_path, registry.host, mirror.host)))
    mount.expect_error(rf"{kit.model.digest} failed verification")
    with pytest.raises(OSError, match="Input/output error"):
        (mount.path / "model.bin").read_bytes()
    assert f"{kit.model.digest} failed verification" in mount.log()
    assert registry.blob_file(kit.model.digest).read_bytes() == kit.weights


def test_a_small_read_through_a_cold_mirror_fetches_little(
        mounter: Mounter, registry: Registry, pusher: Pusher, mirror: Registry,
        tmp_path: Path) -> None:
    """The mirror does not hold the 64 MiB layer: it answers a 4 KiB read's range with 200 and
    the whole blob. kitfs drops that answer unread and asks the registry for the range; the
    mirror goes on storing the blob, and once it holds it, it serves ranges (206)."""
    kit = push_kit(pusher, registry.host, "cold", os.urandom(64 * MiB))
    directory = hosts_dir(tmp_path, registry.host, mirror.host)
    upstream, mirrored = registry.log_mark(), mirror.log_mark()
    mount = mounter.mount(kit.reference, "--hosts-dir", str(directory))
    offset = 60 * MiB
    fd = os.open(mount.path / "model.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, offset) == kit.weights[offset : offset + 4096]
    finally:
        os.close(fd)
    from_upstream = registry.blob_bytes_served(upstream, agent=KITFS)
    model_uri = f"/blobs/{kit.model.digest}"
    from_mirror = sum(n for _, uri, n in mirror.requests(mirrored, agent=KITFS) if model_uri in uri)
    # What the mirror wrote before kitfs' close reached it sat in socket buffers, unread.
    print(f"\ncold mirror, 4 KiB read at 60 MiB of 64 MiB: kitfs got {from_upstream} bytes from "
          f"the registry; the mirror wrote {from_mirror} bytes toward kitfs before it closed")
    assert from_upstream <= 2 * MiB
    assert from_mirror < 16 * MiB  # socket buffers at most, never the blob
    wait_until_stored(mirror, kit.model.digest)  # the mirror filled its store meanwhile

    second = mounter.mount(kit.reference, "--hosts-dir", str(directory), "--cache-dir",
                           str(tmp_path / "second-cache"), name="second")
    upstream, mirrored = registry.log_mark(), mirror.log_mark()
    fd = os.open(second.path / "model.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 30 * MiB) == kit.weights[30 * MiB : 30 * MiB + 4096]
    finally:
        os.close(fd)
    assert kitfs_blob_requests(registry, upstream) == []
    assert 0 < mirror.blob_bytes_served(mirrored, agent=KITFS) <= 2 * MiB


async def test_a_cold_mirrors_answer_near_the_range_is_read_and_the_blob_then_asked_upstream(
        registry: Registry, pusher: Pusher, mirror: Registry, tmp_path: Path) -> None:
    """A range with fewer bytes before it than its own length is read from the cold mirror's
    200 (at most twice the range crosses the wire); the next range of that blob goes to the
    registry without asking the mirror (it is filling its store)."""
    kit = push_kit(pusher, registry.host, "near", os.urandom(16 * MiB))
    hosts = parse_hosts_toml(
        (hosts_dir(tmp_path, registry.host, mirror.host) / registry.host / "hosts.toml").read_bytes(),
        str(tmp_path), "hosts.toml")
    digest = Digest.parse(kit.model.digest)
    upstream, mirrored = await trio.to_thread.run_sync(lambda: (registry.log_mark(),
                                                               mirror.log_mark()))
    async with RegistryClient(registry.host, RegistryConfig(plain_http=True),
                              hosts=hosts) as client:
        first = bytearray(PIECE)
        await client.fetch_range(kit.repository, digest, len(kit.weights), PIECE // 2,
                                 memoryview(first))
        second = bytearray(PIECE)
        await client.fetch_range(kit.repository, digest, len(kit.weights), 8 * MiB,
                                 memoryview(second))
        assert client.stats.blob_bytes_by_host == {mirror.host: PIECE, registry.host: PIECE}
    assert bytes(first) == kit.weights[PIECE // 2 : PIECE // 2 + PIECE]
    assert bytes(second) == kit.weights[8 * MiB : 8 * MiB + PIECE]
    mirror_asked, upstream_asked = await trio.to_thread.run_sync(
        lambda: (mirror.blob_requests(mirrored, agent=KITFS),
                 registry.blob_requests(upstream, agent=KITFS)))
    assert (mirror_asked, upstream_asked) == (1, 1)


def test_an_invalid_hosts_toml_stops_the_command_naming_the_file(
        kitfs: Any, registry: Registry, tmp_path: Path) -> None:
    directory = tmp_path / "certs.d" / registry.host
    directory.mkdir(parents=True)
    (directory / "hosts.toml").write_text('[host."http://127.0.0.1:9"]\ncapabilities = ["pul"]\n')
    done = kitfs("ls", f"{registry.host}/any/kit:v1", "--hosts-dir", str(tmp_path / "certs.d"),
                 check=False)
    assert done.returncode == 64
    assert done.stderr == (f"kitfs: {directory}/hosts.toml: host.\"http://127.0.0.1:9\".capabilities: "
                           "unknown capability 'pul' (pull, resolve, push)\n")

