"""A sans-I/O tar header parser: feed it bytes, get members with their data offsets.

kitfs never extracts a tar; it needs, for each member, its path, type, mode, size and where its
data starts in the (uncompressed) layer. ``TarScanner`` is a push parser: the caller asks
``wants()`` which byte range it needs next, ``feed()``s exactly those bytes (from a Range
request, a cache, or a decompressing stream) and collects ``TarMember``s. It never asks for
file bodies, only for headers, so a 4 GiB weights file costs one 512-byte read plus its
parents' headers.

Two paths over the same headers: ``feed`` first runs a batch loop over every plain header in the
window it was given (the common case: POSIX ustar, a file or a directory, canonical octal
fields, the checksum every current tar writes, no extended header pending), which checks and
decodes each header with one regular-expression match and two Adler-32 calls, and builds the
member in place; at the first header it does not take (pax, GNU, a link, an odd number, a bad
checksum, the end) it hands over to the per-member path, which handles and checks everything.
The batch loop only ever takes a header the per-member path reads the same way (tests compare
the two over generated and mutated archives), so which path read a header never shows.

Formats: POSIX USTAR (prefix + name), PAX extended headers (``x`` per file, ``g`` global:
``path``, ``size``, ``linkpath`` and ``mtime``), GNU long names and long links (``L``/``K``)
and GNU base-256 numbers. Names are returned as ``str`` decoded UTF-8 with surrogateescape, so
any byte sequence round-trips; policy on what is acceptable lives in ``kitfs.format.layout``.

Pure: no I/O.
"""

from __future__ import annotations

import re
import zlib
from typing import NamedTuple

from kitfs.errors import FormatError

BLOCK = 512
# A PAX or GNU long-name record larger than this is refused (tarfile has no limit; Go caps
# PAX headers at 1 MiB). Keeps a hostile header from making us buffer gigabytes.
MAX_EXTENDED_HEADER_BYTES = 1 << 20

REGULAR_TYPES = (b"0", b"\0", b"7")  # '7' is contiguous file, read as regular (tarfile does)
DIRECTORY_TYPE = b"5"


class TarMember(NamedTuple):
    """One tar entry. ``data_offset`` is where its data starts in the uncompressed stream.

    (A NamedTuple, not a frozen dataclass: indexing a layer of 100,000 files makes 100,000 of
    them, and a NamedTuple is several times cheaper to build.)
    """

    name: str
    typeflag: bytes
    mode: int
    size: int
    data_offset: int
    header_offset: int
    linkname: str = ""
    mtime: int = 0

    @property
    def is_file(self) -> bool:
        return self.typeflag in REGULAR_TYPES

    @property
    def is_dir(self) -> bool:
        return self.typeflag == DIRECTORY_TYPE


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


_OCTAL_DIGITS = b"01234567"


def parse_number(field: bytes, what: str) -> int:
    """Parse an octal (NUL/space padded) or GNU base-256 numeric field.

    Octal is octal digits only, as Go's ``archive/tar`` reads it: ``int(text, 8)`` would also
    take a sign, ``0o`` and ``_``, and a negative size sends the scan backwards, for ever.
    """
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        if field[0] & 0x40:  # negative base-256
            value -= 1 << (8 * (len(field) - 1))
            raise FormatError(f"tar header: negative {what}")
        return value | ((field[0] & 0x3F) << (8 * (len(field) - 1)))
    text = field.strip(b" \0")
    if not text:
        return 0
    if text.translate(None, _OCTAL_DIGITS):  # anything left is not an octal digit
        raise FormatError(f"tar header: {what} field {field!r} is not octal")
    return int(text, 8)


_HIGH_BYTES = bytes(range(128, 256))
_ZERO_BLOCK = bytes(BLOCK)
_NO_PAX: dict[str, str] = {}  # never mutated


def _byte_sum(piece: bytes) -> int:
    """The sum of ``piece``'s bytes, for at most 256 bytes: Adler-32's low half is one plus
    that sum modulo 65521, which 256 * 255 cannot reach; so C does the loop (5x faster than
    ``sum``, and a layer of 100,000 small files checks 100,000 headers)."""
    return (zlib.adler32(piece) & 0xFFFF) - 1


def _checksum_ok(block: bytes) -> bool:
    stored = block[148:156]
    try:
        expected = parse_number(stored, "checksum")
    except FormatError:
        return False
    unsigned = (_byte_sum(block[:148]) + 8 * 32 + _byte_sum(block[156:334])
                + _byte_sum(block[334:]))
    if expected == unsigned:  # what every current tar writes: done without a second pass
        return True
    # Some old tars summed the header as signed chars: every byte above 127 counts 256 less.
    high_bytes = len(block) - 8 - len(block[:148].translate(None, _HIGH_BYTES)) - len(
        block[156:].translate(None, _HIGH_BYTES))
    return expected == unsigned - 256 * high_bytes


def parse_pax_records(data: bytes) -> dict[str, str]:
    """Parse PAX ``"%d %s=%s\\n"`` records. Raises FormatError on malformed records."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding after the last record
            break
        space = data.find(b" ", pos)
        if space < 0:
            raise FormatError("PAX header: record without length")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise FormatError("PAX header: bad record length") from None
        if length <= 0 or pos + length > len(data) or space >= pos + length:
            raise FormatError("PAX header: record length out of range")
        record = data[space + 1 : pos + length]
        if not record.endswith(b"\n") or b"=" not in record:
            raise FormatError("PAX header: malformed record")
        key, _, value = record[:-1].partition(b"=")
        records[_decode(key)] = _decode(value)
        pos += length
    return records


# A header the batch loop takes, in one match at its first byte: the name (up to its first NUL,
# by a lookahead), mode, uid and gid as 7 octal digits and a NUL, size and mtime as 11 and a
# NUL, the checksum as 6 and NUL space (what tarfile, GNU tar and Go write), type '0' or '5',
# no link name, the POSIX magic "ustar\0" "00", and the prefix (up to its first NUL). Anything
# else is left to the per-member path.
_PLAIN_HEADER = re.compile(
    rb"(?s)(?=([^\0]{0,100})).{100}"  # name
    rb"([0-7]{7})\0[0-7]{7}\0[0-7]{7}\0"  # mode, uid, gid
    rb"([0-7]{11})\0([0-7]{11})\0([0-7]{6})\0 "  # size, mtime, checksum
    rb"([05])\0.{99}"  # typeflag, an empty link name
    rb"ustar\x0000.{80}"  # magic and version; uname, gname, devmajor, devminor
    rb"(?=([^\0]{0,155})).{155}"  # prefix
)
# The checksum field as summed when it holds NUL and space after its 6 digits: only the
# digits' own sum is added to this (8 spaces stand for the field in the sum, which is 256).
_CHECKSUM_FIELD_ALLOWANCE = 8 * 32 - 32


class TarScanner:
    """Push parser over a tar stream's headers.

    Usage::

        scanner = TarScanner(stream_size)
        while (want := scanner.wants()) is not None:
            offset, length = want
            members.extend(scanner.feed(read(offset, length)))

    ``wants()`` returns ``None`` when the archive has ended (a zero block, or the end of the
    stream at a block boundary). The caller may feed more bytes than asked, starting at the
    asked offset; extra bytes are used for following headers. Bytes must be fed in order.
    """

    def __init__(self, stream_size: int, *, batch: bool = True) -> None:
        self._size = stream_size
        self._batch = batch  # False: the per-member path only (the batch loop's reference)
        self._offset = 0  # offset of the next header block
        # Bytes fed and not yet consumed are self._buffer[self._start:]; the first of them is
        # at stream offset self._offset. Consuming moves _start (no copy per member), so a big
        # window of small files is parsed in linear time.
        self._buffer = b""
        self._start = 0
        self._pending_length = BLOCK  # bytes needed at self._offset
        self._pax: dict[str, str] = {}
        self._global_pax: dict[str, str] = {}
        self._long_name: str | None = None
        self._long_link: str | None = None
        self._ext_header_offset: int | None = None
        self._ext_type = b""  # set while an extended header's body is awaited (b"" otherwise)
        self._ext_size = 0
        self._done = False

    @property
    def _available(self) -> int:
        return len(self._buffer) - self._start

    def wants(self) -> tuple[int, int] | None:
        """The ``(offset, length)`` of the bytes the parser needs next, or None at the end."""
        if self._done:
            return None
        if self._offset >= self._size:
            self._done = True
            if self._pax or self._long_name is not None or self._long_link is not None:
                raise FormatError("tar: archive ends after an extended header")
            return None
        if self._offset + self._pending_length > self._size:
            raise FormatError(
                f"tar: truncated archive: need {self._pending_length} bytes at offset "
                f"{self._offset}, stream is {self._size} bytes"
            )
        have = self._available
        return self._offset + have, self._pending_length - have

    def feed(self, data: bytes | bytearray | memoryview) -> list[TarMember]:
        """Feed bytes starting at the offset ``wants()`` returned; return completed members."""
        if self._start == len(self._buffer):
            self._buffer, self._start = bytes(data), 0
        else:
            self._buffer, self._start = self._buffer[self._start :] + bytes(data), 0
        members: list[TarMember] = []
        while not self._done and self._available >= self._pending_length:
            # (a member's own extended headers set _ext_header_offset; a global one, _global_pax)
            if self._batch and self._ext_header_offset is None and not (
                    self._ext_type or self._global_pax):
                self._scan_plain_headers(members)
                if self._offset >= self._size or self._available < BLOCK:
                    break
            member = self._step()
            if member is not None:
                members.append(member)
            if self._offset >= self._size:
                break
        return members

    def _scan_plain_headers(self, members: list[TarMember]) -> None:
        """The batch loop: take every plain header from the buffer's start on, up to the first
        one that is not (or is incomplete), and leave the state as the per-member path would."""
        buffer, start, offset, size = self._buffer, self._start, self._offset, self._size
        end = len(buffer)
        match = _PLAIN_HEADER.match
        adler32 = zlib.adler32
        new_member = tuple.__new__
        count = 0
        while start + BLOCK <= end:
            found = match(buffer, start)
            if found is None:
                break
            name, mode, member_size, mtime, checksum, typeflag, prefix = found.groups()
            # The header's unsigned byte sum, with the checksum field counted as 8 spaces:
            # Adler-32's low half is one plus the byte sum, exact for 256 bytes (see _byte_sum).
            byte_sum = ((adler32(buffer[start : start + 256]) & 0xFFFF)
                        + (adler32(buffer[start + 256 : start + BLOCK]) & 0xFFFF) - 2
                        + _CHECKSUM_FIELD_ALLOWANCE - sum(checksum))
            if byte_sum != int(checksum, 8):
                break  # the per-member path: a signed-sum checksum, or a bad one
            data_size = int(member_size, 8) if typeflag == b"0" else 0
            data_offset = offset + BLOCK
            if data_offset + data_size > size:
                break  # the per-member path says why
            path = name.decode("utf-8", "surrogateescape")
            if prefix:
                path = prefix.decode("utf-8", "surrogateescape") + "/" + path
            members.append(new_member(TarMember, (
                path, typeflag, int(mode, 8) & 0o7777, data_size, data_offset, offset, "",
                int(mtime, 8))))
            count += 1
            step = BLOCK + (data_size + BLOCK - 1) // BLOCK * BLOCK
            start += step
            offset += step
            if offset >= size:
                break
        if start > end:  # the last member's data runs past the bytes fed: skip it unread
            self._buffer, self._start = b"", 0
        else:
            self._start = start
        self._offset = offset

    def _advance(self, count: int) -> None:
        self._start += count
        self._offset += count

    def _step(self) -> TarMember | None:
        if self._ext_type:  # an extended header and its body (which may be empty) are buffered
            self._finish_extended()
            return None
        block = self._buffer[self._start : self._start + BLOCK]
        if block == _ZERO_BLOCK:
            self._done = True  # end-of-archive marker (one zero block is enough to stop)
            return None
        if not _checksum_ok(block):
            raise FormatError(f"tar: bad header checksum at offset {self._offset}")
        typeflag = block[156:157]
        size = parse_number(block[124:136], "size")
        if typeflag in (b"x", b"g", b"L", b"K"):
            if size > MAX_EXTENDED_HEADER_BYTES:
                raise FormatError(
                    f"tar: extended header of {size} bytes at offset {self._offset} is too large"
                )
            self._ext_type = typeflag
            self._ext_size = size
            # A member's header chain starts at its first own extended header; a global
            # ``g`` header belongs to no member.
            if typeflag != b"g" and self._ext_header_offset is None:
                self._ext_header_offset = self._offset
            self._pending_length = BLOCK + _round_up(size)
            return None
        return self._finish_member(block, typeflag, size)

    def _finish_extended(self) -> None:
        body = self._buffer[self._start + BLOCK : self._start + BLOCK + self._ext_size]
        if self._ext_type in (b"x", b"g"):
            records = parse_pax_records(body)
            (self._pax if self._ext_type == b"x" else self._global_pax).update(records)
        elif self._ext_type == b"L":
            self._long_name = _decode(_cstr(body))
        else:
            self._long_link = _decode(_cstr(body))
        self._advance(self._pending_length)
        self._pending_length = BLOCK
        self._ext_type = b""

    def _finish_member(self, block: bytes, typeflag: bytes, size: int) -> TarMember:
        header_offset = self._ext_header_offset if self._ext_header_offset is not None else self._offset
        name = _decode(_cstr(block[0:100]))
        if block[257:262] == b"ustar" and block[345] != 0:
            prefix = _cstr(block[345:500])
            if prefix and block[257:265] != b"ustar  \0":  # POSIX prefix; not in old GNU format
                name = _decode(prefix) + "/" + name
        linkname = _decode(_cstr(block[157:257])) if block[157] != 0 else ""
        mode = parse_number(block[100:108], "mode")
        mtime = parse_number(block[136:148], "mtime")
        pax = {**self._global_pax, **self._pax} if self._global_pax or self._pax else _NO_PAX
        if self._long_name is not None:
            name = self._long_name
        if self._long_link is not None:
            linkname = self._long_link
        if "path" in pax:
            name = pax["path"]
        if "linkpath" in pax:
            linkname = pax["linkpath"]
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise FormatError(f"tar: PAX size {pax['size']!r} is not a number") from None
            if size < 0:
                raise FormatError(f"tar: PAX size {size} is negative")
        if "mtime" in pax:
            try:
                mtime = int(float(pax["mtime"]))
            except (ValueError, OverflowError):  # not a number, NaN, or infinite ("1e400")
                mtime = 0
        if typeflag not in REGULAR_TYPES:
            # Only regular files carry data the reader may need; links, dirs and devices are
            # given a size of 0 when skipping (GNU tar and tarfile do the same for these types).
            data_size = size if typeflag not in (b"1", b"2", b"3", b"4", b"5", b"6") else 0
        else:
            data_size = size
        data_offset = self._offset + BLOCK
        member = TarMember(
            name=name,
            typeflag=typeflag,
            mode=mode & 0o7777,
            size=data_size,
            data_offset=data_offset,
            header_offset=header_offset,
            linkname=linkname,
            mtime=mtime,
        )
        self._pax = {}
        self._long_name = self._long_link = None
        self._ext_header_offset = None
        next_offset = data_offset + _round_up(data_size)
        if data_offset + data_size > self._size:
            raise FormatError(
                f"tar: member {name!r} data ({data_size} bytes at {data_offset}) runs past the "
                f"end of the {self._size}-byte layer"
            )
        skip = next_offset - self._offset
        if skip <= self._available:
            self._advance(skip)
        else:
            self._buffer, self._start = b"", 0
            self._offset = next_offset
        return member


def _round_up(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK
