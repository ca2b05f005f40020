"""Layer 2: the Intel MultiProcessor Specification (1.4) table, for kernels
without ACPI.

Without it (or an ACPI MADT) Linux scans the BIOS area for seconds, then
falls back to the PIC in virtual-wire mode.  The table lists each vCPU's
local APIC, the ISA bus, the IOAPIC, and where each interrupt arrives:
KVM's default routing sends GSI n to IOAPIC pin n (and to the PIC for
n < 16), so ISA IRQ n is pin n (the cascade, IRQ 2, excepted), and the
virtio-mmio GSIs above 15 are listed as ISA interrupts on their own pins.
LINT0 takes the PIC (ExtINT), LINT1 NMI.  Layouts are the specification's,
packed with `struct`.
"""

from __future__ import annotations

import struct

from kvmcolo.acpi import IOAPIC_BASE, LAPIC_BASE

MP_GPA = 0xF0000  # in the BIOS area Linux scans (0xF0000-0xFFFFF), reserved in the E820 map
IOAPIC_PINS = 24

_FLOATING = struct.Struct("<4sIBBB5s")  # "_MP_", table address, length/16, revision, checksum, features
_HEADER = struct.Struct("<4sHBB8s12sIHHIHBx")  # "PCMP", length, revision, checksum, OEM, product, ..., LAPIC
_PROCESSOR = struct.Struct("<BBBBII8x")
_BUS = struct.Struct("<BB6s")
_IOAPIC = struct.Struct("<BBBBI")
_INTERRUPT = struct.Struct("<BBHBBBB")  # type, kind, flags, source bus, source IRQ, destination, pin

ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IO_INTERRUPT, ENTRY_LOCAL_INTERRUPT = range(5)
INT_VECTORED, INT_NMI, INT_EXTINT = 0, 1, 3
CPU_ENABLED, CPU_BOOTSTRAP = 1, 2
ISA_BUS = 0


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build(ncpus: int, gsis: list[int] = (), base: int = MP_GPA) -> bytes:
    """The floating pointer at `base`, the configuration table after it."""
    ioapic_id = ncpus
    entries = []
    for cpu in range(ncpus):
        flags = CPU_ENABLED | (CPU_BOOTSTRAP if cpu == 0 else 0)
        entries.append(_PROCESSOR.pack(ENTRY_PROCESSOR, cpu, 0x14, flags, 0x600, 0x201))  # family 6, FPU+APIC
    entries.append(_BUS.pack(ENTRY_BUS, ISA_BUS, b"ISA   "))
    entries.append(_IOAPIC.pack(ENTRY_IOAPIC, ioapic_id, 0x11, 1, IOAPIC_BASE))
    irqs = sorted({i for i in range(16) if i != 2} | {g for g in gsis if g < IOAPIC_PINS})
    for irq in irqs:  # flags 0: polarity and trigger as the bus (ISA: edge, active high)
        entries.append(_INTERRUPT.pack(ENTRY_IO_INTERRUPT, INT_VECTORED, 0, ISA_BUS, irq, ioapic_id, irq))
    entries.append(_INTERRUPT.pack(ENTRY_LOCAL_INTERRUPT, INT_EXTINT, 0, ISA_BUS, 0, 0xFF, 0))
    entries.append(_INTERRUPT.pack(ENTRY_LOCAL_INTERRUPT, INT_NMI, 0, ISA_BUS, 0, 0xFF, 1))
    body = b"".join(entries)
    table_at = base + _FLOATING.size
    header = bytearray(_HEADER.pack(b"PCMP", _HEADER.size + len(body), 4, 0, b"KVMCOLO ", b"KVMCOLO VM  ", 0, 0,
                                    len(entries), LAPIC_BASE, 0, 0))  # fmt: skip
    header[7] = _checksum(bytes(header) + body)
    floating = bytearray(_FLOATING.pack(b"_MP_", table_at, 1, 4, 0, bytes(5)))
    floating[10] = _checksum(floating)
    return bytes(floating) + bytes(header) + body
