"""kitfs: mount ModelKits straight from an OCI registry, lazily and verified."""

__version__ = "0.1.0"
