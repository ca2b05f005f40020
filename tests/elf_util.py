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


def make_bzimage(kernel: bytes = b"\x90" * 0x400, version: int = 0x020F, xloadflags: int = 1,
                 pref_address: int = 0x1000000, init_size: int = 0x200000, setup_sects: int = 1) -> bytes:
    """A bzImage's setup header (boot protocol `version`) and `kernel` as its
    protected-mode part: what the loader reads, without a real kernel."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x200:0x202] = bytes([0xEB, 0x268 - 0x202])  # jmp over the header, which ends at 0x268
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<I", setup, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", setup, 0x230, 0x200000)  # kernel_alignment
    setup[0x234] = 1  # relocatable
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, 2047)  # cmdline_size
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + kernel
