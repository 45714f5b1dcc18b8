"""``kitfs pull`` and pins through the real CLI and registry (README "Pulling, pinning,
offline, diff"): what a pull fetches, verifies and indexes, its progress display on a terminal
and off one, a failed layer named, and pins that survive eviction pressure."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kitfs.demo import Pusher, Registry, sample_kit, tar_layer, with_layer_info
from tests.kitfs_cli import kitfs_argv
from tests.kits import ALL_FILES, EveryPartKit, push_every_part_kit
from tests.mounts import Mounter

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def every(registry: Registry, pusher: Pusher) -> EveryPartKit:
    return push_every_part_kit(pusher, f"{registry.host}/team/pull-every-part:v1")


@pytest.fixture(scope="module")
def big(registry: Registry, pusher: Pusher) -> str:
    reference = f"{registry.host}/team/pull-big:v1"
    sample_kit(pusher, reference, os.urandom(40 * MiB))
    return reference


def test_a_pulled_kit_is_verified_and_indexed_so_reading_it_asks_the_registry_nothing(
        kitfs: Any, every: EveryPartKit, registry: Registry) -> None:
    done = kitfs("pull", every.reference)
    total = sum(len(layer.data) for layer in every.layers.values())
    assert re.fullmatch(rf"pulled {re.escape(every.reference)}@sha256:[0-9a-f]{{64}}: 8 layers, "
                        rf"{total} bytes verified \({total} fetched\) in \d+\.\d s\n", done.text)
    inspect = json.loads(kitfs("inspect", "--json", every.reference).text)
    assert {layer["verification"] for layer in inspect["layers"]} == {"verified"}
    mark = registry.log_mark()
    listed = {e["path"] for e in json.loads(kitfs("ls", "--json", every.reference).text)}
    assert set(ALL_FILES) <= listed
    for path, data in ALL_FILES.items():
        assert kitfs("cat", every.reference, path).stdout == data, path
    assert registry.blob_bytes_served(mark) == 0
    again = kitfs("pull", every.reference)
    assert f"{total} bytes verified (0 fetched)" in again.text


def test_off_a_terminal_progress_is_a_plain_line_per_layer(
        kitfs: Any, every: EveryPartKit) -> None:
    done = kitfs("pull", every.reference, "--filter", "model", "--filter", "docs")
    lines = done.stderr.splitlines()
    sizes = [len(every.layers[part].data) for part in ("model", "part", "docs")]
    assert re.fullmatch(rf"pulling {re.escape(every.reference)}@sha256:[0-9a-f]{{64}}: 3 layers, "
                        r"9\.0 MiB", lines[0])
    expected = [("model", "models/llama.gguf"), ("modelpart", "models/tokenizer.json"),
                ("docs", "README.md")]
    assert len(lines) == 4
    done_bytes = 0
    for number, ((kind, path), line, size) in enumerate(zip(expected, lines[1:], sizes,
                                                             strict=True), start=1):
        part = {"model": "model", "modelpart": "part", "docs": "docs"}[kind]
        done_bytes += size
        assert line.startswith(f"layer {number}/3 {every.layers[part].digest} {kind} {path}: "
                               "verified; "), line
        assert re.search(r"of 9\.0 MiB, [\d.]+ (B|KiB|MiB|GiB)/s, ETA \d+ s$", line), line
    assert "pulled" in done.text and "pulled" not in done.stderr


def pull_on_a_terminal(reference: str, cache_dir: Path, *args: str) -> tuple[str, bytes]:
    """``kitfs pull`` with its stderr on a pseudo-terminal: what it showed there (escape
    sequences dropped), and its stdout."""
    leader, follower = pty.openpty()
    env = dict(os.environ, KITFS_CACHE_DIR=str(cache_dir), COLUMNS="160", TERM="xterm")
    with os.fdopen(leader, "rb", buffering=0) as terminal, subprocess.Popen(
            kitfs_argv("pull", reference, *args), stdout=subprocess.PIPE,
            stderr=follower, env=env) as proc:
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = terminal.read(65536)
            except OSError:  # EIO: the pull exited and closed its end
                break
            if not chunk:
                break
            out += chunk
        stdout, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
    return re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", out).decode(errors="replace"), stdout


def test_on_a_terminal_progress_is_one_bar_with_bytes_rate_eta_and_layers(
        every: EveryPartKit, cache_dir: Path) -> None:
    shown, stdout = pull_on_a_terminal(every.reference, cache_dir)
    assert "8/8 layers" in shown  # layers done
    assert re.search(r"9\.\d/9\.\d MiB", shown)  # bytes, of the total
    assert re.search(r"[\d.]+ [kMG]?i?B/s", shown)  # rate
    assert "ETA" in shown
    assert "layer 1/8" not in shown  # not the plain lines
    assert stdout.startswith(b"pulled ")
    plain, _ = pull_on_a_terminal(every.reference, cache_dir, "--progress", "plain")
    assert "layer 8/8 " in plain and "8/8 layers" not in plain


def test_progress_none_prints_only_the_summary(kitfs: Any, every: EveryPartKit) -> None:
    done = kitfs("pull", every.reference, "--filter", "code", "--progress", "none")
    assert done.stderr == ""
    assert done.text.startswith("pulled ")


def test_a_layer_failing_its_digest_fails_the_pull_naming_it(
        kitfs: Any, pusher: Pusher, registry: Registry) -> None:
    reference = f"{registry.host}/team/pull-forged:v1"
    data = tar_layer("dataset", {"data/x.csv": b"x\n1\n"}, "data")
    docs = tar_layer("docs", {"docs/manual.pdf": os.urandom(5 * MiB)}, "docs")
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0",
                               "datasets": [{"name": "x", "path": "data"}],
                               "docs": [{"path": "docs"}]}
    with_layer_info(kitfile, [(kitfile["datasets"][0], data), (kitfile["docs"][0], docs)])
    pusher.push_kit(reference, kitfile, [docs, data])
    registry.flip_stored_byte(docs.digest, 3 * MiB)
    done = kitfs("pull", reference, "--pin", "--progress", "plain", check=False)
    assert done.returncode == 65
    assert re.search(rf"^kitfs: layer {docs.digest} \(docs docs\) of \S+: layer "
                     rf"{docs.digest} failed verification", done.stderr, re.MULTILINE), done.stderr
    assert f"layer 1/2 {data.digest} dataset data: verified" in done.stderr
    assert done.text == ""
    assert kitfs("cache", "pins").text == "no pins\npinned 0 bytes in all\n"


def test_pins_survive_eviction_pressure_and_count_in_the_quota(
        kitfs: Any, every: EveryPartKit, big: str, registry: Registry) -> None:
    quota = ["--cache-size", "24M"]
    kitfs("pull", every.reference, "--pin", *quota)
    pins = json.loads(kitfs("cache", "pins", "--json").text)
    assert [(p["reference"], p["layers"]) for p in pins] == [(every.reference, 8)]
    pinned = json.loads(kitfs("cache", "stats", "--json").text)["pinned_bytes"]
    assert pinned == pins[0]["bytes"] and pinned > 9 * MiB

    weights = kitfs("cat", big, "models/weights.safetensors", *quota).stdout  # 40 MiB through 24
    stats = json.loads(kitfs("cache", "stats", "--json", *quota).text)
    assert stats["used_bytes"] <= 24 * MiB and stats["pinned_bytes"] == pinned
    mark = registry.log_mark()
    for path, data in ALL_FILES.items():
        assert kitfs("cat", every.reference, path, *quota).stdout == data, path
    assert registry.blob_bytes_served(mark) == 0  # every pinned byte was still there
    mark = registry.log_mark()
    assert kitfs("cat", big, "models/weights.safetensors", *quota).stdout == weights
    assert registry.blob_bytes_served(mark) > 16 * MiB  # the unpinned kit had been evicted

    assert kitfs("cache", "unpin", every.reference).text == f"unpinned {every.reference}\n"
    assert json.loads(kitfs("cache", "stats", "--json").text)["pinned_bytes"] == 0
    kitfs("cat", big, "models/weights.safetensors", *quota)
    mark = registry.log_mark()
    assert kitfs("cat", every.reference, "models/llama.gguf", *quota).stdout == \
        ALL_FILES["models/llama.gguf"]
    assert registry.blob_bytes_served(mark) > 0  # unpinned, it was evicted like the rest


def test_a_pin_that_does_not_fit_the_quota_is_refused_before_anything_is_fetched(
        kitfs: Any, every: EveryPartKit, big: str, registry: Registry) -> None:
    kitfs("pull", every.reference, "--pin", "--cache-size", "24M")
    mark = registry.log_mark()
    done = kitfs("pull", big, "--pin", "--cache-size", "24M", check=False)
    assert done.returncode == 64
    assert re.search(r"kitfs: pinning \S+ needs \d+ bytes, and \d+ bytes are pinned already: "
                     r"more than the cache's quota \(--cache-size 25165824 bytes\); kitfs cache "
                     "pins lists the pins, kitfs cache unpin REF releases one", done.stderr)
    assert registry.blob_bytes_served(mark) < 64 * 1024  # the config, no layer
    assert [p["reference"] for p in json.loads(kitfs("cache", "pins", "--json").text)] == [
        every.reference]


def test_a_quota_smaller_than_the_pins_is_refused_with_a_clear_error(
        kitfs: Any, mounter: Mounter, every: EveryPartKit) -> None:
    kitfs("pull", every.reference, "--pin", "--filter", "model")
    pinned = json.loads(kitfs("cache", "stats", "--json").text)["pinned_bytes"]
    for command in (["cache", "stats"], ["cat", every.reference, "README.md"]):
        done = kitfs(*command, "--cache-size", "4M", check=False)
        assert done.returncode == 64
        assert done.stderr.startswith(f"kitfs: --cache-size {4 * MiB} bytes is smaller than the "
                                      f"{pinned} bytes pinned in the cache "), done.stderr
    mounted = mounter.kitfs("mount", every.reference, str(mounter.mountpoint()),
                            "--cache-size", "4M", check=False)
    assert mounted.returncode == 64 and "bytes pinned in the cache" in mounted.stderr


def test_unpin_takes_the_reference_as_pulled_or_its_digest(
        kitfs: Any, every: EveryPartKit) -> None:
    kitfs("pull", every.reference, "--pin", "--filter", "docs")
    digest = json.loads(kitfs("inspect", "--json", every.reference).text)["digest"]
    repository = every.reference.rsplit(":", 1)[0]
    assert kitfs("cache", "pins").text.splitlines()[0] == \
        f"{every.reference}  {digest}  1 layer  {len(every.layers['docs'].data)} bytes"
    assert kitfs("cache", "unpin", f"{repository}:v0", check=False).returncode == 66
    assert kitfs("cache", "unpin", f"{repository}@{digest}").text == f"unpinned {every.reference}\n"
    assert kitfs("cache", "pins").text == "no pins\npinned 0 bytes in all\n"
