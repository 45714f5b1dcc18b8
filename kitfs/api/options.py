"""The Python API's options: the command line's (README "Command line") as keyword arguments,
checked, as one ``SessionOptions``. ``open_kit`` and ``KitFileSystem`` take the same ones."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from kitfs.core.modelkit import DEFAULT_VERIFY, SessionOptions
from kitfs.core.reader import VerifyMode
from kitfs.environment import default_cache_dir
from kitfs.errors import UsageError
from kitfs.format.sizes import parse_size
from kitfs.remote.registry import DEFAULT_TIMEOUT_S, RegistryConfig

__all__ = ["DEFAULT_TIMEOUT_S", "DEFAULT_VERIFY", "session_options"]


def session_options(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_size: int | str | None = None,
    verify: str | VerifyMode = DEFAULT_VERIFY.value,
    plain_http: bool | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    select: Mapping[str, str] | None = None,
) -> SessionOptions:
    """The command line's options (README "Command line") as keyword arguments.

    Args:
        cache_dir: the cache (default ``$KITFS_CACHE_DIR``, else ``/var/cache/kitfs`` for
            root, else ``$XDG_CACHE_HOME/kitfs``): the one the mounts and the CLI use.
        cache_size: the quota, in bytes or as ``--cache-size`` takes it (``"20G"``).
        verify: ``"strict"``, ``"eventual"`` (default) or ``"off"`` (README "Verification").
        plain_http: HTTP instead of HTTPS (default: for loopback registries only).
        ca_file: an extra CA bundle for TLS.
        timeout: seconds to wait for a registry that does not answer (default 30).
        select: labels picking an entry of an image index (``--select KEY=VALUE``).

    Raises:
        ValueError: naming the option and what it takes.
    """
    try:
        mode = VerifyMode(verify)
    except ValueError:
        raise ValueError(f"verify must be 'strict', 'eventual' or 'off', not {verify!r}") from None
    size_bytes: int | None
    if cache_size is None:
        size_bytes = None
    elif isinstance(cache_size, str):
        try:
            size_bytes = parse_size(cache_size)
        except UsageError as exc:
            raise ValueError(f"cache_size: {exc}") from None
    elif isinstance(cache_size, int) and not isinstance(cache_size, bool) and cache_size > 0:
        size_bytes = cache_size
    else:
        raise ValueError(f"cache_size must be a number of bytes or a size such as '20G', not "
                         f"{cache_size!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds above 0, not {timeout!r}")
    if plain_http is not None and not isinstance(plain_http, bool):
        raise ValueError(f"plain_http must be True, False or None, not {plain_http!r}")
    labels = dict(select or {})
    if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in labels.items()):
        raise ValueError(f"select must map label names to values (strings), not {select!r}")
    return SessionOptions(
        cache_dir=Path(cache_dir) if cache_dir is not None else default_cache_dir(),
        cache_size_bytes=size_bytes, verify=mode, select=labels,
        registry=RegistryConfig(plain_http=plain_http,
                                ca_file=os.fspath(ca_file) if ca_file is not None else None,
                                timeout_s=float(timeout)),
    )
