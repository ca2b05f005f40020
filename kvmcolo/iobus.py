"""Layer 2: the I/O bus — port I/O and MMIO dispatch from vCPU exits to devices.

A device registers a range and gets accesses as (offset, size[, value]).
Unclaimed reads return all ones and unclaimed writes are dropped, as on a
real bus; each such port or address is logged once so a guest poking at
nothing is visible without flooding the log.
"""

from __future__ import annotations

import bisect
import logging
from typing import Protocol

log = logging.getLogger(__name__)


class BusDevice(Protocol):
    def io_read(self, offset: int, size: int) -> int: ...

    def io_write(self, offset: int, size: int, value: int) -> None: ...


class IoBus:
    """One address space (ports or MMIO) of non-overlapping device ranges."""

    def __init__(self, name: str):
        self.name = name
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int, BusDevice]] = []  # (start, end, device), sorted
        self._unclaimed_seen: set[int] = set()

    def register(self, start: int, length: int, device: BusDevice) -> None:
        end = start + length
        i = bisect.bisect_right(self._starts, start)
        if (i > 0 and self._ranges[i - 1][1] > start) or (i < len(self._ranges) and self._ranges[i][0] < end):
            raise ValueError(f"{self.name} range {start:#x}-{end - 1:#x} overlaps another device")
        self._starts.insert(i, start)
        self._ranges.insert(i, (start, end, device))

    def find(self, addr: int) -> tuple[BusDevice, int] | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            start, end, device = self._ranges[i]
            if addr < end:
                return device, addr - start
        return None

    def read(self, addr: int, size: int) -> int:
        hit = self.find(addr)
        if hit is None:
            self._unclaimed(addr, "read")
            return (1 << (8 * size)) - 1
        device, offset = hit
        return device.io_read(offset, size)

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self.find(addr)
        if hit is None:
            self._unclaimed(addr, "write")
            return
        device, offset = hit
        device.io_write(offset, size, value)

    def _unclaimed(self, addr: int, what: str) -> None:
        if addr not in self._unclaimed_seen:
            self._unclaimed_seen.add(addr)
            log.info("guest %s of unclaimed %s address %#x (logged once)", what, self.name, addr)
