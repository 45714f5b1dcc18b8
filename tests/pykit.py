"""The kit the Python API and fsspec tests read (``push_analytics_kit``), what was packed in
it, and the helpers those tests share.

The kit: a 12 MiB weights file, a 64 MiB Parquet table of four 16 MiB float64 columns, four
CSV parts, a small code directory and a README, each Kitfile entry its own layer, as kit pack
writes them.
"""

from __future__ import annotations

import io
import os

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kitfs.api.fs import KitFileSystem
from kitfs.demo import Entry, Layer, Pusher, push_entries, tar_layer

MiB = 1 << 20


def parquet_table(seed: int) -> tuple[bytes, pd.DataFrame]:
    """A 64 MiB Parquet file of four 16 MiB float64 columns (one row group, uncompressed), and
    the frame it holds."""
    rng = np.random.default_rng(seed)
    rows = 1 << 21  # 4 float64 columns x 16 MiB
    frame = pd.DataFrame({name: rng.standard_normal(rows) for name in ("a", "b", "c", "d")})
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer,
                   compression="none", row_group_size=rows)
    return buffer.getvalue(), frame


PARQUET, FRAME = parquet_table(23)
COLUMN_BYTES = len(PARQUET) // 4
WEIGHTS = os.urandom(12 * MiB + 12345)
CSV = {f"data/csv/part-{i}.csv": ("id,value\n" + "".join(
    f"{j},{i * j}\n" for j in range(5_000))).encode() for i in range(4)}
CODE = {"src/train.py": b"print('train')\n", "src/util/io.py": b"def load():\n    pass\n"}
README = b"# Analytics kit\n"
DATA = {"data/table.parquet": PARQUET, **CSV}
PACKED = {"models/weights.bin": WEIGHTS, **DATA, **CODE, "README.md": README}


def push_analytics_kit(pusher: Pusher, reference: str) -> dict[str, Layer]:
    """Push the kit at ``reference``; its layers by Kitfile path."""
    entries = [
        Entry("model", {"name": "m", "path": "models/weights.bin"},
              tar_layer("model", {"models/weights.bin": WEIGHTS}, "models/weights.bin")),
        Entry("datasets", {"name": "data", "path": "data"}, tar_layer("dataset", DATA, "data")),
        Entry("code", {"path": "src"}, tar_layer("code", CODE, "src")),
        Entry("docs", {"path": "README.md"}, tar_layer("docs", {"README.md": README}, "README.md")),
    ]
    push_entries(pusher, reference, entries, package={"name": "analytics", "version": "1.0.0"})
    return {entry.fields["path"]: entry.layer for entry in entries if entry.layer}


def register_kitfs() -> None:
    """Make ``kitfs://`` known to fsspec in this process.

    An installed kitfs registers it through its ``fsspec.specs`` entry point
    (``tests/test_bare_install.py`` checks that in a venv built from this tree); a development
    venv installed before the entry point existed has no such metadata until ``pip install -e``
    runs again, so the tests register the same class by hand there.
    """
    if "kitfs" not in fsspec.available_protocols():
        fsspec.register_implementation("kitfs", KitFileSystem)
