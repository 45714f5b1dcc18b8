"""containerd's hosts.toml, read as containerd's docs/hosts.md and its code say (README "Mirrors")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kitfs.errors import UsageError
from kitfs.format.hosts import (
    ALL_CAPABILITIES,
    Capability,
    host_directories,
    parse_hosts_toml,
)
from kitfs.remote.hostsdir import load_hosts

# The "Setup a Local Mirror for Docker" example of docs/hosts.md, plus headers and paths.
DOCS_EXAMPLE = b"""
server = "https://registry-1.docker.io"    # Exclude this to not use upstream

[host."https://public-mirror.example.com"]
  capabilities = ["pull"]                  # Requires less trust, won't resolve tag to digest
[host."https://docker-mirror.internal"]
  capabilities = ["pull", "resolve"]
  ca = "docker-mirror.crt"                 # Or an absolute path
  [host."https://docker-mirror.internal".header]
    x-custom-2 = ["value1", "value2"]
[host."https://mirror-bak.registry/us"]
  capabilities = ["PULL"]
  skip_verify = true
[host."https://non-compliant-mirror.registry/v2/upstream"]
  capabilities = ["pull"]
  override_path = true
[host."http://10.0.1.2:5000"]
"""


def test_hosts_come_in_file_order_then_the_server() -> None:
    config = parse_hosts_toml(DOCS_EXAMPLE, "/etc/containerd/certs.d/docker.io", "hosts.toml")
    assert [(h.scheme, h.host, h.path) for h in config.hosts] == [
        ("https", "public-mirror.example.com", "/v2"),
        ("https", "docker-mirror.internal", "/v2"),
        ("https", "mirror-bak.registry", "/us/v2"),  # /v2 appended to the path
        ("https", "non-compliant-mirror.registry", "/v2/upstream"),  # override_path: as it is
        ("http", "10.0.1.2:5000", "/v2"),
        ("https", "registry-1.docker.io", "/v2"),
    ]
    assert [h.is_server for h in config.hosts] == [False] * 5 + [True]
    public, private, bak, _, plain, server = config.hosts
    assert public.capabilities == Capability.PULL
    assert not public.can(Capability.PULL | Capability.RESOLVE)  # a tag is never resolved there
    assert private.can(Capability.PULL | Capability.RESOLVE)
    assert bak.capabilities == Capability.PULL and bak.skip_verify
    assert private.ca_files == ("/etc/containerd/certs.d/docker.io/docker-mirror.crt",)
    assert private.headers == (("x-custom-2", "value1, value2"),)
    assert plain.capabilities == ALL_CAPABILITIES == server.capabilities  # absent: all of them
    assert config.unused == ()


def test_without_a_server_the_registry_itself_is_last_with_the_top_level_settings() -> None:
    config = parse_hosts_toml(b'ca = ["/etc/a.pem", "b.pem"]\nskip_verify = false\n'
                              b'[header]\nx-a = "1"\n'
                              b'[host."mirror.example.com:5000"]\ncapabilities = ["pull"]\n',
                              "/d", "hosts.toml")
    mirror, itself = config.hosts
    assert (mirror.scheme, mirror.host, mirror.path) == ("https", "mirror.example.com:5000", "/v2")
    assert (itself.scheme, itself.host, itself.is_server) == (None, None, True)
    assert itself.ca_files == ("/etc/a.pem", "/d/b.pem")
    assert itself.headers == (("x-a", "1"),)


def test_a_server_with_only_a_mirror_leaves_the_registry_out() -> None:
    config = parse_hosts_toml(b'server = "http://127.0.0.1:5001"\n', "/d", "hosts.toml")
    assert [(h.scheme, h.host, h.is_server) for h in config.hosts] == [("http", "127.0.0.1:5001", True)]


def test_keys_kitfs_does_not_use_are_listed() -> None:
    config = parse_hosts_toml(b'dial_timeout = "1s"\nproxy = "http://p:8080"\nmystery = 1\n'
                              b'[host."https://m"]\nclient = [["c.cert", "c.key"], "d.pem"]\n'
                              b'dial_timeout = "2s"\n', "/d", "hosts.toml")
    assert set(config.unused) == {"dial_timeout", "proxy", "mystery", 'host."https://m".client',
                                  'host."https://m".dial_timeout'}


@pytest.mark.parametrize(("text", "message"), [
    (b'server = "https://a"\n[host."https://m"\ncapabilities = ["pull"]', "not a valid TOML file"),
    (b'[host."https://m"]\ncapabilities = ["pull", "fetch"]\n', "unknown capability 'fetch'"),
    (b'[host."https://m"]\ncapabilities = "pull"\n', "must be a list of strings"),
    (b'[host."https://m"]\nskip_verify = "yes"\n', "skip_verify must be true or false"),
    (b'[host."https://m"]\nca = 5\n', "ca must be a string or a list of strings"),
    (b'[host."https://m"]\nheader = "x"\n', "header must be a table"),
    (b'[host."https://m".header]\nx-a = 1\n', "must be a string or a list of strings"),
    (b'server = 5\n', "'server' must be a string"),
    (b'[host."ftp://m"]\n', "not an http:// or https:// URL"),
    (b'[host."https://m:port"]\n', "is not a URL"),
    (b'client = 5\n', "client must be a path"),
])
def test_a_file_containerd_could_not_use_is_refused_naming_the_key(text: bytes, message: str) -> None:
    with pytest.raises(UsageError, match=r"^/etc/x/hosts\.toml: ") as caught:
        parse_hosts_toml(text, "/etc/x", "/etc/x/hosts.toml")
    assert message in str(caught.value)


def test_host_directories_are_looked_up_in_containerds_order() -> None:
    assert host_directories("127.0.0.1:5000") == ["127.0.0.1_5000_", "127.0.0.1:5000", "_default"]
    assert host_directories("[::1]:5000") == ["[::1]_5000_", "[::1]:5000", "_default"]
    assert host_directories("registry.example.com") == ["registry.example.com", "_default"]


def test_the_first_directory_that_exists_configures_the_registry(tmp_path: Path) -> None:
    for name, mirror in (("r.example.com_5000_", "a"), ("r.example.com:5000", "b"),
                         ("_default", "c")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "hosts.toml").write_text(f'[host."https://{mirror}"]\n')
    assert load_hosts(tmp_path, "r.example.com:5000").hosts[0].host == "a"
    (tmp_path / "r.example.com_5000_" / "hosts.toml").unlink()
    (tmp_path / "r.example.com_5000_").rmdir()
    assert load_hosts(tmp_path, "r.example.com:5000").hosts[0].host == "b"
    assert load_hosts(tmp_path, "other.example.com").hosts[0].host == "c"
    assert load_hosts(tmp_path / "absent", "other.example.com").hosts[0].host is None


def test_a_directory_without_hosts_toml_gives_its_crt_files_as_cas(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "r.example.com"
    directory.mkdir()
    for name in ("ca.crt", "client.cert", "client.key", "notes.txt"):
        (directory / name).write_text("x")
    (itself,) = load_hosts(tmp_path, "r.example.com").hosts
    assert itself.host is None and itself.ca_files == (str(directory / "ca.crt"),)
    assert "client certificates are not supported; left out: client.cert, client.key" in caplog.text


def test_an_invalid_file_in_the_hosts_directory_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text('server = ["a"]\n')
    expected = re.escape(f"{tmp_path}/_default/hosts.toml: 'server' must be")
    with pytest.raises(UsageError, match="^" + expected):
        load_hosts(tmp_path, "r.example.com")
