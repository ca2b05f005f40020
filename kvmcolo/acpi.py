"""Layer 2: the few ACPI tables a PVH guest needs to find its CPUs.

RSDP (revision 2) -> XSDT -> MADT.  The MADT lists one enabled local APIC per
vCPU (APIC ID = vCPU index) and the IOAPIC; it is how a PVH kernel (ours or
Linux) learns how many CPUs to start.  These layouts are ACPI's, not the
kernel's, so they are packed here with `struct` (ACPI 6.x, section 5.2).
"""

from __future__ import annotations

import struct

LAPIC_BASE = 0xFEE0_0000
IOAPIC_BASE = 0xFEC0_0000
OEM_ID = b"KVMCLO"
OEM_TABLE_ID = b"KVMCOLO "
CREATOR_ID = b"KCLO"

_HEADER = struct.Struct("<4sIBB6s8sI4sI")  # 36 bytes
_RSDP = struct.Struct("<8sB6sBII Q B3x".replace(" ", ""))  # 36 bytes
MADT_PCAT_COMPAT = 1


def _checksum_fix(table: bytearray, at: int, length: int | None = None) -> None:
    """Set byte `at` so that the first `length` bytes sum to 0 mod 256."""
    end = len(table) if length is None else length
    table[at] = (-sum(table[:end])) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    length = _HEADER.size + len(body)
    t = bytearray(_HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1) + body)
    _checksum_fix(t, 9)
    return bytes(t)


def madt(ncpus: int) -> bytes:
    body = struct.pack("<II", LAPIC_BASE, MADT_PCAT_COMPAT)
    for cpu in range(ncpus):
        body += struct.pack("<BBBBI", 0, 8, cpu, cpu, 1)  # processor local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, ncpus, 0, IOAPIC_BASE, 0)  # IOAPIC, GSI base 0
    return _table(b"APIC", 5, body)


def build_tables(base: int, ncpus: int) -> tuple[bytes, int]:
    """Tables laid out from guest address `base`.  Returns (blob, rsdp_gpa)."""
    rsdp_at = base
    xsdt_at = base + 64
    madt_at = xsdt_at + 64
    xsdt = _table(b"XSDT", 1, struct.pack("<Q", madt_at))
    rsdp = bytearray(_RSDP.pack(b"RSD PTR ", 0, OEM_ID, 2, 0, _RSDP.size, xsdt_at, 0))
    _checksum_fix(rsdp, 8, 20)  # ACPI 1.0 checksum: first 20 bytes
    _checksum_fix(rsdp, 32)  # extended checksum: all 36 bytes
    blob = bytearray(madt_at - base) + madt(ncpus)
    blob[0 : len(rsdp)] = rsdp
    blob[xsdt_at - base : xsdt_at - base + len(xsdt)] = xsdt
    return bytes(blob), rsdp_at
