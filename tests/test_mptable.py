"""The MP table's layout and checksums (the kernel ignores a table whose
checksum is wrong; test_linux shows a kernel using it)."""

from __future__ import annotations

import struct

from kvmcolo import mptable


def test_floating_pointer_and_table_checksum_and_point_at_each_other():
    blob = mptable.build(2, [5, 6, 16], base=0xF0000)
    assert blob[:4] == b"_MP_" and sum(blob[:16]) & 0xFF == 0
    (table_at,) = struct.unpack_from("<I", blob, 4)
    table = blob[table_at - 0xF0000 :]
    assert table[:4] == b"PCMP"
    length, revision = struct.unpack_from("<HB", table, 4)
    assert revision == 4 and length == len(table) and sum(table) & 0xFF == 0


def _entries(blob: bytes) -> list[bytes]:
    table = blob[16:]
    (count,) = struct.unpack_from("<H", table, 34)
    at, out = 44, []
    for _ in range(count):
        size = 20 if table[at] == mptable.ENTRY_PROCESSOR else 8
        out.append(table[at : at + size])
        at += size
    assert at == len(table)
    return out


def test_every_cpu_the_ioapic_and_each_interrupt_are_listed():
    entries = _entries(mptable.build(3, [5, 6, 17]))
    cpus = [e for e in entries if e[0] == mptable.ENTRY_PROCESSOR]
    assert [c[1] for c in cpus] == [0, 1, 2] and cpus[0][3] == 3 and cpus[1][3] == 1  # CPU 0 is the BSP
    (ioapic,) = [e for e in entries if e[0] == mptable.ENTRY_IOAPIC]
    assert ioapic[1] == 3 and struct.unpack_from("<I", ioapic, 4)[0] == 0xFEC00000
    pins = {e[5]: e[7] for e in entries if e[0] == mptable.ENTRY_IO_INTERRUPT}
    assert 2 not in pins and all(pins[i] == i for i in (0, 1, 3, 4, 5, 6, 14, 15, 17))  # KVM's GSI n = pin n
    local = [(e[1], e[7]) for e in entries if e[0] == mptable.ENTRY_LOCAL_INTERRUPT]
    assert local == [(mptable.INT_EXTINT, 0), (mptable.INT_NMI, 1)]
