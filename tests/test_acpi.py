"""The ACPI tables and the AML builder (issue 13): checked by ACPICA's own
disassembler (iasl, what firmware engineers use), not by our reading of
our own bytes; and the encodings that matter at their edges."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from conftest import unavailable
from kvmcolo import acpi, aml

BASE = 0x4000


def _tables(ncpus: int, virtio) -> dict[bytes, bytes]:
    blob, rsdp = acpi.build_tables(BASE, ncpus, virtio)
    assert rsdp == BASE and blob[:8] == b"RSD PTR "
    assert sum(blob[:20]) % 256 == 0 and sum(blob[:36]) % 256 == 0

    def table(gpa: int) -> bytes:
        at = gpa - BASE
        length = struct.unpack_from("<I", blob, at + 4)[0]
        t = blob[at : at + length]
        assert sum(t) % 256 == 0, f"{t[:4]} checksum"
        return t

    xsdt = table(struct.unpack_from("<Q", blob, 24)[0])
    found = {b"XSDT": xsdt}
    for (gpa,) in struct.iter_unpack("<Q", xsdt[36:]):
        t = table(gpa)
        found[t[:4]] = t
    found[b"DSDT"] = table(struct.unpack_from("<Q", found[b"FACP"], 140)[0])
    return found


def _disassemble(tmp_path, name: str, data: bytes) -> str:
    if shutil.which("iasl") is None:
        unavailable("iasl is not installed (./scripts/setup installs acpica-tools)")
    (tmp_path / f"{name}.dat").write_bytes(data)
    proc = subprocess.run(["iasl", "-d", f"{name}.dat"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (tmp_path / f"{name}.dsl").read_text()


VIRTIO = [acpi.MmioDevice(0xD000_0000, 0x200, 5), acpi.MmioDevice(0xD000_1000, 0x200, 6)]


def test_dsdt_lists_each_virtio_transport_and_the_isa_devices(tmp_path):
    dsl = _disassemble(tmp_path, "dsdt", _tables(2, VIRTIO)[b"DSDT"])
    devices = dsl.split("Device (")[1:]
    assert [d.split(")")[0] for d in devices] == ["COM1", "RTC", "VR00", "VR01"]
    for d, dev in zip(devices[2:], VIRTIO):
        assert 'Name (_HID, "LNRO0005")' in d
        assert f"0x{dev.base:08X},         // Address Base" in d and "0x00000200,         // Address Length" in d
        assert "Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive" in d and f"0x{dev.gsi:08X}," in d
    assert '"PNP0501"' in devices[0] and "0x03F8" in devices[0] and "0x00000004," in devices[0]
    assert '"PNP0B00"' in devices[1] and "0x0070" in devices[1] and "0x00000008," in devices[1]


def test_fadt_is_hardware_reduced_and_points_at_the_dsdt(tmp_path):
    tables = _tables(1, VIRTIO)
    dsl = _disassemble(tmp_path, "facp", tables[b"FACP"])
    fields = {re.sub(r"^\[.*?\]", "", k).strip(): v.strip()
              for k, sep, v in (line.partition(" : ") for line in dsl.splitlines()) if sep}  # fmt: skip
    assert fields["Hardware Reduced (V5)"] == "1"
    assert fields["RTC Century Index"] == "32"
    assert fields["CMOS RTC Not Present (V5)"] == "0" and fields["8042 Present on ports 60/64 (V2)"] == "1"
    dsdt_gpa = BASE + _blob_offset(tables[b"DSDT"])
    assert int(fields["DSDT Address"], 16) == dsdt_gpa
    assert fields["Revision"] == "06"


def _blob_offset(table: bytes) -> int:
    blob, _ = acpi.build_tables(BASE, 1, VIRTIO)
    return blob.index(table)


def test_madt_lists_each_cpu_and_the_ioapic():
    madt = _tables(3, [])[b"APIC"]
    entries, at = [], 44
    while at < len(madt):
        entries.append((madt[at], madt[at + 3] if madt[at] == 0 else None))
        at += madt[at + 1]
    assert entries == [(0, 0), (0, 1), (0, 2), (1, None)]


def test_tables_that_do_not_fit_are_refused():
    from kvmcolo.errors import UserError

    with pytest.raises(UserError, match="ACPI tables for 2 vCPUs and 2 devices need"):
        acpi.build_tables(BASE, 2, VIRTIO, limit=256)


@pytest.mark.parametrize("body_len, encoded", [
    (0, b"\x01"), (62, b"\x3f"),  # one byte: the length counts itself
    (63, b"\x41\x04"), (4093, b"\x4f\xff"),  # two bytes: low nibble, then the next 8 bits
    (4094, b"\x81\x00\x01"), ((1 << 20) - 4, b"\x8f\xff\xff"),  # three bytes
    ((1 << 20) - 3, b"\xc1\x00\x00\x01"),  # four
])  # fmt: skip
def test_pkg_length_at_each_size_boundary(body_len, encoded):
    out = aml.pkg_length(body_len)
    assert out == encoded
    lead = out[0]
    n = (lead >> 6) + 1
    total = lead & 0x3F if n == 1 else (lead & 0x0F) | int.from_bytes(out[1:], "little") << 4
    assert total == body_len + len(out)


def test_integers_take_the_shortest_encoding():
    assert [aml.integer(v) for v in (0, 1, 2, 0x1234, 0x12345678, 1 << 40)] == [
        b"\x00", b"\x01", b"\x0a\x02", b"\x0b\x34\x12", b"\x0c\x78\x56\x34\x12", b"\x0e" + (1 << 40).to_bytes(8, "little")]


def test_names_are_checked_and_padded():
    assert aml.name_string("\\_SB.VR0") == b"\\\x2e_SB_VR0_"
    assert aml.name_string("RTC") == b"RTC_"
    for bad in ("TOOLONG", "1ABC", "a.b"):
        with pytest.raises(ValueError):
            aml.name_string(bad)
