"""Offline after a pull (README "Pulling, pinning, offline, diff"): with its registry stopped
(by PID), a pulled kit mounts and reads right by digest, and by tag at the digest the tag last
resolved to, with one warning (after the one saying the registry is being retried);
``--offline`` never contacts a registry at all."""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kitfs.demo import Pusher, Registry
from kitfs.mount.fstab import mount_options_to_argv
from tests.kits import ALL_FILES, EveryPartKit, push_every_part_kit
from tests.mounts import Mount, Mounter


@pytest.fixture
def own_registry(tmp_path: Path, docker_registry: str) -> Iterator[Registry]:
    """A registry of this test's own: the test stops it."""
    registry = Registry(tmp_path / "registry").start()
    try:
        yield registry
    finally:
        registry.stop()


@pytest.fixture
def pulled(own_registry: Registry, kitfs: Any) -> tuple[EveryPartKit, str]:
    """The every-part kit pushed, pulled by tag; then the registry is stopped (by PID).
    Returns the kit and its manifest digest."""
    every = push_every_part_kit(Pusher(own_registry.host), f"{own_registry.host}/team/offline:v1")
    kitfs("pull", every.reference)
    digest = json.loads(kitfs("inspect", "--json", every.reference).text)["digest"]
    assert own_registry.process is not None
    pid = own_registry.process.pid
    own_registry.stop()  # SIGTERM to that PID, and waited for
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return every, digest


def mount_and_read_everything(mounter: Mounter, reference: str, *args: str,
                              name: str) -> tuple[Mount, str]:
    path = mounter.mountpoint(name)
    log_file = mounter.workdir / f"{name}.log"
    done = mounter.kitfs("mount", reference, str(path), "--log-file", str(log_file), *args)
    mount = mounter.adopt(reference, path, log_file)
    for file, data in ALL_FILES.items():
        assert (mount.path / file).read_bytes() == data, file
    kitfile = (mount.path / "Kitfile").read_text()
    assert "name: every-part" in kitfile
    return mount, done.stderr


def test_a_pulled_kit_mounts_and_reads_by_tag_and_by_digest_with_its_registry_stopped(
        mounter: Mounter, pulled: tuple[EveryPartKit, str]) -> None:
    every, digest = pulled
    repository = every.reference.rsplit(":", 1)[0]
    _, said = mount_and_read_everything(mounter, f"{repository}@{digest}", "--timeout", "2",
                                        name="digest")
    assert said == ""  # a digest needs no registry: nothing to warn about
    by_tag, said = mount_and_read_everything(mounter, every.reference, "--timeout", "2",
                                             name="tag")
    warnings = said.splitlines()
    assert len(warnings) == 2, said  # the registry is being retried; then what was done about it
    host = every.reference.split("/", 1)[0]
    assert re.fullmatch(rf"kitfs: WARNING: {re.escape(host)}: manifest team/offline:v1: .*; "
                        r"retrying, giving up 2 s after the first attempt \(--timeout\)",
                        warnings[0]), warnings[0]
    assert re.fullmatch(
        rf"kitfs: WARNING: {re.escape(every.reference)}: the registry could not be asked \(.*"
        rf"no answer within 2 s.*\); using {digest}, the digest this tag last resolved to "
        r"\(at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+\)", warnings[1]), warnings[1]
    assert by_tag.status()["digest"] == digest
    for warning in warnings:  # and both are in the daemon's log
        assert warning.removeprefix("kitfs: WARNING: ") in by_tag.log()


def test_offline_never_contacts_the_registry(
        mounter: Mounter, kitfs: Any, pulled: tuple[EveryPartKit, str]) -> None:
    every, digest = pulled
    _, said = mount_and_read_everything(mounter, every.reference, "--offline", name="offline")
    assert re.fullmatch(rf"kitfs: WARNING: {re.escape(every.reference)}: the registry could not be "
                        r"asked \(\S+: manifest team/offline:v1: not asked for: --offline forbids "
                        rf"contacting the registry\); using {digest}, .*", said.strip()), said
    assert kitfs("cat", every.reference, "README.md", "--offline").stdout == ALL_FILES["README.md"]
    repository = every.reference.rsplit(":", 1)[0]
    _, said = mount_and_read_everything(mounter, f"{repository}@{digest}", "--offline",
                                        name="digest-offline")
    assert said == ""  # by digest, everything came from the cache: not one request was wanted
    other = every.reference.replace(":v1", ":v2")  # a tag this cache never resolved
    done = kitfs("ls", other, "--offline", check=False)
    assert done.returncode == 69
    assert done.stderr.strip().endswith("manifest team/offline:v2: not asked for: --offline "
                                        "forbids contacting the registry")


def test_offline_a_layer_that_was_not_pulled_fails_at_once_naming_why(
        kitfs: Any, own_registry: Registry) -> None:
    every = push_every_part_kit(Pusher(own_registry.host), f"{own_registry.host}/team/partial:v1")
    kitfs("pull", every.reference, "--filter", "model")
    own_registry.stop()
    assert kitfs("cat", every.reference, "models/tokenizer.json", "--offline").stdout == \
        ALL_FILES["models/tokenizer.json"]
    done = kitfs("cat", every.reference, "src/train.py", "--offline", check=False)
    assert done.returncode == 69
    assert re.search(rf"blob {every.layers['code'].digest} bytes 0-\d+: not asked for: --offline "
                     "forbids contacting the registry", done.stderr), done.stderr


def test_a_registry_that_answers_is_believed_over_the_cache(
        kitfs: Any, own_registry: Registry) -> None:
    every = push_every_part_kit(Pusher(own_registry.host), f"{own_registry.host}/team/gone:v1")
    kitfs("pull", every.reference, "--filter", "docs")
    digest = json.loads(kitfs("inspect", "--json", every.reference).text)["digest"]
    request = urllib.request.Request(
        f"http://{own_registry.host}/v2/team/gone/manifests/{digest}", method="DELETE")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202
    done = kitfs("cat", every.reference, "README.md", check=False)
    assert done.returncode == 66
    assert "manifest team/gone:v1 not found" in done.stderr
    assert "last resolved" not in done.stderr


def test_offline_is_a_mount_option_too() -> None:
    assert mount_options_to_argv("r.io/a:b", "/mnt/x", "ro,offline") == [
        "mount", "r.io/a:b", "/mnt/x", "--offline"]
