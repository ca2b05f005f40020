"""Layer 2: a small AML builder, enough for a DSDT that lists devices.

AML is the bytecode of ACPI's definition blocks (ACPI 6.5, chapter 20).
A kernel's ACPI interpreter reads the DSDT to find the devices that no bus
can enumerate; ours are the virtio-mmio transports (and the legacy ISA
devices), each a Device with a hardware ID and its current resources.

Only the terms such a table needs are here: Scope, Device, Name, integers,
strings, and resource templates (Memory32Fixed, IO, extended Interrupt).
Each term is bytes; composing them is concatenation, so a table is built
bottom-up and its package lengths are exact.
"""

from __future__ import annotations

import struct

_ZERO_OP, _ONE_OP, _ONES_OP = 0x00, 0x01, 0xFF
_BYTE_PREFIX, _WORD_PREFIX, _DWORD_PREFIX, _QWORD_PREFIX, _STRING_PREFIX = 0x0A, 0x0B, 0x0C, 0x0E, 0x0D
_NAME_OP, _SCOPE_OP, _BUFFER_OP = 0x08, 0x10, 0x11
_EXT_OP_PREFIX, _DEVICE_OP = 0x5B, 0x82
_ROOT_CHAR, _DUAL_NAME_PREFIX, _MULTI_NAME_PREFIX = 0x5C, 0x2E, 0x2F

# resource descriptors (ACPI 6.5, section 6.4)
_IO_PORT = 0x47  # small item, 7 bytes of body
_END_TAG = 0x79
_MEMORY32_FIXED = 0x86  # large items
_EXTENDED_INTERRUPT = 0x89


def pkg_length(body_len: int) -> bytes:
    """The PkgLength encoding of a package whose contents are `body_len`
    bytes (the encoding counts itself): one byte up to 63, else 2-4 bytes
    with the count in the lead byte's top two bits."""
    for n in range(1, 5):
        total = body_len + n
        if n == 1 and total < 0x40:
            return bytes([total])
        if n > 1 and total < 1 << (4 + 8 * (n - 1)):
            out = [((n - 1) << 6) | (total & 0x0F)]
            rest = total >> 4
            for _ in range(n - 1):
                out.append(rest & 0xFF)
                rest >>= 8
            return bytes(out)
    raise ValueError(f"AML package of {body_len} bytes is too long")


def _name_seg(seg: str) -> bytes:
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_") or not all(
        c.isupper() or c.isdigit() or c == "_" for c in seg
    ):
        raise ValueError(f"{seg!r} is not an ACPI name segment (1-4 of A-Z, 0-9, _; not starting with a digit)")
    return seg.ljust(4, "_").encode()


def name_string(path: str) -> bytes:
    """'\\_SB.VR00' or 'VR00' as an AML NameString."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes([_ROOT_CHAR]), path[1:]
    segs = [_name_seg(s) for s in path.split(".")] if path else []
    if not segs:
        return prefix + b"\x00"  # NullName
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([_DUAL_NAME_PREFIX]) + b"".join(segs)
    return prefix + bytes([_MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    if value == 0:
        return bytes([_ZERO_OP])
    if value == 1:
        return bytes([_ONE_OP])
    for prefix, fmt, limit in ((_BYTE_PREFIX, "<B", 1 << 8), (_WORD_PREFIX, "<H", 1 << 16),
                               (_DWORD_PREFIX, "<I", 1 << 32), (_QWORD_PREFIX, "<Q", 1 << 64)):  # fmt: skip
        if 0 <= value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    raise ValueError(f"AML integer {value} is out of range")


def string(text: str) -> bytes:
    raw = text.encode("ascii")
    if b"\0" in raw:
        raise ValueError("an AML string cannot hold NUL")
    return bytes([_STRING_PREFIX]) + raw + b"\x00"


def name(path: str, value: bytes) -> bytes:
    """Name(path, value): value is an already-encoded data object."""
    return bytes([_NAME_OP]) + name_string(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([_SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([_EXT_OP_PREFIX, _DEVICE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes([_BUFFER_OP]) + pkg_length(len(body)) + body


# ---- resource templates -------------------------------------------------------


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    return struct.pack("<BHBII", _MEMORY32_FIXED, 9, 1 if writable else 0, base, length)


def io_port(base: int, length: int) -> bytes:
    """IO(Decode16, base, base, 1, length): a fixed range of ports."""
    return struct.pack("<BBHHBB", _IO_PORT, 1, base, base, 1, length)


def interrupt(gsi: int, level: bool = True, active_low: bool = False, shared: bool = False) -> bytes:
    """Interrupt(ResourceConsumer, Level|Edge, ActiveHigh|ActiveLow,
    Exclusive|Shared) {gsi}: the extended form, which names a GSI."""
    flags = 0x01 | (0 if level else 0x02) | (0x04 if active_low else 0) | (0x08 if shared else 0)
    return struct.pack("<BHBBI", _EXTENDED_INTERRUPT, 6, flags, 1, gsi)


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate() {...}: a Buffer of descriptors and an end tag
    (checksum 0, which means "not checksummed")."""
    return buffer(b"".join(descriptors) + bytes([_END_TAG, 0]))
