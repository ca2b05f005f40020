"""Tiny hand-made ELF files for loader tests (no compiler needed)."""

from __future__ import annotations

import struct

PT_LOAD, PT_NOTE = 1, 4


def make_elf(segments: list[tuple[int, bytes, int]], pvh_entry: int | None = None) -> bytes:
    """ELF64 x86-64 with PT_LOAD segments (paddr, data, memsz) and, if given,
    a PVH entry note."""
    phdrs = []
    blobs = []
    note = b""
    if pvh_entry is not None:
        note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", pvh_entry)
    nph = len(segments) + (1 if note else 0)
    offset = 64 + 56 * nph
    for paddr, data, memsz in segments:
        phdrs.append(struct.pack("<IIQQQQQQ", PT_LOAD, 7, offset, paddr, paddr, len(data), memsz, 0x1000))
        blobs.append(data)
        offset += len(data)
    if note:
        phdrs.append(struct.pack("<IIQQQQQQ", PT_NOTE, 4, offset, 0, 0, len(note), len(note), 4))
        blobs.append(note)
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, pvh_entry or 0, 64, 0, 0, 64, 56, nph, 64, 0, 0)
    return header + b"".join(phdrs) + b"".join(blobs)
