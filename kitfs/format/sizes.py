"""Sizes as people write them (``20G``, ``512MiB``, ``4096``): the ``--cache-size`` option and
the Python API's ``cache_size``. Pure: text in, bytes out."""

from __future__ import annotations

import re

from kitfs.errors import UsageError

_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``10G``, ``512MiB``, ``1.5T``, ``4096`` → bytes (powers of 1024).

    Raises:
        UsageError: naming the text, with examples.
    """
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise UsageError(f"invalid size {text!r} (examples: 4096, 512M, 10G)")
    number, unit, _ = match.groups()
    return int(float(number) * 1024 ** "bkmgtp".index(unit.lower() or "b"))
