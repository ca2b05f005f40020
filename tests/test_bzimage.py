"""The bzImage loader (issue 13) on hand-made images: what it refuses, and
the zero page, page tables and boot CPU a 64-bit Linux entry expects.  The
real kernel's bzImage boots in test_linux.py."""

from __future__ import annotations

import struct

import pytest

from elf_util import make_bzimage, make_elf
from kvmcolo import acpi, boot, bzimage, kernels
from kvmcolo.errors import UserError
from kvmcolo.memory import GuestMemory


def _read(tmp_path, data: bytes):
    path = tmp_path / "kernel"
    path.write_bytes(data)
    return kernels.read_kernel(str(path))


def test_format_is_told_by_content(tmp_path):
    bz = _read(tmp_path, make_bzimage())
    assert isinstance(bz, bzimage.BzImage) and bz.protocol == "2.15" and bz.entry == 0x1000200
    assert "bzImage, boot protocol 2.15" in kernels.describe(bz)
    pvh = _read(tmp_path, make_elf([(0x100000, b"\xf4", 1)], pvh_entry=0x100000))
    assert isinstance(pvh, boot.PvhImage) and "PVH ELF" in kernels.describe(pvh)
    with pytest.raises(UserError, match="neither an ELF with a PVH entry note nor a bzImage"):
        _read(tmp_path, b"MZ" + bytes(4096))


@pytest.mark.parametrize("image, message", [
    (make_bzimage(version=0x020B), "protocol 2.11.* without a 64-bit entry"),
    (make_bzimage(xloadflags=0), "protocol 2.15.* without a 64-bit entry"),
    (make_bzimage(kernel=b"\x90" * 16), "damaged bzImage"),
])  # fmt: skip
def test_bzimages_it_cannot_boot_are_refused(tmp_path, image, message):
    with pytest.raises(UserError, match=message):
        _read(tmp_path, image)


def test_zero_page_page_tables_and_initrd(tmp_path):
    image = _read(tmp_path, make_bzimage(kernel=b"K" * 0x400))
    mem = GuestMemory(64 << 20)
    try:
        virtio = [acpi.MmioDevice(0xD000_0000, 0x200, 5)]
        zp_at = bzimage.load_bzimage(mem, image, "console=ttyS0 root=/dev/vda", 2, b"INITRD" * 100, virtio)
        zp = mem.read(zp_at, 4096)
        assert zp[0x202:0x206] == b"HdrS" and zp[0x210] == 0xFF  # header copied; loader "undefined"
        cmdline = struct.unpack_from("<I", zp, 0x228)[0]
        assert mem.read(cmdline, 28) == b"console=ttyS0 root=/dev/vda\0"
        rd_at, rd_size = struct.unpack_from("<II", zp, 0x218)
        assert rd_size == 600 and mem.read(rd_at, 6) == b"INITRD" and rd_at % 4096 == 0 and rd_at >= image.end
        assert mem.read(image.load_address, 4) == b"KKKK"
        e820 = [struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) for i in range(zp[0x1E8])]
        assert e820 == [(0, 0xA0000, 1), (0xA0000, 0x60000, 2), (0x100000, (64 << 20) - 0x100000, 1)]
        rsdp = struct.unpack_from("<Q", zp, 0x070)[0]
        assert mem.read(rsdp, 8) == b"RSD PTR "
        # the identity map: PML4[0] -> PDPT, PDPT[3] -> the 4th directory, whose last entry maps 4 GiB - 2 MiB
        pml4 = struct.unpack_from("<Q", mem.read(bzimage.PAGE_TABLES_GPA, 8))[0]
        pdpt3 = struct.unpack_from("<Q", mem.read((pml4 & ~0xFFF) + 24, 8))[0]
        last = struct.unpack_from("<Q", mem.read((pdpt3 & ~0xFFF) + 511 * 8, 8))[0]
        assert last == (4 << 30) - (2 << 20) | 0x83
    finally:
        mem.close()


def test_kernel_that_cannot_decompress_in_ram_is_refused(tmp_path):
    image = _read(tmp_path, make_bzimage(init_size=64 << 20))
    mem = GuestMemory(32 << 20)
    try:
        with pytest.raises(UserError, match="needs RAM up to .* to decompress"):
            bzimage.load_bzimage(mem, image, "", 1)
    finally:
        mem.close()
