"""Registry credentials and the ``WWW-Authenticate`` challenge flows (Basic and Bearer).

Credentials are looked up, in order, in:

1. kit's own store: ``$KITOPS_HOME/credentials.json``, else
   ``${XDG_DATA_HOME:-~/.local/share}/kitops/credentials.json`` (``kit login`` writes it with
   oras-go's file store, and kit falls back to the Docker config for reads, as we do);
2. the Docker config: ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``.

Both files share the Docker config format, and within one file the rules are Docker's and
oras-go's: a credential helper named for the host in ``credHelpers``, else the default
``credsStore``, is asked first (``docker-credential-NAME get``, the host on stdin, JSON
``{"ServerURL","Username","Secret"}`` on stdout); when there is none, or it has nothing for
the host, the inline ``auths`` entry is used (base64 ``auth`` = ``user:password``, or
``username``/``password`` fields). An ``auths`` key matches when it names the host, with or
without a scheme and a path (``https://host/v1/``), as Docker and oras-go match legacy keys.

We read the files ourselves rather than through ``oras.auth.utils.load_configs``, which
always merges ``~/.docker/config.json`` in and merges files in set order, so precedence would
be random. Nothing here logs a credential or a token, and nothing is written anywhere.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kitfs.environment import credential_files

log = logging.getLogger(__name__)

CREDENTIAL_HELPER_TIMEOUT_S = 10
# A credential helper's answer for a registry it has no credentials for (docker-credential-*).
_HELPER_NOT_FOUND = "credentials not found in native keychain"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str = field(default="", compare=False)  # where they were found, for messages

    def basic_header(self) -> str:
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"

    def __repr__(self) -> str:  # never show the secret
        return f"Credentials(username={self.username!r}, password=***, source={self.source!r})"


def key_hostname(key: str) -> str:
    """The host an ``auths`` key names: ``https://host:5000/v1/`` → ``host:5000``."""
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme):]
            break
    return key.split("/", 1)[0]


def find_credentials(registry: str) -> Credentials | None:
    """Credentials for ``registry`` from the documented places, or None (anonymous).

    What went wrong on the way (an unreadable file, a missing or failing helper) is logged
    as a warning when no credentials are found, and only at debug level when some are.
    """
    problems: list[str] = []
    for path in credential_files():
        config = _load_config(path, problems)
        if config is None:
            continue
        if creds := _from_config(config, registry, path, problems):
            for problem in problems:
                log.debug("%s", problem)
            log.debug("credentials for %s: user %r from %s", registry, creds.username, creds.source)
            return creds
    for problem in problems:
        log.warning("%s", problem)
    log.debug("no credentials for %s in %s", registry,
              ", ".join(str(p) for p in credential_files()))
    return None


def _load_config(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problems.append(f"ignoring unreadable credentials file {path}: {exc}")
        return None
    return config


def _section(config: dict[str, Any], name: str, path: Path, problems: list[str]) -> dict[str, Any]:
    value = config.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"ignoring {name!r} in {path}: not a JSON object")
        return {}
    return value


def _from_config(config: dict[str, Any], registry: str, path: Path,
                 problems: list[str]) -> Credentials | None:
    helpers = _section(config, "credHelpers", path, problems)
    helper = helpers.get(registry) or next(
        (v for k, v in helpers.items() if key_hostname(k) == registry), None)
    if helper is None:
        helper = config.get("credsStore")
    if helper is not None and not (isinstance(helper, str) and helper):
        problems.append(f"ignoring credential helper {helper!r} in {path}: not a name")
    elif helper and (creds := _run_helper(helper, registry, problems)):
        return creds
    auths = _section(config, "auths", path, problems)
    keys = [registry, *(k for k in auths if k != registry and key_hostname(k) == registry)]
    for key in keys:
        entry = auths.get(key)
        source = f"{path} (auths {key!r})"
        if isinstance(entry, dict) and (creds := _decode_entry(entry, source, problems)):
            return creds
    return None


def _decode_entry(entry: dict[str, Any], source: str, problems: list[str]) -> Credentials | None:
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode()
        except (binascii.Error, ValueError, UnicodeDecodeError):
            decoded = ""
        user, colon, password = decoded.partition(":")
        if not colon or not user:
            problems.append(f"ignoring {source}: its auth field is not base64 of user:password")
            return None
        return Credentials(user, password, source)
    username, secret = entry.get("username"), entry.get("password")
    if isinstance(username, str) and username and isinstance(secret, str):
        return Credentials(username, secret, source)
    if entry.get("identitytoken") or entry.get("registrytoken"):
        problems.append(f"ignoring {source}: identity and registry tokens are not supported; "
                        "log in with a username and password")
    return None


def _run_helper(helper: str, registry: str, problems: list[str]) -> Credentials | None:
    binary = f"docker-credential-{helper}"
    try:
        proc = subprocess.run(
            [binary, "get"], input=registry.encode(), capture_output=True,
            timeout=CREDENTIAL_HELPER_TIMEOUT_S, check=False,
        )
    except FileNotFoundError:
        problems.append(f"credential helper {binary} is not on PATH")
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        problems.append(f"credential helper {binary} failed for {registry}: {type(exc).__name__}")
        return None
    if proc.returncode != 0:
        # The helper's own words (never its stdout, which may hold a secret) say why.
        why = proc.stderr.decode(errors="replace").strip()[:200] or f"exit {proc.returncode}"
        if _HELPER_NOT_FOUND in proc.stdout.decode(errors="replace") + why:
            log.debug("credential helper %s has no credentials for %s", binary, registry)
        else:
            problems.append(f"credential helper {binary} failed for {registry}: {why}")
        return None
    try:
        payload = json.loads(proc.stdout)
    except ValueError:
        payload = None
    username = payload.get("Username") if isinstance(payload, dict) else None
    secret = payload.get("Secret") if isinstance(payload, dict) else None
    if not (isinstance(username, str) and isinstance(secret, str) and username and secret):
        problems.append(f"credential helper {binary} gave no usable credentials for {registry}")
        return None
    if username == "<token>":
        problems.append(f"credential helper {binary} holds an identity token for {registry}, "
                        "which is not supported; log in with a username and password")
        return None
    return Credentials(username, secret, f"credential helper {binary}")


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
