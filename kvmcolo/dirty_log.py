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

import threading
from dataclasses import dataclass

from kvmcolo.kvm_ffi import Kvm, ffi, ioctl, lib
from kvmcolo.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory, Region


@dataclass
class RegionDirty:
    """The dirty pages of one memory region."""

    region: Region
    pages: object  # cffi uint32_t[] of page numbers within the region, ascending;
    # reused by the reader's next collect(), so consume it before then
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
    """The one owner of a machine's dirty pages (get it with `of(machine)`).

    KVM keeps one log per memory slot, and reading it re-arms it: two
    independent readers would steal pages from each other (a snapshot would
    leave the next checkpoint incomplete).  So only this object reads KVM's
    log and the VMM-dirty bitmap; every consumer (COLO checkpoints, the
    secondary's own tracking, incremental snapshots, later pre-copy) has a
    `DirtyReader` with its own pending bitmap, and every harvest is ORed into
    all of them.  A reader's first collect returns every page."""

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
        # One scratch bitmap per region, allocated once: the checkpoint path
        # allocates nothing.
        self._scratch = [_new_bitmap(r) for r in memory.regions]
        self._log = ffi.new("struct kvm_dirty_log *")
        self._clear = ffi.new("struct kvm_clear_dirty_log *")
        self._readers: dict[str, DirtyReader] = {}
        self._lock = threading.Lock()

    def reader(self, name: str) -> DirtyReader:
        """The reader called `name` (made on first use; one per consumer)."""
        with self._lock:
            if name not in self._readers:
                self._readers[name] = DirtyReader(self, name)
            return self._readers[name]

    def _harvest(self) -> None:
        """Read and re-arm KVM's log and the VMM-dirty bitmap once, into every
        reader's pending set (caller holds _lock; vCPUs paused)."""
        vmm_maps = self.memory.take_vmm_dirty()
        readers = list(self._readers.values())
        for i, r in enumerate(self.memory.regions):
            bitmap, words = self._scratch[i]
            self._log.slot = r.slot
            self._log.dirty_bitmap = bitmap
            ioctl(self.vm_fd, lib.KVM_GET_DIRTY_LOG, self._log, what=f"slot {r.slot}")
            if self.manual:
                self._clear.slot = r.slot
                self._clear.first_page = 0
                self._clear.num_pages = r.npages
                self._clear.dirty_bitmap = bitmap
                ioctl(self.vm_fd, lib.KVM_CLEAR_DIRTY_LOG, self._clear, what=f"slot {r.slot}")
            lib.kvmcolo_bitmap_or(bitmap, ffi.from_buffer("uint64_t[]", vmm_maps[i]), words)
            for reader in readers:
                lib.kvmcolo_bitmap_or(reader._pending[i][0], bitmap, words)

    def stop(self) -> None:
        """Turn logging off again (slots back to plain RAM)."""
        self.memory.register(self.vm_fd, flags=0)


class DirtyReader:
    """One consumer's view of the machine's dirty pages."""

    def __init__(self, log: DirtyLog, name: str):
        self.name = name
        self._log = log
        regions = log.memory.regions
        self._pending = [_new_bitmap(r, all_set=True) for r in regions]
        self._out = [_new_bitmap(r) for r in regions]
        self._pages = [ffi.new("uint32_t[]", words * 64) for _, words in self._out]

    def collect(self) -> list[RegionDirty]:
        """Pages dirtied since this reader's last collect (the first time:
        all pages).  vCPUs must be paused.  The result's arrays are reused by
        the next collect of this reader."""
        log = self._log
        out = []
        with log._lock:
            log._harvest()
            for i, r in enumerate(log.memory.regions):
                pending, words = self._pending[i]
                bitmap, _ = self._out[i]
                ffi.memmove(bitmap, pending, words * 8)
                ffi.memmove(pending, _zeros(words), words * 8)
                count = lib.kvmcolo_bitmap_pages(bitmap, words, self._pages[i])
                out.append(RegionDirty(r, self._pages[i], count, bitmap, words))
        return out


    def put_back(self, dirty: list[RegionDirty]) -> None:
        """Return a collect()'s pages unconsumed: the next collect includes
        them again (a pre-copy that counted a round's leftovers and then
        decided to send them with the final state instead)."""
        with self._log._lock:
            for i, d in enumerate(dirty):
                if d.bitmap is None:
                    raise ValueError("put_back needs the pages as collect() returned them")
                lib.kvmcolo_bitmap_or(self._pending[i][0], d.bitmap, d.words)


def of(machine) -> DirtyLog:
    """The machine's one DirtyLog (logging starts on first use)."""
    with _machine_lock:
        if getattr(machine, "dirty_log", None) is None:
            machine.dirty_log = DirtyLog(machine.kvm, machine.vm.fd, machine.vm.memory)
        return machine.dirty_log


_machine_lock = threading.Lock()
_zero_words: dict[int, bytes] = {}


def _zeros(words: int) -> bytes:
    if words not in _zero_words:
        _zero_words[words] = bytes(words * 8)
    return _zero_words[words]


def _new_bitmap(region: Region, all_set: bool = False):
    """A KVM-layout bitmap for `region`: (uint64_t[] words, word count)."""
    words = (region.npages + 63) // 64
    bitmap = ffi.new("uint64_t[]", words)
    if all_set:
        full, rest = divmod(region.npages, 64)
        ffi.buffer(bitmap)[: full * 8] = b"\xff" * (full * 8)
        if rest:
            bitmap[full] = (1 << rest) - 1
    return bitmap, words


def dirty_bytes(dirty: list[RegionDirty]) -> int:
    return sum(d.count for d in dirty) * PAGE_SIZE


__all__ = ["DirtyLog", "DirtyReader", "RegionDirty", "of", "PAGE_SHIFT", "dirty_bytes", "pages_array", "scatter_pages"]
