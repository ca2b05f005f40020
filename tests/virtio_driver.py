"""A test-side virtio driver: lays out split rings in real guest memory and
crafts requests (well-formed or deliberately broken) for device tests."""

from __future__ import annotations

import struct

from kvmcolo.devices import virtio_mmio as vm
from kvmcolo.memory import GuestMemory

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


class RingDriver:
    """Drives one VirtioMmio transport through its registers, like a guest would."""

    def __init__(self, mem: GuestMemory, transport: vm.VirtioMmio, area: int = 0x100000):
        self.mem = mem
        self.t = transport
        self.area = area  # rings and buffers are allocated from here
        self.next_free = area
        self.queues: dict[int, dict] = {}

    def alloc(self, size: int, align: int = 16) -> int:
        self.next_free = (self.next_free + align - 1) & ~(align - 1)
        at = self.next_free
        self.next_free += size
        return at

    def w(self, reg: int, value: int) -> None:
        self.t.io_write(reg, 4, value)

    def r(self, reg: int) -> int:
        return self.t.io_read(reg, 4)

    def init(self, features: int | None = None, queue_sizes=(8,), driver_ok: bool = True) -> bool:
        self.w(vm.STATUS, 0)
        self.w(vm.STATUS, vm.ACKNOWLEDGE | vm.DRIVER)
        offered = 0
        for sel in (0, 1):
            self.w(vm.DEVICE_FEATURES_SEL, sel)
            offered |= self.r(vm.DEVICE_FEATURES) << (32 * sel)
        features = offered if features is None else features
        for sel in (0, 1):
            self.w(vm.DRIVER_FEATURES_SEL, sel)
            self.w(vm.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.w(vm.STATUS, vm.ACKNOWLEDGE | vm.DRIVER | vm.FEATURES_OK)
        if not self.r(vm.STATUS) & vm.FEATURES_OK:
            return False
        for q, size in enumerate(queue_sizes):
            self.setup_queue(q, size)
        if driver_ok:
            self.w(vm.STATUS, vm.ACKNOWLEDGE | vm.DRIVER | vm.FEATURES_OK | vm.DRIVER_OK)
        return True

    def setup_queue(self, q: int, size: int, desc: int | None = None) -> None:
        desc = self.alloc(16 * size) if desc is None else desc
        avail = self.alloc(6 + 2 * size, 2)
        used = self.alloc(6 + 8 * size, 4)
        self.w(vm.QUEUE_SEL, q)
        self.w(vm.QUEUE_NUM, size)
        for lo, hi, addr in ((vm.QUEUE_DESC_LOW, vm.QUEUE_DESC_HIGH, desc),
                             (vm.QUEUE_DRIVER_LOW, vm.QUEUE_DRIVER_HIGH, avail),
                             (vm.QUEUE_DEVICE_LOW, vm.QUEUE_DEVICE_HIGH, used)):  # fmt: skip
            self.w(lo, addr & 0xFFFFFFFF)
            self.w(hi, addr >> 32)
        self.w(vm.QUEUE_READY, 1)
        self.queues[q] = {"size": size, "desc": desc, "avail": avail, "used": used, "free": 0, "avail_idx": 0}

    def put_desc(self, q: int, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(self.queues[q]["desc"] + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def submit(self, q: int, buffers: list[tuple[int, int, bool]], notify: bool = True) -> int:
        """buffers: (addr, len, device_writable).  Returns the head index."""
        qi = self.queues[q]
        first = qi["free"]
        for i, (addr, length, writable) in enumerate(buffers):
            index = (first + i) % qi["size"]
            last = i == len(buffers) - 1
            flags = (F_WRITE if writable else 0) | (0 if last else F_NEXT)
            self.put_desc(q, index, addr, length, flags, (index + 1) % qi["size"])
        qi["free"] = (first + len(buffers)) % qi["size"]
        self.publish(q, first, notify)
        return first

    def publish(self, q: int, head: int, notify: bool = True) -> None:
        qi = self.queues[q]
        self.mem.write(qi["avail"] + 4 + 2 * (qi["avail_idx"] % qi["size"]), struct.pack("<H", head))
        qi["avail_idx"] = (qi["avail_idx"] + 1) & 0xFFFF
        self.mem.write(qi["avail"] + 2, struct.pack("<H", qi["avail_idx"]))
        if notify:
            self.t.notify(q)

    def used(self, q: int) -> list[tuple[int, int]]:
        qi = self.queues[q]
        idx = struct.unpack("<H", self.mem.read(qi["used"] + 2, 2))[0]
        return [struct.unpack("<II", self.mem.read(qi["used"] + 4 + 8 * (i % qi["size"]), 8)) for i in range(idx)]
