"""``kitfs demo``'s machinery, which the tests and benchmarks share: a loopback registry
(``kitfs.demo.registry``) and ModelKits written as ``kit pack`` writes them, pushed to it
(``kitfs.demo.kits``).

Not part of the filesystem: only ``kitfs demo``, the tests and the benchmarks import it (an
import-linter layer above the core says so), and it is the only kitfs code that imports oras.
"""

from kitfs.demo.kits import (
    Entry,
    Layer,
    Push,
    Pusher,
    compress,
    kit_tar,
    kitfile_of,
    manifest_bytes,
    push_entries,
    sample_kit,
    sha256,
    split_reference,
    tar_layer,
    with_layer_info,
)
from kitfs.demo.registry import Registry, free_port, htpasswd_line

__all__ = [
    "Entry",
    "Layer",
    "Push",
    "Pusher",
    "Registry",
    "compress",
    "free_port",
    "htpasswd_line",
    "kit_tar",
    "kitfile_of",
    "manifest_bytes",
    "push_entries",
    "sample_kit",
    "sha256",
    "split_reference",
    "tar_layer",
    "with_layer_info",
]
