"""The Python API (``kitfs.open_kit``, ``Kit``, ``KitFile``) against the real registry on loopback:
what a kit shows, its bytes, whole-kit verification, the errors as Python exceptions, use from
a running asyncio loop (as in Jupyter), after ``shutdown()`` and in a forked child, and the
cache it shares with real mounts (the registry's own log is the witness)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pytest

import kitfs
from kitfs import open_kit  # a public name of the package, as kitfs.open_kit
from kitfs.api.fs import KitFileSystem
from kitfs.api.kit import Entry, VerifyProgress
from kitfs.api.runtime import shutdown
from kitfs.demo import Push, Pusher, Registry, sample_kit, tar_layer, with_layer_info
from tests.mounts import Mounter
from tests.pykit import MiB, register_kitfs

register_kitfs()
WEIGHTS = os.urandom(6 * MiB + 777)
CSV_003 = b"id,value\n3,9\n"  # data/train/part-003.csv of kitfs.demo.sample_kit


@pytest.fixture(scope="module")
def pushed(registry: Registry, pusher: Pusher) -> Push:
    return sample_kit(pusher, f"{registry.host}/team/api-sample:v1", WEIGHTS)


@pytest.fixture
def kit(pushed: Push) -> str:
    return pushed.reference


@pytest.fixture(autouse=True)
def fresh_runtime() -> Iterator[None]:
    KitFileSystem.clear_instance_cache()
    yield
    KitFileSystem.clear_instance_cache()
    shutdown()


def test_a_kit_shows_its_pinned_digest_kitfile_and_layers(
        kit: str, pushed: Push, cache_dir: Path, kitfs: Any) -> None:
    opened = open_kit(kit, cache_dir=cache_dir)
    inspected = json.loads(kitfs("inspect", "--json", kit).text)  # the CLI, same cache
    assert opened.digest == inspected["digest"]
    assert opened.reference == f"{kit}@{opened.digest}"
    assert opened.kitfile == json.loads(pushed.config)
    layers = opened.layers
    assert [layer.digest for layer in layers] == [layer.digest for layer in pushed.layers]
    assert [(layer.kind, layer.path) for layer in layers] == [
        ("model", "models/weights.safetensors"), ("code", "src"), ("dataset", "data/train"),
        ("docs", "README.md")]
    assert [layer.size for layer in layers] == [len(layer.data) for layer in pushed.layers]
    assert {layer.verification for layer in layers} == {"not fetched"}
    assert opened.read_bytes("README.md") == b"# Sample kit\n"
    states = {layer.kind: layer.verification for layer in opened.layers}
    assert states == {"model": "not fetched", "code": "not fetched", "dataset": "not fetched",
                      "docs": "verified"}  # a whole small layer read is checked
    assert repr(opened) == f"<kitfs.Kit {opened.reference}>"


def test_ls_info_walk_open_and_read_bytes(kit: str, cache_dir: Path) -> None:
    opened = kitfs.open_kit(kit, cache_dir=cache_dir)
    assert opened.ls() == ["Kitfile", "README.md", "data", "models", "src"]
    assert opened.ls("/src/") == ["src/train.py", "src/util"]
    detailed = opened.ls("data/train", detail=True)
    assert detailed[3] == Entry("data/train/part-003.csv", "file", len(CSV_003), 0o644,
                                opened.layers[2].digest)
    assert opened.info("models") == Entry("models", "directory", 0, 0o755, None)
    assert opened.info("Kitfile").digest is None
    assert [e.path for e in opened.walk("src")] == ["src", "src/train.py", "src/util",
                                                    "src/util/io.py"]
    assert opened.exists("src/util/io.py") and not opened.exists("src/nope.py")
    assert opened.read_bytes("data/train/part-003.csv") == CSV_003
    assert opened.read_bytes("models/weights.safetensors", 5 * MiB, 5 * MiB + 7) == (
        WEIGHTS[5 * MiB : 5 * MiB + 7])
    assert opened.read_bytes("models/weights.safetensors", -3) == WEIGHTS[-3:]
    with opened.open("models/weights.safetensors", block_size=4096) as f:
        assert isinstance(f, kitfs.KitFile)
        assert (f.path, f.size, f.digest) == ("models/weights.safetensors", len(WEIGHTS),
                                              opened.layers[0].digest)
        f.seek(3 * MiB)
        assert f.read(10) == WEIGHTS[3 * MiB : 3 * MiB + 10]
        assert f.read() == WEIGHTS[3 * MiB + 10 :]
    assert f.closed
    with pytest.raises(ValueError, match="closed file"):
        f.read(1)
    with pytest.raises(NotADirectoryError):
        opened.ls("README.md")
    with pytest.raises(IsADirectoryError):
        opened.open("src")
    with pytest.raises(IsADirectoryError):
        opened.read_bytes("data")


def test_verify_checks_every_layer_and_reports_progress_in_the_calling_thread(
        kit: str, pushed: Push, cache_dir: Path, registry: Registry) -> None:
    opened = kitfs.open_kit(kit, cache_dir=cache_dir)
    mark = registry.log_mark()
    seen: list[VerifyProgress] = []
    caller = threading.current_thread()

    def progress(report: VerifyProgress) -> None:
        assert threading.current_thread() is caller
        assert opened.info("README.md").size == 13  # the API may be called from the callback
        seen.append(report)

    opened.verify(progress=progress)
    sizes = [len(layer.data) for layer in pushed.layers]
    assert [(p.digest, p.layers_done, p.layers_total, p.error) for p in seen] == [
        (layer.digest, i, 4, None) for i, layer in enumerate(pushed.layers, 1)]
    assert [p.bytes_done for p in seen] == [sum(sizes[:i]) for i in range(1, 5)]
    assert seen[-1].bytes_total == sum(sizes)
    assert registry.blob_bytes_served(mark) == sum(sizes)  # every layer, once
    assert {layer.verification for layer in opened.layers} == {"verified"}
    mark = registry.log_mark()
    opened.verify()
    assert registry.blob_bytes_served(mark) == 0


def _tampered_kit(registry: Registry, pusher: Pusher, name: str) -> tuple[str, str, str]:
    """A kit whose code layer has one byte flipped in the registry: (reference, code layer
    digest, docs layer digest)."""
    script = b"print(%r)\n" % os.urandom(8).hex()
    code = tar_layer("code", {"src/run.py": script}, "src")
    docs = tar_layer("docs", {"README.md": b"# " + os.urandom(4).hex().encode() + b"\n"},
                     "README.md")
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0", "code": [{"path": "src"}],
                               "docs": [{"path": "README.md"}]}
    with_layer_info(kitfile, [(kitfile["code"][0], code), (kitfile["docs"][0], docs)])
    reference = f"{registry.host}/team/{name}:v1"
    pusher.push_kit(reference, kitfile, [code, docs])
    registry.flip_stored_byte(code.digest, code.data.index(script) + 3, 0x01)
    return reference, code.digest, docs.digest


def test_verify_names_a_tampered_layer_and_still_checks_the_others(
        registry: Registry, pusher: Pusher, cache_dir: Path) -> None:
    reference, code, docs = _tampered_kit(registry, pusher, "tampered-verify")
    opened = kitfs.open_kit(reference, cache_dir=cache_dir)
    seen: list[VerifyProgress] = []
    with pytest.raises(OSError, match=f"1 of 2 layers .* failed verification: layer {code}") as caught:
        opened.verify(progress=seen.append)
    assert caught.value.errno == errno.EIO
    assert [(p.digest, p.error is not None) for p in seen] == [(code, True), (docs, False)]
    assert {layer.digest: layer.verification for layer in opened.layers} == {
        code: "FAILED", docs: "verified"}


def test_errors_are_python_exceptions_with_the_mounts_errnos(
        kit: str, registry: Registry, pusher: Pusher, cache_dir: Path) -> None:
    opened = kitfs.open_kit(kit, cache_dir=cache_dir)
    with pytest.raises(FileNotFoundError, match="no such file or directory in the kit") as missing:
        opened.read_bytes("src/nope.py")
    assert missing.value.errno == errno.ENOENT
    with pytest.raises(FileNotFoundError) as no_tag:
        kitfs.open_kit(f"{registry.host}/team/api-sample:no-such-tag", cache_dir=cache_dir)
    assert no_tag.value.errno == errno.ENOENT
    with pytest.raises(FileNotFoundError):
        kitfs.open_kit(f"{registry.host}/team/no-such-repository:v1", cache_dir=cache_dir)
    reference, code, _ = _tampered_kit(registry, pusher, "tampered-errors")
    tampered = kitfs.open_kit(reference, cache_dir=cache_dir)
    for _ in range(2):  # that read, and every later one
        with pytest.raises(OSError, match=f"layer {code} failed verification") as bad:
            tampered.read_bytes("src/run.py")
        assert bad.value.errno == errno.EIO and type(bad.value) is OSError
    with pytest.raises(ValueError, match="invalid reference"):
        kitfs.open_kit("not a reference", cache_dir=cache_dir)
    with pytest.raises(ValueError, match="timeout must be"):
        kitfs.open_kit(kit, cache_dir=cache_dir, timeout=0)
    with pytest.raises(ValueError, match="cache_size"):
        kitfs.open_kit(kit, cache_dir=cache_dir, cache_size="lots")


@pytest.fixture(scope="module")
def auth_kit(tmp_path_factory: pytest.TempPathFactory, docker_registry: str) -> Iterator[str]:
    """A registry that wants alice's password for every request, holding the sample kit."""
    registry = Registry(tmp_path_factory.mktemp("auth-registry"),
                        users={"alice": "api-secret"}).start()
    try:
        reference = f"{registry.host}/team/private:v1"
        sample_kit(Pusher(registry.host, "alice", "api-secret"), reference, b"w" * 1000)
        yield reference
    finally:
        registry.stop()


def test_refused_credentials_are_a_permission_error(
        auth_kit: str, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docker = tmp_path / "docker"
    docker.mkdir()
    host = auth_kit.split("/")[0]
    (docker / "config.json").write_text(json.dumps(
        {"auths": {host: {"username": "alice", "password": "wrong-password"}}}))
    for name, value in (("HOME", tmp_path), ("DOCKER_CONFIG", docker),
                        ("KITOPS_HOME", tmp_path / "kitops"), ("XDG_DATA_HOME", tmp_path)):
        monkeypatch.setenv(name, str(value))
    with pytest.raises(PermissionError) as caught:
        kitfs.open_kit(auth_kit, cache_dir=cache_dir)
    assert caught.value.errno == errno.EACCES and host in str(caught.value)
    assert "wrong-password" not in str(caught.value)


def test_the_api_works_inside_a_running_asyncio_loop(kit: str, cache_dir: Path) -> None:
    ticks: list[int] = []

    async def notebook_cell() -> tuple[bytes, pd.DataFrame, list[str]]:
        asyncio.get_running_loop()  # a cell runs with the kernel's loop running, as here
        opened = kitfs.open_kit(kit, cache_dir=cache_dir)
        frame = pd.read_csv(f"kitfs://{kit}/data/train/part-003.csv",
                            storage_options={"cache_dir": str(cache_dir)})
        listing = fsspec.filesystem("kitfs", cache_dir=str(cache_dir)).ls(
            f"kitfs://{kit}/src", detail=False)
        await asyncio.sleep(0)  # and the loop itself goes on afterwards
        ticks.append(1)
        return opened.read_bytes("models/weights.safetensors"), frame, listing

    weights, frame, listing = asyncio.run(notebook_cell())
    assert weights == WEIGHTS
    assert frame.to_dict("list") == {"id": [3], "value": [9]}
    assert listing == [f"{kit}/src/train.py", f"{kit}/src/util"]
    assert ticks == [1]


def test_repr_html_shows_reference_digest_layers_and_escapes_what_the_kit_names(
        registry: Registry, pusher: Pusher, cache_dir: Path) -> None:
    path = "docs/<img src=x onerror=alert(1)>.md"
    docs = tar_layer("docs", {path: b"hello\n"}, path)
    model = tar_layer("model", {"models/w.bin": b"w" * 3000}, "models/w.bin")
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0", "model": {"path": "models/w.bin"},
                               "docs": [{"path": path}]}
    with_layer_info(kitfile, [(kitfile["model"], model), (kitfile["docs"][0], docs)])
    reference = f"{registry.host}/team/html:v1"
    pusher.push_kit(reference, kitfile, [model, docs])
    opened = kitfs.open_kit(reference, cache_dir=cache_dir)
    opened.read_bytes("models/w.bin")
    page = opened._repr_html_()
    assert opened.reference in page and opened.digest in page
    rows = {layer.digest: next(row for row in page.split("<tr>") if layer.digest in row)
            for layer in (model, docs)}
    for layer, kind, state in ((model, "model", "verified"), (docs, "docs", "not fetched")):
        row = rows[layer.digest]
        assert f"<td>{kind}</td>" in row and f"<td>{state}</td>" in row
        assert f'title="{len(layer.data)} bytes"' in row
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


def test_a_kit_keeps_working_after_shutdown_and_in_a_forked_child(
        kit: str, cache_dir: Path, registry: Registry) -> None:
    opened = kitfs.open_kit(kit, cache_dir=cache_dir)
    assert opened.read_bytes("README.md") == b"# Sample kit\n"
    shutdown()  # its session closes; the next call opens the kit again, by its digest
    mark = registry.log_mark()
    assert opened.read_bytes("src/train.py") == b"print('train')\n"
    # the tag stays pinned: reopened by its digest, whose manifest the cache kept (the
    # manifest a tag resolved to is kept with that digest): no manifest request at all
    manifests = [uri for _, uri, _ in registry.requests(mark) if "/manifests/" in uri]
    assert manifests == []
    fs = fsspec.filesystem("kitfs", cache_dir=str(cache_dir))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no copy of the parent's loop thread; it starts its own
        code = 1
        try:
            digest = hashlib.sha256(fs.cat_file(f"{kit}/models/weights.safetensors")).hexdigest()
            digest += hashlib.sha256(opened.read_bytes("data/train/part-003.csv")).hexdigest()
            os.write(write, digest.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        digests = answer.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert digests == hashlib.sha256(WEIGHTS).hexdigest() + hashlib.sha256(CSV_003).hexdigest()


def test_the_api_and_mounts_share_one_cache(
        kit: str, cache_dir: Path, registry: Registry, mounter: Mounter) -> None:
    opened = kitfs.open_kit(kit, cache_dir=cache_dir)  # the cache the mounts use
    assert opened.read_bytes("models/weights.safetensors") == WEIGHTS
    mount = mounter.mount(kit)
    mark = registry.log_mark()
    assert (mount.path / "models/weights.safetensors").read_bytes() == WEIGHTS
    assert registry.blob_bytes_served(mark) == 0  # read through the API: not fetched again
    assert (mount.path / "src/train.py").read_bytes() == b"print('train')\n"
    mark = registry.log_mark()
    assert opened.read_bytes("src/util/io.py") == b"def load():\n    pass\n"
    assert registry.blob_bytes_served(mark) == 0  # the mount fetched that layer: not again
    assert {layer.kind: layer.verification for layer in opened.layers}["code"] == "verified"


def test_a_registry_that_does_not_answer_is_an_eio_and_reads_work_again_once_it_is_back(
        tmp_path: Path, cache_dir: Path, docker_registry: str) -> None:
    registry = Registry(tmp_path / "registry").start()
    try:
        reference = f"{registry.host}/team/outage:v1"
        sample_kit(Pusher(registry.host), reference, WEIGHTS)
        opened = kitfs.open_kit(reference, cache_dir=cache_dir, timeout=2)
        assert opened.read_bytes("README.md") == b"# Sample kit\n"
        registry.stop()
        with pytest.raises(OSError, match="no answer within 2 s") as caught:
            opened.read_bytes("models/weights.safetensors")
        assert caught.value.errno == errno.EIO and registry.host in str(caught.value)
        registry = Registry(tmp_path / "registry", port=registry.port).start()
        assert opened.read_bytes("models/weights.safetensors") == WEIGHTS
    finally:
        registry.stop()
