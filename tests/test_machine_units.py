"""Pure logic of the machine layer, without KVM: sizes, bus, UART, ACPI,
CPUID table, PVH loading into real (mmap'ed) guest memory."""

from __future__ import annotations

import struct

import pytest

from elf_util import make_elf
from kvmcolo import boot
from kvmcolo.cli import parse_size
from kvmcolo.devices.serial import Serial8250
from kvmcolo.errors import UserError
from kvmcolo.iobus import IoBus
from kvmcolo.memory import MMIO_HOLE_END, MMIO_HOLE_START, GuestMemory, GuestMemoryError, bitmap_pages


@pytest.mark.parametrize("text,value", [("256M", 256 << 20), ("1G", 1 << 30), ("512MiB", 512 << 20),
                                        ("64k", 64 << 10), ("128", 128 << 20), ("2T", 2 << 40)])  # fmt: skip
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "1.5G", "-1M", "10X", "ten"])
def test_parse_size_rejects(text):
    with pytest.raises(UserError):
        parse_size(text)


class Recorder:
    def __init__(self):
        self.writes = []

    def io_read(self, offset, size):
        return 0x1000 + offset

    def io_write(self, offset, size, value):
        self.writes.append((offset, size, value))


def test_iobus_dispatch_and_unclaimed():
    bus = IoBus("port")
    a, b = Recorder(), Recorder()
    bus.register(0x3F8, 8, a)
    bus.register(0x400, 4, b)
    assert bus.read(0x3FD, 1) == 0x1005
    bus.write(0x402, 2, 7)
    assert b.writes == [(2, 2, 7)]
    assert bus.read(0x3F0, 1) == 0xFF  # nothing there: all ones
    assert bus.read(0x500, 4) == 0xFFFFFFFF
    bus.write(0x500, 1, 1)  # dropped
    with pytest.raises(ValueError, match="overlaps"):
        bus.register(0x3FC, 8, Recorder())
    with pytest.raises(ValueError, match="overlaps"):
        bus.register(0x3F0, 9, Recorder())


class Out:
    def __init__(self):
        self.data = bytearray()
        self.flushes = 0

    def write(self, b):
        self.data += b

    def flush(self):
        self.flushes += 1


def test_serial_output_and_line_flush():
    out, irqs = Out(), []
    uart = Serial8250(out, irqs.append)
    for ch in b"hi\n":
        uart.io_write(0, 1, ch)
    assert out.data == b"hi\n" and out.flushes == 1
    assert uart.io_read(5, 1) & 0x60 == 0x60  # transmitter always empty
    assert irqs == []  # no interrupts enabled


def test_serial_receive_interrupt():
    out, irqs = Out(), []
    uart = Serial8250(out, irqs.append)
    uart.io_write(1, 1, 0x01)  # IER: received data available
    uart.feed(b"ab")
    assert irqs == [True]
    assert uart.io_read(5, 1) & 1  # LSR.DR
    assert uart.io_read(2, 1) & 0x0F == 0x04  # IIR: RDA
    assert uart.io_read(0, 1) == ord("a")
    assert uart.io_read(0, 1) == ord("b")
    assert irqs == [True, False]
    assert uart.io_read(2, 1) & 0x01  # no interrupt pending


def test_serial_break_reads_as_nul_with_bi_until_taken():
    levels = []
    uart = Serial8250(None, levels.append)
    uart.io_write(1, 1, 0x01)  # IER: received data available
    uart.send_break()
    uart.feed(b"h")
    assert levels == [True] and uart.io_read(5, 1) & 0x11 == 0x11  # LSR: DR and BI
    saved = uart.save_state()
    assert saved["rx_breaks"] == [0]
    assert uart.io_read(0, 1) == 0 and uart.io_read(5, 1) & 0x11 == 0x01  # the NUL taken, BI gone, "h" waits
    other = Serial8250(None, lambda level: None)
    other.load_state(saved)
    assert other.io_read(5, 1) & 0x10 and other.io_read(0, 1) == 0 and other.io_read(0, 1) == ord("h")
    with pytest.raises(ValueError, match="outside"):
        other.load_state({**saved, "rx_breaks": [7]})


def test_serial_divisor_latch_does_not_transmit():
    out = Out()
    uart = Serial8250(out, lambda level: None)
    uart.io_write(3, 1, 0x80)  # DLAB
    uart.io_write(0, 1, 0x0C)
    uart.io_write(1, 1, 0x00)
    assert uart.io_read(0, 1) == 0x0C
    uart.io_write(3, 1, 0x03)
    assert out.data == b""


def test_guest_memory_layout_and_vmm_dirty_tracking():
    mem = GuestMemory(MMIO_HOLE_START + (8 << 20))  # spills over the hole
    try:
        assert mem.e820_ram() == [(0, MMIO_HOLE_START), (MMIO_HOLE_END, 8 << 20)]
        mem.write(0x1FFE, b"abcd")  # straddles pages 1 and 2
        mem.write(MMIO_HOLE_END + 5, b"x")
        assert mem.read(0x1FFE, 4) == b"abcd"
        low, high = mem.take_vmm_dirty()
        assert bitmap_pages(low) == [1, 2]
        assert bitmap_pages(high) == [0]
        assert not any(mem.take_vmm_dirty()[0])  # taken means cleared
        with pytest.raises(GuestMemoryError):
            mem.read(MMIO_HOLE_START - 2, 4)  # runs into the hole
        view = mem.writable_view(0x5000, 10)
        view[:] = b"0123456789"
        assert mem.read(0x5000, 10) == b"0123456789"
        assert bitmap_pages(mem.take_vmm_dirty()[0]) == [5]
        mem.fill(0x3000, 40 * 4096 + 1)  # a long range: whole bytes in the middle
        assert bitmap_pages(mem.take_vmm_dirty()[0]) == list(range(3, 44))
    finally:
        mem.close()


def test_pvh_load_places_segments_and_start_info(tmp_path):
    code = bytes(range(200))
    path = tmp_path / "k.elf"
    path.write_bytes(make_elf([(0x100000, code, 0x3000)], pvh_entry=0x100010))
    image = boot.read_pvh_image(str(path))
    assert image.entry == 0x100010
    mem = GuestMemory(64 << 20)
    try:
        mem.write(0x100000 + 0x2000, b"\xff" * 16)  # stale bytes in .bss must be zeroed
        at = boot.load_pvh(mem, image, "pages=12 hello", ncpus=2)
        magic, version, _, nmods, _, cmdline, rsdp, memmap, nmap, _ = struct.unpack("<IIIIQQQQII", mem.read(at, 56))
        assert (magic, version, nmods) == (0x336EC578, 1, 0)
        assert mem.read(cmdline, 15) == b"pages=12 hello\0"
        assert mem.read(rsdp, 8) == b"RSD PTR "
        entries = [struct.unpack("<QQII", mem.read(memmap + 24 * i, 24))[:3] for i in range(nmap)]
        assert entries == [(0, 0xA0000, 1), (0xA0000, 0x60000, 2), (0x100000, (64 << 20) - 0x100000, 1)]
        assert mem.read(0x100000, 200) == code
        assert mem.read(0x100000 + 200, 0x3000 - 200) == bytes(0x3000 - 200)
    finally:
        mem.close()


def test_pvh_load_refuses_segment_over_boot_data(tmp_path):
    path = tmp_path / "k.elf"
    path.write_bytes(make_elf([(0x2000, b"x", 1)], pvh_entry=0x2000))
    mem = GuestMemory(16 << 20)
    try:
        with pytest.raises(UserError, match="boot data"):
            boot.load_pvh(mem, boot.read_pvh_image(str(path)), "", 1)
    finally:
        mem.close()


def test_pvh_modules_are_listed(tmp_path):
    path = tmp_path / "k.elf"
    path.write_bytes(make_elf([(0x100000, b"x", 1)], pvh_entry=0x100000))
    mem = GuestMemory(16 << 20)
    try:
        at = boot.load_pvh(mem, boot.read_pvh_image(str(path)), "", 1, [("initrd", b"INITRD" * 1000, "rd")])
        _, _, _, nmods, modlist, *_ = struct.unpack("<IIIIQQQQII", mem.read(at, 56))
        paddr, size, cmd, _ = struct.unpack("<QQQQ", mem.read(modlist, 32))
        assert nmods == 1 and size == 6000 and paddr % 4096 == 0
        assert mem.read(paddr, 6) == b"INITRD" and mem.read(cmd, 3) == b"rd\0"
    finally:
        mem.close()


@pytest.fixture(scope="module")
def small_mem():
    m = GuestMemory(4 << 20)
    yield m
    m.close()


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(0, (4 << 20) - 1), st.integers(1, 200_000)), max_size=6))
def test_vmm_dirty_bitmap_matches_a_model(small_mem, writes):
    small_mem.take_vmm_dirty()
    expected = set()
    for off, length in writes:
        length = min(length, (4 << 20) - off)
        small_mem.fill(off, length, 0)
        expected |= set(range(off >> 12, ((off + length - 1) >> 12) + 1))
    assert bitmap_pages(small_mem.take_vmm_dirty()[0]) == sorted(expected)
