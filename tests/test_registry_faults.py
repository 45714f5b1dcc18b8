"""The registry client under faults: the real CLI, a fault-injecting proxy, the real registry.

Kits are pushed straight to the real distribution registry; every ``kitfs`` command here names
the proxy (``tests/faultproxy.py``) as its registry, and the proxy is programmed per test to
fail in one way. Each test checks what a user sees (bytes, exit code, message, time taken) and
what went over the wire (the proxy's record of requests and answers).

Credentials: every run gets its own empty ``DOCKER_CONFIG`` and ``KITOPS_HOME`` (the two places
``kitfs.remote.auth`` reads), so nothing on this machine leaks in; auth tests write them.

TLS: the loopback host names (``localhost``, ``127.x``) mean plain HTTP to kitfs, so the TLS
tests name the proxy ``registry.test`` and run the CLI with that one name resolved to
127.0.0.1 (the certificate is issued for it), as a remote registry's DNS name would be.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kitfs.demo import Pusher, Registry, sample_kit
from tests.faultproxy import Cert, FaultProxy, Rule, issue, make_ca, running, server_context
from tests.kitfs_cli import Kitfs, Result, run_kitfs

WEIGHTS = os.urandom(6 * 1024 * 1024 + 4321)  # two 4 MiB chunks: the second starts past 0
WEIGHTS_PATH = "models/weights.safetensors"
README = b"# Sample kit\n"
REPOSITORY = "faults/sample"
TLS_NAME = "registry.test"  # resolved to 127.0.0.1 for the CLI by _AS_REMOTE_HOST


@dataclass(frozen=True)
class Kit:
    tag: str  # repository:tag, without the registry
    weights_digest: str  # the model layer: a tar holding WEIGHTS
    weights_layer_size: int


Run = Callable[..., Result]


@pytest.fixture(scope="module")
def kit(registry: Registry, pusher: Pusher) -> Kit:
    push = sample_kit(pusher, f"{registry.host}/{REPOSITORY}:v1", WEIGHTS)
    model = push.layers[0]
    return Kit(f"{REPOSITORY}:v1", model.digest, len(model.data))


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with running(FaultProxy(registry.host)) as started:
        yield started


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """Where the CLI looks for credentials: empty unless a test writes there."""
    docker, kitops = tmp_path / "docker", tmp_path / "kitops"
    docker.mkdir()
    kitops.mkdir()
    return {"DOCKER_CONFIG": str(docker), "KITOPS_HOME": str(kitops)}


@pytest.fixture
def run(kitfs: Kitfs, home: dict[str, str]) -> Run:
    """The ``kitfs`` CLI with this test's cache and credential places; returns an Result."""

    def go(*args: str, check: bool = True, env: dict[str, str] | None = None) -> Result:
        return kitfs(*args, check=check, env={**home, **(env or {})})

    return go


def reference(proxy: FaultProxy, kit: Kit) -> str:
    return f"{proxy.host}/{kit.tag}"


def write_credentials(path: Path, host: str, user: str, password: str) -> Path:
    """A Docker-format config (``docker login`` and ``kit login`` both write this shape)."""
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return path


def assert_clean_failure(outcome: Result, code: int) -> None:
    assert outcome.returncode == code, (outcome.returncode, outcome.stderr)
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert outcome.stderr.startswith("kitfs: "), outcome.stderr


# --- the proxy itself -----------------------------------------------------------------------------


def test_the_proxy_forwards_and_counts_every_byte(run: Run, proxy: FaultProxy, kit: Kit) -> None:
    assert run("cat", reference(proxy, kit), WEIGHTS_PATH).stdout == WEIGHTS
    blob = proxy.requests(kit.weights_digest)
    assert blob and all(s.status == 206 and s.headers["range"].startswith("bytes=") for s in blob)
    # a whole-file read verifies the layer: every byte of it fetched, and only once
    assert sum(s.body_bytes for s in blob) == kit.weights_layer_size
    assert proxy.requests("/manifests/")[0].status == 200


# --- transient failures are retried ---------------------------------------------------------------


def test_transient_503s_are_retried(run: Run, proxy: FaultProxy, kit: Kit) -> None:
    manifest = proxy.add(Rule("status", path="/manifests/", status=503, times=2))
    blob = proxy.add(Rule("status", path=kit.weights_digest, status=503, times=3))
    assert run("cat", reference(proxy, kit), WEIGHTS_PATH).stdout == WEIGHTS
    assert (manifest.hits, blob.hits) == (2, 3)
    statuses = [s.status for s in proxy.requests(kit.weights_digest)]
    assert statuses.count(503) == 3 and statuses.count(206) >= 2


def test_429_with_retry_after_is_honoured(run: Run, proxy: FaultProxy, kit: Kit) -> None:
    proxy.add(Rule("status", path="/manifests/", status=429, retry_after="1", times=1))
    assert run("cat", reference(proxy, kit), "README.md").stdout == README
    manifests = proxy.requests("/manifests/")
    assert [s.status for s in manifests] == [429, 200]
    waited = manifests[1].at - manifests[0].at
    assert waited >= 0.9, waited  # the client's own backoff starts at 50 ms


def test_connection_resets_are_retried(run: Run, proxy: FaultProxy, kit: Kit) -> None:
    manifest = proxy.add(Rule("reset", path="/manifests/", times=1))
    blob = proxy.add(Rule("reset", path=kit.weights_digest, times=2))
    assert run("cat", reference(proxy, kit), WEIGHTS_PATH).stdout == WEIGHTS
    assert (manifest.hits, blob.hits) == (1, 2)


def test_truncated_bodies_are_retried(run: Run, proxy: FaultProxy, kit: Kit) -> None:
    rule = proxy.add(Rule("truncate", path=kit.weights_digest, times=2))
    assert run("cat", reference(proxy, kit), WEIGHTS_PATH).stdout == WEIGHTS
    assert rule.hits == 2


def test_a_slow_answer_within_the_timeout_is_waited_for(run: Run, proxy: FaultProxy, kit: Kit) -> None:
    rule = proxy.add(Rule("stall", path="/manifests/", delay_s=1))
    outcome = run("cat", "--timeout", "3", reference(proxy, kit), "README.md")
    assert outcome.stdout == README
    assert rule.hits == 1 and len(proxy.requests("/manifests/")) == 1  # waited, did not give up


# --- failures that last: a clear error within --timeout, never wrong bytes ----------------------


@pytest.mark.parametrize("target", ["manifest", "blob"])
def test_a_registry_that_keeps_failing_gives_a_clear_error_in_time(
    run: Run, proxy: FaultProxy, kit: Kit, target: str
) -> None:
    path = "/manifests/" if target == "manifest" else kit.weights_digest
    proxy.add(Rule("status", path=path, status=500, times=None))
    outcome = run("cat", "--timeout", "2", reference(proxy, kit), WEIGHTS_PATH, check=False)
    assert_clean_failure(outcome, 69)
    assert proxy.host in outcome.stderr and "HTTP 500" in outcome.stderr, outcome.stderr
    assert "no answer" not in outcome.stderr  # it did answer, with errors
    assert outcome.elapsed_s < 2 + 10
    assert len(proxy.requests(path)) >= 3  # it retried before giving up
    assert outcome.stdout == b""


def test_a_registry_that_always_truncates_gives_an_error_not_wrong_bytes(
    run: Run, proxy: FaultProxy, kit: Kit
) -> None:
    proxy.add(Rule("truncate", path=kit.weights_digest, times=None))
    outcome = run("cat", "--timeout", "2", reference(proxy, kit), WEIGHTS_PATH, check=False)
    assert_clean_failure(outcome, 69)
    assert "closed" in outcome.stderr and kit.weights_digest in outcome.stderr, outcome.stderr
    assert WEIGHTS.startswith(outcome.stdout)
    assert outcome.elapsed_s < 2 + 10


def test_a_stalled_registry_gives_a_clear_error_within_the_timeout(
    run: Run, proxy: FaultProxy, kit: Kit
) -> None:
    proxy.add(Rule("stall", path="/manifests/", delay_s=60, times=None))
    outcome = run("ls", "--timeout", "2", reference(proxy, kit), check=False)
    assert_clean_failure(outcome, 69)
    assert f"{proxy.host}: manifest" in outcome.stderr and "within 2 s" in outcome.stderr
    assert outcome.elapsed_s < 2 + 10


def test_a_dead_registry_gives_a_clear_error_within_the_timeout(
    run: Run, proxy: FaultProxy, kit: Kit
) -> None:
    ref = reference(proxy, kit)
    proxy.stop()
    outcome = run("cat", "--timeout", "2", ref, "README.md", check=False)
    assert_clean_failure(outcome, 69)
    assert proxy.host in outcome.stderr and "no answer within 2 s" in outcome.stderr
    assert outcome.elapsed_s < 2 + 10


# --- Range answers ----------------------------------------------------------------------------


def test_a_chunked_206_gives_the_right_bytes(run: Run, proxy: FaultProxy, kit: Kit) -> None:
    proxy.add(Rule("forward", path=kit.weights_digest, times=None, chunked=True))
    assert run("cat", reference(proxy, kit), WEIGHTS_PATH).stdout == WEIGHTS
    answered = proxy.requests(kit.weights_digest)
    assert answered and all(s.status == 206 for s in answered)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_200_with_the_whole_blob_gives_the_right_bytes(
    run: Run, proxy: FaultProxy, kit: Kit, chunked: bool
) -> None:
    proxy.add(Rule("ignore_range", path=kit.weights_digest, times=None, chunked=chunked))
    outcome = run("cat", reference(proxy, kit), WEIGHTS_PATH)
    assert outcome.stdout == WEIGHTS
    answered = proxy.requests(kit.weights_digest)
    assert answered and all(s.status == 200 for s in answered)
    # the second chunk starts at 4 MiB: the bytes before it were dropped, not served
    assert any(not s.headers["range"].startswith("bytes=0-") for s in answered)
    assert "ignored a Range request" in outcome.stderr


def test_a_whole_blob_under_another_2xx_status_is_refused(
    run: Run, proxy: FaultProxy, kit: Kit
) -> None:
    """A transforming proxy's 203 (or any 2xx but 200/206) is not a range and not the blob."""
    proxy.add(Rule("ignore_range", path=kit.weights_digest, times=None, rewrite_status=203))
    outcome = run("cat", reference(proxy, kit), WEIGHTS_PATH, check=False)
    assert_clean_failure(outcome, 69)
    assert "203" in outcome.stderr and kit.weights_digest in outcome.stderr, outcome.stderr
    assert WEIGHTS.startswith(outcome.stdout)


def test_a_wrong_content_range_is_an_error_not_wrong_bytes(
    run: Run, proxy: FaultProxy, kit: Kit
) -> None:
    proxy.add(Rule("wrong_range", path=kit.weights_digest, times=None))
    outcome = run("cat", reference(proxy, kit), WEIGHTS_PATH, check=False)
    assert_clean_failure(outcome, 69)
    assert "Content-Range" in outcome.stderr and kit.weights_digest in outcome.stderr
    assert proxy.host in outcome.stderr
    assert outcome.stdout == b""


def test_a_redirect_to_storage_keeps_the_range_and_drops_credentials(
    run: Run, proxy: FaultProxy, kit: Kit, home: dict[str, str]
) -> None:
    proxy.require_basic("alice", "s3cret")
    write_credentials(Path(home["DOCKER_CONFIG"]) / "config.json", proxy.host, "alice", "s3cret")
    proxy.add(Rule("redirect", path=kit.weights_digest, times=None))
    assert run("cat", reference(proxy, kit), WEIGHTS_PATH).stdout == WEIGHTS
    redirected = [s for s in proxy.requests(kit.weights_digest) if s.status == 307]
    stored = proxy.storage_seen
    assert redirected and len(stored) == len(redirected)
    assert sorted(str(s.headers.get("range")) for s in stored) == sorted(
        s.headers["range"] for s in redirected)
    assert all(s.status == 206 for s in stored)
    assert sum(s.body_bytes for s in stored) == kit.weights_layer_size
    assert all("authorization" in s.headers for s in redirected)
    assert not any("authorization" in s.headers for s in stored)  # another host: no credentials


# --- auth ---------------------------------------------------------------------------------------


def test_basic_auth_with_credentials_from_the_docker_config(
    run: Run, proxy: FaultProxy, kit: Kit, home: dict[str, str]
) -> None:
    proxy.require_basic("alice", "s3cret")
    write_credentials(Path(home["DOCKER_CONFIG"]) / "config.json", proxy.host, "alice", "s3cret")
    assert run("cat", reference(proxy, kit), "README.md").stdout == README
    statuses = [s.status for s in proxy.seen]
    assert statuses[0] == 401 and statuses.count(401) == 1 and set(statuses[1:]) <= {200, 206}


def test_basic_auth_without_credentials_exits_77(run: Run, proxy: FaultProxy, kit: Kit) -> None:
    proxy.require_basic("alice", "s3cret")
    outcome = run("ls", reference(proxy, kit), check=False)
    assert_clean_failure(outcome, 77)
    assert proxy.host in outcome.stderr and "login" in outcome.stderr, outcome.stderr


def test_a_wrong_password_exits_77_with_a_clear_message(
    run: Run, proxy: FaultProxy, kit: Kit, home: dict[str, str]
) -> None:
    proxy.require_basic("alice", "s3cret")
    config = write_credentials(Path(home["DOCKER_CONFIG"]) / "config.json", proxy.host, "alice",
                               "not-the-password")
    outcome = run("ls", reference(proxy, kit), check=False)
    assert_clean_failure(outcome, 77)
    assert "refused" in outcome.stderr and "alice" in outcome.stderr, outcome.stderr
    assert str(config) in outcome.stderr  # where the refused credentials came from
    assert "not-the-password" not in outcome.stderr


def test_bearer_tokens_are_fetched_and_refetched_when_revoked(
    run: Run, proxy: FaultProxy, kit: Kit, home: dict[str, str]
) -> None:
    # after 3 authorized requests (manifest, config, first blob range) every token is revoked
    proxy.require_bearer("bob", "hunter2", revoke_after=3)
    write_credentials(Path(home["KITOPS_HOME"]) / "credentials.json", proxy.host, "bob", "hunter2")
    assert run("cat", reference(proxy, kit), WEIGHTS_PATH).stdout == WEIGHTS
    assert len(proxy.tokens_issued) >= 2
    refused_with_token = [s for s in proxy.seen if s.status == 401
                          and s.headers.get("authorization", "").startswith("Bearer ")]
    assert refused_with_token  # a revoked token was refused mid-session...
    token_requests = proxy.requests("/token")
    assert all(s.status == 200 for s in token_requests)  # ...and a new one fetched
    basic = "Basic " + base64.b64encode(b"bob:hunter2").decode()
    assert all(s.headers.get("authorization") == basic for s in token_requests)
    assert f"scope=repository%3A{REPOSITORY.replace('/', '%2F')}%3Apull" in token_requests[0].path


def test_token_service_hiccups_are_retried(run: Run, proxy: FaultProxy, kit: Kit) -> None:
    proxy.require_bearer()  # anonymous tokens
    rule = proxy.add(Rule("status", path="^/token", status=503, times=2))
    assert run("cat", reference(proxy, kit), "README.md").stdout == README
    assert rule.hits == 2


def test_the_token_service_refusing_the_password_exits_77(
    run: Run, proxy: FaultProxy, kit: Kit, home: dict[str, str]
) -> None:
    proxy.require_bearer("bob", "hunter2")
    write_credentials(Path(home["DOCKER_CONFIG"]) / "config.json", proxy.host, "bob", "wrong")
    outcome = run("ls", reference(proxy, kit), check=False)
    assert_clean_failure(outcome, 77)
    assert "refused" in outcome.stderr and proxy.host in outcome.stderr, outcome.stderr


# --- TLS ----------------------------------------------------------------------------------------

# The CLI with one DNS name faked: registry.test is 127.0.0.1 (traffic stays on loopback).
_AS_REMOTE_HOST = f"""
import socket
_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    return _getaddrinfo("127.0.0.1" if host == {TLS_NAME!r} else host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
"""


@dataclass(frozen=True)
class Certs:
    ca: Cert  # signs the registry's certificate; given with --ca-file
    registry: Cert
    other_ca: Cert  # signs the storage's certificate; stands for a public CA
    storage: Cert


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("tls")
    ca, other_ca = make_ca(directory, "test-ca"), make_ca(directory, "public-ca")
    return Certs(ca, issue(ca, directory, "registry", [TLS_NAME, "localhost", "127.0.0.1"]),
                 other_ca, issue(other_ca, directory, "storage", ["127.0.0.1"]))


@pytest.fixture
def tls_proxy(registry: Registry, certs: Certs) -> Iterator[FaultProxy]:
    with running(FaultProxy(registry.host, hostname=TLS_NAME, context=server_context(certs.registry),
                            storage_context=server_context(certs.storage))) as started:
        yield started


@pytest.fixture
def run_remote(cache_dir: Path, home: dict[str, str]) -> Run:
    """The CLI (same ``main`` as ``python -m kitfs``) with registry.test resolving to loopback."""

    def go(*args: str, env: dict[str, str] | None = None) -> Result:
        environ = {**os.environ, "KITFS_CACHE_DIR": str(cache_dir), **home, **(env or {})}
        return run_kitfs(*args, env=environ, prelude=_AS_REMOTE_HOST)

    return go


def test_tls_with_the_ca_file(run_remote: Run, tls_proxy: FaultProxy, kit: Kit, certs: Certs) -> None:
    outcome = run_remote("cat", "--ca-file", str(certs.ca.cert), reference(tls_proxy, kit),
                         WEIGHTS_PATH)
    assert (outcome.returncode, outcome.stderr) == (0, "")
    assert outcome.stdout == WEIGHTS
    assert len(tls_proxy.requests(kit.weights_digest)) >= 2


def test_tls_without_the_ca_file_fails_at_once_with_a_clear_message(
    run_remote: Run, tls_proxy: FaultProxy, kit: Kit
) -> None:
    outcome = run_remote("ls", "--timeout", "30", reference(tls_proxy, kit))
    assert_clean_failure(outcome, 69)
    assert tls_proxy.host in outcome.stderr and "certificate" in outcome.stderr, outcome.stderr
    assert "--ca-file" in outcome.stderr
    assert outcome.elapsed_s < 15  # not retried until the 30 s timeout: it cannot get better


def test_the_ca_file_adds_to_the_system_certificates(
    run_remote: Run, tls_proxy: FaultProxy, kit: Kit, certs: Certs
) -> None:
    """The registry is trusted through --ca-file, its blob storage through the system store
    (OpenSSL's default paths, which SSL_CERT_FILE sets): both must be trusted at once."""
    tls_proxy.add(Rule("redirect", path=kit.weights_digest, times=None))
    outcome = run_remote("cat", "--ca-file", str(certs.ca.cert), reference(tls_proxy, kit),
                         WEIGHTS_PATH, env={"SSL_CERT_FILE": str(certs.other_ca.cert)})
    assert (outcome.returncode, outcome.stderr) == (0, "")
    assert outcome.stdout == WEIGHTS
    assert tls_proxy.storage_url.startswith("https://") and tls_proxy.storage_seen


def test_an_unreadable_ca_file_is_a_usage_error(run: Run, proxy: FaultProxy, kit: Kit,
                                                tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    outcome = run("ls", "--ca-file", str(missing), reference(proxy, kit), check=False)
    assert_clean_failure(outcome, 64)
    assert str(missing) in outcome.stderr


def test_a_loopback_registry_with_tls_is_reachable_with_the_ca_file(
    run: Run, registry: Registry, certs: Certs, kit: Kit
) -> None:
    proxy = FaultProxy(registry.host, hostname="localhost",
                       context=server_context(certs.registry)).start()
    try:
        outcome = run("cat", "--timeout", "2", "--ca-file", str(certs.ca.cert),
                      reference(proxy, kit), "README.md", check=False)
    finally:
        proxy.stop()
    assert (outcome.returncode, outcome.stdout) == (0, README), outcome.stderr
