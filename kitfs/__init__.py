"""kitfs: ModelKits straight from an OCI registry, lazily and verified: a read-only FUSE mount
(``kitfs mount``), ``kitfs://`` URLs for fsspec, pandas and pyarrow, and a Python API::

    import kitfs
    kit = kitfs.open_kit("registry.example.com/team/llama:v3")
    with kit.open("models/config.json") as f: ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kitfs.version import __version__

__all__ = ["Kit", "KitFile", "__version__", "open_kit"]

if TYPE_CHECKING:
    from kitfs.api.file import KitFile
    from kitfs.api.kit import Kit, open_kit


def __getattr__(name: str) -> Any:
    """``open_kit``, ``Kit`` and ``KitFile``, imported on first use: the mount daemon and the
    command line import ``kitfs.…`` modules without loading the Python API and fsspec."""
    if name in ("open_kit", "Kit"):
        from kitfs.api import kit

        return getattr(kit, name)
    if name == "KitFile":
        from kitfs.api.file import KitFile

        return KitFile
    raise AttributeError(f"module 'kitfs' has no attribute {name!r}")
