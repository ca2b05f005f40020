"""Layer 2: loading a kernel through the PVH boot ABI.

PVH (Xen's "HVM direct boot", also used by QEMU's microvm and by Linux's
CONFIG_PVH) is the simplest real boot protocol for x86: an ELF image carries
a note XEN_ELFNOTE_PHYS32_ENTRY with a 32-bit physical entry point; the VMM
loads the PT_LOAD segments at their physical addresses and starts the boot
CPU there in 32-bit flat protected mode, paging off, with EBX pointing to an
`hvm_start_info` that gives the command line, the memory map, the ACPI RSDP
and any modules (an initrd).

Guest-physical layout of the boot data (all below the kernel at 1 MiB):

    0x1000  hvm_start_info, then the memory map
    0x2000  command line (NUL-terminated, up to 8 KiB)
    0x4000  ACPI tables (RSDP, XSDT, MADT, FADT, DSDT)
    0x6000  module list
    0x8000  free for the guest (our tiny guests put their AP trampoline here)
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.construct.core import ConstructError
from elftools.elf.elffile import ELFFile

from kvmcolo import acpi, mptable
from kvmcolo.errors import UserError
from kvmcolo.files import open_input
from kvmcolo.memory import PAGE_SIZE, GuestMemory

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1

START_INFO_GPA = 0x1000
MEMMAP_GPA = 0x1040
CMDLINE_GPA = 0x2000
CMDLINE_MAX = 0x2000  # bytes, including the terminating NUL
ACPI_GPA = 0x4000
MODLIST_GPA = 0x6000
BOOT_DATA = (0x1000, 0x8000)  # range kernel segments must not overlap
LOW_RAM_END = 0xA0000  # the legacy VGA/BIOS area 640 KiB - 1 MiB is not RAM
HIGH_RAM_START = 0x100000

# Xen public ABI (xen/include/public/arch-x86/hvm/start_info.h)
_START_INFO = struct.Struct("<IIIIQQQQII")  # magic version flags nr_modules modlist cmdline rsdp memmap entries rsvd
_MEMMAP_ENTRY = struct.Struct("<QQII")  # addr size type reserved
_MODLIST_ENTRY = struct.Struct("<QQQQ")  # paddr size cmdline_paddr reserved
E820_RAM = 1
E820_RESERVED = 2


@dataclass
class Segment:
    paddr: int
    data: bytes
    memsz: int


@dataclass
class PvhImage:
    path: str
    entry: int
    segments: list[Segment]

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


def read_pvh_image(path: str) -> PvhImage:
    """Parse a PVH ELF kernel.  Raises UserError for anything that is not one."""
    with open_input(path, "kernel") as f:
        try:
            entry, segments = _pvh_segments(f, path)
        except UserError:
            raise
        except _DAMAGED_ELF as e:
            # pyelftools on a damaged file fails in many ways (a seek before
            # the start, a short struct, a bad index): all mean the same.
            raise UserError(f"kernel {path!r} is a damaged ELF file ({type(e).__name__}: {e})")
    if entry is None:
        raise UserError(f"kernel {path!r} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): not a PVH kernel")
    if not segments:
        raise UserError(f"kernel {path!r} has nothing to load")
    return PvhImage(path, entry, segments)


# What pyelftools raises on a damaged file, besides its own ELFError (and
# its construct parser's errors, e.g. a note name with no terminator).
_DAMAGED_ELF = (ELFError, ConstructError, OSError, struct.error, ValueError, KeyError, IndexError, TypeError, AttributeError)


def _pvh_segments(f, path: str) -> tuple[int | None, list[Segment]]:
    """The PVH entry point (from the Xen PHYS32_ENTRY note) and the loadable segments."""
    file_size = os.fstat(f.fileno()).st_size
    try:
        elf = ELFFile(f)
    except ELFError:
        raise UserError(f"kernel {path!r} is not an ELF file")
    if elf["e_machine"] not in ("EM_X86_64", "EM_386"):
        raise UserError(f"kernel {path!r} is an ELF for {elf['e_machine']}, not x86")
    entry = None
    segments = []
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_NOTE":
            for note in seg.iter_notes():
                if note["n_name"] == "Xen" and note["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY:
                    desc = note["n_desc"]
                    if isinstance(desc, str):
                        desc = desc.encode("latin-1")
                    entry = int.from_bytes(desc[:8], "little") & 0xFFFFFFFF
        elif seg["p_type"] == "PT_LOAD" and seg["p_memsz"] > 0:
            if seg["p_filesz"] > seg["p_memsz"]:
                raise UserError(f"kernel {path!r} has a segment larger on file than in memory")
            if seg["p_offset"] + seg["p_filesz"] > file_size:
                raise UserError(f"kernel {path!r} is truncated: a segment ends at byte "
                                f"{seg['p_offset'] + seg['p_filesz']}, the file has {file_size}")  # fmt: skip
            segments.append(Segment(seg["p_paddr"], seg.data(), seg["p_memsz"]))
    return entry, segments


def _overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


def load_pvh(
    mem: GuestMemory,
    image: PvhImage,
    cmdline: str,
    ncpus: int,
    modules: list[tuple[str, bytes, str]] = (),
    virtio: list[acpi.MmioDevice] = (),
) -> int:
    """Load `image` and the boot data into guest RAM.  Returns the start_info address.

    `modules` are (name, contents, cmdline) triples, e.g. an initrd; they are
    placed page-aligned at the top of RAM below 3 GiB.
    """
    ram_mib = mem.size >> 20
    for s in image.segments:
        end = s.paddr + s.memsz
        if not mem.contains(s.paddr, s.memsz):
            raise UserError(
                f"kernel {image.path!r} does not fit in {ram_mib} MiB of RAM "
                f"(segment {s.paddr:#x}-{end:#x}); give it more with --mem"
            )
        if _overlaps(s.paddr, end, *BOOT_DATA):
            raise UserError(f"kernel {image.path!r} has a segment at {s.paddr:#x}-{end:#x}, where the VMM keeps boot data")
        if _overlaps(s.paddr, end, LOW_RAM_END, HIGH_RAM_START):
            raise UserError(f"kernel {image.path!r} has a segment at {s.paddr:#x}-{end:#x}, in the 640 KiB-1 MiB hole that is not RAM")
    raw_cmdline = cmdline.encode()
    if len(raw_cmdline) >= CMDLINE_MAX or b"\0" in raw_cmdline:
        raise UserError(f"command line must be under {CMDLINE_MAX} bytes with no NUL")

    for s in image.segments:
        mem.write(s.paddr, s.data)
        mem.fill(s.paddr + len(s.data), s.memsz - len(s.data))

    mem.write(CMDLINE_GPA, raw_cmdline + b"\0")
    tables, rsdp = acpi.build_tables(ACPI_GPA, ncpus, virtio, limit=MODLIST_GPA - ACPI_GPA)
    mem.write(ACPI_GPA, tables)
    mem.write(mptable.MP_GPA, mptable.build(ncpus, [d.gsi for d in virtio]))  # for kernels without ACPI

    memmap = memory_map(mem)
    mem.write(MEMMAP_GPA, b"".join(_MEMMAP_ENTRY.pack(a, n, t, 0) for a, n, t in memmap))

    modlist = _load_modules(mem, image, modules)
    start_info = _START_INFO.pack(
        HVM_START_MAGIC, HVM_START_VERSION, 0, len(modlist),
        MODLIST_GPA if modlist else 0, CMDLINE_GPA, rsdp, MEMMAP_GPA, len(memmap), 0,
    )  # fmt: skip
    mem.write(START_INFO_GPA, start_info)
    return START_INFO_GPA


def memory_map(mem: GuestMemory) -> list[tuple[int, int, int]]:
    entries = []
    for gpa, size in mem.e820_ram():
        if gpa == 0:
            entries.append((0, min(size, LOW_RAM_END), E820_RAM))
            if size > HIGH_RAM_START:
                entries.append((LOW_RAM_END, HIGH_RAM_START - LOW_RAM_END, E820_RESERVED))
                entries.append((HIGH_RAM_START, size - HIGH_RAM_START, E820_RAM))
        else:
            entries.append((gpa, size, E820_RAM))
    return entries


def _load_modules(mem: GuestMemory, image: PvhImage, modules) -> list[bytes]:
    entries = []
    top = mem.e820_ram()[0][1]  # end of RAM below the MMIO hole
    cmdline_at = MODLIST_GPA + 0x400
    for name, data, mod_cmdline in modules:
        at = (top - len(data)) & ~(PAGE_SIZE - 1)
        if at < max(image.end, HIGH_RAM_START):
            raise UserError(f"module {name!r} ({len(data)} bytes) does not fit in RAM above the kernel; give more --mem")
        mem.write(at, data)
        top = at
        raw = mod_cmdline.encode() + b"\0"
        if cmdline_at + len(raw) > BOOT_DATA[1]:
            raise UserError("module command lines are too long")
        mem.write(cmdline_at, raw)
        entries.append(_MODLIST_ENTRY.pack(at, len(data), cmdline_at, 0))
        cmdline_at += len(raw)
    if entries:
        mem.write(MODLIST_GPA, b"".join(entries))
    return entries


def pvh_boot_cpu_state(vcpu, entry: int, start_info: int) -> None:
    """Put the boot vCPU at the PVH entry: 32-bit flat protected mode, paging off."""
    sregs = vcpu.get_sregs()
    for name, selector, seg_type in (("cs", 0x10, 0xB), ("ds", 0x18, 0x3), ("es", 0x18, 0x3),
                                     ("fs", 0x18, 0x3), ("gs", 0x18, 0x3), ("ss", 0x18, 0x3)):  # fmt: skip
        seg = getattr(sregs, name)
        seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, seg_type
        seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 1, 0, 0
    boot_task_register(sregs)
    sregs.cr0 = 0x11  # PE | ET
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = entry
    regs.rbx = start_info
    regs.rflags = 0x2
    vcpu.set_regs(regs)


def boot_task_register(sregs) -> None:
    """A busy 32/64-bit TSS descriptor in TR: KVM refuses a protected- or
    long-mode vCPU without one, and no kernel uses it before loading its own."""
    sregs.tr.base, sregs.tr.limit, sregs.tr.selector, sregs.tr.type = 0, 0x67, 0x20, 0xB
    sregs.tr.present, sregs.tr.s, sregs.tr.g, sregs.tr.unusable = 1, 0, 0, 0
