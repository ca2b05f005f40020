"""Layer 4: the network side of COLO — thin drivers around the comparator
(netcompare) and the sequence rewriter (netrewrite), as packet backends
that sit between each virtio-net device and its tap.

Primary host, per NIC (`PrimaryPort`, in front of the tap, which is a port
of the host bridge):
    LAN -> tap -> guest RAM, and the same frame to the secondary (NET_INBOUND)
    guest -> comparator: held until the secondary sent the same -> tap -> LAN
    secondary's frames (NET_OUTPUT) -> comparator
Secondary host, per NIC (`SecondaryPort`; its tap stays off the bridge):
    NET_INBOUND -> rewriter (ack into the SVM's sequence space) -> guest RAM
    guest -> rewriter (seq into the PVM's space) -> NET_OUTPUT to the primary
After a failover the secondary puts its tap on the bridge, announces the
guest (RARP + gratuitous ARP) and runs `ActivePort`: tap <-> guest, still
through the rewriter, because connections opened before the failover keep
the SVM's own initial sequence numbers for good.

Frames carry the sender's epoch (checkpoints captured / loaded so far), so a
checkpoint can tell the frames its state already includes from later ones.
All of this runs on the I/O thread, the COLO receiver thread and a ticker;
nothing here ever blocks a vCPU thread (a tap write is non-blocking, the
comparator never waits).
"""

from __future__ import annotations

import collections
import logging
import os
import struct
import threading
import time

from kvmcolo import packets, testhooks
from kvmcolo.buffers import scatter, split_views
from kvmcolo.colo import Msg
from kvmcolo.netcompare import Comparator, Release, RequestCheckpoint
from kvmcolo.netrewrite import SeqRewriter
from kvmcolo.threads import Periodic
from kvmcolo.wire import ChannelError

log = logging.getLogger("kvmcolo.net")

FRAME_HEADER = struct.Struct("<HQ")  # NIC index, sender's epoch
ANNOUNCE_DELAYS = (0.0, 0.05, 0.15, 0.35, 0.75)  # like QEMU's announce-self rounds: soon, then backing off
MAX_FRAME = 65536


# ---- primary ------------------------------------------------------------------------------


class PrimaryNetwork:
    """The comparator for each NIC, fed by the guest (PrimaryPort.send) and by
    the secondary's frames; held frames go out through the tap."""

    def __init__(self, devices, taps, send, epoch, request_checkpoint, timeout: float, max_queue: int, on_error):
        """`send(mtype, parts)`: a frame to the secondary (raises ChannelError);
        `epoch()`: captures so far; `request_checkpoint(reason)`;
        `on_error(thread, exc)`: an internal error in the ticker thread."""
        self._send = send
        self._epoch = epoch
        self._request_checkpoint = request_checkpoint
        self._lock = threading.Lock()  # one owner of the comparators' state
        self.comparators = [Comparator(timeout, max_queue, epoch=epoch()) for _ in devices]
        self.ports = [PrimaryPort(self, i, tap) for i, tap in enumerate(taps)]
        self.mirroring = True
        self.mirror_errors = 0
        for device, port in zip(devices, self.ports):
            device.set_backend(port)
        self._ticker = Periodic("colo-net-tick", 0.01, self._tick, on_error)

    def start(self) -> None:
        self._ticker.start()

    def stop(self) -> None:
        self._ticker.stop()

    # events

    def from_guest(self, nic: int, frame: bytes) -> None:
        with self._lock:
            self._do(nic, self.comparators[nic].primary(frame, self._epoch(), time.monotonic()))

    def from_secondary(self, payload) -> None:
        nic, epoch = FRAME_HEADER.unpack_from(payload)
        if nic >= len(self.comparators):
            log.warning("the secondary sent a frame for NIC %d; there are %d (ignored)", nic, len(self.comparators))
            return
        with self._lock:
            self._do(nic, self.comparators[nic].secondary(bytes(payload[FRAME_HEADER.size :]), epoch, time.monotonic()))

    def checkpoint_started(self) -> None:
        with self._lock:
            for c in self.comparators:
                c.checkpoint_started()

    def checkpoint_received(self, epoch: int) -> None:
        """The secondary has the state of capture `epoch`: what the PVM sent
        before it can go out (called in channel order, before any frame the
        SVM sends after loading it)."""
        with self._lock:
            for nic, c in enumerate(self.comparators):
                self._do(nic, c.checkpoint(epoch, time.monotonic()))

    def alone(self) -> None:
        """No secondary any more: release what is held, stop comparing."""
        self.mirroring = False
        with self._lock:
            for nic, c in enumerate(self.comparators):
                self._do(nic, c.alone())

    def mirror(self, nic: int, views: list[memoryview], length: int) -> None:
        """A frame the guest just received goes to the secondary too."""
        if not self.mirroring:
            return
        frame, _ = split_views(views, length)
        try:
            self._send(Msg.NET_INBOUND, [FRAME_HEADER.pack(nic, self._epoch()), *frame])
        except ChannelError:
            self.mirror_errors += 1  # the COLO layer notices the lost link and fails over

    def stats(self) -> dict:
        with self._lock:
            out = [c.stats() for c in self.comparators]
        return {"nics": out, "mirroring": self.mirroring, "mirror_errors": self.mirror_errors}

    def _tick(self) -> None:
        testhooks.hit("colo-net-tick")
        now = time.monotonic()
        with self._lock:
            for nic, c in enumerate(self.comparators):
                self._do(nic, c.tick(now))

    def _do(self, nic: int, actions) -> None:
        port = self.ports[nic]
        for act in actions:
            if isinstance(act, Release):
                port.transmit(act.frame)
            elif isinstance(act, RequestCheckpoint):
                self._request_checkpoint(act.reason)
            else:
                raise TypeError(f"the comparator driver has no action {act!r}")


class PrimaryPort:
    """The PVM's packet backend: the tap, with mirroring and comparison."""

    def __init__(self, network: PrimaryNetwork, nic: int, tap):
        self._network = network
        self._nic = nic
        self.tap = tap
        self.tx_errors = 0

    def fileno(self) -> int:
        return self.tap.fileno()

    def recv_into(self, views: list[memoryview]) -> int:
        n = self.tap.recv_into(views)
        self._network.mirror(self._nic, views, n)
        return n

    def send(self, views: list[memoryview]) -> int:
        frame = b"".join(views)  # held past this call: copied out of guest RAM
        self._network.from_guest(self._nic, frame)
        return len(frame)

    def transmit(self, frame: bytes) -> None:
        try:
            self.tap.send([frame])
        except OSError:  # tap queue full or down: lost, as on a wire
            self.tx_errors += 1


def lan_ends(devices, taps) -> list:
    """What each NIC talks to the LAN through, for a new pair's primary
    ports: the tap itself — or, on a secondary's survivor, its ActivePort,
    whose rewriter must stay in the path (connections opened just before
    that failover keep the SVM's own sequence numbers for good).  A former
    pair's PrimaryPort is looked through to its tap."""
    out = []
    for device, tap in zip(devices, taps):
        backend = device.backend
        out.append(backend.tap if isinstance(backend, PrimaryPort) else backend if isinstance(backend, ActivePort)
                   else tap)  # fmt: skip
    return out


# ---- secondary -----------------------------------------------------------------------------


class SecondaryNetwork:
    """The SVM's NICs: mirrored input in, output to the primary, and the
    takeover of the taps at failover."""

    def __init__(self, devices, taps, bridges, macs, send, epoch, paused, on_error):
        """`send(mtype, parts)` raises ChannelError; `epoch()`: loads so far;
        `paused()`: the SVM is stopped (for a checkpoint);
        `on_error(thread, exc)`: an internal error in the ticker thread."""
        self._paused = paused
        self._devices = devices
        self._taps = taps
        self._bridges = bridges
        self._macs = macs
        self._send = send
        self._epoch = epoch
        self.rewriters = [SeqRewriter() for _ in devices]
        self.ports = [SecondaryPort(self, i, r) for i, r in enumerate(self.rewriters)]
        self.active = False
        self.output_errors = 0
        for device, port in zip(devices, self.ports):
            device.set_backend(port)
        self._ticker = Periodic("colo-net-tick", 0.1, self._tick, on_error)

    def start(self) -> None:
        self._ticker.start()

    def stop(self) -> None:
        self._ticker.stop()

    def from_primary(self, payload) -> None:
        nic, epoch = FRAME_HEADER.unpack_from(payload)
        if nic >= len(self.ports):
            log.warning("the primary mirrored a frame for NIC %d; there are %d (ignored)", nic, len(self.ports))
            return
        if epoch < self._epoch():  # the PVM had it before a checkpoint the SVM already loaded
            self.ports[nic].counters["dropped_at_checkpoint"] += 1
            return
        # Delivered from this (the receiver) thread unless the SVM is stopped
        # for a checkpoint — which only this thread does, so the check holds;
        # a stopped SVM gets the frame from the I/O thread after it resumes.
        direct = not self._paused()
        self.ports[nic].queue_frame(bytearray(payload[FRAME_HEADER.size :]), epoch, wake=not direct)
        if direct:
            self._devices[nic].poll_backend()

    def to_primary(self, nic: int, frame) -> None:
        try:
            self._send(Msg.NET_OUTPUT, [FRAME_HEADER.pack(nic, self._epoch()), frame])
        except ChannelError:
            self.output_errors += 1  # link gone: the COLO layer fails over

    def checkpoint_loaded(self, epoch: int) -> None:
        """The SVM now is the PVM as of capture `epoch` (called with the SVM
        and the I/O thread stopped)."""
        for port in self.ports:
            port.checkpoint_loaded(epoch)

    def take_over(self) -> None:
        """Failover: the taps join their bridges, the guest is announced, and
        from now on the SVM talks to the LAN itself."""
        self.active = True
        self._ticker.stop()  # from now on ActivePort (on the I/O thread) alone drives the rewriters
        for nic, (device, tap, bridge, port) in enumerate(zip(self._devices, self._taps, self._bridges, self.ports)):
            stale = tap.drain()  # whatever the host sent the tap while it was off the bridge
            if bridge:
                try:
                    tap.join_bridge(bridge)
                except Exception as e:  # noqa: BLE001 - the guest goes on; the operator must fix the bridge
                    log.error("failover: %s", e)
            device.set_backend(ActivePort(tap, port))
            log.info("failover: NIC %d on tap %s%s (%d stale frames dropped)", nic, tap.name,
                     f" in bridge {bridge}" if bridge else "", stale)  # fmt: skip
        threading.Thread(target=self._announce, name="colo-announce", daemon=True).start()

    def _announce(self) -> None:
        start = time.monotonic()
        for delay in ANNOUNCE_DELAYS:
            time.sleep(max(0.0, start + delay - time.monotonic()))
            for tap, mac, port in zip(self._taps, self._macs, self.ports):
                frames = [packets.rarp_announce(mac)]
                if port.guest_ip:
                    frames.append(packets.gratuitous_arp(mac, port.guest_ip))
                if tap.fd < 0:
                    return  # the VMM is shutting down
                for frame in frames:
                    try:
                        tap.send([frame])
                    except OSError as e:
                        log.warning("announce on %s failed: %s", tap.name, e)
        log.info("announced the guest (RARP%s) on the LAN", " + gratuitous ARP" if any(p.guest_ip for p in self.ports)
                 else "")  # fmt: skip

    def stats(self) -> dict:
        return {"nics": [p.stats() for p in self.ports], "active": self.active, "output_errors": self.output_errors}

    def _tick(self) -> None:
        testhooks.hit("colo-net-tick")
        for port in self.ports:
            port.tick()


class SecondaryPort:
    """The SVM's packet backend while COLO runs: mirrored frames in (woken
    through an eventfd), output to the primary."""

    def __init__(self, network: SecondaryNetwork, nic: int, rewriter: SeqRewriter):
        self._network = network
        self._nic = nic
        self.rewriter = rewriter
        self._lock = threading.Lock()  # the queues: filled by the receiver thread, emptied by the I/O thread
        self._queued: collections.deque = collections.deque()  # (frame, epoch) as the primary received them
        # (rewritten frame, (epoch, original bytes)) for the guest: a checkpoint
        # can undo the rewrite, whose offsets it makes stale
        self._ready: collections.deque = collections.deque()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.guest_ip: bytes | None = None
        self.counters = {"delivered": 0, "dropped_at_checkpoint": 0, "sent": 0}

    def fileno(self) -> int:
        return self._wake

    def queue_frame(self, frame: bytearray, epoch: int, wake: bool = True) -> None:
        with self._lock:
            self._queued.append((frame, epoch))
        if wake:
            os.eventfd_write(self._wake, 1)

    def recv_into(self, views: list[memoryview]) -> int:
        frame = self._next_frame()
        if frame is None:
            raise BlockingIOError()
        self.counters["delivered"] += 1
        return scatter(views, frame)

    def _next_frame(self) -> bytearray | None:
        """The next frame for the guest, rewritten; None when there is none
        (the eventfd is then cleared, and re-checked so no wake-up is lost)."""
        for attempt in range(2):
            with self._lock:
                while not self._ready and self._queued:
                    frame, epoch = self._queued.popleft()
                    self._ready.extend(self.rewriter.inbound(frame, (epoch, bytes(frame)), time.monotonic()))
                if self._ready:
                    return self._ready.popleft()[0]
            if attempt == 0:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
        return None

    def send(self, views: list[memoryview]) -> int:
        frame = bytearray().join(views)
        self._learn_ip(frame)
        with self._lock:
            self.rewriter.outbound(frame, time.monotonic())
            released = self.rewriter.ready()
            self._ready.extend(released)
        if released:
            os.eventfd_write(self._wake, 1)
        self._network.to_primary(self._nic, frame)
        self.counters["sent"] += 1
        return len(frame)

    def _learn_ip(self, frame) -> None:
        """The guest's IPv4 address, for the gratuitous ARP at failover."""
        if self.guest_ip is None:
            sender = packets.arp_sender(packets.parse(frame))
            if sender is not None:
                self.guest_ip = sender[1]

    def checkpoint_loaded(self, epoch: int) -> None:
        """Frames the PVM received before the capture are in the loaded state
        already; later ones still go to the guest.  Connections now share the
        PVM's sequence space: the rewriter starts over."""
        with self._lock:
            deferred = self.rewriter.reset()  # unmodified, with their tags
            waiting = [(bytearray(original), e) for _, (e, original) in [*self._ready, *deferred]]
            waiting += self._queued
            keep = [(f, e) for f, e in waiting if e >= epoch]
            self.counters["dropped_at_checkpoint"] += len(waiting) - len(keep)
            self._ready.clear()
            self._queued = collections.deque(keep)
        if self._queued:
            os.eventfd_write(self._wake, 1)

    def tick(self) -> None:
        with self._lock:
            late = self.rewriter.tick(time.monotonic())
            self._ready.extend(late)
        if late:
            os.eventfd_write(self._wake, 1)

    def leftovers(self) -> list[bytearray]:
        """At failover: mirrored frames the SVM has not had yet, rewritten."""
        out = []
        while (frame := self._next_frame()) is not None:
            out.append(frame)
        return out

    def stats(self) -> dict:
        return {**self.counters, "queued": len(self._queued), "rewriter": dict(self.rewriter.counters),
                "guest_ip": ".".join(map(str, self.guest_ip)) if self.guest_ip else None}  # fmt: skip


class ActivePort:
    """The SVM's packet backend after failover: its own tap, through the
    rewriter (connections from before keep their sequence offsets)."""

    def __init__(self, tap, colo_port: SecondaryPort):
        self.tap = tap
        self.rewriter = colo_port.rewriter
        self.guest_ip = colo_port.guest_ip
        self._pending = collections.deque(colo_port.leftovers())
        self._buffer = bytearray(MAX_FRAME)

    def fileno(self) -> int:
        return self.tap.fileno()

    def recv_into(self, views: list[memoryview]) -> int:
        while not self._pending:
            n = self.tap.recv_into([memoryview(self._buffer)])  # BlockingIOError when none is queued
            now = time.monotonic()
            self._pending.extend(f for f, _ in self.rewriter.inbound(bytearray(self._buffer[:n]), None, now))
            self._pending.extend(f for f, _ in self.rewriter.tick(now))
        return scatter(views, self._pending.popleft())

    def send(self, views: list[memoryview]) -> int:
        frame = bytearray().join(views)
        self.rewriter.outbound(frame, time.monotonic())
        self._pending.extend(f for f, _ in self.rewriter.ready())
        return self.tap.send([frame])
