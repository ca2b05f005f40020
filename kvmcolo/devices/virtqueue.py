"""Layer 2: the device side of a virtio split virtqueue (virtio 1.x, 2.7).

Everything here distrusts the guest.  A descriptor that points outside guest
RAM, a chain that loops or runs longer than the queue, a `next` beyond the
table, an absurd length, a readable descriptor after a writable one, or an
avail index that jumps by more than the queue size raises QueueError; the
transport then marks the device NEEDS_RESET.  Nothing is written to guest
memory for a chain that fails validation.

Guest memory is reached only through GuestMemory (reads via views, writes
via write()/writable_view()), so every byte the device writes is recorded as
dirty for checkpoints.

Layouts (little-endian):
    descriptor  { u64 addr; u32 len; u16 flags; u16 next; }       16 bytes
    avail       { u16 flags; u16 idx; u16 ring[size]; u16 used_event; }
    used        { u16 flags; u16 idx; {u32 id; u32 len} ring[size]; u16 avail_event; }
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kvmcolo.memory import GuestMemory, GuestMemoryError

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

MAX_QUEUE_SIZE = 32768  # the spec's limit
MAX_CHAIN_BYTES = 256 << 20  # no legitimate request is bigger: anything larger is an attack

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class QueueError(Exception):
    """The guest broke the virtqueue rules; the device must stop using the queue."""


@dataclass
class DescChain:
    """One request: the head index and its buffers as guest (addr, len) pairs."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


@dataclass
class QueueConfig:
    """What the driver programmed through the transport."""

    size: int = 0
    desc_addr: int = 0
    avail_addr: int = 0
    used_addr: int = 0


class Virtqueue:
    def __init__(self, memory: GuestMemory, config: QueueConfig, max_size: int):
        size = config.size
        if size == 0 or size > max_size or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of two in 1..{max_size}")
        for name, addr, length, align in (
            ("descriptor table", config.desc_addr, 16 * size, 16),
            ("available ring", config.avail_addr, 6 + 2 * size, 2),
            ("used ring", config.used_addr, 6 + 8 * size, 4),
        ):
            if addr % align:
                raise QueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            if not memory.contains(addr, length):
                raise QueueError(f"{name} at {addr:#x}+{length:#x} is outside guest RAM")
        self.memory = memory
        self.size = size
        self.desc_addr = config.desc_addr
        self.avail_addr = config.avail_addr
        self.used_addr = config.used_addr
        self.last_avail_idx = 0  # next avail entry the device will take
        self.used_idx = 0  # next used entry the device will fill

    # ---- taking requests ---------------------------------------------------

    def avail_idx(self) -> int:
        return _U16.unpack(self.memory.view(self.avail_addr + 2, 2))[0]

    def has_available(self) -> bool:
        return self.avail_idx() != self.last_avail_idx

    def pop(self) -> DescChain | None:
        """The next available chain, validated, or None if the ring is empty."""
        avail = self.avail_idx()
        pending = (avail - self.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise QueueError(f"avail index jumped by {pending} on a queue of {self.size}")
        slot = self.last_avail_idx % self.size
        head = _U16.unpack(self.memory.view(self.avail_addr + 4 + 2 * slot, 2))[0]
        chain = self._walk(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return chain

    def unpop(self) -> None:
        """Give back the chain pop() just returned (nothing was written to it
        that the driver will look at, and it was not pushed)."""
        self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF

    def _walk(self, head: int) -> DescChain:
        chain = DescChain(head)
        index = head
        total = 0
        table = self.memory.view(self.desc_addr, 16 * self.size)
        for _ in range(self.size):
            if index >= self.size:
                raise QueueError(f"descriptor index {index} is outside a queue of {self.size}")
            addr, length, flags, nxt = _DESC.unpack_from(table, 16 * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise QueueError("indirect descriptor used but not negotiated")
            total += length
            if length > MAX_CHAIN_BYTES or total > MAX_CHAIN_BYTES:
                raise QueueError(f"descriptor chain of {total} bytes is absurdly long")
            if length and not self.memory.contains(addr, length):
                raise QueueError(f"descriptor {index} points outside guest RAM ({addr:#x}+{length:#x})")
            if flags & VIRTQ_DESC_F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise QueueError("a device-readable descriptor follows a device-writable one")
            else:
                chain.readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            index = nxt
        raise QueueError(f"descriptor chain from {head} is longer than the queue (a loop?)")

    # ---- buffers as Python views -------------------------------------------

    def readable_views(self, chain: DescChain) -> list[memoryview]:
        return [self.memory.view(a, n) for a, n in chain.readable if n]

    def writable_views(self, chain: DescChain) -> list[memoryview]:
        """Writable views straight into guest RAM; the pages are marked dirty."""
        return [self.memory.writable_view(a, n) for a, n in chain.writable if n]

    # ---- returning requests --------------------------------------------------

    def push(self, chain: DescChain, written: int) -> None:
        """Return a chain to the driver with `written` bytes written into it."""
        slot = self.used_idx % self.size
        self.memory.write(self.used_addr + 4 + 8 * slot, _USED_ELEM.pack(chain.head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        # The element is in place before the index moves (x86 stores are ordered).
        self.memory.write(self.used_addr + 2, _U16.pack(self.used_idx))

    def interrupt_wanted(self) -> bool:
        flags = _U16.unpack(self.memory.view(self.avail_addr, 2))[0]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    # ---- checkpoints -----------------------------------------------------------

    def save_state(self) -> dict:
        return {"last_avail_idx": self.last_avail_idx, "used_idx": self.used_idx}

    def load_state(self, state: dict) -> None:
        self.last_avail_idx = state["last_avail_idx"] & 0xFFFF
        self.used_idx = state["used_idx"] & 0xFFFF


__all__ = [
    "DescChain",
    "GuestMemoryError",
    "QueueConfig",
    "QueueError",
    "Virtqueue",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
]
