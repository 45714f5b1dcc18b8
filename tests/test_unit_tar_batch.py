"""The tar scanner's batch loop against its per-member path (``TarScanner(batch=False)``).

The batch loop takes the plain headers of a window in one go and must be invisible: over
generated archives, archives mutated in the very fields it checks (numbers in every form
``parse_number`` reads, signed checksums, prefixes, type flags, magics, link names) and
the hostile archives of the fuzz tests, fed in the same pieces, both give the same members,
ask for the same bytes, and fail with the same error at the same place.
"""

from __future__ import annotations

import io
import tarfile

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kitfs.errors import FormatError
from kitfs.format.tar import BLOCK, TarMember, TarScanner
from tests.test_fuzz_parsers import _FEEDS, EXAMPLES, fix_checksum, mutated_archives
from tests.test_unit_tar import FORMATS, Spec, build, specs_strategy

COMPARE = settings(max_examples=EXAMPLES, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

Outcome = tuple[list[TarMember], list[tuple[int, int]], str | None]


def run(archive: bytes, feeds: list[int], *, batch: bool) -> Outcome:
    """Members, the ranges asked for (so where the scan stopped), and the error (if any)."""
    scanner = TarScanner(len(archive), batch=batch)
    members: list[TarMember] = []
    wants: list[tuple[int, int]] = []
    error = None
    try:
        while (want := scanner.wants()) is not None:
            wants.append(want)
            offset, length = want
            extra = feeds[len(wants) % len(feeds)] if feeds else 0
            members.extend(scanner.feed(archive[offset : offset + max(1, length + extra)]))
    except FormatError as exc:
        error = str(exc)
    return members, wants, error


def assert_same(archive: bytes, feeds: list[int]) -> Outcome:
    batched = run(archive, feeds, batch=True)
    assert batched == run(archive, feeds, batch=False)
    return batched


def _plain_member(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.uid, info.mtime, info.mode, info.type = 1000, 0, 0o644, kind
    info.size = size if kind == tarfile.REGTYPE else 0
    return info


@st.composite
def plain_archives(draw: st.DrawFn) -> bytes:
    """What ``kit pack`` writes for a dataset: directories and small files, POSIX headers."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(draw(st.integers(0, 12))):
            if draw(st.integers(0, 4)) == 0:
                tar.addfile(_plain_member(f"d{i}", 0, tarfile.DIRTYPE))
            else:
                size = draw(st.sampled_from([0, 1, 511, 512, 513, 1500, 4096]))
                name = draw(st.sampled_from([f"f{i}", f"dir/sub/f{i}.bin", "p/" * 60 + f"{i}"]))
                tar.addfile(_plain_member(name, size), io.BytesIO(b"x" * size))
    return buffer.getvalue()


# Each field of a header and values the per-member path reads (or refuses) differently from
# the canonical form the batch loop takes: padded or short numbers, base-256, signs, other
# type flags, a link name, GNU and v7 magics, a prefix, names with and without NULs.
_FIELDS = {
    (0, 100): [b"n", b"a/b\0junk", b"\xff\xfe", b"x" * 100, b"\0"],
    (100, 8): [b"644\0\0\0\0\0", b"  644   ", b"0000644 ", b"\x80\0\0\0\0\0\x01\xa4", b"0008000\0",
               b"7777777\0", b"-000644\0"],
    (108, 8): [b"1750 \0\0\0", b"\x80" + b"\0" * 7, b"xyz\0\0\0\0\0"],
    (124, 12): [b"00000001750 ", b"1750\0\0\0\0\0\0\0\0", b" " * 12, b"\0" * 12,
                b"\x80" + b"\0" * 10 + b"\x10", b"77777777777\0", b"0000000001x\0",
                b"00000000000\0", b"00000001000\0"],
    (136, 12): [b"12345670123 ", b"\x80" + b"\0" * 11, b"00000000009\0"],
    (148, 8): [b"\0" * 8, b"12345\0 \0"],
    (156, 1): [b"0", b"5", b"\0", b"7", b"1", b"2", b"x", b"g", b"L", b"K", b"S", b"4"],
    (157, 100): [b"target", b"\0target"],
    (257, 8): [b"ustar  \0", b"ustar\x0001", b"\0" * 8, b"USTAR\x0000"],
    (345, 155): [b"pre/fix", b"\0pre", b"p" * 155, b"\xff"],
}


@st.composite
def mutated_plain_archives(draw: st.DrawFn) -> bytes:
    archive = bytearray(draw(plain_archives()))
    headers = [i for i in range(0, len(archive), BLOCK) if archive[i + 257 : i + 262] == b"ustar"]
    for _ in range(draw(st.integers(0, 3))):
        if not headers:
            break
        at = draw(st.sampled_from(headers))
        block = bytearray(archive[at : at + BLOCK])
        start, width = draw(st.sampled_from(sorted(_FIELDS)))
        value = draw(st.sampled_from(_FIELDS[(start, width)]))
        block[start : start + width] = value.ljust(width, b"\0")[:width]
        checksum = draw(st.sampled_from(["unsigned", "signed", "wrong", "as is"]))
        if checksum != "as is":
            fix_checksum(block)
        if checksum == "signed":  # the sum old tars wrote, counting bytes above 127 as negative
            high_bytes = sum(1 for i, byte in enumerate(block) if byte > 127 and not 148 <= i < 156)
            block[148:156] = b"%06o\0 " % (int(block[148:154], 8) - 256 * high_bytes)
        elif checksum == "wrong":
            block[148:156] = b"%06o\0 " % ((int(block[148:154], 8) + 1) % 0o777777)
        archive[at : at + BLOCK] = block
    if draw(st.booleans()) and archive:
        archive = archive[: draw(st.integers(0, len(archive)))]
    return bytes(archive)


@COMPARE
@given(archive=plain_archives(), feeds=_FEEDS)
def test_batch_loop_reads_plain_archives_as_the_per_member_path(archive: bytes,
                                                              feeds: list[int]) -> None:
    members, _, error = assert_same(archive, feeds)
    assert error is None
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert len(members) == len(tar.getmembers())


@COMPARE
@given(archive=mutated_plain_archives(), feeds=_FEEDS)
def test_batch_loop_matches_the_per_member_path_on_mutated_headers(archive: bytes,
                                                                  feeds: list[int]) -> None:
    assert_same(archive, feeds)


@COMPARE
@given(archive=mutated_archives(), feeds=_FEEDS)
def test_batch_loop_matches_the_per_member_path_on_hostile_archives(archive: bytes,
                                                                   feeds: list[int]) -> None:
    assert_same(archive, feeds)


@COMPARE
@given(specs=specs_strategy(), fmt=st.sampled_from(sorted(FORMATS)), feeds=_FEEDS)
def test_batch_loop_matches_the_per_member_path_in_every_format(specs: list[Spec], fmt: str,
                                                               feeds: list[int]) -> None:
    try:
        archive = build(specs, FORMATS[fmt])
    except ValueError:  # USTAR cannot hold this name (or link name)
        assume(False)
    assert_same(archive, feeds)


def test_a_window_of_plain_headers_is_read_by_the_batch_loop() -> None:
    """The common case really takes the batch loop: a window of 200 plain members is parsed
    with no per-member step at all."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(200):
            tar.addfile(_plain_member(f"data/d{i % 7}/f{i:04d}.bin", 100 + i),
                        io.BytesIO(b"y" * (100 + i)))
    archive = buffer.getvalue()
    scanner = TarScanner(len(archive))
    steps: list[int] = []
    original_step = scanner._step

    def counting_step() -> TarMember | None:
        steps.append(scanner._offset)
        return original_step()

    scanner._step = counting_step  # type: ignore[method-assign]
    members = scanner.feed(archive)
    assert len(members) == 200
    assert [m.name for m in members] == [f"data/d{i % 7}/f{i:04d}.bin" for i in range(200)]
    assert steps == [members[-1].data_offset + 512]  # only the end-of-archive block
