"""Layer 2: virtio-net over a packet backend (a tap, or anything with the
same three methods: fileno(), recv_into(views), send(views)).

No offloads: every frame carries a 12-byte virtio_net_hdr_v1 that is all
zero (num_buffers = 1 on receive).  Received frames go from the backend
straight into the guest's receive buffers (readv into writable views of
guest RAM, which GuestMemory marks dirty); transmitted frames go from the
guest's buffers straight to the backend (writev).

Receive runs on the I/O thread when the backend is readable.  When the guest
has no receive buffers left, the device stops watching the backend (frames
wait in the tap's queue) until the guest posts buffers and notifies.
"""

from __future__ import annotations

import logging
import re
from typing import Protocol

from kvmcolo.devices.virtio_mmio import VIRTIO_F_VERSION_1, VirtioMmio
from kvmcolo.buffers import scatter, split_views
from kvmcolo.devices.virtqueue import Virtqueue
from kvmcolo.errors import UserError
from kvmcolo.event_loop import EventLoop

log = logging.getLogger(__name__)

DEVICE_ID_NET = 1
QUEUE_SIZE = 256
RX, TX = 0, 1
VIRTIO_NET_F_MAC = 1 << 5
NET_HDR_LEN = 12
RX_HEADER = bytes(10) + (1).to_bytes(2, "little")  # num_buffers = 1
DEFAULT_MAC = "52:54:00:12:34:56"
_MAC_RE = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


def parse_mac(text: str) -> bytes:
    if not _MAC_RE.match(text):
        raise UserError(f"bad MAC address {text!r}: use six hex pairs like {DEFAULT_MAC}")
    mac = bytes(int(x, 16) for x in text.split(":"))
    if mac[0] & 1:
        raise UserError(f"MAC address {text} is a multicast address")
    return mac


class PacketBackend(Protocol):
    def fileno(self) -> int: ...

    def recv_into(self, views: list[memoryview]) -> int: ...

    def send(self, views: list[memoryview]) -> int: ...


class VirtioNet:
    device_id = DEVICE_ID_NET
    queue_sizes = [QUEUE_SIZE, QUEUE_SIZE]
    features = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC

    def __init__(self, backend: PacketBackend, mac: bytes, loop: EventLoop):
        self.backend = backend
        self.mac = mac
        self._loop = loop
        self._transport: VirtioMmio | None = None
        self._rx: Virtqueue | None = None
        self._tx: Virtqueue | None = None
        self._watching = False
        self.stats = {"rx_frames": 0, "rx_bytes": 0, "tx_frames": 0, "tx_bytes": 0, "tx_errors": 0}

    # ---- VirtioDevice ----------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.mac[offset : offset + size], "little") if offset < 6 else 0

    def config_write(self, offset: int, size: int, value: int) -> None:
        pass  # the MAC is read-only without VIRTIO_NET_F_CTRL_MAC_ADDR

    def activate(self, transport: VirtioMmio, queues: list[Virtqueue | None]) -> None:
        self._transport = transport
        self._rx, self._tx = queues[RX], queues[TX]
        self._watch(True)

    def reset(self) -> None:
        self._rx = self._tx = None
        self._watch(False)

    def notify(self, queue: int) -> None:
        if queue == TX:
            self._transmit()
        elif queue == RX:
            self._receive()  # new buffers: take what waited in the backend

    def set_backend(self, backend: PacketBackend) -> None:
        """Swap the packet backend (COLO puts its ports in front of the tap;
        failover swaps again).  Under the transport lock, so no frame is
        half moved; the I/O loop then watches the new backend's fd."""
        transport = self._transport
        if transport is None:
            self.backend = backend
            return
        with transport.lock:
            watching = self._watching
            self._watch(False)
            self.backend = backend
            if self._rx is not None:
                self._receive()  # what the new backend already holds; watches its fd when it runs dry
            elif watching:
                self._watch(True)

    # ---- data path (transport lock held) ---------------------------------------

    def _watch(self, on: bool) -> None:
        if on and not self._watching:
            self._loop.add_reader(self.backend.fileno(), self._on_readable)
        elif not on and self._watching:
            self._loop.remove_reader(self.backend.fileno())
        self._watching = on

    def poll_backend(self) -> None:
        """Take what the backend holds now, from any thread (a COLO secondary
        delivers mirrored frames from its receiver thread: one thread hop
        fewer than waking the I/O thread)."""
        self._on_readable()

    def _on_readable(self) -> None:
        transport = self._transport
        if transport is None:
            return
        with transport.lock:
            if transport.live:
                try:
                    self._receive()
                except Exception as e:  # noqa: BLE001 - QueueError and guest-memory errors alike
                    transport.fail(f"receive queue: {e}")
                    self._watch(False)

    def _receive(self) -> None:
        q = self._rx
        if q is None:
            return
        delivered = 0
        while True:
            if not q.has_available():
                self._watch(False)  # no buffers: let frames wait in the backend
                break
            chain = q.pop()
            views = q.writable_views(chain)
            header, body = split_views(views, NET_HDR_LEN)
            if sum(len(v) for v in header) < NET_HDR_LEN:
                q.push(chain, 0)  # too small for even the header: return it unused
                delivered += 1
                continue
            try:
                n = self.backend.recv_into(body)
            except BlockingIOError:
                q.unpop()  # nothing queued: give the buffer back untouched
                self._watch(True)
                break
            scatter(header, RX_HEADER)
            q.push(chain, NET_HDR_LEN + n)
            delivered += 1
            self.stats["rx_frames"] += 1
            self.stats["rx_bytes"] += n
        if delivered and q.interrupt_wanted():
            self._transport.signal_used()

    def _transmit(self) -> None:
        q = self._tx
        if q is None:
            return
        sent = 0
        while (chain := q.pop()) is not None:
            _, frame = split_views(q.readable_views(chain), NET_HDR_LEN)
            if frame:
                try:
                    n = self.backend.send(frame)
                    self.stats["tx_frames"] += 1
                    self.stats["tx_bytes"] += n
                except OSError as e:  # tap queue full or interface down: the frame is lost, as on a wire
                    self.stats["tx_errors"] += 1
                    log.debug("tx dropped: %s", e)
            q.push(chain, 0)
            sent += 1
        if sent and q.interrupt_wanted():
            self._transport.signal_used()
