"""The kitfs version, written once: ``kitfs.__version__``, ``kitfs --version`` and the
User-Agent registries see (``kitfs/<version>``) all read it here. Imports nothing."""

__version__ = "0.1.0"
