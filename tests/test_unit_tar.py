"""Pure unit tests for kitfs.format.tar: TarScanner checked against stdlib tarfile as the oracle."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kitfs.errors import FormatError
from kitfs.format.tar import (
    BLOCK,
    MAX_EXTENDED_HEADER_BYTES,
    TarMember,
    TarScanner,
    parse_number,
    parse_pax_records,
)

SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# --- building archives with tarfile ----------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One member to write: kind is 'file', 'dir' or 'symlink'."""

    kind: str
    name: str
    mode: int
    mtime: int
    content: bytes = b""
    linkname: str = ""



def _itn(value: int, digits: int, fmt: int) -> bytes:
    """tarfile's own number encoder (undocumented, so untyped): the oracle for base-256."""
    encoded: bytes = getattr(tarfile, "itn")(value, digits, fmt)  # noqa: B009
    return encoded

def build(specs: list[Spec], fmt: int, pax_headers: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=fmt, encoding="utf-8", pax_headers=pax_headers
    ) as tf:
        for spec in specs:
            info = tarfile.TarInfo(spec.name)
            info.mode = spec.mode
            info.mtime = spec.mtime
            if spec.kind == "dir":
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif spec.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = spec.linkname
                tf.addfile(info)
            else:
                info.size = len(spec.content)
                tf.addfile(info, io.BytesIO(spec.content))
    return buf.getvalue()


def oracle(archive: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:", encoding="utf-8") as tf:
        return tf.getmembers()


def scan_all(archive: bytes, stream_size: int | None = None) -> list[TarMember]:
    """Drive the scanner feeding exactly what it asks for."""
    scanner = TarScanner(len(archive) if stream_size is None else stream_size)
    members: list[TarMember] = []
    while (want := scanner.wants()) is not None:
        offset, length = want
        members.extend(scanner.feed(archive[offset : offset + length]))
    return members


# --- strategies ------------------------------------------------------------------------------

_ALPHABET = st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789_-é日üλ€😀 "))
_COMPONENT = st.text(_ALPHABET, min_size=1, max_size=70).filter(lambda s: s.strip() == s)
_NAME = st.lists(_COMPONENT, min_size=1, max_size=6).map("/".join)
# Some names long enough to need PAX or GNU long names (> 100 bytes) or beyond USTAR (> 255).
_LONG_NAME = st.builds(
    lambda head, n, tail: "/".join([head] * n) + "/" + tail,
    _COMPONENT,
    st.integers(1, 12),
    st.text(_ALPHABET, min_size=90, max_size=130),
)


@st.composite
def specs_strategy(draw: st.DrawFn) -> list[Spec]:
    count = draw(st.integers(0, 8))
    specs = []
    for _ in range(count):
        kind = draw(st.sampled_from(["file", "file", "file", "dir", "symlink"]))
        name = draw(st.one_of(_NAME, _LONG_NAME))
        mode = draw(st.integers(0, 0o7777))
        mtime = draw(st.integers(0, 8**11 - 1))
        if kind == "file":
            content = draw(st.one_of(st.just(b""), st.binary(max_size=1500)))
            specs.append(Spec(kind, name, mode, mtime, content))
        elif kind == "symlink":
            specs.append(Spec(kind, name, mode, mtime, linkname=draw(st.one_of(_NAME, _LONG_NAME))))
        else:
            specs.append(Spec(kind, name, mode, mtime))
    return specs


FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def check_members(
    members: list[TarMember], specs: list[Spec], archive: bytes, global_header: bool = False
) -> None:
    infos = oracle(archive)
    assert len(members) == len(infos) == len(specs)
    for i, (member, info, spec) in enumerate(zip(members, infos, specs, strict=True)):
        expected_name = spec.name + "/" if spec.kind == "dir" else spec.name
        assert member.name == expected_name
        assert member.name.rstrip("/") == info.name
        assert member.typeflag == info.type
        assert member.mode == info.mode == spec.mode
        assert member.mtime == info.mtime == spec.mtime
        assert member.size == (info.size if info.isfile() else 0)
        assert member.data_offset == info.offset_data
        # header_offset lies in the member's header chain (exact value: see the example test
        # test_header_offset_is_start_of_header_chain); kitfs counts a global PAX header as
        # part of the first member's chain, so that one is checked there only.
        if not (global_header and i == 0):
            assert info.offset <= member.header_offset <= member.data_offset - BLOCK
        assert (member.data_offset - member.header_offset) % BLOCK == 0
        assert member.is_file == (spec.kind == "file")
        assert member.is_dir == (spec.kind == "dir")
        if spec.kind == "symlink":
            assert member.linkname == info.linkname == spec.linkname
        if spec.kind == "file":
            assert member.size == len(spec.content)
            assert archive[member.data_offset : member.data_offset + member.size] == spec.content


# --- properties ------------------------------------------------------------------------------


@SETTINGS
@given(specs=specs_strategy(), fmt=st.sampled_from(sorted(FORMATS)), data=st.data())
def test_scanner_matches_tarfile_with_random_feeds(
    specs: list[Spec], fmt: str, data: st.DataObject
) -> None:
    try:
        archive = build(specs, FORMATS[fmt])
    except ValueError:
        # USTAR cannot hold this name (or link name); only GNU and PAX are tried for it.
        assert fmt == "ustar"
        return
    scanner = TarScanner(len(archive))
    members: list[TarMember] = []
    while (want := scanner.wants()) is not None:
        offset, length = want
        assert length > 0
        assert offset + length <= len(archive)
        extra = data.draw(st.integers(0, 1500), label="extra")
        members.extend(scanner.feed(archive[offset : offset + length + extra]))
    check_members(members, specs, archive)


@SETTINGS
@given(specs=specs_strategy(), fmt=st.sampled_from(["gnu", "pax"]), data=st.data())
def test_scanner_accepts_partial_feeds(specs: list[Spec], fmt: str, data: st.DataObject) -> None:
    """Feeding fewer bytes than asked for is fine: the scanner buffers and asks for the rest."""
    archive = build(specs, FORMATS[fmt])
    scanner = TarScanner(len(archive))
    members: list[TarMember] = []
    while (want := scanner.wants()) is not None:
        offset, length = want
        count = data.draw(st.integers(1, length + 700), label="count")
        members.extend(scanner.feed(archive[offset : offset + count]))
    check_members(members, specs, archive)


@SETTINGS
@given(specs=specs_strategy().filter(bool), fmt=st.sampled_from(["gnu", "pax"]))
def test_scanner_stops_at_stream_end_without_trailer(specs: list[Spec], fmt: str) -> None:
    """An archive cut right after its last member (no zero blocks) still ends cleanly."""
    archive = build(specs, FORMATS[fmt])
    last = oracle(archive)[-1]
    data_size = last.size if last.isfile() else 0
    end = last.offset_data + (data_size + BLOCK - 1) // BLOCK * BLOCK
    trimmed = archive[:end]
    members = scan_all(trimmed)
    check_members(members, specs, archive)


@SETTINGS
@given(specs=specs_strategy().filter(bool))
def test_global_pax_header_is_skipped(specs: list[Spec]) -> None:
    archive = build(specs, tarfile.PAX_FORMAT, pax_headers={"comment": "global ☃"})
    assert archive[156:157] == b"g"
    check_members(scan_all(archive), specs, archive, global_header=True)


@SETTINGS
@given(
    records=st.dictionaries(
        st.text(st.characters(blacklist_characters="=\0", blacklist_categories=["Cs"]), min_size=1),
        st.text(st.characters(blacklist_categories=["Cs"])),
        max_size=6,
    )
)
def test_parse_pax_records_round_trip(records: dict[str, str]) -> None:
    body = b"".join(_pax_record(k, v) for k, v in records.items())
    assert parse_pax_records(body) == records
    # NUL padding after the last record is ignored
    assert parse_pax_records(body + b"\0" * 37) == records


def _pax_record(key: str, value: str) -> bytes:
    payload = b" " + key.encode() + b"=" + value.encode() + b"\n"
    length = len(payload)
    while len(str(length)) + len(payload) != length:
        length = len(str(length)) + len(payload)
    return str(length).encode() + payload


# --- examples --------------------------------------------------------------------------------


def _one_file_archive(content: bytes = b"hello", fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    return build([Spec("file", "model.bin", 0o644, 0, content)], fmt)


_LONG_LINK = Spec("symlink", "n" * 150, 0o777, 0, linkname="t" * 150)
_SHORT_FILE = Spec("file", "f", 0o644, 0, b"data")


@pytest.mark.parametrize(
    ("spec", "fmt", "pax_headers", "first_type", "expected_header_offset"),
    [
        # GNU long link (K) then long name (L): the chain starts at the K block, offset 0
        (_LONG_LINK, tarfile.GNU_FORMAT, None, b"K", 0),
        # a global PAX header (g) then a plain member: the g record is not the member's header
        (_SHORT_FILE, tarfile.PAX_FORMAT, {"comment": "c"}, b"g", 2 * BLOCK),
        # global header, then the member's own x header at 1024
        (_LONG_LINK, tarfile.PAX_FORMAT, {"comment": "c"}, b"g", 2 * BLOCK),
    ],
    ids=["gnu-K-then-L", "pax-global-then-ustar", "pax-global-then-x"],
)
def test_header_offset_is_start_of_header_chain(
    spec: Spec,
    fmt: int,
    pax_headers: dict[str, str] | None,
    first_type: bytes,
    expected_header_offset: int,
) -> None:
    archive = build([spec], fmt, pax_headers=pax_headers)
    assert archive[156:157] == first_type
    (info,) = oracle(archive)
    (member,) = scan_all(archive)
    assert (member.name, member.linkname) == (spec.name, spec.linkname)
    assert info.offset == expected_header_offset  # tarfile's view
    assert member.header_offset == expected_header_offset


def test_header_offset_with_one_extended_header() -> None:
    archive = build([Spec("file", "x", 0o644, 0, b"1"), Spec("file", "n" * 300, 0o644, 0, b"2")],
                    tarfile.PAX_FORMAT)
    first, second = scan_all(archive)
    assert (first.header_offset, first.data_offset) == (0, BLOCK)
    assert second.header_offset == 2 * BLOCK
    assert second.data_offset == 5 * BLOCK  # x header + its body + the ustar header


def test_bad_header_checksum_raises() -> None:
    archive = bytearray(_one_file_archive())
    archive[0] ^= 0x01  # change the name, leave the stored checksum
    with pytest.raises(FormatError, match="checksum"):
        scan_all(bytes(archive))


def test_bad_checksum_in_second_header_names_its_offset() -> None:
    archive = bytearray(
        build([Spec("file", "a", 0o644, 0, b"x" * 600), Spec("file", "b", 0o644, 0, b"y")],
              tarfile.USTAR_FORMAT)
    )
    second = BLOCK + 1024
    assert archive[second : second + 1] == b"b"
    archive[second + 148 : second + 156] = b"0000000\0"
    with pytest.raises(FormatError, match=f"checksum at offset {second}"):
        scan_all(bytes(archive))


def test_unsigned_and_signed_checksums_both_accepted() -> None:
    # A name byte > 127: tarfile writes the unsigned sum; old tars wrote the signed one.
    archive = bytearray(build([Spec("file", "é", 0o644, 0, b"z")], tarfile.USTAR_FORMAT))
    header = archive[:BLOCK]
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + b" " * 8 + header[156:])
    archive[148:156] = b"%06o\0 " % signed
    assert [m.name for m in scan_all(bytes(archive))] == ["é"]


def test_truncated_in_file_data_raises() -> None:
    archive = _one_file_archive(b"x" * 1000)
    with pytest.raises(FormatError, match="runs past the end"):
        scan_all(archive[: BLOCK + 300])


def test_truncated_in_header_raises() -> None:
    archive = build(
        [Spec("file", "a", 0o644, 0, b"x" * 10), Spec("file", "b", 0o644, 0, b"y")],
        tarfile.USTAR_FORMAT,
    )
    with pytest.raises(FormatError, match="truncated"):
        scan_all(archive[: 2 * BLOCK + 100])


def test_truncated_in_extended_header_raises() -> None:
    archive = build([Spec("file", "n" * 300, 0o644, 0, b"x")], tarfile.GNU_FORMAT)
    assert archive[156:157] == b"L"
    with pytest.raises(FormatError, match="truncated"):
        scan_all(archive[: BLOCK + 100])


def test_archive_ending_after_extended_header_raises() -> None:
    archive = build([Spec("file", "n" * 300, 0o644, 0, b"x")], tarfile.PAX_FORMAT)
    assert archive[156:157] == b"x"
    pax_end = BLOCK + BLOCK  # the PAX record for a 300-byte path fits one block
    with pytest.raises(FormatError, match="extended header"):
        scan_all(archive[:pax_end])


def test_extended_header_too_large_is_refused() -> None:
    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = MAX_EXTENDED_HEADER_BYTES + 1
    header = info.tobuf(tarfile.GNU_FORMAT)
    with pytest.raises(FormatError, match="too large"):
        scan_all(header, stream_size=len(header) + 2 * MAX_EXTENDED_HEADER_BYTES)


def test_empty_stream_and_zero_block_end() -> None:
    assert scan_all(b"") == []
    assert scan_all(b"\0" * 1024) == []
    scanner = TarScanner(1024)
    assert scanner.wants() == (0, BLOCK)
    assert scanner.feed(b"\0" * 1024) == []
    assert scanner.wants() is None


def test_pax_size_of_8_gib_and_more_is_parsed() -> None:
    size = 8 * 1024**3 + 12345  # too big for the 11-digit octal field
    record = _pax_record("size", str(size))
    assert parse_pax_records(record + _pax_record("path", "w.bin")) == {
        "size": str(size), "path": "w.bin",
    }

    info = tarfile.TarInfo("weights/model.safetensors")
    info.size = size
    headers = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    assert headers[156:157] == b"x"
    padded = (size + BLOCK - 1) // BLOCK * BLOCK
    stream_size = len(headers) + padded + 2 * BLOCK
    scanner = TarScanner(stream_size)
    members: list[TarMember] = []
    while (want := scanner.wants()) is not None:
        offset, length = want
        if offset >= len(headers):
            break  # the scanner skipped the 8 GiB body and now wants the trailer
        members.extend(scanner.feed(headers[offset : offset + length]))
    assert [(m.name, m.size, m.data_offset) for m in members] == [
        ("weights/model.safetensors", size, len(headers))
    ]
    assert scanner.wants() == (len(headers) + padded, BLOCK)


def test_gnu_base256_size_in_archive_is_parsed() -> None:
    size = 9 * 1024**3
    info = tarfile.TarInfo("big.bin")
    info.size = size
    header = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    assert header[124] & 0x80  # tarfile wrote base-256
    scanner = TarScanner(BLOCK + size + BLOCK)
    (member,) = scanner.feed(header)
    assert member.size == size
    assert scanner.wants() == (BLOCK + size, BLOCK)


def _pax_member(pax_headers: dict[str, str]) -> bytes:
    info = tarfile.TarInfo("f")
    info.size = 0
    info.pax_headers = pax_headers
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + b"\0" * 1024


def test_negative_pax_size_raises() -> None:
    archive = _pax_member({"size": "-5"})
    with pytest.raises(FormatError, match="negative"):
        scan_all(archive)


def test_non_numeric_pax_size_raises() -> None:
    with pytest.raises(FormatError, match="not a number"):
        scan_all(_pax_member({"size": "12abc"}))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("typeflag", [b"x", b"g", b"L", b"K"])
def test_an_empty_extended_header_is_read_not_looped_on(typeflag: bytes) -> None:
    """Found by tests/test_fuzz_parsers.py: an extended header with a body of 0 bytes was
    parsed again and again as its own next header, and feed() never returned."""
    empty = bytearray(tarfile.TarInfo("././@LongLink").tobuf(tarfile.USTAR_FORMAT))
    empty[156:157] = typeflag
    empty[148:156] = b" " * 8
    empty[148:156] = b"%06o\0 " % sum(empty)
    (member,) = scan_all(bytes(empty) + build([Spec("file", "a", 0o644, 0, b"xyz")],
                                             tarfile.USTAR_FORMAT))
    assert member.name == ("" if typeflag == b"L" else "a")  # an empty long name is empty
    assert member.size == 3 and member.data_offset == 2 * BLOCK


def test_pax_path_and_mtime_override_header() -> None:
    (member,) = scan_all(_pax_member({"path": "dir/über.bin", "mtime": "1700000000.5"}))
    assert member.name == "dir/über.bin"
    assert member.mtime == 1700000000


@pytest.mark.parametrize("mtime", ["1e400", "-1e400", "inf", "nan", "9" * 5000, "soon"])
def test_a_pax_mtime_that_is_no_finite_number_reads_as_zero(mtime: str) -> None:
    """Found by tests/test_fuzz_parsers.py: "1e400" raised OverflowError, not FormatError."""
    (member,) = scan_all(_pax_member({"mtime": mtime}))
    assert member.mtime == 0


@pytest.mark.parametrize(
    "body",
    [
        b"5 a=b",  # no trailing newline and length too short
        b"abc path=x\n",  # length not a number
        b"0 =\n",  # zero length
        b"99 path=x\n",  # length past the end
        b"11 pathxxx\n",  # no '='
        b"path=x\n",  # no length
    ],
)
def test_malformed_pax_records_raise(body: bytes) -> None:
    with pytest.raises(FormatError, match="PAX header"):
        parse_pax_records(body)


def test_parse_number_octal_and_padding() -> None:
    assert parse_number(b"0000644\0", "mode") == 0o644
    assert parse_number(b"   755 \0", "mode") == 0o755
    assert parse_number(b"\0" * 8, "mode") == 0
    assert parse_number(b"00000000013\0", "size") == 11
    with pytest.raises(FormatError, match="size field"):
        parse_number(b"00000009\0", "size")


@pytest.mark.parametrize("field", [b"-0000001000", b"+0000001000", b"0o000001000", b"1_000",
                                   b"0000644\0junk", b"00 644"])
def test_parse_number_takes_octal_digits_only(field: bytes) -> None:
    """As Go's archive/tar; Python's int(text, 8) takes a sign, 0o and _ too."""
    with pytest.raises(FormatError, match=r"size field .* is not octal"):
        parse_number(field, "size")


@pytest.mark.timeout(10)
def test_a_negative_octal_size_is_refused_not_scanned_for_ever() -> None:
    """Found by tests/test_fuzz_parsers.py: a size field of "-0000001000" (-512) sent the scan
    back to the same header, and feed() never returned."""
    archive = bytearray(build([Spec("file", n, 0o644, 0, b"xyz") for n in ("a", "b")],
                              tarfile.USTAR_FORMAT))
    header = bytearray(archive[2 * BLOCK : 3 * BLOCK])  # b's header
    header[124:136] = b"-0000001000\0"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    archive[2 * BLOCK : 3 * BLOCK] = header
    with pytest.raises(FormatError, match=r"size field b'-0000001000\\x00' is not octal"):
        scan_all(bytes(archive))


def test_parse_number_gnu_base256() -> None:
    value = 8 * 1024**3 + 7
    assert parse_number(b"\x80" + value.to_bytes(11, "big"), "size") == value
    assert parse_number(b"\x80" + (1).to_bytes(7, "big"), "mode") == 1
    # low bits of the marker byte are the top bits of the number
    assert parse_number(b"\x81" + b"\0" * 11, "size") == 1 << 88
    # what tarfile writes for a number too big for octal
    field = _itn(value, 12, tarfile.GNU_FORMAT)
    assert field[0] == 0x80
    assert parse_number(field, "size") == value
    with pytest.raises(FormatError, match="negative size"):
        parse_number(b"\xff" * 12, "size")
    with pytest.raises(FormatError, match="negative"):
        parse_number(_itn(-1, 12, tarfile.GNU_FORMAT), "size")


@SETTINGS
@given(value=st.integers(0, (1 << 88) - 1))
def test_parse_number_base256_property(value: int) -> None:
    assert parse_number(_itn(value, 12, tarfile.GNU_FORMAT), "size") == value


# --- the persisted index (kitfs.cache.index) ------------------------------------------------------

member_names = st.one_of(
    st.text(min_size=1, max_size=40),
    # bytes that are not UTF-8, as the scanner decodes them (surrogate escapes)
    st.binary(min_size=1, max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape")),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(member_names, st.sampled_from([b"0", b"\0", b"5", b"7"]),
                          st.integers(0, 0o7777), st.integers(0, 2**40), st.integers(0, 2**50)),
                max_size=30))
def test_a_packed_index_round_trips_any_name(rows: list[tuple[str, bytes, int, int, int]]) -> None:
    from kitfs.cache.index import pack_members, unpack_members

    members = [TarMember(name=n, typeflag=t, mode=m, size=s, data_offset=o, header_offset=-1)
               for n, t, m, s, o in rows]
    assert unpack_members(pack_members(members), len(members)) == members


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, 200), flip=st.integers(0, 200), count=st.integers(0, 4))
def test_a_damaged_packed_index_is_refused_not_misread(cut: int, flip: int, count: int) -> None:
    """Truncated, altered or miscounted: ValueError ("not indexed"), or as many members as
    the row says, never another exception."""
    import zstandard

    from kitfs.cache.index import pack_members, unpack_members

    members = [TarMember(name=f"d/f{i}", typeflag=b"0", mode=0o644, size=i, data_offset=512 * i,
                         header_offset=-1) for i in range(3)]
    document = bytearray(zstandard.ZstdDecompressor().decompress(pack_members(members)))
    document = document[: len(document) - cut % (len(document) + 1)]
    if document:
        document[flip % len(document)] ^= 0xFF
    try:
        found = unpack_members(zstandard.ZstdCompressor().compress(bytes(document)), count)
    except ValueError:
        return
    assert len(found) == count and all(isinstance(m, TarMember) for m in found)


def test_an_index_of_the_json_format_means_indexing_again() -> None:
    import json

    import zstandard

    from kitfs.cache.index import unpack_members

    old = {"format": 1, "names": ["a"], "typeflags": "0", "modes": [420], "sizes": [1],
           "offsets": [512]}
    with pytest.raises(ValueError, match=r"format|decode"):
        unpack_members(zstandard.ZstdCompressor().compress(json.dumps(old).encode()), 1)


def test_an_unreadable_stored_index_means_indexing_again(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from kitfs.cache.index import load_members, pack_members, store_members
    from kitfs.cache.store import ChunkStore

    store = ChunkStore(tmp_path / "cache")
    try:
        members = [TarMember(name="a/b.bin", typeflag=b"0", mode=0o644, size=3, data_offset=512,
                             header_offset=-1)]
        store_members(store.database, "sha256:" + "ab" * 32, 1, pack_members(members))
        assert load_members(store.database, "sha256:" + "ab" * 32) == members
        store.conn.execute("UPDATE layer_indexes SET packed = ?", (b"not zstd",))
        assert load_members(store.database, "sha256:" + "ab" * 32) is None
        assert "unreadable" in caplog.text and "indexing it again" in caplog.text
    finally:
        store.close()


def test_an_index_arriving_after_its_blob_failed_verification_is_not_kept(tmp_path: Path) -> None:
    """The index is stored behind the lookup it answered; if the blob's digest failed
    meanwhile (its index was read from bad bytes), the late index must not come back."""
    from kitfs.cache.index import load_members, pack_members, store_members
    from kitfs.cache.store import ChunkStore

    key = "sha256:" + "cd" * 32
    store = ChunkStore(tmp_path / "cache")
    try:
        members = [TarMember(name="a/b.bin", typeflag=b"0", mode=0o644, size=3, data_offset=512,
                             header_offset=-1)]
        store.register_blob(key, 1024, 4 << 20)
        store.mark_failed(key, "does not match its digest")
        store_members(store.database, key, 1, pack_members(members))
        assert load_members(store.database, key) is None
        other = "sha256:" + "ef" * 32  # a blob not failed (registered or not) keeps its index
        store_members(store.database, other, 1, pack_members(members))
        assert load_members(store.database, other) == members
    finally:
        store.close()


@settings(max_examples=200, deadline=None)
@given(specs=specs_strategy(), fmt=st.sampled_from(sorted(FORMATS)),
       sizes=st.lists(st.integers(1, 2000), min_size=1, max_size=12))
def test_the_scanner_keeps_no_view_of_the_bytes_it_was_fed(specs: list[Spec], fmt: str,
                                                          sizes: list[int]) -> None:
    """feed reads the caller's buffer where it is and keeps only copies of what it still
    needs: every buffer overwritten right after it was fed, in pieces of any size (headers,
    PAX records and long names cut anywhere), the members are those of a plain scan."""
    try:
        archive = build(specs, FORMATS[fmt])
    except ValueError:  # USTAR cannot hold this name (or link name)
        assume(False)
    scanner = TarScanner(len(archive))
    members: list[TarMember] = []
    feeds = 0
    while (want := scanner.wants()) is not None:
        offset, _ = want
        piece = bytearray(archive[offset : offset + sizes[feeds % len(sizes)]])
        members.extend(scanner.feed(piece))
        piece[:] = b"\xff" * len(piece)
        feeds += 1
    assert members == scan_all(archive)
