"""Layer 3: the one container format for machine state.

Snapshot files and COLO checkpoint payloads are the same thing: a header and
a list of sections.  Every section carries a type tag, a version, its length
and a CRC32 of its payload; the section header has its own CRC, so a flipped
length cannot send the reader off into garbage.  An END section closes the
stream, so truncation is always detected.

    header   : magic "KVMCOLO1" | u32 format version | u32 flags          16 bytes
    section  : tag[4] | u16 version | u16 flags | u64 length |
               u32 payload crc32 | u32 header crc32                        24 bytes
               payload (length bytes)
    ...
    END      : a section with tag "END " and no payload

decode() checks everything — magic, format version, every header and payload
CRC, known tags and versions, the END marker — before returning anything, so
callers never apply part of a damaged snapshot.  Payloads are returned as
zero-copy memoryviews of the input buffer.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"KVMCOLO1"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sII")
_SECTION = struct.Struct("<4sHHQI")  # without the trailing header crc
_SECTION_CRC = struct.Struct("<I")
SECTION_HEADER_SIZE = _SECTION.size + _SECTION_CRC.size
END = b"END "


class StateFormatError(ValueError):
    """The bytes are not a complete, intact state stream this version can read."""


@dataclass
class Section:
    tag: bytes
    version: int
    payload: memoryview | bytes | bytearray
    flags: int = 0


def section_header(tag: bytes, version: int, payload_len: int, payload_crc: int, flags: int = 0) -> bytes:
    head = _SECTION.pack(tag, version, flags, payload_len, payload_crc)
    return head + _SECTION_CRC.pack(zlib.crc32(head))


def encode(sections: list[Section]) -> list[bytes | memoryview]:
    """The stream as a list of buffers (for writev/sendmsg: payloads are not copied)."""
    out: list[bytes | memoryview] = [_HEADER.pack(MAGIC, FORMAT_VERSION, 0)]
    for s in sections:
        if len(s.tag) != 4 or s.tag == END:
            raise ValueError(f"bad section tag {s.tag!r}")
        out.append(section_header(s.tag, s.version, len(s.payload), zlib.crc32(s.payload), s.flags))
        out.append(s.payload)
    out.append(section_header(END, 1, 0, 0))
    return out


def decode(data, known: dict[bytes, int]) -> list[Section]:
    """Parse and fully verify a stream.  `known` maps each tag this reader
    understands to the highest version it can read."""
    view = memoryview(data).cast("B")
    if len(view) < _HEADER.size:
        raise StateFormatError("truncated: no header")
    magic, version, header_flags = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise StateFormatError("not a kvmcolo state stream (bad magic)")
    if version != FORMAT_VERSION:
        raise StateFormatError(f"format version {version} is not supported (this kvmcolo reads {FORMAT_VERSION})")
    if header_flags:
        raise StateFormatError(f"unknown stream flags {header_flags:#x}")
    at = _HEADER.size
    sections = []
    while True:
        if at + SECTION_HEADER_SIZE > len(view):
            raise StateFormatError(f"truncated at byte {at}: no END section")
        head = view[at : at + _SECTION.size]
        (header_crc,) = _SECTION_CRC.unpack_from(view, at + _SECTION.size)
        if zlib.crc32(head) != header_crc:
            raise StateFormatError(f"corrupt section header at byte {at}")
        tag, sversion, flags, length, crc = _SECTION.unpack(head)
        at += SECTION_HEADER_SIZE
        if tag == END:
            return sections
        name = tag.decode("ascii", "replace")
        if tag not in known:
            raise StateFormatError(f"unknown section {name!r}")
        if sversion > known[tag]:
            raise StateFormatError(f"section {name!r} version {sversion} is newer than this kvmcolo reads ({known[tag]})")
        if at + length > len(view):
            raise StateFormatError(f"truncated in section {name!r} ({len(view) - at} of {length} bytes)")
        payload = view[at : at + length]
        if zlib.crc32(payload) != crc:
            raise StateFormatError(f"section {name!r} is corrupt (checksum mismatch)")
        sections.append(Section(tag, sversion, payload, flags))
        at += length


def encoded_size(parts: list[bytes | memoryview]) -> int:
    return sum(len(p) for p in parts)
