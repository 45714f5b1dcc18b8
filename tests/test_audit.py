"""The audit log (README "Audit log"): one JSON line per event, appended whole by concurrent
processes, never a credential. Real mounts, the real registry, the real command line."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kitfs.audit import AuditLog
from kitfs.demo import Entry, Layer, Pusher, Registry, push_entries, sample_kit, tar_layer, with_layer_info
from kitfs.environment import default_audit_log
from kitfs.format.mediatypes import KIT
from tests.mounts import Mount, Mounter

MiB = 1024 * 1024


def events(path: Path) -> list[dict[str, Any]]:
    """Every line of the log, each parsed on its own (a torn line fails here)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(path: Path, count: int, **match: Any) -> list[dict[str, Any]]:
    """The events matching ``match`` once there are ``count`` of them (daemons record layer
    outcomes with their status, every second)."""
    deadline = time.monotonic() + 30
    while True:
        found = [e for e in (events(path) if path.exists() else [])
                 if match.items() <= e.items()]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def push_two_layer_kit(pusher: Pusher, reference: str, weights: bytes) -> tuple[Layer, Layer]:
    model = tar_layer("model", {"models/w.bin": weights}, "models/w.bin")
    docs = tar_layer("docs", {"README.md": b"# audited\n"}, "README.md")
    push_entries(pusher, reference, [Entry("model", {"path": "models/w.bin"}, model),
                                     Entry("docs", {"path": "README.md"}, docs)])
    return model, docs


def test_a_mount_its_layers_outcomes_and_its_unmount_are_recorded(
        mounter: Mounter, registry: Registry, pusher: Pusher, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    weights = os.urandom(5 * MiB)
    reference = f"{registry.host}/audit/kit:v1"
    model, docs = push_two_layer_kit(pusher, reference, weights)
    mount = mounter.mount(reference, "--audit-log", str(log), "--verify", "strict",
                          "--cache-size", "1G")
    digest = mount.status()["digest"]
    (mounted,) = events(log)
    assert mounted["event"] == "mount" and mounted["pid"] == mount.pid
    assert (mounted["uid"], mounted["reference"], mounted["digest"], mounted["mountpoint"]) == \
        (os.getuid(), reference, digest, str(mount.path))
    assert mounted["host"] and mounted["time"].endswith("Z")
    options = mounted["options"]
    assert (options["verify"], options["cache_size_bytes"], options["allow_other"]) == \
        ("strict", 1 << 30, False)
    assert mounted["registry_hosts"] == [registry.host]
    assert {(layer["digest"], layer["path"], layer["state"]) for layer in mounted["layers"]} == \
        {(model.digest, "models/w.bin", "not fetched"), (docs.digest, "README.md", "not fetched")}
    assert (mount.path / "models/w.bin").read_bytes() == weights
    assert (mount.path / "README.md").read_bytes() == b"# audited\n"
    outcomes = wait_for(log, 2, event="layer_verification")
    assert {(e["layer"], e["path"], e["outcome"], e["digest"], e["mountpoint"]) for e in outcomes} == {
        (model.digest, "models/w.bin", "verified", digest, str(mount.path)),
        (docs.digest, "README.md", "verified", digest, str(mount.path))}
    mounter.kitfs("umount", str(mount.path))
    last = events(log)[-1]
    assert (last["event"], last["digest"], last["mountpoint"], last["pid"]) == \
        ("unmount", digest, str(mount.path), mount.pid)
    assert last["bytes_served"] == len(weights) + len(b"# audited\n")
    assert last["bytes_fetched"] >= len(model.data) + len(docs.data)
    assert [e["event"] for e in events(log)].count("layer_verification") == 2  # once each


def test_a_verification_failure_is_recorded_once_with_the_layers_outcome(
        mounter: Mounter, registry: Registry, pusher: Pusher, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    reference = f"{registry.host}/audit/tampered:v1"
    model, _ = push_two_layer_kit(pusher, reference, os.urandom(3 * MiB))
    registry.flip_stored_byte(model.digest)
    mount = mounter.mount(reference, "--audit-log", str(log))
    mount.expect_error(rf"{model.digest} failed verification")
    for _ in range(3):  # the same failure, answered three times
        with pytest.raises(OSError, match="Input/output error"):
            (mount.path / "models/w.bin").read_bytes()
    (failed,) = wait_for(log, 1, event="layer_verification", outcome="failed")
    assert failed["layer"] == model.digest
    failures = [e for e in events(log) if e["event"] == "verification_failure"]
    assert len(failures) == 1
    assert failures[0]["layer"] == model.digest and "failed verification" in failures[0]["error"]


def test_a_failed_mount_and_a_cache_clear_are_recorded(
        mounter: Mounter, registry: Registry, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    reference = f"{registry.host}/audit/absent:v1"
    done = mounter.kitfs("mount", reference, str(mounter.mountpoint()), "--audit-log", str(log),
                         check=False)
    assert done.returncode == 66
    (failed,) = events(log)
    assert (failed["event"], failed["reference"], failed["exit_code"]) == \
        ("mount_failed", reference, 66)
    assert "not found" in failed["error"]
    mounter.kitfs("cache", "clear", "--audit-log", str(log))
    cleared = events(log)[-1]
    assert (cleared["event"], cleared["cache_dir"], cleared["uid"]) == \
        ("cache_clear", str(mounter.cache_dir), os.getuid())


def test_pulls_pins_and_unpins_are_recorded(
        mounter: Mounter, registry: Registry, pusher: Pusher, tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    reference = f"{registry.host}/audit/pulled:v1"
    model, docs = push_two_layer_kit(pusher, reference, os.urandom(3 * MiB))
    mounter.kitfs("pull", reference, "--pin", "--progress", "none", "--audit-log", str(log))
    pulled, pinned = events(log)
    assert (pulled["event"], pulled["reference"], pulled["outcome"], pulled["pinned"]) == \
        ("pull", reference, "verified", True)
    assert pulled["digest"].startswith("sha256:")
    assert set(pulled["layers"]) == {model.digest, docs.digest}
    assert pulled["bytes"] == pulled["fetched_bytes"] == len(model.data) + len(docs.data)
    assert (pinned["event"], pinned["reference"], pinned["digest"]) == \
        ("pin", reference, pulled["digest"])
    mounter.kitfs("cache", "unpin", reference, "--audit-log", str(log))
    unpinned = events(log)[-1]
    assert (unpinned["event"], unpinned["reference"]) == ("unpin", reference)

    forged = f"{registry.host}/audit/forged:v1"
    model, _ = push_two_layer_kit(pusher, forged, os.urandom(3 * MiB))
    registry.flip_stored_byte(model.digest, -100)
    done = mounter.kitfs("pull", forged, "--progress", "none", "--audit-log", str(log),
                         check=False)
    assert done.returncode == 65
    failed = events(log)[-1]
    assert (failed["event"], failed["reference"], failed["outcome"], failed["pinned"]) == \
        ("pull", forged, "failed", False)
    assert model.digest in failed["error"] and "failed verification" in failed["error"]


def test_a_mount_whose_audit_log_cannot_be_written_does_not_happen(
        mounter: Mounter, registry: Registry, pusher: Pusher, tmp_path: Path) -> None:
    reference = f"{registry.host}/audit/unwritable:v1"
    push_two_layer_kit(pusher, reference, b"w")
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    path = mounter.mountpoint()
    done = mounter.kitfs("mount", reference, str(path), "--audit-log",
                         str(blocker / "audit.jsonl"), check=False)
    assert done.returncode == 64
    assert f"cannot write the audit log {blocker}/audit.jsonl: Not a directory" in done.stderr
    assert not os.path.ismount(path)


USER = "auditor"
PASSWORD = "kitfs-audit-pw-" + secrets.token_hex(8)
HEADER_SECRET = "kitfs-header-" + secrets.token_hex(8)


def test_no_credentials_ever(mounter: Mounter, tmp_path: Path, docker_registry: str) -> None:
    """A registry wanting a password (from a Docker config), a hosts.toml header carrying a
    token, ``--debug``: mount, read, a verification outcome, unmount, cache clear. Neither the
    password, nor its Basic form, nor the header's value is in the audit log or the daemon's log."""
    log = tmp_path / "audit.jsonl"
    own = Registry(tmp_path / "auth-registry", users={USER: PASSWORD}).start()
    try:
        reference = f"{own.host}/audit/private:v1"
        sample_kit(Pusher(own.host, USER, PASSWORD), reference, os.urandom(MiB))
        docker = tmp_path / "docker"
        docker.mkdir()
        basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        (docker / "config.json").write_text(json.dumps({"auths": {own.host: {"auth": basic}}}))
        hosts = tmp_path / "certs.d" / own.host
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(f'[header]\n  x-registry-token = "{HEADER_SECRET}"\n')
        mounter.extra_env["DOCKER_CONFIG"] = str(docker)
        mount = mounter.mount(reference, "--audit-log", str(log), "--debug", "--hosts-dir",
                              str(tmp_path / "certs.d"))
        assert len((mount.path / "models/weights.safetensors").read_bytes()) == MiB
        assert wait_for(log, 1, event="layer_verification")
        mounter.kitfs("umount", str(mount.path))
        mounter.kitfs("cache", "clear", "--audit-log", str(log))
    finally:
        own.stop()
    written = log.read_text()
    assert events(log)[0]["event"] == "mount"
    assert events(log)[-1]["event"] == "cache_clear"
    for text in (written, mount.log()):
        for secret in (PASSWORD, basic, HEADER_SECRET):
            assert secret not in text, "a credential leaked"
    with pytest.raises(ValueError, match="never carry password, token"):
        AuditLog(log).record("pull", password=PASSWORD, token="x")


def many_layer_kit(pusher: Pusher, reference: str, count: int) -> None:
    layers = [Layer(f"{KIT}.code.v1.raw", os.urandom(1000 + i),
                    {"org.cncf.model.filepath": f"src/f{i:03d}.bin"}) for i in range(count)]
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0", "package": {},
                               "code": [{"path": f"src/f{i:03d}.bin"} for i in range(count)]}
    with_layer_info(kitfile, list(zip(kitfile["code"], layers, strict=True)))
    pusher.push_kit(reference, kitfile, layers)


def test_two_mounts_at_once_write_whole_lines(
        mounter: Mounter, registry: Registry, pusher: Pusher, tmp_path: Path) -> None:
    """Two daemons, each recording a line for each of its 60 layers as it verifies them,
    into one log at the same time: every line is whole and every event is there once."""
    log = tmp_path / "audit.jsonl"
    mounts: list[Mount] = []
    for name in ("one", "two"):
        reference = f"{registry.host}/audit/many-{name}:v1"
        many_layer_kit(pusher, reference, 60)
        mounts.append(mounter.mount(reference, "--audit-log", str(log), name=name))

    def read_all(mount: Mount) -> None:
        for path in sorted((mount.path / "src").iterdir()):
            path.read_bytes()

    readers = [threading.Thread(target=read_all, args=(m,)) for m in mounts]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(120)
    for mount in mounts:
        assert len(wait_for(log, 60, event="layer_verification", mountpoint=str(mount.path))) == 60
    for mount in mounts:
        mounter.kitfs("umount", str(mount.path))
    lines = events(log)  # each parsed alone: a torn or interleaved line fails here
    for mount in mounts:
        own = [e for e in lines if e.get("mountpoint") == str(mount.path)]
        assert [e["event"] for e in own].count("layer_verification") == 60
        assert own[0]["event"] == "mount" and own[-1]["event"] == "unmount"


def test_processes_appending_large_lines_at_once_never_tear_one(tmp_path: Path) -> None:
    """The property the log rests on, pushed harder than mounts can: 4 processes append 200
    lines of 96 KiB each (many pages, far past PIPE_BUF) to one file at once."""
    log = tmp_path / "audit.jsonl"
    script = ("import sys; from pathlib import Path; from kitfs.audit import AuditLog\n"
              "log = AuditLog(Path(sys.argv[1]))\n"
              "for i in range(200): log.record('test', writer=sys.argv[2], n=i, "
              "pad=sys.argv[2] * 96 * 1024)\n")
    writers = [subprocess.Popen([sys.executable, "-c", script, str(log), str(w)])
               for w in range(4)]
    assert [w.wait(120) for w in writers] == [0] * 4
    lines = events(log)
    assert len(lines) == 800
    for writer in range(4):
        mine = [e for e in lines if e["writer"] == str(writer)]
        assert [e["n"] for e in mine] == list(range(200))
        assert all(e["pad"] == str(writer) * 96 * 1024 for e in mine)


def test_the_default_log_of_root_is_var_log_kitfs(tmp_path: Path) -> None:
    """As root, without KITFS_AUDIT_LOG, on a fresh /var/log (a tmpfs in a private mount
    namespace: the machine's /var/log is not touched)."""
    assert os.geteuid() == 0
    env = {k: v for k, v in os.environ.items() if k != "KITFS_AUDIT_LOG"}
    script = (f"mount -t tmpfs tmpfs /var/log && {sys.executable} -m kitfs cache clear "
              f"--cache-dir {tmp_path / 'cache'} && stat -c '%a %n' /var/log/kitfs "
              "/var/log/kitfs/audit.jsonl && cat /var/log/kitfs/audit.jsonl")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1:3] == ["750 /var/log/kitfs", "640 /var/log/kitfs/audit.jsonl"]
    assert json.loads(lines[3])["event"] == "cache_clear"


def test_the_default_log_of_another_user_is_in_the_runtime_directory(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KITFS_AUDIT_LOG")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert default_audit_log(tmp_path) == tmp_path / "audit.jsonl"
    monkeypatch.setenv("KITFS_AUDIT_LOG", str(tmp_path / "elsewhere.jsonl"))
    assert default_audit_log(tmp_path) == tmp_path / "elsewhere.jsonl"
