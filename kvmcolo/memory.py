"""Layer 2: guest RAM.

GuestMemory owns the host mappings behind guest RAM and the KVM memslots that
expose them.  It is also the ONE way the VMM writes into guest RAM: every
write records the pages it touched in a per-region byte map, because KVM's
dirty log only sees writes made by the guest.  A checkpoint that misses the
VMM's own writes (virtio used rings, received frames, block reads) would be
silently wrong, so nothing else in the VMM may write guest memory directly.

Layout: RAM starts at 0 and runs up to the 32-bit MMIO hole; RAM beyond the
hole continues at 4 GiB (as on a PC).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmcolo.errors import UserError
from kvmcolo.kvm_ffi import ffi, ioctl, lib

PAGE_SIZE = 4096
PAGE_SHIFT = 12

MMIO_HOLE_START = 0xC000_0000  # 3 GiB: devices, IOAPIC and LAPIC live above
MMIO_HOLE_END = 0x1_0000_0000  # 4 GiB


@dataclass
class Region:
    """One contiguous run of guest RAM backed by one host mapping and memslot."""

    slot: int
    gpa: int
    size: int
    host_addr: int
    view: memoryview  # the whole region, writable
    vmm_dirty: bytearray  # bitmap, bit per page (KVM's layout): written by the VMM

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def npages(self) -> int:
        return self.size >> PAGE_SHIFT


class GuestMemory:
    """Guest RAM: host mappings, memslots, and VMM reads/writes with dirty tracking."""

    def __init__(self, size: int):
        if size <= 0 or size % PAGE_SIZE:
            raise UserError(f"memory size must be a positive multiple of 4 KiB, got {size}")
        self.size = size
        self.regions: list[Region] = []
        low = min(size, MMIO_HOLE_START)
        self._add_region(0, low)
        if size > low:
            self._add_region(MMIO_HOLE_END, size - low)

    def _add_region(self, gpa: int, size: int) -> None:
        ptr = lib.kvmcolo_map_anonymous(size)
        if ptr == ffi.NULL:
            raise UserError(f"cannot map {size >> 20} MiB of guest memory on this host")
        view = memoryview(ffi.buffer(ptr, size))
        self.regions.append(
            Region(
                slot=len(self.regions),
                gpa=gpa,
                size=size,
                host_addr=int(ffi.cast("uintptr_t", ptr)),
                view=view,
                vmm_dirty=new_bitmap(size >> PAGE_SHIFT),
            )
        )

    # ---- KVM side -------------------------------------------------------

    def register(self, vm_fd: int, flags: int = 0) -> None:
        """Create (or update the flags of) every region's memslot."""
        for r in self.regions:
            slot = ffi.new(
                "struct kvm_userspace_memory_region *",
                {
                    "slot": r.slot,
                    "flags": flags,
                    "guest_phys_addr": r.gpa,
                    "memory_size": r.size,
                    "userspace_addr": r.host_addr,
                },
            )
            ioctl(vm_fd, lib.KVM_SET_USER_MEMORY_REGION, slot, what=f"slot {r.slot}")

    def e820_ram(self) -> list[tuple[int, int]]:
        """(gpa, size) of every RAM range, for the guest's memory map."""
        return [(r.gpa, r.size) for r in self.regions]

    # ---- VMM access ------------------------------------------------------

    def _locate(self, gpa: int, length: int) -> tuple[Region, int]:
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r, gpa - r.gpa
        raise GuestMemoryError(gpa, length)

    def contains(self, gpa: int, length: int) -> bool:
        return any(r.gpa <= gpa and gpa + length <= r.end for r in self.regions)

    def read(self, gpa: int, length: int) -> bytes:
        r, off = self._locate(gpa, length)
        return bytes(r.view[off : off + length])

    def view(self, gpa: int, length: int) -> memoryview:
        """A read-only view of guest RAM (no copy).  Writers use write()."""
        r, off = self._locate(gpa, length)
        return r.view[off : off + length].toreadonly()

    def write(self, gpa: int, data) -> None:
        """Copy `data` (any buffer) into guest RAM and record the dirtied pages."""
        n = len(data)
        r, off = self._locate(gpa, n)
        r.view[off : off + n] = data
        self._mark(r, off, n)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        """Set `length` bytes of guest RAM to `byte` (zeroing .bss and the like)."""
        r, off = self._locate(gpa, length)
        r.view[off : off + length] = bytes([byte]) * length
        self._mark(r, off, length)

    def writable_view(self, gpa: int, length: int) -> memoryview:
        """A writable view for zero-copy I/O (recv_into, readinto) straight into
        guest RAM.  The pages are recorded as dirty now, before the caller writes."""
        r, off = self._locate(gpa, length)
        self._mark(r, off, length)
        return r.view[off : off + length]

    @staticmethod
    def _mark(r: Region, off: int, length: int) -> None:
        if length <= 0:
            return
        first = off >> PAGE_SHIFT
        last = (off + length - 1) >> PAGE_SHIFT
        bm = r.vmm_dirty
        fb, lb = first >> 3, last >> 3
        if fb == lb:
            bm[fb] |= (0xFF << (first & 7)) & (0xFF >> (7 - (last & 7)))
        else:
            bm[fb] |= (0xFF << (first & 7)) & 0xFF
            if lb - fb > 1:
                bm[fb + 1 : lb] = b"\xff" * (lb - fb - 1)
            bm[lb] |= 0xFF >> (7 - (last & 7))

    def take_vmm_dirty(self) -> list[bytearray]:
        """Return each region's VMM-dirty bitmap and start new, empty ones."""
        taken = []
        for r in self.regions:
            taken.append(r.vmm_dirty)
            r.vmm_dirty = new_bitmap(r.npages)
        return taken

    def close(self) -> None:
        for r in self.regions:
            r.view.release()
            lib.kvmcolo_unmap(ffi.cast("void *", r.host_addr), r.size)
        self.regions = []


def new_bitmap(npages: int) -> bytearray:
    """A zeroed dirty bitmap in KVM's layout: whole 64-bit words, bit i = page i."""
    return bytearray(((npages + 63) // 64) * 8)


def bitmap_pages(bitmap) -> list[int]:
    """Set bits of a bitmap as page numbers (for tests and small maps; the
    checkpoint path uses the C helper in dirty_log)."""
    value = int.from_bytes(bitmap, "little")
    pages = []
    while value:
        low = value & -value
        pages.append(low.bit_length() - 1)
        value ^= low
    return pages


class GuestMemoryError(ValueError):
    """A guest-supplied address range is not backed by RAM."""

    def __init__(self, gpa: int, length: int):
        super().__init__(f"guest range {gpa:#x}+{length:#x} is not in guest RAM")
        self.gpa = gpa
        self.length = length
