"""Layer 2: the ACPI tables that describe the machine to its kernel.

RSDP (revision 2) -> XSDT -> MADT and FADT -> DSDT.  The MADT lists one
enabled local APIC per vCPU (APIC ID = vCPU index) and the IOAPIC; it is how
a PVH kernel (ours or Linux) learns how many CPUs to start.  The FADT says
the platform is hardware-reduced and points at the DSDT, whose AML (aml.py)
lists the devices no bus enumerates: the virtio-mmio transports, COM1 and
the RTC.  A kernel without VIRTIO_MMIO_CMDLINE_DEVICES (a distribution's)
finds its disks and NICs only this way.  The layouts are ACPI's, not the
kernel's, so they are packed here with `struct` (ACPI 6.5, section 5.2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmcolo import aml
from kvmcolo.errors import UserError

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


# FADT (ACPI 6.5, section 5.2.9): 276 bytes, revision 6.
_FADT_SIZE = 276
_FADT_REVISION, _FADT_MINOR = 6, 5
FADT_HW_REDUCED_ACPI = 1 << 20  # no PM1/GPE blocks, no SCI: every device is in the DSDT
BOOT_ARCH_LEGACY_DEVICES = 1 << 0  # ISA devices (the UART, the RTC) are there
BOOT_ARCH_8042 = 1 << 1  # the i8042 (our reset line) is there
BOOT_ARCH_NO_VGA = 1 << 2
CMOS_CENTURY = 0x32  # the RTC's century register (devices/rtc.py)


def fadt(dsdt_gpa: int) -> bytes:
    """A hardware-reduced FADT pointing at the DSDT.  Hardware-reduced
    means the guest expects no ACPI PM hardware (no SCI, no PM timer, no
    sleep registers) and, on x86 Linux, no PIT or legacy PIC either: its
    timer is the local APIC's, its interrupts go through the IOAPIC."""
    body = bytearray(_FADT_SIZE - _HEADER.size)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, body, offset - _HEADER.size, *values)

    put(40, "<I", dsdt_gpa if dsdt_gpa < 1 << 32 else 0)
    put(108, "<B", CMOS_CENTURY)
    put(109, "<H", BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042 | BOOT_ARCH_NO_VGA)
    put(112, "<I", FADT_HW_REDUCED_ACPI)
    put(131, "<B", _FADT_MINOR)
    put(140, "<Q", dsdt_gpa)  # X_DSDT
    put(268, "<8s", b"KVMCOLO\0")  # hypervisor vendor identity
    return _table(b"FACP", _FADT_REVISION, bytes(body))


@dataclass(frozen=True)
class MmioDevice:
    """A virtio-mmio transport as the DSDT announces it."""

    base: int
    size: int
    gsi: int


# The legacy ISA devices of every machine (machine.py), so that a kernel
# with PNP ACPI binds its drivers to them with the right interrupt.
COM1 = (0x3F8, 8, 4)
RTC = (0x70, 2, 8)


def dsdt(virtio: list[MmioDevice]) -> bytes:
    """\\_SB with COM1 (PNP0501), the RTC (PNP0B00) and each virtio-mmio
    transport (LNRO0005, the ID Linux's virtio_mmio driver matches)."""
    devices = [
        aml.device("COM1", aml.name("_HID", aml.string("PNP0501")), aml.name("_UID", aml.integer(1)),
                   aml.name("_CRS", aml.resource_template(aml.io_port(COM1[0], COM1[1]),
                                                           aml.interrupt(COM1[2], level=False)))),
        aml.device("RTC", aml.name("_HID", aml.string("PNP0B00")),
                   aml.name("_CRS", aml.resource_template(aml.io_port(RTC[0], RTC[1]),
                                                           aml.interrupt(RTC[2], level=False)))),
    ]  # fmt: skip
    for i, d in enumerate(virtio):
        devices.append(aml.device(
            f"VR{i:02X}", aml.name("_HID", aml.string("LNRO0005")), aml.name("_UID", aml.integer(i)),
            aml.name("_CRS", aml.resource_template(aml.memory32_fixed(d.base, d.size), aml.interrupt(d.gsi)))))  # fmt: skip
    return _table(b"DSDT", 2, aml.scope("\\_SB", *devices))


def build_tables(base: int, ncpus: int, virtio: list[MmioDevice] = (), limit: int | None = None) -> tuple[bytes, int]:
    """RSDP -> XSDT -> (MADT, FADT -> DSDT), laid out from guest address
    `base`.  Returns (blob, rsdp_gpa); the blob must fit in `limit` bytes."""
    madt_table = madt(ncpus)
    xsdt_at = base + _aligned(_RSDP.size)
    madt_at = xsdt_at + _aligned(_HEADER.size + 16)
    fadt_at = madt_at + _aligned(len(madt_table))
    dsdt_at = fadt_at + _aligned(_FADT_SIZE)
    dsdt_table = dsdt(list(virtio))
    xsdt = _table(b"XSDT", 1, struct.pack("<QQ", madt_at, fadt_at))
    rsdp = bytearray(_RSDP.pack(b"RSD PTR ", 0, OEM_ID, 2, 0, _RSDP.size, xsdt_at, 0))
    _checksum_fix(rsdp, 8, 20)  # ACPI 1.0 checksum: first 20 bytes
    _checksum_fix(rsdp, 32)  # extended checksum: all 36 bytes
    blob = bytearray(dsdt_at - base + len(dsdt_table))
    for at, table in ((base, rsdp), (xsdt_at, xsdt), (madt_at, madt_table), (fadt_at, fadt(dsdt_at)), (dsdt_at, dsdt_table)):
        blob[at - base : at - base + len(table)] = table
    if limit is not None and len(blob) > limit:
        raise UserError(f"the ACPI tables for {ncpus} vCPUs and {len(virtio)} devices need {len(blob)} bytes; "
                        f"the VMM has room for {limit}")  # fmt: skip
    return bytes(blob), base


def _aligned(n: int) -> int:
    return (n + 15) & ~15
