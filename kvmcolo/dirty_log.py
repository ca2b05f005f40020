"""Layer 3: which guest pages changed since the last checkpoint.

Two sources, merged: KVM's dirty log (pages the guest wrote) and the pages
the VMM itself wrote through GuestMemory (device DMA: used rings, received
frames, block reads), which KVM never sees.

With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (and INITIALLY_SET) reading the log
does not re-protect anything: the VMM reads the bitmap with GET_DIRTY_LOG and
re-arms exactly the pages it got with CLEAR_DIRTY_LOG, and enabling logging
costs nothing up front.  Without it, GET_DIRTY_LOG does both at once.  Either
way the caller must have the vCPUs paused, or pages written between the read
and the re-arm would be lost.

Bitmaps are turned into page lists, and pages gathered into or scattered from
contiguous buffers, by small C helpers (kvm_ffi): whole-buffer loops that
Python would otherwise run per bit and per page.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmcolo.kvm_ffi import Kvm, ffi, ioctl, lib
from kvmcolo.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory, Region


@dataclass
class RegionDirty:
    """The dirty pages of one memory region."""

    region: Region
    pages: object  # cffi uint32_t[] of page numbers within the region, ascending;
    # reused by the next DirtyLog.collect(), so consume it before then
    count: int
    bitmap: object = None  # the same set as a KVM-layout cffi uint64_t[] (from collect())
    words: int = 0

    def page_list(self) -> list[int]:
        return list(ffi.unpack(self.pages, self.count))

    def gather(self, dst) -> None:
        """Copy the pages, in order, into `dst` (a buffer of count * 4 KiB)."""
        src = ffi.cast("uint8_t *", self.region.host_addr)
        lib.kvmcolo_gather_pages(src, self.pages, self.count, ffi.from_buffer(dst, require_writable=True))


def merge_and_copy(dirty: RegionDirty, extra_pages, extra_count: int, dst: Region, src_addr: int) -> int:
    """Add `extra_pages` to `dirty`'s set, then copy every page of the union
    from the mapping at `src_addr` to `dst`.  Returns the pages copied."""
    lib.kvmcolo_bitmap_set_pages(dirty.bitmap, extra_pages, extra_count)
    count = lib.kvmcolo_bitmap_pages(dirty.bitmap, dirty.words, dirty.pages)
    lib.kvmcolo_copy_pages(ffi.cast("uint8_t *", dst.host_addr), ffi.cast("uint8_t *", src_addr), dirty.pages, count)
    return count


def scatter_pages(region: Region, pages, count: int, src) -> None:
    """Copy consecutive pages of `src` to the given pages of `region`."""
    dst = ffi.cast("uint8_t *", region.host_addr)
    lib.kvmcolo_scatter_pages(dst, pages, count, ffi.from_buffer(src))


def pages_array(page_numbers: list[int]):
    arr = ffi.new("uint32_t[]", max(1, len(page_numbers)))
    for i, p in enumerate(page_numbers):
        arr[i] = p
    return arr


class DirtyLog:
    def __init__(self, kvm: Kvm, vm_fd: int, memory: GuestMemory, manual: bool = True):
        """manual=False forces the legacy GET_DIRTY_LOG path (for measuring)."""
        self.memory = memory
        self.vm_fd = vm_fd
        wanted = lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | lib.KVM_DIRTY_LOG_INITIALLY_SET
        self.manual = manual and (kvm.check_extension("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2") & wanted) == wanted
        if self.manual:
            cap = ffi.new("struct kvm_enable_cap *")
            cap.cap = lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
            cap.args[0] = wanted
            ioctl(vm_fd, lib.KVM_ENABLE_CAP, cap, what="manual dirty-log protect")
        memory.register(vm_fd, flags=lib.KVM_MEM_LOG_DIRTY_PAGES)
        # One bitmap and one page list per region, allocated once: the
        # checkpoint path allocates nothing.
        self._bitmaps = []
        self._pages = []
        for r in memory.regions:
            words = (r.npages + 63) // 64
            self._bitmaps.append((ffi.new("uint64_t[]", words), words))
            self._pages.append(ffi.new("uint32_t[]", words * 64))
        self._log = ffi.new("struct kvm_dirty_log *")
        self._clear = ffi.new("struct kvm_clear_dirty_log *")

    def collect(self, include_vmm: bool = True) -> list[RegionDirty]:
        """Pages dirtied since the last collect (the first one: all pages),
        re-arming the log for them.  vCPUs must be paused."""
        vmm_maps = self.memory.take_vmm_dirty() if include_vmm else None
        out = []
        for i, r in enumerate(self.memory.regions):
            bitmap, words = self._bitmaps[i]
            self._log.slot = r.slot
            self._log.dirty_bitmap = bitmap
            ioctl(self.vm_fd, lib.KVM_GET_DIRTY_LOG, self._log, what=f"slot {r.slot}")
            if self.manual:
                self._clear.slot = r.slot
                self._clear.first_page = 0
                self._clear.num_pages = r.npages
                self._clear.dirty_bitmap = bitmap
                ioctl(self.vm_fd, lib.KVM_CLEAR_DIRTY_LOG, self._clear, what=f"slot {r.slot}")
            if vmm_maps is not None:
                lib.kvmcolo_bitmap_or(bitmap, ffi.from_buffer("uint64_t[]", vmm_maps[i]), words)
            count = lib.kvmcolo_bitmap_pages(bitmap, words, self._pages[i])
            out.append(RegionDirty(r, self._pages[i], count, bitmap, words))
        return out

    def stop(self) -> None:
        """Turn logging off again (slots back to plain RAM)."""
        self.memory.register(self.vm_fd, flags=0)


def dirty_bytes(dirty: list[RegionDirty]) -> int:
    return sum(d.count for d in dirty) * PAGE_SIZE


__all__ = ["DirtyLog", "RegionDirty", "PAGE_SHIFT", "dirty_bytes", "pages_array", "scatter_pages"]
