"""Credentials against the real distribution registry with htpasswd (HTTP Basic) auth.

A second registry on loopback wants ``alice``'s password for every request. Each test drives
the ``kitfs`` command line in a subprocess whose HOME, ``DOCKER_CONFIG``, ``KITOPS_HOME`` and
PATH point into the test's own directory, so the only credentials it can find are the ones the
test wrote: the Docker config (inline ``auths``, ``credHelpers``, ``credsStore``), kit's own
store (``credentials.json``), or a ``docker-credential-*`` helper script on PATH.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from kitfs.core.modelkit import SessionOptions, open_session
from kitfs.demo import Pusher, Registry, sample_kit
from kitfs.format.reference import Reference
from kitfs.remote.auth import Credentials
from tests.kitfs_cli import Result, run_kitfs

USER = "alice"
PASSWORD = "kitfs-pw-" + secrets.token_hex(8)  # unique, so finding it in stderr means a leak
WEIGHTS = os.urandom(96 * 1024 + 17)
KIT_PATH = "models/weights.safetensors"


@dataclass
class AuthKit:
    registry: Registry
    reference: str

    @property
    def host(self) -> str:
        return self.registry.host


@pytest.fixture(scope="module")
def auth_kit(tmp_path_factory: pytest.TempPathFactory, docker_registry: str
             ) -> Iterator[AuthKit]:
    """A registry that wants alice's password (stopped by PID), holding the sample kit."""
    registry = Registry(tmp_path_factory.mktemp("auth-registry"), users={USER: PASSWORD}).start()
    try:
        reference = f"{registry.host}/team/private:v1"
        sample_kit(Pusher(registry.host, USER, PASSWORD), reference, WEIGHTS)
        yield AuthKit(registry, reference)
    finally:
        registry.stop()


class Sandbox:
    """A HOME, a Docker config directory, a KITOPS_HOME and a bin directory for one test."""

    def __init__(self, root: Path, host: str) -> None:
        self.root = root
        self.host = host
        self.home = root / "home"
        self.docker = root / "docker"
        self.kitops = root / "kitops"
        self.bin = root / "bin"
        self.helper_log = root / "helper-stdin.log"
        for d in (self.home, self.docker, self.kitops, self.bin):
            d.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("DOCKER_CONFIG", "KITOPS_HOME", "XDG_DATA_HOME", "HOME")}
        self.env.update(HOME=str(self.home), DOCKER_CONFIG=str(self.docker),
                        KITOPS_HOME=str(self.kitops), KITFS_CACHE_DIR=str(root / "cache"),
                        PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}")

    def docker_config(self, config: dict[str, Any]) -> None:
        (self.docker / "config.json").write_text(json.dumps(config))

    def kit_store(self, config: dict[str, Any], directory: Path | None = None) -> None:
        target = directory or self.kitops
        target.mkdir(parents=True, exist_ok=True)
        (target / "credentials.json").write_text(json.dumps(config))

    def helper(self, name: str, username: str = USER, secret: str = PASSWORD) -> None:
        """``docker-credential-NAME``: the ``get`` protocol, credentials for ``self.host`` only."""
        script = self.bin / f"docker-credential-{name}"
        answer = json.dumps({"ServerURL": self.host, "Username": username, "Secret": secret})
        script.write_text(
            "#!/bin/sh\n"
            '[ "$1" = get ] || exit 2\n'
            "read -r server\n"
            f"printf '%s %s\\n' {name} \"$server\" >> '{self.helper_log}'\n"
            f"if [ \"$server\" = '{self.host}' ]; then\n"
            f"  printf '%s' '{answer}'\n"
            "else\n"
            "  echo 'credentials not found in native keychain'; exit 1\n"
            "fi\n"
        )
        script.chmod(script.stat().st_mode | stat.S_IXUSR)

    def helper_calls(self) -> list[str]:
        return self.helper_log.read_text().splitlines() if self.helper_log.exists() else []

    def kitfs(self, *args: str) -> Result:
        return run_kitfs(*args, env=self.env, timeout_s=60)


@pytest.fixture
def sandbox(tmp_path: Path, auth_kit: AuthKit) -> Sandbox:
    return Sandbox(tmp_path, auth_kit.host)


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def assert_no_secret(text: str) -> None:
    for secret in (PASSWORD, basic(USER, PASSWORD), basic(USER, "wrong-" + PASSWORD)):
        assert secret not in text, "a credential leaked into the output"


def assert_lists_the_kit(outcome: Result) -> None:
    assert outcome.returncode == 0, outcome.stderr
    assert "Traceback" not in outcome.stderr
    assert KIT_PATH in outcome.stdout.decode()


# --- the Docker config ---------------------------------------------------------------------


@pytest.mark.parametrize("key", ["{host}", "http://{host}", "https://{host}/", "{host}/v2/"])
def test_docker_config_inline_auth(sandbox: Sandbox, auth_kit: AuthKit, key: str) -> None:
    """Base64 ``auth``, under the host or a legacy key with a scheme or a path (as Docker matches)."""
    sandbox.docker_config({"auths": {key.format(host=auth_kit.host): {"auth": basic(USER, PASSWORD)}}})
    assert_lists_the_kit(sandbox.kitfs("ls", auth_kit.reference))
    assert sandbox.kitfs("cat", auth_kit.reference, KIT_PATH).stdout == WEIGHTS


def test_docker_config_username_and_password_fields(sandbox: Sandbox, auth_kit: AuthKit) -> None:
    sandbox.docker_config({"auths": {auth_kit.host: {"username": USER, "password": PASSWORD}}})
    assert_lists_the_kit(sandbox.kitfs("ls", auth_kit.reference))


def test_default_docker_config_under_home(sandbox: Sandbox, auth_kit: AuthKit) -> None:
    del sandbox.env["DOCKER_CONFIG"]
    (sandbox.home / ".docker").mkdir()
    (sandbox.home / ".docker" / "config.json").write_text(
        json.dumps({"auths": {auth_kit.host: {"auth": basic(USER, PASSWORD)}}}))
    assert_lists_the_kit(sandbox.kitfs("ls", auth_kit.reference))


# --- credential helpers --------------------------------------------------------------------


def test_cred_helper_for_the_registry(sandbox: Sandbox, auth_kit: AuthKit) -> None:
    """``credHelpers`` names the helper for this host; it is asked with the host on stdin."""
    sandbox.helper("kitfstest")
    sandbox.docker_config({"credHelpers": {auth_kit.host: "kitfstest"}})
    assert_lists_the_kit(sandbox.kitfs("ls", auth_kit.reference))
    assert sandbox.helper_calls() == [f"kitfstest {auth_kit.host}"]


def test_creds_store_default(sandbox: Sandbox, auth_kit: AuthKit) -> None:
    sandbox.helper("kitfstest")
    sandbox.docker_config({"credsStore": "kitfstest", "auths": {auth_kit.host: {}}})
    assert_lists_the_kit(sandbox.kitfs("ls", auth_kit.reference))
    assert sandbox.helper_calls() == [f"kitfstest {auth_kit.host}"]


def test_cred_helper_for_the_host_wins_over_creds_store(sandbox: Sandbox, auth_kit: AuthKit) -> None:
    sandbox.helper("kitfstest")
    sandbox.helper("wrongstore", secret="wrong-" + PASSWORD)
    sandbox.docker_config({"credsStore": "wrongstore", "credHelpers": {auth_kit.host: "kitfstest"}})
    assert_lists_the_kit(sandbox.kitfs("ls", auth_kit.reference))
    assert sandbox.helper_calls() == [f"kitfstest {auth_kit.host}"]


def test_helper_wins_over_inline_auth_and_falls_back_to_it(sandbox: Sandbox, auth_kit: AuthKit) -> None:
    """As in Docker and oras-go, a configured helper comes before ``auths``; when the helper has
    nothing for the host (or is missing), the inline entry is still used, without a warning."""
    sandbox.helper("kitfstest")
    sandbox.docker_config({"credsStore": "kitfstest",
                           "auths": {auth_kit.host: {"auth": basic(USER, "wrong-" + PASSWORD)}}})
    assert_lists_the_kit(sandbox.kitfs("ls", auth_kit.reference))

    sandbox.docker_config({"credsStore": "kitfstest",
                           "auths": {f"http://{auth_kit.host}": {"auth": basic(USER, PASSWORD)}}})
    sandbox.host = "some.other.registry"  # the helper now answers "not found" for our host
    sandbox.helper("kitfstest")
    outcome = sandbox.kitfs("ls", auth_kit.reference)
    assert_lists_the_kit(outcome)
    assert "WARNING" not in outcome.stderr

    sandbox.docker_config({"credsStore": "missing",
                           "auths": {auth_kit.host: {"auth": basic(USER, PASSWORD)}}})
    outcome = sandbox.kitfs("ls", auth_kit.reference)
    assert_lists_the_kit(outcome)
    assert "WARNING" not in outcome.stderr


async def test_a_slow_credential_helper_leaves_the_trio_thread_running(
        sandbox: Sandbox, auth_kit: AuthKit, monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper answers only once a file appears that a trio task of this same process writes
    when it sees the helper start: the kit opens only if the trio thread runs while the helper
    does (run on the trio thread, the helper would give up after 8 s, and the registry would
    refuse the anonymous request)."""
    started, go = sandbox.root / "helper-started", sandbox.root / "go"
    answer = json.dumps({"ServerURL": auth_kit.host, "Username": USER, "Secret": PASSWORD})
    script = sandbox.bin / "docker-credential-waiting"
    script.write_text(
        "#!/bin/sh\n"
        "read -r server\n"
        f"touch '{started}'\n"
        "i=0\n"
        f"while [ ! -e '{go}' ] && [ $i -lt 80 ]; do sleep 0.1; i=$((i + 1)); done\n"
        f"[ -e '{go}' ] || exit 1\n"
        f"printf '%s' '{answer}'\n"
    )
    script.chmod(0o755)
    sandbox.docker_config({"credHelpers": {auth_kit.host: "waiting"}})
    for name in ("HOME", "DOCKER_CONFIG", "KITOPS_HOME", "PATH"):
        monkeypatch.setenv(name, sandbox.env[name])

    async def answer_the_helper() -> None:
        with trio.fail_after(60):
            while not started.exists():  # noqa: ASYNC110 (another process writes it)
                await trio.sleep(0.02)
        go.touch()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_the_helper)
        async with open_session(SessionOptions(cache_dir=sandbox.root / "cache")) as session:
            kit = await session.open(Reference.parse(auth_kit.reference))
            node = await session.resolve(kit, KIT_PATH)
            assert await session.read_file(kit, node, 0, 16) == WEIGHTS[:16]
    assert go.exists()


# --- kit's own store -----------------------------------------------------------------------


def test_kit_store_in_kitops_home(sandbox: Sandbox, auth_kit: AuthKit) -> None:
    """``kit login`` writes ``$KITOPS_HOME/credentials.json`` (oras-go's file store format)."""
    sandbox.kit_store({"auths": {auth_kit.host: {"auth": basic(USER, PASSWORD)}}})
    assert_lists_the_kit(sandbox.kitfs("ls", auth_kit.reference))


@pytest.mark.parametrize("xdg", [True, False], ids=["XDG_DATA_HOME", "HOME"])
def test_kit_store_default_location(sandbox: Sandbox, auth_kit: AuthKit, xdg: bool) -> None:
    """Without KITOPS_HOME: ``$XDG_DATA_HOME/kitops``, else ``~/.local/share/kitops``."""
    del sandbox.env["KITOPS_HOME"]
    if xdg:
        data_home = sandbox.root / "xdg-data"
        sandbox.env["XDG_DATA_HOME"] = str(data_home)
    else:
        data_home = sandbox.home / ".local" / "share"
    sandbox.kit_store({"auths": {auth_kit.host: {"auth": basic(USER, PASSWORD)}}},
                      data_home / "kitops")
    assert_lists_the_kit(sandbox.kitfs("ls", auth_kit.reference))


def test_kit_store_comes_before_the_docker_config(sandbox: Sandbox, auth_kit: AuthKit) -> None:
    sandbox.kit_store({"auths": {auth_kit.host: {"auth": basic(USER, PASSWORD)}}})
    sandbox.docker_config({"auths": {auth_kit.host: {"auth": basic(USER, "wrong-" + PASSWORD)}}})
    assert_lists_the_kit(sandbox.kitfs("ls", auth_kit.reference))

    sandbox.kit_store({"auths": {auth_kit.host: {"auth": basic(USER, "wrong-" + PASSWORD)}}})
    sandbox.docker_config({"auths": {auth_kit.host: {"auth": basic(USER, PASSWORD)}}})
    assert sandbox.kitfs("ls", auth_kit.reference).returncode == 77


def test_kit_store_with_a_creds_store_helper(sandbox: Sandbox, auth_kit: AuthKit) -> None:
    """kit login on a machine with a native store records ``credsStore`` in credentials.json."""
    sandbox.helper("kitfstest")
    sandbox.kit_store({"credsStore": "kitfstest"})
    assert_lists_the_kit(sandbox.kitfs("ls", auth_kit.reference))


# --- refusals ------------------------------------------------------------------------------


def test_no_credentials_exit_77_naming_the_registry(sandbox: Sandbox, auth_kit: AuthKit) -> None:
    sandbox.docker_config({"auths": {"other.example:5000": {"auth": basic(USER, PASSWORD)}}})
    outcome = sandbox.kitfs("ls", auth_kit.reference)
    assert outcome.returncode == 77, outcome.stderr
    assert auth_kit.host in outcome.stderr and "credentials" in outcome.stderr
    assert "Traceback" not in outcome.stderr
    assert outcome.stdout == b""


def test_wrong_password_exit_77_and_no_secret_even_with_debug(sandbox: Sandbox,
                                                             auth_kit: AuthKit) -> None:
    sandbox.docker_config({"auths": {auth_kit.host: {"auth": basic(USER, "wrong-" + PASSWORD)}}})
    outcome = sandbox.kitfs("ls", auth_kit.reference, "--debug")
    assert outcome.returncode == 77, outcome.stderr
    assert auth_kit.host in outcome.stderr
    assert_no_secret(outcome.stderr)
    assert "wrong-" not in outcome.stderr


def test_no_secret_in_debug_output_of_a_successful_read(sandbox: Sandbox, auth_kit: AuthKit) -> None:
    sandbox.docker_config({"auths": {auth_kit.host: {"auth": basic(USER, PASSWORD)}}})
    outcome = sandbox.kitfs("cat", auth_kit.reference, KIT_PATH, "--debug")
    assert outcome.returncode == 0 and outcome.stdout == WEIGHTS, outcome.stderr
    assert "INFO" in outcome.stderr  # debug logging was on
    # where the credentials came from is told, without them
    assert f"credentials for {auth_kit.host}: user '{USER}' from " in outcome.stderr
    assert_no_secret(outcome.stderr)

    sandbox.docker_config({"credsStore": "kitfstest"})
    sandbox.helper("kitfstest")
    outcome = sandbox.kitfs("inspect", auth_kit.reference, "--debug")
    assert outcome.returncode == 0, outcome.stderr
    assert_no_secret(outcome.stderr + outcome.stdout.decode())
    # nor anywhere in the cache the reads filled (database, its -wal, chunks)
    cache = sandbox.root / "cache"
    stored = b"".join(p.read_bytes() for p in cache.rglob("*") if p.is_file())
    assert WEIGHTS in stored  # the cache does hold what was read
    for secret in (PASSWORD, basic(USER, PASSWORD)):
        assert secret.encode() not in stored and secret.encode().hex().encode() not in stored


def test_failing_or_missing_helper_is_reported_not_a_traceback(sandbox: Sandbox,
                                                              auth_kit: AuthKit) -> None:
    sandbox.docker_config({"credsStore": "missing"})
    outcome = sandbox.kitfs("ls", auth_kit.reference)
    assert outcome.returncode == 77, outcome.stderr
    assert "docker-credential-missing is not on PATH" in outcome.stderr
    assert "Traceback" not in outcome.stderr

    broken = sandbox.bin / "docker-credential-broken"
    broken.write_text(f"#!/bin/sh\necho 'helper exploded' >&2\necho '{PASSWORD}'\nexit 3\n")
    broken.chmod(0o755)
    sandbox.docker_config({"credsStore": "broken"})
    outcome = sandbox.kitfs("ls", auth_kit.reference, "--debug")
    assert outcome.returncode == 77, outcome.stderr
    assert "docker-credential-broken failed" in outcome.stderr and "helper exploded" in outcome.stderr
    assert_no_secret(outcome.stderr)  # the helper's stdout is never shown


@pytest.mark.parametrize("config", [
    {"auths": ["not", "an", "object"]},
    {"credHelpers": "kitfstest"},
    {"auths": {"{host}": {"auth": "%%% not base64 %%%"}}},
    {"auths": {"{host}": "a string"}},
    {"credsStore": 42},
], ids=["auths-list", "credHelpers-string", "bad-base64", "entry-string", "credsStore-number"])
def test_malformed_docker_config_means_no_credentials(sandbox: Sandbox, auth_kit: AuthKit,
                                                      config: dict[str, Any]) -> None:
    text = json.dumps(config).replace("{host}", auth_kit.host)
    (sandbox.docker / "config.json").write_text(text)
    outcome = sandbox.kitfs("ls", auth_kit.reference)
    assert outcome.returncode == 77, outcome.stderr
    assert "Traceback" not in outcome.stderr


def test_the_registry_is_closed_to_anonymous_pulls_and_pushes(auth_kit: AuthKit) -> None:
    """What makes every test above meaningful: without alice's password the registry says 401."""
    repo_url = f"http://{auth_kit.host}/v2/team/private"
    for method, url in (("GET", f"{repo_url}/manifests/v1"), ("POST", f"{repo_url}/blobs/uploads/")):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10)
        caught.value.close()
        assert caught.value.code == 401
        assert caught.value.headers["WWW-Authenticate"].startswith("Basic ")
    request = urllib.request.Request(f"{repo_url}/manifests/v1", headers={
        "Authorization": f"Basic {basic(USER, PASSWORD)}",
        "Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read())["layers"]


def test_credentials_never_show_the_password() -> None:
    creds = Credentials(USER, PASSWORD, "somewhere")
    assert PASSWORD not in repr(creds) and PASSWORD not in str(creds) and PASSWORD not in f"{creds}"
    assert creds.basic_header() == f"Basic {basic(USER, PASSWORD)}"
    assert creds == Credentials(USER, PASSWORD)  # where they came from is not part of them
