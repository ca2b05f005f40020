"""Layer 2: loading a Linux bzImage through its 64-bit boot protocol.

A bzImage (what distributions ship as vmlinuz) is a real-mode setup part
followed by the compressed protected-mode kernel.  Since boot protocol 2.12
a 64-bit kernel also has a 64-bit entry point 0x200 bytes into that kernel
(Documentation/arch/x86/boot.rst, "64-bit BOOT PROTOCOL"): the VMM loads
it, fills in a zero page (struct boot_params: the setup header copied from
the file, the command line, the initrd, the e820 memory map, the ACPI RSDP),
and starts the boot CPU in long mode on identity-mapped page tables with
RSI pointing at the zero page.  The real-mode setup code never runs.

Guest-physical layout, beside boot.py's (command line, ACPI tables and MP
table are shared with PVH):

    0x1000  GDT (null, null, 64-bit code at 0x10, data at 0x18)
    0x7000  zero page (boot_params)
    0x9000  page tables: PML4, PDPT, then 4 page directories of 2 MiB
            pages mapping the first 4 GiB one to one (to 0xF000)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmcolo import acpi, boot, mptable
from kvmcolo.errors import UserError
from kvmcolo.memory import GuestMemory

GDT_GPA = 0x1000
ZERO_PAGE_GPA = 0x7000
PAGE_TABLES_GPA = 0x9000
PAGE_TABLES_END = 0xF000
IDENTITY_MAP_GIB = 4

# setup header (offsets into the file and into boot_params alike)
_SETUP_SECTS, _BOOT_FLAG, _JUMP, _HEADER, _VERSION = 0x1F1, 0x1FE, 0x200, 0x202, 0x206
_TYPE_OF_LOADER, _LOADFLAGS, _RAMDISK_IMAGE, _RAMDISK_SIZE = 0x210, 0x211, 0x218, 0x21C
_CMD_LINE_PTR, _INITRD_ADDR_MAX, _KERNEL_ALIGNMENT, _RELOCATABLE = 0x228, 0x22C, 0x230, 0x234
_XLOADFLAGS, _CMDLINE_SIZE, _HARDWARE_SUBARCH, _PREF_ADDRESS, _INIT_SIZE = 0x236, 0x238, 0x23C, 0x258, 0x260
# boot_params outside the header
_ACPI_RSDP_ADDR, _EXT_RAMDISK_IMAGE, _EXT_RAMDISK_SIZE, _EXT_CMD_LINE_PTR = 0x070, 0x0C0, 0x0C4, 0x0C8
_E820_ENTRIES, _E820_TABLE, _E820_MAX = 0x1E8, 0x2D0, 128
_E820_ENTRY = struct.Struct("<QQI")
_SETUP_HEADER_LIMIT = 0x290  # where boot_params' copy of the setup header must end

MIN_VERSION = 0x020C  # 2.12: xloadflags, and with it the 64-bit entry
XLF_KERNEL_64 = 1 << 0  # the 64-bit entry at +0x200 exists
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
LOADER_UNDEFINED = 0xFF  # type_of_loader: a boot loader without an assigned ID
ENTRY_64_OFFSET = 0x200

BOOT_CS, BOOT_DS = 0x10, 0x18


@dataclass
class BzImage:
    path: str
    version: int  # boot protocol, e.g. 0x020F
    header: bytes  # the setup header, 0x1F1 up to its end
    kernel: bytes  # the protected-mode part, loaded at load_address
    load_address: int
    init_size: int  # memory the kernel needs from load_address while it decompresses
    cmdline_size: int  # the longest command line it takes, without the NUL

    @property
    def entry(self) -> int:
        return self.load_address + ENTRY_64_OFFSET

    @property
    def end(self) -> int:
        return self.load_address + max(self.init_size, len(self.kernel))

    @property
    def protocol(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


def is_bzimage(head: bytes) -> bool:
    return len(head) > _HEADER + 4 and head[_HEADER : _HEADER + 4] == b"HdrS" and head[_BOOT_FLAG : _BOOT_FLAG + 2] == b"\x55\xaa"


def read_bzimage(path: str, data: bytes) -> BzImage:
    """Parse the bzImage `data` (read from `path`).  Raises UserError for
    anything this loader cannot boot."""
    if not is_bzimage(data):
        raise UserError(f"kernel {path!r} is not a bzImage (no 'HdrS' setup header)")
    if len(data) < _SETUP_HEADER_LIMIT:  # every field read below lies before this
        raise UserError(f"kernel {path!r} is a truncated bzImage ({len(data)} bytes, not even its setup header)")
    version = struct.unpack_from("<H", data, _VERSION)[0]
    xloadflags = struct.unpack_from("<H", data, _XLOADFLAGS)[0] if version >= MIN_VERSION else 0
    if version < MIN_VERSION or not xloadflags & XLF_KERNEL_64:
        raise UserError(f"kernel {path!r} is a bzImage (boot protocol {version >> 8}.{version & 0xFF:02d}) without a "
                        "64-bit entry point: kvmcolo boots 64-bit kernels with protocol 2.12 or later")  # fmt: skip
    setup_sects = data[_SETUP_SECTS] or 4  # 0 means 4, for very old kernels
    kernel_at = (setup_sects + 1) * 512
    header_end = _JUMP + 2 + data[_JUMP + 1]  # the jump at 0x200 skips over the header
    if kernel_at + ENTRY_64_OFFSET >= len(data) or header_end > min(kernel_at, _SETUP_HEADER_LIMIT):
        raise UserError(f"kernel {path!r} is a damaged bzImage (setup of {setup_sects} sectors, {len(data)} bytes)")
    load_address = struct.unpack_from("<Q", data, _PREF_ADDRESS)[0]
    if not boot.HIGH_RAM_START <= load_address < 1 << 32:
        load_address = boot.HIGH_RAM_START  # a relocatable kernel moves itself from here
    init_size, cmdline_size = (struct.unpack_from("<I", data, at)[0] for at in (_INIT_SIZE, _CMDLINE_SIZE))
    return BzImage(path, version, data[_SETUP_SECTS:header_end], data[kernel_at:], load_address, init_size,
                   cmdline_size)  # fmt: skip


def load_bzimage(
    mem: GuestMemory,
    image: BzImage,
    cmdline: str,
    ncpus: int,
    initrd: bytes | None = None,
    virtio: list[acpi.MmioDevice] = (),
) -> int:
    """Load `image`, its zero page and the boot data.  Returns the zero page's address."""
    if not mem.contains(image.load_address, image.end - image.load_address):
        raise UserError(f"kernel {image.path!r} needs RAM up to {image.end:#x} to decompress "
                        f"({mem.size >> 20} MiB given); give it more with --mem")  # fmt: skip
    raw_cmdline = cmdline.encode()
    cmdline_max = min(boot.CMDLINE_MAX, image.cmdline_size + 1)
    if len(raw_cmdline) >= cmdline_max or b"\0" in raw_cmdline:
        raise UserError(f"command line must be under {cmdline_max} bytes for this kernel, with no NUL")

    mem.write(image.load_address, image.kernel)
    mem.write(boot.CMDLINE_GPA, raw_cmdline + b"\0")
    tables, rsdp = acpi.build_tables(boot.ACPI_GPA, ncpus, virtio, limit=boot.MODLIST_GPA - boot.ACPI_GPA)
    mem.write(boot.ACPI_GPA, tables)
    mem.write(mptable.MP_GPA, mptable.build(ncpus, [d.gsi for d in virtio]))

    zp = bytearray(4096)
    zp[_SETUP_SECTS : _SETUP_SECTS + len(image.header)] = image.header
    zp[_TYPE_OF_LOADER] = LOADER_UNDEFINED
    struct.pack_into("<I", zp, _CMD_LINE_PTR, boot.CMDLINE_GPA)
    struct.pack_into("<I", zp, _HARDWARE_SUBARCH, 0)  # a PC
    struct.pack_into("<Q", zp, _ACPI_RSDP_ADDR, rsdp)
    if initrd:
        at = _place_initrd(mem, image, initrd, zp)
        mem.write(at, initrd)
        struct.pack_into("<II", zp, _RAMDISK_IMAGE, at & 0xFFFFFFFF, len(initrd) & 0xFFFFFFFF)
        struct.pack_into("<II", zp, _EXT_RAMDISK_IMAGE, at >> 32, len(initrd) >> 32)
    memmap = boot.memory_map(mem)
    if len(memmap) > _E820_MAX:
        raise UserError(f"memory map of {len(memmap)} entries does not fit the zero page")
    zp[_E820_ENTRIES] = len(memmap)
    for i, (addr, size, kind) in enumerate(memmap):
        _E820_ENTRY.pack_into(zp, _E820_TABLE + i * _E820_ENTRY.size, addr, size, kind)
    mem.write(ZERO_PAGE_GPA, bytes(zp))
    _write_gdt_and_page_tables(mem)
    return ZERO_PAGE_GPA


def _place_initrd(mem: GuestMemory, image: BzImage, initrd: bytes, zp: bytearray) -> int:
    """The initrd's address: page-aligned at the top of low RAM, under the
    kernel's initrd_addr_max (the 64-bit kernel lifts it to 4 GiB and more)."""
    addr_max = struct.unpack_from("<I", zp, _INITRD_ADDR_MAX)[0] or 0x37FFFFFF
    top = min(mem.e820_ram()[0][1], addr_max + 1)
    at = (top - len(initrd)) & ~0xFFF
    if at < image.end:
        raise UserError(f"initrd ({len(initrd)} bytes) does not fit in RAM above the kernel; give more --mem")
    return at


def _write_gdt_and_page_tables(mem: GuestMemory) -> None:
    code64 = 0x00AF9B000000FFFF  # present, DPL 0, code, execute/read, accessed, L=1, G=1
    data = 0x00CF93000000FFFF  # present, DPL 0, data, read/write, accessed, D/B=1, G=1
    mem.write(GDT_GPA, struct.pack("<4Q", 0, 0, code64, data))
    pml4, pdpt, pd = PAGE_TABLES_GPA, PAGE_TABLES_GPA + 0x1000, PAGE_TABLES_GPA + 0x2000
    present_rw, huge = 0x3, 0x80
    mem.write(pml4, struct.pack("<Q", pdpt | present_rw) + bytes(4088))
    mem.write(pdpt, b"".join(struct.pack("<Q", (pd + i * 0x1000) | present_rw) for i in range(IDENTITY_MAP_GIB))
              + bytes(4096 - 8 * IDENTITY_MAP_GIB))  # fmt: skip
    mem.write(pd, b"".join(struct.pack("<Q", (i << 21) | present_rw | huge) for i in range(512 * IDENTITY_MAP_GIB)))


def boot_cpu_state(vcpu, entry: int, zero_page: int) -> None:
    """Put the boot vCPU at the 64-bit entry: long mode, paging on the
    identity map, flat segments from our GDT, interrupts off, RSI = zero page."""
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = getattr(sregs, name)
        code = name == "cs"
        seg.base, seg.limit, seg.selector = 0, 0xFFFFFFFF, BOOT_CS if code else BOOT_DS
        seg.type = 0xB if code else 0x3
        seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 0
        seg.l, seg.db = (1, 0) if code else (0, 1)
    boot.boot_task_register(sregs)
    sregs.gdt.base, sregs.gdt.limit = GDT_GPA, 4 * 8 - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 = 0x80000011  # PG | ET | PE
    sregs.cr3 = PAGE_TABLES_GPA
    sregs.cr4 = 0x20  # PAE
    sregs.efer = 0x500  # LMA | LME
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = entry
    regs.rsi = zero_page
    regs.rflags = 0x2
    vcpu.set_regs(regs)
