"""``kitfs://`` URLs through fsspec, pandas and pyarrow, against the real registry on loopback.

Each test reads through the public names a user has (``fsspec.filesystem("kitfs")``,
``fsspec.open_files``, ``pd.read_parquet("kitfs://…")``) and checks the bytes against what was
packed; laziness is read from the registry's own log. fsspec's own abstract tests for ``get``
run against a kit that holds their scenarios.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fsspec.tests.abstract import AbstractFixtures
from fsspec.tests.abstract.get import AbstractGetTests

import kitfs
from kitfs import open_kit
from kitfs.api.fs import KitFileSystem
from kitfs.api.runtime import shutdown
from kitfs.demo import Pusher, Registry, tar_layer, with_layer_info
from tests.pykit import (
    COLUMN_BYTES,
    CSV,
    DATA,
    FRAME,
    PACKED,
    PARQUET,
    WEIGHTS,
    MiB,
    push_analytics_kit,
    register_kitfs,
)
from tests.test_index_select import push_variant

register_kitfs()
CHUNK = 4 * MiB
PIECE = 128 * 1024


@pytest.fixture(scope="module")
def kit(registry: Registry, pusher: Pusher) -> str:
    reference = f"{registry.host}/team/analytics:v1"
    push_analytics_kit(pusher, reference)
    return reference


@pytest.fixture(autouse=True)
def fresh_runtime() -> Iterator[None]:
    """Each test starts with no file system instance and no open session (sessions close at
    the end of each test; a Kit kept across is opened again, by digest, on its next use)."""
    KitFileSystem.clear_instance_cache()
    yield
    KitFileSystem.clear_instance_cache()
    shutdown()


def _fs(cache_dir: Path, **options: Any) -> KitFileSystem:
    fs = fsspec.filesystem("kitfs", cache_dir=str(cache_dir), **options)
    assert isinstance(fs, KitFileSystem)
    return fs


def test_ls_info_find_and_glob_show_the_tree_kit_unpack_writes(kit: str, cache_dir: Path) -> None:
    fs = _fs(cache_dir)
    url = f"kitfs://{kit}"
    assert fs.ls(url, detail=False) == [f"{kit}/{name}" for name in
                                        ("Kitfile", "README.md", "data", "models", "src")]
    infos = {i["name"]: i for i in fs.ls(f"{url}/data")}
    assert infos[f"{kit}/data/table.parquet"]["size"] == len(PARQUET)
    assert infos[f"{kit}/data/table.parquet"]["type"] == "file"
    assert infos[f"{kit}/data/csv"]["type"] == "directory"
    info = fs.info(f"{url}/models/weights.bin")
    assert (info["size"], info["type"], info["mode"]) == (len(WEIGHTS), "file", 0o644)
    assert info["digest"].startswith("sha256:")
    assert fs.info(url)["type"] == "directory"
    files = fs.find(url)
    assert sorted(f.removeprefix(f"{kit}/") for f in files) == sorted([*PACKED, "Kitfile"])
    assert fs.glob(f"{url}/data/csv/part-[12].csv") == [f"{kit}/data/csv/part-1.csv",
                                                       f"{kit}/data/csv/part-2.csv"]
    assert fs.glob(f"{url}/**/*.py") == [f"{kit}/src/train.py", f"{kit}/src/util/io.py"]
    walked = {root: (sorted(dirs), sorted(names)) for root, dirs, names in fs.walk(f"{url}/src")}
    assert walked == {f"{kit}/src": (["util"], ["train.py"]), f"{kit}/src/util": ([], ["io.py"])}
    assert fs.isdir(f"{url}/data") and fs.isfile(f"{url}/README.md")
    assert not fs.exists(f"{url}/data/nope.csv")
    assert fs.ls(f"{url}/README.md", detail=False) == [f"{kit}/README.md"]  # a file lists itself


def test_cat_file_with_ranges_and_open_with_seeks_give_the_packed_bytes(
        kit: str, cache_dir: Path) -> None:
    fs = _fs(cache_dir)
    path = f"kitfs://{kit}/models/weights.bin"
    assert fs.cat_file(f"kitfs://{kit}/README.md") == PACKED["README.md"]
    assert fs.cat_file(path, start=5 * MiB, end=5 * MiB + 10) == WEIGHTS[5 * MiB : 5 * MiB + 10]
    assert fs.cat_file(path, start=-100) == WEIGHTS[-100:]
    assert fs.cat_file(path, start=10, end=-10) == WEIGHTS[10:-10]
    assert fs.cat_file(path, start=len(WEIGHTS) + 5) == b""
    with fs.open(path, block_size=64 * 1024) as f:
        assert f.size == len(WEIGHTS) and f.seekable() and f.readable() and not f.writable()
        f.seek(7 * MiB + 3)
        assert f.read(5) == WEIGHTS[7 * MiB + 3 : 7 * MiB + 8]
        assert f.tell() == 7 * MiB + 8
        f.seek(-4, os.SEEK_END)
        assert f.read() == WEIGHTS[-4:]
        f.seek(100)
        buffer = bytearray(1000)
        assert f.readinto(buffer) == 1000 and bytes(buffer) == WEIGHTS[100:1100]
        assert f.read(0) == b"" and f.tell() == 1100
    with fs.open(f"kitfs://{kit}/data/csv/part-2.csv", "r") as text:  # text mode, by fsspec
        assert text.readline() == "id,value\n"


def test_open_reads_a_block_at_a_time_and_serves_smaller_reads_from_it(
        kit: str, cache_dir: Path, registry: Registry) -> None:
    fs = _fs(cache_dir)
    path = f"{kit}/models/weights.bin"
    fs.info(path)  # the layer's index: its first and last chunk
    with fs.open(path, block_size=4096) as f:  # in chunk 1, not fetched yet
        mark = registry.log_mark()
        f.seek(5 * MiB)
        assert f.read(10) == WEIGHTS[5 * MiB : 5 * MiB + 10]
        assert registry.blob_bytes_served(mark) == PIECE  # the piece around one 4 KiB block
    with fs.open(path) as f:  # the default block: 256 KiB, in chunk 2
        mark = registry.log_mark()
        f.seek(9 * MiB)
        assert f.read(10) == WEIGHTS[9 * MiB : 9 * MiB + 10]
        fetched = registry.blob_bytes_served(mark)
        assert 2 * PIECE <= fetched <= 3 * PIECE  # the pieces around one 256 KiB block
        mark = registry.log_mark()
        assert f.read(200 * 1024) == WEIGHTS[9 * MiB + 10 : 9 * MiB + 10 + 200 * 1024]
        assert registry.blob_requests(mark) == 0  # served from the block read before


def test_cat_ranges_fetch_only_the_pieces_they_cover(
        kit: str, cache_dir: Path, registry: Registry) -> None:
    fs = _fs(cache_dir)
    path = f"{kit}/models/weights.bin"
    fs.info(path)  # the layer's index: its first and last chunk
    mark = registry.log_mark()
    starts = [PIECE * 10 + 5, 3 * MiB + 17, 9 * MiB + PIECE - 10, len(WEIGHTS) - 50]
    ranges = fs.cat_ranges([path] * 4 + [f"{kit}/nope"], [*starts, 0], [s + 40 for s in starts] + [1])
    assert ranges[:4] == [WEIGHTS[s : s + 40] for s in starts]
    assert isinstance(ranges[4], FileNotFoundError)
    # the first two ranges are in chunk 0 and the last in the last chunk, which indexing
    # fetched (a layer of one big file costs its first and last chunk); the third costs the
    # 128 KiB piece (or two) around it, not its 4 MiB chunk
    assert PIECE <= registry.blob_bytes_served(mark) <= 2 * PIECE, registry.requests(mark)


def test_pandas_reads_one_parquet_column_through_a_kitfs_url_fetching_a_fraction_of_the_file(
        kit: str, cache_dir: Path, registry: Registry) -> None:
    url = f"kitfs://{kit}/data/table.parquet"
    options = {"cache_dir": str(cache_dir)}
    _fs(cache_dir).info(url)  # index the dataset layer first: the column read is counted alone
    mark = registry.log_mark()
    frame = pd.read_parquet(url, columns=["c"], storage_options=options)
    np.testing.assert_array_equal(frame["c"].to_numpy(), FRAME["c"].to_numpy())
    fetched = registry.blob_bytes_served(mark)
    # the whole chunks covering the column (a large read), a chunk of read-ahead, the footer
    assert COLUMN_BYTES <= fetched <= COLUMN_BYTES + 3 * CHUNK + 2 * PIECE, (fetched, len(PARQUET))
    assert fetched < len(PARQUET) / 2
    csv = pd.read_csv(f"kitfs://{kit}/data/csv/part-3.csv", storage_options=options)
    assert csv["value"].sum() == 3 * sum(range(5_000))


def test_pyarrow_reads_one_parquet_column_through_the_file_system_lazily(
        kit: str, cache_dir: Path, registry: Registry) -> None:
    fs = _fs(cache_dir)
    path = f"kitfs://{kit}/data/table.parquet"
    fs.info(path)
    mark = registry.log_mark()
    table = pq.read_table(path, columns=["b"], filesystem=fs)
    np.testing.assert_array_equal(table["b"].to_numpy(), FRAME["b"].to_numpy())
    fetched = registry.blob_bytes_served(mark)
    assert COLUMN_BYTES <= fetched <= COLUMN_BYTES + 3 * CHUNK + 2 * PIECE, (fetched, len(PARQUET))
    assert fetched < len(PARQUET) / 2
    with fs.open(path) as f:  # pyarrow on a file object opened by fsspec
        assert pq.ParquetFile(f).schema_arrow.names == ["a", "b", "c", "d"]


def test_open_files_with_a_glob_over_a_dataset_directory(kit: str, cache_dir: Path) -> None:
    files = fsspec.open_files(f"kitfs://{kit}/data/csv/part-*.csv", cache_dir=str(cache_dir))
    assert [f.path for f in files] == [f"{kit}/{name}" for name in sorted(CSV)]
    frames = []
    for file in files:
        with file as f:
            frames.append(pd.read_csv(f))
    combined = pd.concat(frames, ignore_index=True)
    assert len(combined) == 4 * 5_000
    assert combined["value"].sum() == sum(i * j for i in range(4) for j in range(5_000))
    with fsspec.open(f"kitfs://{kit}/data/csv/part-0.csv", "rb", cache_dir=str(cache_dir)) as f:
        assert f.read() == CSV["data/csv/part-0.csv"]


def test_get_of_a_directory_writes_the_packed_bytes_and_verifies_the_layer(
        kit: str, cache_dir: Path, tmp_path: Path) -> None:
    fs = _fs(cache_dir)
    target = tmp_path / "out"
    fs.get(f"kitfs://{kit}/data", str(target), recursive=True)
    written = {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert written == {path.removeprefix("data/"): data for path, data in DATA.items()}
    dataset = next(layer for layer in fs.kit(kit).layers if layer.path == "data")
    assert dataset.verification == "verified"
    fs.get(f"kitfs://{kit}/README.md", str(tmp_path / "README.md"))
    assert (tmp_path / "README.md").read_bytes() == PACKED["README.md"]


def test_get_writes_nothing_of_a_layer_that_fails_its_digest(
        registry: Registry, pusher: Pusher, cache_dir: Path, tmp_path: Path) -> None:
    files = {f"data/part-{i}.csv": os.urandom(512 * 1024) for i in range(3)}
    dataset = tar_layer("dataset", files, "data")
    docs = tar_layer("docs", {"README.md": b"# tampered kit\n"}, "README.md")
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0", "datasets": [{"path": "data"}],
                               "docs": [{"path": "README.md"}]}
    with_layer_info(kitfile, [(kitfile["datasets"][0], dataset), (kitfile["docs"][0], docs)])
    reference = f"{registry.host}/team/tampered-get:v1"
    pusher.push_kit(reference, kitfile, [dataset, docs])
    registry.flip_stored_byte(dataset.digest, dataset.data.index(files["data/part-2.csv"]) + 9, 0x01)
    fs = _fs(cache_dir)
    target = tmp_path / "out"
    with pytest.raises(OSError, match="failed verification") as caught:
        fs.get(f"kitfs://{reference}/data", str(target), recursive=True)
    assert caught.value.errno == errno.EIO
    assert not [p for p in target.rglob("*") if p.is_file()]
    with pytest.raises(OSError, match="failed verification") as again:  # and every later read
        fs.cat_file(f"kitfs://{reference}/data/part-0.csv", start=0, end=10)
    assert again.value.errno == errno.EIO
    assert fs.cat_file(f"kitfs://{reference}/README.md") == b"# tampered kit\n"
    # verify="off" checks nothing (another cache: this one holds the failure for every reader)
    unchecked = _fs(tmp_path / "unchecked-cache", verify="off")
    unchecked.get(f"kitfs://{reference}/data", str(tmp_path / "unchecked"), recursive=True)
    got = (tmp_path / "unchecked" / "part-2.csv").read_bytes()
    assert got != files["data/part-2.csv"] and len(got) == len(files["data/part-2.csv"])


def test_many_threads_read_through_one_file_system_instance(
        kit: str, cache_dir: Path, registry: Registry) -> None:
    fs = KitFileSystem(cache_dir=str(cache_dir), skip_instance_cache=True)
    mark = registry.log_mark()
    threads_count = 16
    start = threading.Barrier(threads_count)
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()  # all at once: the first open of the kit, the session, the index
            with fs.open(f"{kit}/models/weights.bin", block_size=rng.choice([4096, 256 * 1024])) as f:
                for _ in range(25):
                    offset = rng.randrange(len(WEIGHTS))
                    length = rng.choice([1, 100, 5000, 300_000, 2 * MiB])
                    f.seek(offset)
                    assert f.read(length) == WEIGHTS[offset : offset + length]
            name = rng.choice(sorted(CSV))
            assert fs.cat_file(f"{kit}/{name}") == CSV[name]
            assert fs.cat_file(f"{kit}/data/table.parquet", start=-8) == PARQUET[-8:]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    manifests = [uri for method, uri, _ in registry.requests(mark) if "/manifests/" in uri]
    assert manifests == ["/v2/team/analytics/manifests/v1"]  # one open, shared by 16 threads
    assert fs.cat_file(f"{kit}/models/weights.bin") == WEIGHTS


def test_every_write_is_refused_as_read_only(kit: str, cache_dir: Path, tmp_path: Path) -> None:
    fs = _fs(cache_dir)
    url = f"kitfs://{kit}"
    local = tmp_path / "local.txt"
    local.write_bytes(b"x")
    attempts: dict[str, Callable[[], object]] = {
        "open wb": lambda: fs.open(f"{url}/new.txt", "wb"),
        "open ab": lambda: fs.open(f"{url}/README.md", "ab"),
        "pipe": lambda: fs.pipe(f"{url}/new.txt", b"data"),
        "touch": lambda: fs.touch(f"{url}/new.txt"),
        "mkdir": lambda: fs.mkdir(f"{url}/newdir"),
        "makedirs": lambda: fs.makedirs(f"{url}/a/b", exist_ok=True),
        "rm": lambda: fs.rm(f"{url}/README.md"),
        "rm_file": lambda: fs.rm_file(f"{url}/README.md"),
        "rmdir": lambda: fs.rmdir(f"{url}/src"),
        "mv": lambda: fs.mv(f"{url}/README.md", f"{url}/README2.md"),
        "copy": lambda: fs.copy(f"{url}/README.md", f"{url}/README2.md"),
        "put": lambda: fs.put(str(local), f"{url}/local.txt"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError, match="kitfs is read-only") as caught:
            attempt()
        assert caught.value.errno == errno.EROFS, what
    assert fs.cat_file(f"{url}/README.md") == PACKED["README.md"]


def test_a_url_without_tag_or_digest_and_unknown_options_are_value_errors(
        kit: str, cache_dir: Path, registry: Registry) -> None:
    fs = _fs(cache_dir)
    with pytest.raises(ValueError, match="names no tag or digest"):
        fs.cat_file(f"kitfs://{registry.host}/team/analytics/README.md")
    with pytest.raises(ValueError, match="unknown kitfs storage option 'cache_dirr'"):
        fsspec.filesystem("kitfs", cache_dirr="/tmp")
    with pytest.raises(ValueError, match="verify must be"):
        fsspec.filesystem("kitfs", verify="sometimes")
    with pytest.raises(ValueError, match="invalid size '12Q'"):
        fsspec.filesystem("kitfs", cache_size="12Q")
    with pytest.raises(FileNotFoundError):
        fs.info(f"kitfs://{registry.host}/team/analytics:no-such-tag/README.md")


def test_a_kit_named_by_digest_and_a_pinned_tag(kit: str, cache_dir: Path, registry: Registry,
                                                 pusher: Pusher) -> None:
    fs = _fs(cache_dir)
    digest = fs.kit(kit).digest
    by_digest = f"{registry.host}/team/analytics@{digest}"
    assert fs.cat_file(f"kitfs://{by_digest}/README.md") == PACKED["README.md"]
    assert fs.ls(f"kitfs://{by_digest}/src", detail=False) == [f"{by_digest}/src/train.py",
                                                              f"{by_digest}/src/util"]
    both = f"{registry.host}/team/analytics:v1@{digest}"
    assert fs.cat_file(f"kitfs://{both}/src/train.py") == PACKED["src/train.py"]
    # the tag moves: this instance keeps the digest it pinned until invalidate_cache()
    moved = f"{registry.host}/team/moving:v1"
    _push_readme(pusher, moved, b"first\n")
    assert fs.cat_file(f"{moved}/README.md") == b"first\n"
    _push_readme(pusher, moved, b"second\n")
    assert fs.cat_file(f"{moved}/README.md") == b"first\n"
    fs.invalidate_cache(f"kitfs://{moved}")
    assert fs.cat_file(f"{moved}/README.md") == b"second\n"


def _push_readme(pusher: Pusher, reference: str, readme: bytes) -> None:
    docs = tar_layer("docs", {"README.md": readme}, "README.md")
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0", "docs": [{"path": "README.md"}]}
    with_layer_info(kitfile, [(kitfile["docs"][0], docs)])
    pusher.push_kit(reference, kitfile, [docs])


def test_ukey_and_checksum_follow_the_digests(kit: str, cache_dir: Path, registry: Registry,
                                               pusher: Pusher) -> None:
    fs = _fs(cache_dir)
    other = f"{registry.host}/team/analytics-copy:v1"
    push_analytics_kit(pusher, other)  # the same layers in another repository
    same = [fs.ukey(f"{ref}/data/csv/part-1.csv") for ref in (kit, other)]
    assert same[0] == same[1]  # same layer digest, same place in it: same bytes
    assert fs.checksum(f"{kit}/data/csv/part-1.csv") == int(same[0], 16)
    assert fs.ukey(f"{kit}/data/csv/part-2.csv") != same[0]
    changed = f"{registry.host}/team/analytics-changed:v1"
    dataset = tar_layer("dataset", {**DATA, "data/extra.txt": b"x"}, "data")
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0", "datasets": [{"path": "data"}]}
    with_layer_info(kitfile, [(kitfile["datasets"][0], dataset)])
    pusher.push_kit(changed, kitfile, [dataset])
    assert fs.ukey(f"{changed}/data/csv/part-1.csv") != same[0]  # another layer digest


# --- fsspec's own abstract tests for get ----------------------------------------------------


def _abstract_files() -> dict[str, bytes]:
    """The scenarios fsspec's abstract get tests build with touch and pipe, under ``abstract/``."""
    names = ["bulk/source/file1", "bulk/source/file2", "bulk/source/subdir/subfile1",
             "bulk/source/subdir/subfile2", "bulk/source/subdir/nesteddir/nestedfile",
             "glob/source/file1", "glob/source/file2",
             "prefix/source/subdir.txt", "prefix/source/subdir/subfile.txt"]
    names += [f"glob/source/{subdir}/{name}" for subdir in ("subdir0", "subdir1")
              for name in ("subfile1", "subfile2", "nesteddir/nestedfile")]
    files = {f"abstract/{name}": b"" for name in names}
    for i in range(10):
        files[f"abstract/hashed/source/{hashlib.md5(str(i).encode()).hexdigest()}.txt"] = (
            str(i).encode())
    return files


@pytest.fixture(scope="module")
def abstract_kit(registry: Registry, pusher: Pusher) -> str:
    reference = f"{registry.host}/abstract/get:v1"
    layer = tar_layer("dataset", _abstract_files(), "abstract")
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0", "datasets": [{"path": "abstract"}]}
    with_layer_info(kitfile, [(kitfile["datasets"][0], layer)])
    pusher.push_kit(reference, kitfile, [layer])
    return reference


class TestFsspecAbstractGet(AbstractFixtures, AbstractGetTests):  # type: ignore[misc]
    """fsspec's ``AbstractGetTests`` on a kit. The scenario fixtures, which fsspec builds with
    ``touch`` and ``pipe`` (writes), point at the same trees packed in ``abstract_kit``. The
    other abstract classes (copy, put, pipe, open: its one test writes) need a writable file
    system; so does ``test_get_directory_recursive``, which makes its source with ``mkdir``."""

    test_get_directory_recursive = None

    @pytest.fixture
    def fs(self, cache_dir: Path) -> KitFileSystem:
        return _fs(cache_dir)

    @pytest.fixture
    def fs_join(self) -> Any:
        return posixpath.join

    @pytest.fixture
    def fs_path(self, abstract_kit: str) -> str:
        return f"{abstract_kit}/abstract"

    @pytest.fixture
    def fs_bulk_operations_scenario_0(self, fs_path: str) -> str:
        return f"{fs_path}/bulk/source"

    @pytest.fixture
    def fs_glob_edge_cases_files(self, fs_path: str) -> str:
        return f"{fs_path}/glob/source"

    @pytest.fixture
    def fs_dir_and_file_with_same_name_prefix(self, fs_path: str) -> str:
        return f"{fs_path}/prefix/source"

    @pytest.fixture
    def fs_10_files_with_hashed_names(self, fs_path: str) -> str:
        return f"{fs_path}/hashed/source"


def test_the_abstract_kit_holds_the_scenarios(abstract_kit: str, cache_dir: Path) -> None:
    fs = _fs(cache_dir)
    found = {p.removeprefix(f"{abstract_kit}/") for p in fs.find(abstract_kit)}
    assert found == {*_abstract_files(), "Kitfile"}


def test_kitfs_module_exports(kit: str, cache_dir: Path) -> None:
    assert callable(kitfs.open_kit) and kitfs.Kit.__name__ == "Kit"
    with _fs(cache_dir).open(f"{kit}/README.md") as f:
        assert isinstance(f, kitfs.KitFile) and f.digest is not None and f.read() == PACKED["README.md"]


def test_storage_options_are_the_command_lines(
        kit: str, registry: Registry, pusher: Pusher, cache_dir: Path, kitfs: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    q4, q8 = b"q4 weights " * 20_000, b"q8 weights, twice the bits " * 20_000
    variants = {"q4": push_variant(pusher, "team/py-indexed", "q4", q4),
                "q8": push_variant(pusher, "team/py-indexed", "q8", q8)}
    index = f"{registry.host}/team/py-indexed:all"
    pusher.push_index(index, [variants[v].index_entry({"quantization": f"{v}_0"}) for v in variants])
    # select: an entry of an image index by its labels
    with fsspec.open(f"kitfs://{index}/models/model-q8.gguf", cache_dir=str(cache_dir),
                     select={"quantization": "q8_0"}) as f:
        assert f.read() == q8
    picked = open_kit(index, cache_dir=cache_dir, select={"quantization": "q4_0"})
    assert picked.digest == variants["q4"].digest
    with pytest.raises(ValueError, match="choose one"):  # kit's rule: exactly one must match
        open_kit(index, cache_dir=cache_dir)
    # verify="strict": no byte before the whole layer is fetched and checked
    fs = _fs(cache_dir / "strict", verify="strict", timeout=5, select={"quantization": "q8_0"})
    mark = registry.log_mark()
    assert fs.cat_file(f"{index}/models/model-q8.gguf", start=0, end=10) == q8[:10]
    layer = fs.kit(index).layers[0]
    assert registry.blob_bytes_served(mark) >= layer.size and layer.verification == "verified"
    # cache_size: the quota, as --cache-size takes it
    quota = _fs(cache_dir / "small", cache_size="5M")
    assert quota.cat_file(f"kitfs://{kit}/models/weights.bin") == WEIGHTS
    shutdown()
    stats = json.loads(kitfs("cache", "stats", "--json", "--cache-dir", str(cache_dir / "small")).text)
    assert 0 < stats["used_bytes"] <= 5 * MiB  # the 12 MiB file went through a 5 MiB cache
    # the default cache is the command line's: $KITFS_CACHE_DIR here
    monkeypatch.setenv("KITFS_CACHE_DIR", str(cache_dir / "default"))
    assert KitFileSystem(skip_instance_cache=True).cat_file(f"{index}@{picked.digest}/Kitfile")
    assert (cache_dir / "default" / "kitfs.db").exists()
