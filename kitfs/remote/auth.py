"""Registry credentials and the ``WWW-Authenticate`` challenge flows (Basic and Bearer).

Credentials are looked up, in order, in:

1. kit's own store: ``$KITOPS_HOME/credentials.json``, else
   ``${XDG_DATA_HOME:-~/.local/share}/kitops/credentials.json`` (``kit login`` writes it);
2. the Docker config: ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``: inline
   ``auths``, then ``credHelpers`` for the host, then ``credsStore`` (``docker-credential-*``).

Both files share the Docker config format. We read them ourselves rather than through
``oras.auth.utils.load_configs``, which always merges ``~/.docker/config.json`` in and merges
files in set order, so precedence would be random. Nothing here logs a credential or a token,
and nothing is written anywhere.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CREDENTIAL_HELPER_TIMEOUT_S = 10


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic_header(self) -> str:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"

    def __repr__(self) -> str:  # never show the secret
        return f"Credentials(username={self.username!r}, password=***)"


def credential_files() -> list[Path]:
    """The files credentials are read from, in order of precedence (existing or not)."""
    if kitops_home := os.environ.get("KITOPS_HOME"):
        kit = Path(kitops_home) / "credentials.json"
    else:
        data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        kit = Path(data_home) / "kitops" / "credentials.json"
    docker_dir = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    return [kit, Path(docker_dir) / "config.json"]


def _host_keys(registry: str) -> list[str]:
    return [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/"]


def find_credentials(registry: str) -> Credentials | None:
    """Credentials for ``registry`` from the documented places, or None (anonymous)."""
    for path in credential_files():
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text())
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable credentials file %s: %s", path, exc)
            continue
        auths = config.get("auths") or {}
        for key in _host_keys(registry):
            entry = auths.get(key)
            if isinstance(entry, dict) and (creds := _decode_entry(entry)):
                return creds
        helper = (config.get("credHelpers") or {}).get(registry) or config.get("credsStore")
        if isinstance(helper, str) and helper and (creds := _run_helper(helper, registry)):
            return creds
    return None


def _decode_entry(entry: dict[str, object]) -> Credentials | None:
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, _, password = base64.b64decode(auth).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return Credentials(user, password)
    username, secret = entry.get("username"), entry.get("password")
    if isinstance(username, str) and isinstance(secret, str):
        return Credentials(username, secret)
    return None


def _run_helper(helper: str, registry: str) -> Credentials | None:
    binary = f"docker-credential-{helper}"
    try:
        proc = subprocess.run(
            [binary, "get"], input=registry.encode(), capture_output=True,
            timeout=CREDENTIAL_HELPER_TIMEOUT_S, check=True,
        )
        payload = json.loads(proc.stdout)
        return Credentials(str(payload["Username"]), str(payload["Secret"]))
    except FileNotFoundError:
        log.warning("credential helper %s is not on PATH", binary)
    except (subprocess.SubprocessError, ValueError, KeyError, TypeError):
        log.warning("credential helper %s found no usable credentials for %s", binary, registry)
    return None


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer", lower-case
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge:
    """Parse ``Bearer realm="…",service="…",scope="…"`` (quoted or token values)."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        while pos < len(rest) and rest[pos] in " ,":
            pos += 1
        eq = rest.find("=", pos)
        if eq < 0:
            break
        key = rest[pos:eq].strip().lower()
        pos = eq + 1
        if pos < len(rest) and rest[pos] == '"':
            value_chars = []
            pos += 1
            while pos < len(rest) and rest[pos] != '"':
                if rest[pos] == "\\" and pos + 1 < len(rest):
                    pos += 1
                value_chars.append(rest[pos])
                pos += 1
            pos += 1
            value = "".join(value_chars)
        else:
            end = rest.find(",", pos)
            end = len(rest) if end < 0 else end
            value = rest[pos:end].strip()
            pos = end
        params[key] = value
    return Challenge(scheme.lower(), params)
