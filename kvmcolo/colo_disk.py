"""Layer 4: the disk side of COLO — the drivers around disk_replication.

Primary (`PrimaryDisks`): the initial sync (only the MiB chunks whose
hashes differ from the secondary's), then every guest write forwarded in
order on the channel, tagged with the primary's epoch (checkpoints captured
so far).  The write observer runs on the I/O thread, which a checkpoint's
hold parks before capture, so each write is ordered against the captures.

Secondary (`SecondaryDisks`): forwarded writes kept pending per disk; at
each load the writes that load's capture saw are applied to the base
images (journaled), and the SVM's own writes (in the overlays) dropped; at
failover the pending writes are dropped and the overlays committed.

The DISK_WRITE record is defined here once: u16 disk, u64 epoch, u64
offset, then the data.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading

from kvmcolo import jsonsafe, testhooks
from kvmcolo.colo import Msg, ProtocolError
from kvmcolo.disk_replication import HASH_CHUNK, PendingWrites, apply_writes, chunk_hashes, file_hash
from kvmcolo.errors import UserError
from kvmcolo.wire import ChannelError

log = logging.getLogger("kvmcolo.colo")

DISK_WRITE = struct.Struct("<HQQ")  # disk, epoch (captures so far on the primary), offset
DEFAULT_OVERLAY_ROOT = "/run/kvmcolo/overlay"


class PrimaryDisks:
    def __init__(self, machine, channel, epoch, on_lost):
        """`epoch()`: captures so far; `on_lost(reason)`: the channel failed."""
        self.machine = machine
        self.channel = channel
        self._epoch = epoch
        self._on_lost = on_lost
        self.lost = False
        self._observers: list = []  # (device, observer) this object attached
        # A chunk's read and send are one step against the guest's writes:
        # a write forwarded between them would reach the secondary before
        # the older chunk that then overwrites it.
        self._chunk_lock = threading.Lock()

    def sync(self) -> None:
        """The initial sync, safe while the guest runs and writes: every
        guest write is forwarded from before the hashes are taken (so a
        chunk that changes after it was hashed or sent arrives as a write
        after it), then the chunks whose hashes differ are sent."""
        mtype, payload = self.channel.recv()
        if mtype != Msg.DISK_HASHES:
            raise UserError(f"the secondary answered {mtype} instead of its disk hashes")
        theirs = jsonsafe.loads(bytes(payload))
        self.attach()
        for index, (image, remote) in enumerate(zip(self.machine.disk_images, theirs)):
            local = chunk_hashes(image.path)
            differ = [i for i, (a, b) in enumerate(zip(local, remote)) if a != b]
            log.info("disk %d: %d of %d MiB differ on the secondary", index, len(differ), len(local))
            with open(image.path, "rb") as f:
                for n, chunk in enumerate(differ, 1):
                    with self._chunk_lock:
                        data = os.pread(f.fileno(), HASH_CHUNK, chunk * HASH_CHUNK)
                        self.channel.send(Msg.DISK_WRITE, [DISK_WRITE.pack(index, 0, chunk * HASH_CHUNK), data])
                    if n % 64 == 0 or n == len(differ):
                        log.info("disk %d: initial sync %d of %d MiB sent", index, n, len(differ))

    def attach(self) -> None:
        """Forward every guest write from now on.  Alone, without sync(): a
        switchover's new pair, whose images are equal by construction (the
        last checkpoint's load made them so; hashing them would stop both
        guests for as long as reading the whole disk takes)."""
        for index, device in enumerate(self.machine.block_devices()):
            observer = lambda offset, views, index=index: self._forward(index, offset, views)  # noqa: E731
            device.write_observers.append(observer)
            self._observers.append((device, observer))

    def detach(self) -> None:
        """Forward nothing more (protection ended; a new pair attaches its own)."""
        self.lost = True
        for device, observer in self._observers:  # a new list: the I/O thread may be iterating the old one
            device.write_observers = [o for o in device.write_observers if o is not observer]
        self._observers.clear()

    def _forward(self, index: int, offset: int, views) -> None:
        if self.lost:
            return
        try:
            with self._chunk_lock:
                self.channel.send(Msg.DISK_WRITE, [DISK_WRITE.pack(index, self._epoch(), offset), *views])
        except ChannelError as e:
            self._on_lost(str(e))

    def hashes(self) -> dict[str, str]:
        return {f"disk.{i}": file_hash(image.path) for i, image in enumerate(self.machine.disk_images)}


class SecondaryDisks:
    def __init__(self, bases: list[str], overlays: list):
        """`bases`: the real images; `overlays`: the OverlayMount each one is
        seen through by the SVM (same order)."""
        self.bases = list(bases)
        self.overlays = list(overlays)
        self.pending = [PendingWrites(os.path.dirname(os.path.abspath(b))) for b in self.bases]
        self.loads = 0  # loads so far (the initial copy is load 1)

    def hashes_message(self) -> bytes:
        return json.dumps([chunk_hashes(b) for b in self.bases]).encode()

    def on_write(self, payload) -> None:
        """A DISK_WRITE record from the primary."""
        if len(payload) < DISK_WRITE.size:
            raise ProtocolError(f"a disk write record of {len(payload)} bytes")
        index, epoch, offset = DISK_WRITE.unpack_from(payload)
        if index >= len(self.pending):
            raise ProtocolError(f"write to disk {index}, but there are {len(self.pending)}")
        self.pending[index].add(offset, bytes(payload[DISK_WRITE.size :]), epoch)

    def load(self) -> None:
        """At a load (SVM held): the primary's writes made before that state's
        capture into the base images (journaled), then the SVM's own writes
        thrown away."""
        self.loads += 1  # the initial copy is load 1: it takes the epoch-0 (initial sync) writes
        crash = (lambda: testhooks.hit("crash:disk-apply")) if testhooks.armed("crash:disk-apply") else None
        for base, pending in zip(self.bases, self.pending):
            batch = pending.before(self.loads)
            if batch:
                apply_writes(base, batch, crash_hook=crash)
                pending.drop_before(self.loads)
        for overlay in self.overlays:
            overlay.drop()

    def take_over(self) -> None:
        """Failover: the SVM's own writes match its own state, so they become
        the disk; the primary's writes since the last checkpoint go with it."""
        for pending in self.pending:
            pending.clear()
        for overlay in self.overlays:
            overlay.commit()

    def hashes(self) -> dict[str, str]:
        return {f"disk.{i}": file_hash(base) for i, base in enumerate(self.bases)}

    def close(self) -> None:
        for pending in self.pending:
            pending.clear()


class DiskViews:
    """How this VMM sees each of its disks — one owner for it, whichever
    pair the VMM is in: the real image (base) and, where there is one, the
    FUSE overlay the guest sees it through.  A secondary's overlays buffer
    the SVM's writes; after a takeover they pass writes through.  At a
    switchover a primary becomes a secondary: a disk without an overlay
    gets one (mounted while the guest runs, swapped in while it is held),
    one that passes through buffers again."""

    def __init__(self, bases: list[str], overlays: list = (), root: str | None = None):
        self.bases = [os.path.abspath(b) for b in bases]
        self.overlays = list(overlays) or [None] * len(self.bases)
        self.root = root or DEFAULT_OVERLAY_ROOT
        self._new: dict[int, object] = {}  # mounted for a switchover, not swapped in yet

    def prepare_buffering(self) -> None:
        """Mount an overlay for each disk that has none (the guest may run:
        nothing of it is used until buffer())."""
        from kvmcolo.disk_buffer import OverlayMount

        try:
            for i, (base, overlay) in enumerate(zip(self.bases, self.overlays)):
                if overlay is None and i not in self._new:
                    os.makedirs(self.root, mode=0o700, exist_ok=True)
                    self._new[i] = OverlayMount(base, os.path.join(self.root, f"{os.getpid()}-switch-{i}"))
        except BaseException:
            self.unprepare()
            raise

    def unprepare(self) -> None:
        """The switchover did not happen: what prepare_buffering() mounted goes."""
        for mount in self._new.values():
            mount.close()
        self._new.clear()

    def buffer(self, machine) -> None:
        """Guest held: from now on the guest's writes stay in the overlays."""
        fresh = set(self._new)  # (buffering from the start)
        for i, mount in sorted(self._new.items()):
            machine.swap_disk(i, mount.image_path)
            self.overlays[i] = mount
        self._new.clear()
        for i, overlay in enumerate(self.overlays):
            if overlay is not None and i not in fresh:
                overlay.buffer()

    def mounts(self) -> list:
        return [o for o in self.overlays if o is not None]

    def close(self) -> None:
        self.unprepare()
        for overlay in self.mounts():
            overlay.close()
