"""Layer 4: the COLO secondary's RAM cache — one owner for it.

The cache is a full copy of the primary's RAM as of the last checkpoint
the secondary adopted.  A checkpoint carries only the pages the PVM dirtied
since the one before; they go into the cache, and then every page dirtied
by the PVM *or by the SVM* since that checkpoint is copied from the cache
into the SVM's RAM (pages only the SVM wrote must go back to the PVM's
contents too).  The copies are whole-page C loops (dirty_log's helpers).
"""

from __future__ import annotations

from kvmcolo import vmstate
from kvmcolo.dirty_log import RegionDirty, merge_and_copy, scatter_pages
from kvmcolo.memory import GuestMemory


# copy_from() works in slices: a memcpy holds the GIL, and a whole 1 GiB
# guest's (faulting in the fresh mapping) would starve the heartbeats for
# longer than the peer's timeout.
COPY_SLICE = 8 << 20


class RamCache:
    def __init__(self, mem_size: int):
        self.memory = GuestMemory(mem_size)
        self._regions = {r.slot: r for r in self.memory.regions}

    def adopt_initial(self, snap: vmstate.Snapshot) -> None:
        """The end of the initial copy (after any pre-copied pages)."""
        vmstate.apply_ram(self.memory, snap)

    def copy_from(self, memory: GuestMemory) -> None:
        """The whole of `memory` (this host's own guest) into the cache: at a
        switchover the old primary's RAM becomes the new secondary's cache,
        and nothing of it needs to travel.  Done while the guest runs (a
        fresh guest-sized mapping faults in page by page: 175-195 ms for
        256 MiB under nested PVM), then refresh() with what it dirtied
        meanwhile, while it is held."""
        for src in memory.regions:
            dst = self._regions.get(src.slot)
            if dst is None or dst.size != src.size:
                raise vmstate.IncompatibleState(f"memory slot {src.slot} does not match the cache")
            for at in range(0, src.size, COPY_SLICE):  # the GIL is free between slices
                dst.view[at : at + COPY_SLICE] = src.view[at : at + COPY_SLICE]

    def refresh(self, dirty: list[RegionDirty]) -> int:
        """The pages of this host's guest dirtied since copy_from() (from a
        dirty-log reader armed before it) into the cache; returns how many."""
        copied = 0
        for d in dirty:
            copied += merge_and_copy(d, d.pages, 0, self._regions[d.region.slot], d.region.host_addr)
        return copied

    def adopt_precopy(self, parts: list[vmstate.RamPart]) -> None:
        """Pages the primary sent while its guest ran (a later copy of any
        page that changed since overwrites them)."""
        vmstate.apply_ram_parts(self.memory, parts)

    def load(self, snap: vmstate.Snapshot, svm_dirty: list[RegionDirty]) -> int:
        """Checkpoint `snap` into the cache, then the cache into the SVM for
        every page either side dirtied (`svm_dirty`: the SVM's own, from its
        dirty-log reader; its regions are the SVM's RAM).  Returns pages copied
        into the SVM."""
        if len(snap.ram) != len(svm_dirty):
            raise vmstate.IncompatibleState(f"{len(snap.ram)} memory regions in the checkpoint, {len(svm_dirty)} here")
        for part, dirty in zip(snap.ram, svm_dirty):  # all checked before anything is written
            region = self._regions.get(part.slot)
            if region is None or region.size != part.size or dirty.region.slot != part.slot:
                raise vmstate.IncompatibleState(f"memory slot {part.slot} does not match this machine")
        copied = 0
        for part, dirty in zip(snap.ram, svm_dirty):
            region = self._regions[part.slot]
            if part.count:
                scatter_pages(region, part.pages, part.count, part.data)
            copied += merge_and_copy(dirty, part.pages, part.count, dirty.region, region.host_addr)
        return copied

    def close(self) -> None:
        self.memory.close()
