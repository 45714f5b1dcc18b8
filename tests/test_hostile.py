"""Hostile kits through the real registry: what ``kitfs ls``/``cat`` and a mount do with them.

Every kit here is pushed to the real distribution registry on loopback. Where the registry
itself refuses to store something (a manifest over 4 MiB, a manifest whose bytes do not match
the digest it is fetched by), the fault proxy in front of it plays the hostile registry and
answers those bytes instead. Expected every time: a clear error naming the problem (exit 65
for bad content), bounded memory and requests, no traceback, and nothing else disturbed:
another mount keeps working and the cache keeps what it had.
"""

from __future__ import annotations

import errno
import gzip
import io
import itertools
import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from kitfs.demo import (
    Entry,
    Layer,
    Pusher,
    Registry,
    kit_tar,
    kitfile_of,
    push_entries,
    sha256,
    tar_layer,
)
from kitfs.format.mediatypes import KIT
from tests.faultproxy import FaultProxy, Rule, running
from tests.kitfs_cli import Result, run_kitfs
from tests.mounts import Mounter

MiB = 1 << 20
MANIFEST_LIMIT_BYTES = 4 * MiB


def kitfs_in(cache_dir: Path, *args: str) -> Result:
    """``kitfs ARGS`` in a subprocess with ``cache_dir``, and its peak resident memory."""
    return run_kitfs(*args, env={**os.environ, "KITFS_CACHE_DIR": str(cache_dir)},
                     measure_memory=True)


def push_one_layer_kit(pusher: Pusher, reference: str, layer: Layer, section: str = "code",
                       path: str = "src", **kwargs: Any) -> None:
    push_entries(pusher, reference, [Entry(section, {"path": path}, layer)],
                 package={"name": "hostile"}, **kwargs)


def refused(result: Any, *fragments: str) -> None:
    """Exit 65 (malformed or unverifiable content) with every fragment in the message."""
    assert result.returncode == 65, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


# --- names ------------------------------------------------------------------------------------

# Names kit packs and unpacks byte for byte on Linux (Go strings are bytes): a newline, a tab,
# and bytes that are not UTF-8. Python shows an undecodable byte as a surrogate escape.
ODD_FILES = {
    "data/new\nline.txt": b"newline\n",
    "data/tab\there.txt": b"tab\n",
    "data/latin-1 \udce9t\udce9.bin": b"latin-1\n",
    "data/ok.txt": b"ok\n",
}


def raw(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


@pytest.fixture(scope="module")
def odd_names(registry: Registry, pusher: Pusher) -> str:
    reference = f"{registry.host}/hostile/names:v1"
    push_one_layer_kit(pusher, reference, tar_layer("dataset", ODD_FILES, "data"), "datasets",
                       "data")
    return reference


def test_names_with_newline_and_invalid_utf8_are_listed_one_per_line(
        kitfs: Any, odd_names: str) -> None:
    """``kitfs ls`` prints such a name in bash's $'…' quoting; bash reads back the exact bytes."""
    lines = kitfs("ls", odd_names).stdout.decode().splitlines()
    assert len(lines) == 1 + 1 + len(ODD_FILES)  # Kitfile, data/, the files
    shown = [line.split(None, 2)[2] for line in lines]
    assert "$'data/new\\nline.txt'" in shown and "$'data/latin-1 \\xe9t\\xe9.bin'" in shown
    assert "data/ok.txt" in shown  # a printable name is shown as it is
    for name in ODD_FILES:
        quoted = next(s for s in shown if s != "data/" and s.strip("$'").startswith(name[:7]))
        as_bash_reads_it = subprocess.run(["bash", "-c", f"printf %s {quoted}"],
                                          capture_output=True, check=True).stdout
        assert as_bash_reads_it == raw(name), quoted


def test_names_with_newline_and_invalid_utf8_round_trip_through_json_cat_and_a_mount(
        kitfs: Any, odd_names: str, mounter: Mounter) -> None:
    """JSON paths are what Python's os functions give for the same names (undecodable bytes as
    surrogate escapes); ``kitfs cat`` takes them back; the mount shows the exact bytes."""
    listed = {e["path"] for e in json.loads(kitfs("ls", "--json", odd_names).stdout)}
    assert listed == {"Kitfile", "data", *ODD_FILES}
    for name, content in ODD_FILES.items():
        assert kitfs("cat", odd_names, name).stdout == content
    mount = mounter.mount(odd_names)
    assert sorted(os.listdir(os.fsencode(mount.path / "data"))) == sorted(
        raw(n).removeprefix(b"data/") for n in ODD_FILES)
    for name, content in ODD_FILES.items():
        assert Path(mount.path / name).read_bytes() == content
    walked = {str(p.relative_to(mount.path)) for p in mount.path.rglob("*")}
    assert walked == listed


def test_a_name_with_a_nul_byte_is_refused(kitfs: Any, registry: Registry, pusher: Pusher) -> None:
    """A NUL can only come in a PAX path record; kit (Go's os) cannot create it: refused."""
    info = tarfile.TarInfo("src/placeholder")
    info.pax_headers = {"path": "src/nul\0byte.py"}
    layer = Layer(f"{KIT}.code.v1.tar", kit_tar({"src/a.py": b"x"}, "src", extra=[info]))
    reference = f"{registry.host}/hostile/nul:v1"
    push_one_layer_kit(pusher, reference, layer)
    refused(kitfs("ls", reference, check=False), "contains a NUL byte", layer.digest)


# --- manifests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_kit(registry: Registry, pusher: Pusher) -> str:
    reference = f"{registry.host}/hostile/small:v1"
    push_one_layer_kit(pusher, reference, tar_layer("code", {"src/a.py": b"print(1)\n"}, "src"))
    return reference


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_100_mb_manifest_is_refused_before_it_is_read(
        registry: Registry, small_kit: str, cache_dir: Path, chunked: bool) -> None:
    """The registry itself refuses to store a manifest over 4 MiB, so the proxy plays one that
    serves 100 MB: refused at once (no retry), without reading it, in bounded memory."""
    pad = b"x" * (100 * MiB)
    huge = b'{"schemaVersion":2,"layers":[],"annotations":{"pad":"' + pad + b'"}}'
    # Create the cache first: its creation imports sqlite-utils, whose memory is not the point.
    assert kitfs_in(cache_dir, "cache", "stats").returncode == 0
    with running(FaultProxy(registry.host)) as proxy:
        proxy.add(Rule("forward", path="/manifests/", body=huge, chunked=chunked, times=None))
        result = kitfs_in(cache_dir, "ls", small_kit.replace(registry.host, proxy.host))
        (request,) = proxy.requests("/manifests/")
    refused(result, "manifest hostile/small:v1", f"over the {MANIFEST_LIMIT_BYTES} allowed")
    if not chunked:
        assert f"a body of {len(huge)} bytes" in result.stderr
    assert request.body_bytes < len(huge) // 4  # written before kitfs hung up: the rest never
    assert result.peak_rss_bytes is not None
    assert result.peak_rss_bytes < 100 * MiB, result.peak_rss_bytes


def test_a_huge_error_page_is_not_read_and_its_status_is_the_answer(
        registry: Registry, cache_dir: Path) -> None:
    """A 404 with a 100 MB body: 'not found' at once, from one request, the body left unread."""
    with running(FaultProxy(registry.host)) as proxy:
        proxy.add(Rule("forward", path="/manifests/", body=b"x" * (100 * MiB), times=None))
        result = kitfs_in(cache_dir, "ls", f"{proxy.host}/hostile/nowhere:v1")
        (request,) = proxy.requests("/manifests/")
    assert result.returncode == 66 and "manifest hostile/nowhere:v1 not found" in result.stderr
    assert request.status == 404 and request.body_bytes < 25 * MiB


def test_a_manifest_just_under_4_mib_is_read(
        registry: Registry, small_kit: str, cache_dir: Path, pusher: Pusher) -> None:
    """The limit is the registry's and kit's: a manifest it stores, kitfs reads."""
    manifest = json.loads(kitfs_in(cache_dir, "inspect", "--json", small_kit).stdout)
    assert manifest["format"] == "kitops"
    body = registry_manifest(registry, small_kit)
    padded = json.loads(body)
    padded["annotations"] = {"pad": "x" * (MANIFEST_LIMIT_BYTES - len(body) - 100)}
    data = json.dumps(padded, separators=(",", ":")).encode()
    assert MANIFEST_LIMIT_BYTES - 200 < len(data) <= MANIFEST_LIMIT_BYTES
    pusher.put_manifest("hostile/small", "padded", data, "application/vnd.oci.image.manifest.v1+json")
    result = kitfs_in(cache_dir, "cat", f"{registry.host}/hostile/small:padded", "src/a.py")
    assert result.returncode == 0 and result.stdout == b"print(1)\n", result.stderr


def registry_manifest(registry: Registry, reference: str) -> bytes:
    repository, tag = reference.split("/", 1)[1].rsplit(":", 1)
    import urllib.request

    request = urllib.request.Request(
        f"http://{registry.host}/v2/{repository}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        body: bytes = answer.read()
    return body


# --- model references -------------------------------------------------------------------------


def push_referencing_kit(pusher: Pusher, reference: str, model_path: str) -> None:
    """A kit whose model is another kit (``model.path`` is a reference), with docs of its own."""
    docs = tar_layer("docs", {"README.md": reference.encode()}, "README.md")
    push_entries(pusher, reference, [Entry("model", {"path": model_path}),
                                     Entry("docs", {"path": "README.md"}, docs)])


def manifest_requests(registry: Registry, since: int) -> int:
    return sum(1 for method, uri, _ in registry.requests(since)
               if method == "GET" and "/manifests/" in uri)


def test_model_reference_cycles_are_refused_naming_the_cycle(
        kitfs: Any, registry: Registry, pusher: Pusher) -> None:
    """A kit whose model.path names itself, and two that name each other: a clear error after
    one manifest request per kit of the cycle, nothing else fetched."""
    itself = f"{registry.host}/cycle/self:v1"
    push_referencing_kit(pusher, itself, itself)
    a, b = f"{registry.host}/cycle/a:v1", f"{registry.host}/cycle/b:v1"
    push_referencing_kit(pusher, a, b)
    push_referencing_kit(pusher, b, a)
    for reference, kits in ((itself, [itself]), (a, [a, b])):
        mark = registry.log_mark()
        result = kitfs("ls", reference, check=False)
        refused(result, "model reference cycle: ")
        cycle = result.stderr.split("model reference cycle: ", 1)[1].strip().split(" -> ")
        assert [c.split("@")[0] for c in cycle] == [*kits, kits[0]], result.stderr
        assert manifest_requests(registry, mark) == len(kits) + 1  # the first kit twice
        assert registry.blob_requests(mark) == len(kits)  # each kit's config, no layer


def test_a_model_reference_chain_longer_than_10_is_refused(
        kitfs: Any, registry: Registry, pusher: Pusher) -> None:
    chain = [f"{registry.host}/chain/k{i}:v1" for i in range(12)]
    for here, there in itertools.pairwise(chain):
        push_referencing_kit(pusher, here, there)
    refused(kitfs("ls", chain[0], check=False), "model reference chain is longer than 10")


def test_a_model_reference_that_is_no_reference_is_a_format_error(
        kitfs: Any, registry: Registry, pusher: Pusher) -> None:
    """kit treats host/Repo:tag as a reference; kitfs parses it, and it is not a valid one."""
    reference = f"{registry.host}/hostile/badref:v1"
    push_referencing_kit(pusher, reference, f"{registry.host}/Upper/Case:v1")
    refused(kitfs("ls", reference, check=False), "Kitfile model.path", "bad repository")


# --- manifests and configs that disagree with the blobs ----------------------------------------


def test_config_entries_naming_missing_layers(kitfs: Any, registry: Registry,
                                              pusher: Pusher) -> None:
    layer = tar_layer("code", {"src/a.py": b"x"}, "src")
    missing = sha256(b"a layer that is not in the manifest")
    reference = f"{registry.host}/hostile/missing:v1"
    push_entries(pusher, reference, [
        Entry("code", {"path": "src"}, layer),
        Entry("datasets", {"path": "data", "digest": missing, "diffId": missing})])
    refused(kitfs("ls", reference, check=False),
            f"Kitfile datasets entry 'data' names layer {missing}, which is not in the manifest")


@pytest.mark.parametrize(
    ("where", "media_type", "message"),
    [
        ("layer", "application/vnd.example.weights.v1.tar", "unsupported layer media type "
         "'application/vnd.example.weights.v1.tar'"),
        ("layer", f"{KIT}.weights.v1.tar", "unknown KitOps layer type 'weights'"),
        ("config", "application/vnd.example.config.v1+json", "not a ModelKit or ModelPack: "
         "artifactType None, config mediaType 'application/vnd.example.config.v1+json'"),
    ],
)
def test_unknown_media_types_are_named(kitfs: Any, registry: Registry, pusher: Pusher,
                                       where: str, media_type: str, message: str) -> None:
    layer = tar_layer("code", {"src/a.py": b"x"}, "src")
    kwargs: dict[str, Any] = {}
    if where == "layer":
        layer = Layer(media_type, layer.data, diff_id=layer.diff_id)
    else:
        kwargs["config_media_type"] = media_type
    reference = f"{registry.host}/hostile/media:{abs(hash(media_type)) % 10**8}"
    push_one_layer_kit(pusher, reference, layer, **kwargs)
    refused(kitfs("ls", reference, check=False), message)


def push_with_sizes(pusher: Pusher, reference: str, layer: Layer, *, layer_size: int | None = None,
                    config_size: int | None = None) -> Any:
    """A one-layer kit whose manifest states other sizes than its blobs have."""
    push = push_entries(pusher, reference, [Entry("code", {"path": "src"}, layer)])
    manifest = dict(push.manifest)
    if layer_size is not None:
        manifest["layers"] = [{**manifest["layers"][0], "size": layer_size}]
    if config_size is not None:
        manifest["config"] = {**manifest["config"], "size": config_size}
    repository, tag = reference.split("/", 1)[1].rsplit(":", 1)
    pusher.put_manifest(repository, tag, json.dumps(manifest).encode(),
                        "application/vnd.oci.image.manifest.v1+json")
    return push


@pytest.mark.parametrize(
    ("what", "delta", "message"),
    [
        ("layer", -512, "the registry has 10240 bytes, the manifest says 9728"),
        ("layer", +512, "the registry has 10240 bytes, the manifest says 10752"),
        ("config", -1, "the manifest says"),
        ("config", +1, "the manifest says"),
    ],
)
def test_descriptor_sizes_that_disagree_with_the_blob(
        kitfs: Any, registry: Registry, pusher: Pusher, what: str, delta: int, message: str) -> None:
    layer = tar_layer("code", {f"src/f{i}.py": os.urandom(900) for i in range(4)}, "src")
    reference = f"{registry.host}/hostile/sizes:{what}-{'less' if delta < 0 else 'more'}"
    config_size = None
    if what == "config":
        config = run_config_size(pusher, reference, layer)
        config_size = config + delta
    push = push_with_sizes(pusher, reference, layer, config_size=config_size,
                           layer_size=len(layer.data) + delta if what == "layer" else None)
    if what == "config":
        refused(kitfs("ls", reference, check=False), message, push.manifest["config"]["digest"])
        return
    assert len(layer.data) == 10240  # four 1024-byte members and the end-of-archive blocks
    refused(kitfs("cat", reference, "src/f3.py", check=False), f"blob {layer.digest}", message)


def run_config_size(pusher: Pusher, reference: str, layer: Layer) -> int:
    kitfile = kitfile_of([Entry("code", {"path": "src"}, layer)])
    return len(json.dumps(kitfile, separators=(",", ":")).encode())


def test_a_config_over_16_mib_by_its_descriptor_is_refused_unfetched(
        kitfs: Any, registry: Registry, pusher: Pusher) -> None:
    reference = f"{registry.host}/hostile/sizes:config-huge"
    push = push_with_sizes(pusher, reference, tar_layer("code", {"src/a.py": b"x"}, "src"),
                           config_size=16 * MiB + 1)
    mark = registry.log_mark()
    refused(kitfs("ls", reference, check=False), push.manifest["config"]["digest"],
            f"is {16 * MiB + 1} bytes by its descriptor, more than the {16 * MiB} allowed")
    assert registry.blob_requests(mark) == 0


@pytest.mark.parametrize("what", ["manifest", "config", "layer"])
def test_bytes_that_do_not_match_their_digest_are_refused(
        registry: Registry, pusher: Pusher, cache_dir: Path, what: str) -> None:
    """A hostile registry answers other bytes for a digest: the manifest (fetched by digest),
    the config, or a layer. Each is checked against its digest and refused, naming it."""
    files = {"src/a.py": b"print('genuine')\n"}
    layer = tar_layer("code", files, "src")
    reference = f"{registry.host}/hostile/digests:{what}"
    push_one_layer_kit(pusher, reference, layer)
    manifest = registry_manifest(registry, reference)
    manifest_digest = sha256(manifest)
    pinned = f"{registry.host}/hostile/digests@{manifest_digest}"
    config_digest = json.loads(manifest)["config"]["digest"]
    forged = {
        "manifest": ("/manifests/", manifest + b"\n"),  # the same document, other bytes
        "config": (f"/blobs/{config_digest}", None),
        "layer": (f"/blobs/{layer.digest}", None),
    }
    path, body = forged[what]
    with running(FaultProxy(registry.host)) as proxy:
        if body is None:  # the same length, other bytes: only the digest can tell
            original = (registry.blob_file(config_digest) if what == "config"
                        else registry.blob_file(layer.digest)).read_bytes()
            body = original.replace(b"genuine", b"forgery") if what == "layer" else (
                original.replace(b'"manifestVersion"', b'"manifestversion"'))
            assert body != original and len(body) == len(original)
        proxy.add(Rule("forward", path=path, body=body, times=None))
        result = kitfs_in(cache_dir, "cat", pinned.replace(registry.host, proxy.host), "src/a.py")
    expected = {"manifest": manifest_digest, "config": config_digest, "layer": layer.digest}[what]
    refused(result, f"expected {expected}")
    assert b"forgery" not in result.stdout  # a full read never passes forged bytes on


def test_a_diff_id_that_does_not_match_the_decompressed_layer(
        kitfs: Any, registry: Registry, pusher: Pusher) -> None:
    files = {"src/a.py": b"print('a')\n"}
    layer = tar_layer("code", files, "src", compression="gzip")
    wrong = sha256(b"not the tar")
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0",
                               "code": [{"path": "src", "digest": layer.digest, "diffId": wrong}]}
    reference = f"{registry.host}/hostile/diffid:v1"
    pusher.push_kit(reference, kitfile, [layer])
    refused(kitfs("cat", reference, "src/a.py", check=False), f"the config's diffId is {wrong}")


# --- scale: 10,000 layers, 100,000 entries in one directory -------------------------------------

LAYER_COUNT = 10_000


@pytest.fixture(scope="module")
def ten_thousand_layers(registry: Registry, pusher: Pusher) -> str:
    """10,000 raw layers, one file each, all of one small blob (two layers may share a digest):
    a 2.3 MB manifest, under the registry's 4 MiB."""
    blob = b"one small file\n"
    layers = [Layer(f"{KIT}.code.v1.raw", blob,
                    {"org.cncf.model.filepath": f"layers/f{i:05d}.txt"}) for i in range(LAYER_COUNT)]
    reference = f"{registry.host}/hostile/layers:v1"
    push_entries(pusher, reference, [Entry("code", {"path": f"layers/f{i:05d}.txt"}, layer)
                                     for i, layer in enumerate(layers)])
    return reference


def test_a_kit_of_10000_layers_lists_and_reads(kitfs: Any, ten_thousand_layers: str) -> None:
    entries = json.loads(kitfs("ls", "--json", ten_thousand_layers, "layers").stdout)
    assert len(entries) == 1 + LAYER_COUNT
    assert entries[-1]["path"] == f"layers/f{LAYER_COUNT - 1:05d}.txt"
    assert kitfs("cat", ten_thousand_layers, "layers/f04321.txt").stdout == b"one small file\n"
    inspected = json.loads(kitfs("inspect", "--json", ten_thousand_layers).stdout)
    assert len(inspected["layers"]) == LAYER_COUNT


def test_a_kit_of_10000_layers_mounts(mounter: Mounter, ten_thousand_layers: str) -> None:
    """Every file looked up by name (each lookup indexes its own layer), then listed."""
    mount = mounter.mount(ten_thousand_layers)
    sizes = {(mount.path / f"layers/f{i:05d}.txt").stat().st_size for i in range(LAYER_COUNT)}
    assert sizes == {15}
    names = os.listdir(mount.path / "layers")
    assert len(names) == LAYER_COUNT
    assert (mount.path / "layers/f09999.txt").read_bytes() == b"one small file\n"
    status = mount.status()
    assert len(status["blobs"]) == LAYER_COUNT


ENTRY_COUNT = 100_000


def big_directory_tar() -> bytes:
    """``data/big`` with 100,000 files: empty, but every 10,000th holds its own number."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for directory in ("data", "data/big"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for i in range(ENTRY_COUNT):
            info = tarfile.TarInfo(f"data/big/f{i:06d}.txt")
            content = f"{i}\n".encode() if i % 10_000 == 0 else b""
            info.size, info.mode = len(content), 0o644
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def big_directory(registry: Registry, pusher: Pusher) -> str:
    reference = f"{registry.host}/hostile/bigdir:v1"
    data = big_directory_tar()
    push_one_layer_kit(pusher, reference, Layer(f"{KIT}.dataset.v1.tar", data, diff_id=sha256(data)),
                       "datasets", "data")
    return reference


def vm_hwm_bytes(pid: int) -> int:
    """A process's peak resident memory, from /proc (while it runs)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def test_100000_entries_in_one_directory(mounter: Mounter, big_directory: str) -> None:
    """Listed whole, read and looked up by name through a mount, in bounded memory: the daemon
    peaked at about 160 MB while it indexed the 51 MB tar (it reads windows of up to 64 MiB of
    headers), and held about 105 MB when it loaded the index from the cache instead."""
    assert kitfs_in(mounter.cache_dir, "cache", "stats").returncode == 0  # see the 100 MB test
    mount = mounter.mount(big_directory)
    names = os.listdir(mount.path / "data/big")
    assert sorted(names) == [f"f{i:06d}.txt" for i in range(ENTRY_COUNT)]
    assert sorted(os.listdir(mount.path / "data/big")) == sorted(names)  # a second listing
    for i in range(0, ENTRY_COUNT, 10_000):
        assert (mount.path / f"data/big/f{i:06d}.txt").read_bytes() == f"{i}\n".encode()
    sizes = {(mount.path / f"data/big/f{i:06d}.txt").stat().st_size for i in range(1, 5000)}
    assert sizes == {0}
    assert vm_hwm_bytes(mount.pid) < 256 * MiB, vm_hwm_bytes(mount.pid)


def test_100000_entries_through_the_command_line(kitfs: Any, big_directory: str) -> None:
    listed = json.loads(kitfs("ls", "--json", big_directory, "data/big").stdout)
    assert len(listed) == 1 + ENTRY_COUNT
    assert kitfs("cat", big_directory, "data/big/f090000.txt").stdout == b"90000\n"


# --- one hostile kit leaves the others alone -----------------------------------------------------


def test_a_diff_id_naming_another_kits_layer_cannot_touch_that_layer(
        mounter: Mounter, registry: Registry, pusher: Pusher) -> None:
    """A hostile kit's config claims, as the diffId of its gzip layer, the digest of another
    kit's (uncompressed) layer, which is public. Its decompressed stream and its index must not
    land where the other kit's content and index are kept, nor mark that content failed."""
    good_files = {"data/genuine.txt": b"genuine bytes\n" * 100}
    good = tar_layer("dataset", good_files, "data")
    good_reference = f"{registry.host}/victim/kit:v1"
    push_one_layer_kit(pusher, good_reference, good, "datasets", "data")
    hostile_tar = kit_tar({"data/genuine.txt": b"HOSTILE BYTES\n" * 100,
                           "data/planted.txt": b"planted\n"}, "data")
    hostile = Layer(f"{KIT}.dataset.v1.tar+gzip", gzip.compress(hostile_tar, mtime=0))
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0", "datasets": [
        {"path": "data", "digest": hostile.digest, "diffId": good.digest}]}  # the lie
    hostile_reference = f"{registry.host}/attacker/kit:v1"
    pusher.push_kit(hostile_reference, kitfile, [hostile])

    victim = mounter.mount(good_reference, name="victim")
    attacker = mounter.mount(hostile_reference, name="attacker")
    attacker.expect_error("failed verification")
    with pytest.raises(OSError, match="Input/output error") as caught:  # its diffId check
        (attacker.path / "data/planted.txt").read_bytes()
    assert caught.value.errno == errno.EIO
    # the victim, mounted before and after, sees its own tree and bytes
    assert sorted(os.listdir(victim.path / "data")) == ["genuine.txt"]
    assert (victim.path / "data/genuine.txt").read_bytes() == good_files["data/genuine.txt"]
    again = mounter.mount(good_reference, name="again")
    assert sorted(os.listdir(again.path / "data")) == ["genuine.txt"]
    assert (again.path / "data/genuine.txt").read_bytes() == good_files["data/genuine.txt"]


def cache_files(cache_dir: Path) -> dict[str, tuple[int, int]]:
    """Every chunk file: its size and mtime (a rewrite would change the mtime)."""
    return {str(p.relative_to(cache_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in (cache_dir / "chunks").rglob("*") if p.is_file()}


def test_hostile_kits_leave_another_mount_and_the_cache_untouched(
        mounter: Mounter, registry: Registry, pusher: Pusher, cache_dir: Path) -> None:
    """A mounted kit, fully read and verified; then, on the same cache, one hostile kit after
    another. The mount keeps serving the same bytes, and its cache entries are as they were."""
    weights = os.urandom(9 * MiB)
    good = tar_layer("model", {"models/w.bin": weights}, "models/w.bin")
    victim_reference = f"{registry.host}/victim/weights:v1"
    push_one_layer_kit(pusher, victim_reference, good, "model", "models/w.bin")
    victim = mounter.mount(victim_reference, name="victim")
    assert (victim.path / "models/w.bin").read_bytes() == weights
    # the read is answered as chunks arrive; their cache files and the digest follow
    for _ in range(10):
        if [blob["state"] for blob in victim.status()["blobs"]] == ["verified"]:
            break
    before = cache_files(cache_dir)
    assert len(before) == 3  # the layer's three 4 MiB chunks

    itself = f"{registry.host}/isolation/cycle:v1"
    push_referencing_kit(pusher, itself, itself)
    symlink = tarfile.TarInfo("src/evil")
    symlink.type, symlink.linkname = tarfile.SYMTYPE, "/etc/shadow"
    hostile_tar = Layer(f"{KIT}.code.v1.tar", kit_tar({"src/a.py": b"x"}, "src", extra=[symlink]))
    tar_reference = f"{registry.host}/isolation/tar:v1"
    push_one_layer_kit(pusher, tar_reference, hostile_tar)
    lying_reference = f"{registry.host}/isolation/sizes:v1"
    push_with_sizes(pusher, lying_reference, tar_layer("code", {"src/b.py": b"y" * 5000}, "src"),
                    layer_size=20_000)
    push_one_layer_kit(pusher, f"{registry.host}/isolation/big:v1",
                       tar_layer("code", {"src/c.py": b"z"}, "src"))  # the proxy swells it
    with running(FaultProxy(registry.host)) as proxy:
        proxy.add(Rule("forward", path="/isolation/big/manifests/", times=None,
                       body=b'{"schemaVersion":2,"pad":"' + b"x" * (8 * MiB) + b'"}'))
        # the victim's layer, one byte off (flipped: a byte set to 0 may have been 0 already)
        forged = weights[:MiB] + bytes([weights[MiB] ^ 0xFF]) + weights[MiB + 1 :]
        proxy.add(Rule("forward", path=f"/blobs/{good.digest}", times=None,
                       body=good.data.replace(weights, forged)))
        via_proxy = victim_reference.replace(registry.host, proxy.host)
        outcomes = [
            kitfs_in(cache_dir, "ls", itself),
            kitfs_in(cache_dir, "ls", tar_reference),
            kitfs_in(cache_dir, "cat", lying_reference, "src/b.py"),
            kitfs_in(cache_dir, "ls", f"{proxy.host}/isolation/big:v1"),
            # the same digest through a registry that forges it: served from the cache
            kitfs_in(cache_dir, "cat", via_proxy, "models/w.bin"),
        ]
        forged_fetches = len(proxy.requests(f"/blobs/{good.digest}"))
    assert [o.returncode for o in outcomes] == [65, 65, 65, 65, 0], [o.stderr for o in outcomes]
    assert outcomes[-1].stdout == weights and forged_fetches == 0
    assert (victim.path / "models/w.bin").read_bytes() == weights
    assert cache_files(cache_dir) == {**before, **{k: v for k, v in cache_files(cache_dir).items()
                                                   if k not in before}}  # kept, not rewritten
    assert all(cache_files(cache_dir)[name] == before[name] for name in before)
    state = json.loads(kitfs_in(cache_dir, "inspect", "--json", victim_reference).stdout)
    assert [layer["verification"] for layer in state["layers"]] == ["verified"]
    verify = kitfs_in(cache_dir, "cache", "verify")
    assert verify.returncode == 0 and b", 0 dropped" in verify.stdout, verify.stdout


def test_a_verified_layer_refetched_from_a_forging_registry_is_refused_chunk_by_chunk(
        registry: Registry, pusher: Pusher, cache_dir: Path) -> None:
    """Once a layer is verified, the BLAKE3 of each piece of its chunks is kept: a chunk fetched again
    (its file gone from the cache) from a registry that forges it is refused, and the layer is
    not marked failed: the genuine registry still serves it."""
    weights = os.urandom(9 * MiB)
    layer = tar_layer("model", {"models/w.bin": weights}, "models/w.bin")
    reference = f"{registry.host}/hostile/verified:v1"
    push_one_layer_kit(pusher, reference, layer, "model", "models/w.bin")
    assert kitfs_in(cache_dir, "cat", reference, "models/w.bin").stdout == weights
    chunk_files = sorted(p for p in (cache_dir / "chunks").rglob("*") if p.is_file())
    assert len(chunk_files) == 3
    chunk_files[1].unlink()  # chunk 1 (bytes 4-8 MiB) must come from the registry again
    flipped = bytes([weights[5 * MiB] ^ 0xFF])  # not b"\0": one time in 256 that is the byte
    forged = layer.data.replace(weights, weights[: 5 * MiB] + flipped + weights[5 * MiB + 1 :])
    with running(FaultProxy(registry.host)) as proxy:
        proxy.add(Rule("forward", path=f"/blobs/{layer.digest}", body=forged, times=None))
        result = kitfs_in(cache_dir, "cat", reference.replace(registry.host, proxy.host),
                           "models/w.bin")
    refused(result, f"layer {layer.digest}: chunk 1 from the registry differs from the verified "
            "blob's (BLAKE3 of its pieces)")
    assert kitfs_in(cache_dir, "cat", reference, "models/w.bin").stdout == weights


def test_verify_off_serves_forged_bytes(registry: Registry, pusher: Pusher,
                                        cache_dir: Path) -> None:
    """--verify off checks no layer digest (benchmarks only): what the registry sends is served."""
    layer = tar_layer("code", {"src/a.py": b"print('genuine')\n"}, "src")
    reference = f"{registry.host}/hostile/off:v1"
    push_one_layer_kit(pusher, reference, layer)
    with running(FaultProxy(registry.host)) as proxy:
        proxy.add(Rule("forward", path=f"/blobs/{layer.digest}", times=None,
                       body=layer.data.replace(b"genuine", b"forgery")))
        via_proxy = reference.replace(registry.host, proxy.host)
        off = kitfs_in(cache_dir, "cat", via_proxy, "src/a.py", "--verify", "off")
        eventual = kitfs_in(cache_dir / "other", "cat", via_proxy, "src/a.py")
    assert off.returncode == 0 and off.stdout == b"print('forgery')\n"
    refused(eventual, f"expected {layer.digest}")


def test_a_digest_forged_by_one_registry_fails_for_the_whole_cache_until_cleared(
        registry: Registry, pusher: Pusher, cache_dir: Path) -> None:
    """The limit of a cache shared by digest (the README's threat model says so): the failure
    a forging registry causes is the digest's, whichever registry is asked next."""
    layer = tar_layer("code", {"src/a.py": b"print('genuine')\n"}, "src")
    reference = f"{registry.host}/hostile/shared:v1"
    push_one_layer_kit(pusher, reference, layer)
    with running(FaultProxy(registry.host)) as proxy:
        proxy.add(Rule("forward", path=f"/blobs/{layer.digest}", times=None,
                       body=layer.data.replace(b"genuine", b"forgery")))
        refused(kitfs_in(cache_dir, "cat", reference.replace(registry.host, proxy.host),
                          "src/a.py"), f"expected {layer.digest}")
    refused(kitfs_in(cache_dir, "cat", reference, "src/a.py"), "failed verification earlier")
    assert kitfs_in(cache_dir, "cache", "clear").returncode == 0
    assert kitfs_in(cache_dir, "cat", reference, "src/a.py").stdout == b"print('genuine')\n"


def test_strict_mode_never_lists_a_tree_read_from_unverified_bytes(
        registry: Registry, pusher: Pusher, cache_dir: Path) -> None:
    """A forging registry answers a layer whose headers name other files. An eventual-mode
    listing through it indexes those headers (a listing reads headers, not whole layers) and
    the cache keeps that index; a --verify strict read of the same digest from an honest
    registry must not reuse it: it sees the tree of the verified bytes."""
    big = os.urandom(10 * 1024 * 1024)  # the headers sit in the first and the last chunk
    layer = tar_layer("code", {"src/big.bin": big, "src/good.py": b"print(1)\n"}, "src")
    forged = tar_layer("code", {"src/big.bin": big, "src/evil.py": b"print(2)\n"}, "src")
    assert len(forged.data) == len(layer.data) and forged.data != layer.data
    reference = f"{registry.host}/hostile/index-from-forged:v1"
    push_one_layer_kit(pusher, reference, layer)
    with running(FaultProxy(registry.host)) as proxy:
        proxy.add(Rule("forward", path=f"/blobs/{layer.digest}", body=forged.data, times=None))
        lying = kitfs_in(cache_dir, "ls", reference.replace(registry.host, proxy.host))
    assert lying.returncode == 0 and b"src/evil.py" in lying.stdout  # eventual: unverified
    # strict: the layer is verified before its index is trusted; the forged chunks the cache
    # holds fail it (the shared-cache limit of the threat model), never "no such file"
    refused(kitfs_in(cache_dir, "cat", "--verify", "strict", reference, "src/good.py"),
            "failed verification")
    # the failure also drops the index read from those bytes: no listing shows them again
    after = kitfs_in(cache_dir, "ls", reference)
    assert after.returncode == 65 and b"evil" not in after.stdout, after
    assert kitfs_in(cache_dir, "cache", "clear").returncode == 0
    strict = kitfs_in(cache_dir, "cat", "--verify", "strict", reference, "src/good.py")
    assert strict.returncode == 0 and strict.stdout == b"print(1)\n", strict.stderr
