"""Layer 4: the COLO primary — runs the guest, takes checkpoints, sends them.

Threads: the checkpoint loop (timer or request triggers one), a receiver
that reads every frame from the secondary (heartbeats only refresh
liveness; the SVM's network output goes to the comparator; replies go to
an inbox), and the heartbeat sender.  Losing the secondary at any point —
silence past the heartbeat timeout, a closed or broken connection, a frame
that fails authentication — means: stop taking checkpoints, make sure the
guest is running, fence the secondary if a fence command is set (network
output stays held until it succeeds), and go on alone.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import struct
import threading
import time

from kvmcolo import dirty_log, sections, testhooks, vmstate
from kvmcolo.colo import Act, Msg, PrimaryCore, ProtocolError
from kvmcolo.colo_net import PrimaryNetwork
from kvmcolo.colo_session import (CheckpointRecord, ColoOptions, ColoStatus, Heartbeat, config_message, fence_peer,
                                  hang_up)  # fmt: skip
from kvmcolo.dirty_log import DirtyReader
from kvmcolo.disk_replication import HASH_CHUNK, chunk_hashes, file_hash
from kvmcolo.errors import UserError
from kvmcolo.threads import guarded
from kvmcolo.wire import Channel, ChannelError, client_handshake

log = logging.getLogger("kvmcolo.colo")


class SecondaryLost(Exception):
    pass


class ColoPrimary:
    def __init__(self, machine, peer: tuple[str, int], key: bytes, options: ColoOptions):
        self.machine = machine
        self.peer = peer
        self.key = key
        self.options = options
        self.status = ColoStatus("primary")
        self.status.peer = f"{peer[0]}:{peer[1]}"
        self.core = PrimaryCore(options.resume_early)
        self.channel: Channel | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._trigger = threading.Event()
        self._reason = "timer"
        self._lost = threading.Event()
        self._stopping = threading.Event()
        self._holding = False  # the checkpoint thread's hold on the guest (only that thread touches it)
        self._lock = threading.Lock()
        self._seq = 0
        self._heartbeat: Heartbeat | None = None
        self._ram_buffer = bytearray()
        self.network: PrimaryNetwork | None = None
        self.dirty: DirtyReader | None = None  # checkpoints' view of the machine's one dirty log
        self.host: vmstate.HostCaps | None = None
        self._epoch = 0  # checkpoints captured so far (the initial copy counts): tags forwarded writes

    # ---- start-up -------------------------------------------------------------

    def connect(self, timeout: float = 60.0) -> None:
        """Connect (retrying until `timeout`), authenticate, agree on the machine."""
        deadline = time.monotonic() + timeout
        addr = f"{self.peer[0]}:{self.peer[1]}"
        while True:
            try:
                sock = socket.create_connection(self.peer, timeout=2)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise UserError(f"cannot reach the secondary at {addr}: {e.strerror or e}")
                time.sleep(0.2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.channel = client_handshake(sock, self.key, "primary", addr, self.options.heartbeat_timeout * 5)
        except ChannelError as e:
            sock.close()
            raise UserError(f"replication handshake with {addr} failed: {e}")
        m = self.machine
        self.host = vmstate.HostCaps.probe(m.kvm, m.vm.vcpus[0])
        self.channel.send(Msg.CONFIG, [config_message(m, self.host.as_meta(), self.options)])
        mtype, payload = self.channel.recv()
        if mtype == Msg.CONFIG_REFUSED:
            raise UserError(f"the secondary refused this VM: {bytes(payload).decode()}")
        if mtype != Msg.CONFIG_OK:
            raise UserError(f"the secondary answered {mtype} to CONFIG")
        log.info("connected to the secondary at %s", addr)
        self._sync_disks()

    # ---- disks ------------------------------------------------------------------

    _DISK_WRITE = struct.Struct("<HQQ")  # disk, epoch (captures so far), offset

    def _sync_disks(self) -> None:
        """Initial sync: send only the MiB chunks whose hashes differ."""
        mtype, payload = self.channel.recv()
        if mtype != Msg.DISK_HASHES:
            raise UserError(f"the secondary answered {mtype} instead of its disk hashes")
        theirs = json.loads(bytes(payload))
        for index, (image, remote) in enumerate(zip(self.machine.disk_images, theirs)):
            local = chunk_hashes(image.path)
            differ = [i for i, (a, b) in enumerate(zip(local, remote)) if a != b]
            log.info("disk %d: %d of %d MiB differ on the secondary", index, len(differ), len(local))
            with open(image.path, "rb") as f:
                for n, chunk in enumerate(differ, 1):
                    data = os.pread(f.fileno(), HASH_CHUNK, chunk * HASH_CHUNK)
                    self.channel.send(Msg.DISK_WRITE, [self._DISK_WRITE.pack(index, 0, chunk * HASH_CHUNK), data])
                    if n % 64 == 0 or n == len(differ):
                        log.info("disk %d: initial sync %d of %d MiB sent", index, n, len(differ))
        for index, device in enumerate(self.machine.block_devices()):
            device.write_observers.append(lambda offset, views, index=index: self._forward_write(index, offset, views))

    def _forward_write(self, index: int, offset: int, views) -> None:
        """Every write the guest makes goes to the secondary, in order (runs on
        the I/O thread, so it is ordered with the checkpoints' capture)."""
        if self._lost.is_set():
            return
        try:
            self.channel.send(Msg.DISK_WRITE, [self._DISK_WRITE.pack(index, self._epoch, offset), *views])
        except ChannelError as e:
            self._lose(str(e))

    def initial_copy(self) -> None:
        """The first full copy, before the guest first runs: RAM, vCPU, VM and
        device state.  Returns when the secondary has loaded it."""
        m = self.machine
        self.dirty = dirty_log.of(m).reader("colo")
        cap = vmstate.capture(m, self.dirty, vmstate.KIND_FULL, None, self.host)
        self._epoch = 1  # writes from now on belong after the initial copy
        parts = sections.encode(cap.sections)
        total = sections.encoded_size(parts)
        next_report = [0.0]

        def progress(sent: int, size: int) -> None:
            if size >= 4 << 20 and sent / size >= next_report[0]:
                log.info("initial copy: %d of %d MiB sent", sent >> 20, size >> 20)
                next_report[0] += 0.25

        t0 = time.perf_counter()
        self.channel.timeout = max(self.channel.timeout, 60)
        self.channel.send(Msg.INITIAL_STATE, parts, progress)
        mtype, _ = self.channel.recv()
        if mtype != Msg.VMSTATE_LOADED:
            raise UserError(f"the secondary answered {mtype} to the initial copy")
        self.channel.sock.settimeout(self.options.heartbeat_timeout)
        self.channel.timeout = self.options.heartbeat_timeout
        log.info("initial copy done: %d pages, %.1f MiB in %.2f s; COLO is running", cap.dirty_pages,
                 total / (1 << 20), time.perf_counter() - t0)  # fmt: skip
        self.status.state = "colo"

    def start(self) -> None:
        """Start replicating (before the guest first runs)."""
        devices = self.machine.net_devices()
        if devices:
            self.network = PrimaryNetwork(devices, self.machine.taps, self.channel.send, lambda: self._epoch,
                                          self.request_checkpoint, self.options.compare_timeout,
                                          self.options.max_queue, self._internal_error)  # fmt: skip
            self.status.net_stats = self.network.stats
            self.network.start()
        self._heartbeat = Heartbeat(self.channel, self.options.heartbeat_interval, self._lose, self._internal_error)
        self._heartbeat.start()
        guarded("colo-recv", self._receive, self._internal_error)
        guarded("colo-checkpoints", self._loop, self._internal_error)

    # ---- public controls ---------------------------------------------------------

    def request_checkpoint(self, reason: str) -> None:
        """Ask for a checkpoint as soon as possible (comparator, control socket)."""
        self._reason = reason
        self._trigger.set()

    def follows_peer(self) -> bool:
        return False  # the primary's guest is its own

    def failover(self, reason: str = "requested") -> None:
        """Give up the secondary and go on alone (like x-colo-lost-heartbeat)."""
        self._lose(reason)

    def goodbye(self, status: int, reason: str) -> None:
        """The guest ended: tell the secondary to end too."""
        self._stopping.set()
        if self.channel is not None and not self._lost.is_set():
            try:
                self.channel.send(Msg.GOODBYE, [json.dumps({"status": status, "reason": reason}).encode()])
            except ChannelError:
                pass
        self.close()

    def close(self) -> None:
        self._stopping.set()
        if self.network is not None:
            self.network.stop()
        hang_up(self._heartbeat, self.channel)

    # ---- threads --------------------------------------------------------------------

    def _receive(self) -> None:
        try:
            while not self._lost.is_set():
                mtype, payload = self.channel.recv()
                testhooks.hit("colo-recv")
                if mtype == Msg.NET_OUTPUT:
                    if self.network is not None:
                        self.network.from_secondary(payload)
                    continue
                if mtype == Msg.VMSTATE_RECEIVED and self.network is not None:
                    # Released here, in channel order: every frame the SVM sent
                    # before loading this checkpoint came before it, every later
                    # one comes after (the checkpoint thread would be too late).
                    self.network.checkpoint_received(self._epoch)
                if mtype != Msg.HEARTBEAT:
                    self._inbox.put(mtype)
        except ChannelError as e:
            if not self._stopping.is_set():
                self._lose(str(e))

    def _lose(self, reason: str) -> None:
        with self._lock:
            if self._lost.is_set():
                return
            self._lost.set()
        fencing = bool(self.options.fence_command)
        self.status.state = "fencing" if fencing else "alone"
        self.status.phase = "idle"
        self.status.failover("secondary lost; the primary goes on alone", reason)
        self._inbox.put(None)
        hang_up(self._heartbeat, self.channel)
        # A checkpoint in progress ends at once (its _wait sees the None above)
        # and gives back its hold on the guest; the operator's hold, if any, stays.
        if fencing:  # the guest runs on meanwhile; its network output stays held
            threading.Thread(target=self._fence_then_go_on, args=(reason,), name="colo-fence", daemon=True).start()
        elif self.network is not None:
            self.network.alone()

    def _fence_then_go_on(self, reason: str) -> None:
        if fence_peer(self.options.fence_command, "primary", self.status.peer, reason, self.options.fence_timeout):
            self.status.state = "alone"
            if self.network is not None:
                self.network.alone()
            return
        self.status.state = "fenced-out"
        self.machine.vm.request_exit(3, "could not fence the secondary: the primary stops to avoid a split brain")

    def _internal_error(self, thread: str, exc: BaseException) -> None:
        """A bug, not a lost peer: logged once with its traceback, then the
        secondary is told to end (it must not take over a guest that is still
        running here) and the primary goes on alone."""
        self.status.internal_error(thread, exc)
        if self.channel is not None and not self._lost.is_set():
            try:
                self.channel.send(Msg.GOODBYE, [json.dumps({"status": 4, "reason": (
                    f"the primary ended protection after an internal error in {thread}; it goes on alone")}).encode()])
            except ChannelError:
                pass
        self._lose(f"internal error in {thread}: {type(exc).__name__}: {exc}")

    def _loop(self) -> None:
        while not self._lost.is_set() and not self._stopping.is_set():
            triggered = self._trigger.wait(self.options.checkpoint_delay)
            self._trigger.clear()
            reason = self._reason if triggered else "timer"
            self._reason = "timer"
            if self._lost.is_set() or self._stopping.is_set() or self.machine.vm.exit is not None:
                return
            try:
                self._checkpoint(reason)
            except SecondaryLost:
                return
            except ProtocolError as e:
                self._lose(f"protocol error: {e}")
                return

    def _wait(self, expected: Msg, timeout: float) -> None:
        try:
            msg = self._inbox.get(timeout=timeout)
        except queue.Empty:
            self._lose(f"no {expected.name} within {timeout:.1f} s")
            raise SecondaryLost()
        if msg is None or self._lost.is_set():
            raise SecondaryLost()
        for act in self.core.on_message(Msg(msg)):
            self._do(act)

    def _checkpoint(self, reason: str) -> None:
        testhooks.hit("colo-checkpoints")
        self._seq += 1
        self._rec = {"reason": reason, "t0": time.perf_counter()}
        self.status.phase = "requested"
        if self.network is not None:
            self.network.checkpoint_started()
        for act in self.core.start_checkpoint():
            self._do(act)
        timeout = self.options.heartbeat_timeout * 3
        try:
            self._wait(Msg.CHECKPOINT_REPLY, timeout)  # -> pause, capture, (resume), send
            self._wait(Msg.VMSTATE_RECEIVED, timeout)
            self._rec["received"] = time.perf_counter()
            self._wait(Msg.VMSTATE_LOADED, timeout * 4)
        finally:
            self._release_guest()  # however the checkpoint ended

    def _release_guest(self) -> None:
        if self._holding:
            self._holding = False
            self.machine.release("checkpoint")

    def _do(self, act: Act) -> None:
        ch = self.channel
        try:
            if act is Act.SEND_REQUEST:
                ch.send(Msg.CHECKPOINT_REQUEST)
            elif act is Act.PAUSE_VM:
                self.machine.hold("checkpoint")
                self._holding = True
                self._rec["paused"] = time.perf_counter()
            elif act is Act.CAPTURE:
                self._capture()
            elif act is Act.RESUME_VM:
                self._release_guest()
                self._rec["resumed"] = time.perf_counter()
            elif act is Act.SEND_STATE:
                self.status.phase = "sending"
                self._rec["send"] = time.perf_counter()
                ch.send(Msg.VMSTATE_SEND)
                ch.send(Msg.VMSTATE_SIZE, [self._size.to_bytes(8, "little")])
                if self.options.debug_stall_ms:
                    ch.send(Msg.VMSTATE_DATA, self._parts, self._stall_marker, self.options.debug_stall_ms / 1000)
                    self.status.phase = "sending"
                else:
                    ch.send(Msg.VMSTATE_DATA, self._parts)
                self.status.phase = "waiting"
            elif act is Act.RELEASE_OUTPUT:
                pass  # done by the receiver thread as VMSTATE_RECEIVED arrived (see _receive)
            elif act is Act.CHECKPOINT_DONE:
                self._finish_record()
            else:
                raise ProtocolError(f"the primary driver has no action {act}")
        except ChannelError as e:
            self._lose(str(e))
            raise SecondaryLost()

    def _capture(self) -> None:
        m = self.machine
        cap = vmstate.capture(m, self.dirty, vmstate.KIND_INCREMENTAL, None, self.host, self._ram_buffer)
        self._epoch += 1  # guest paused, I/O thread held: no write is being forwarded right now
        ram = cap.sections[-1].payload
        if len(self._ram_buffer) < len(ram):
            self._ram_buffer = bytearray(len(ram) + (1 << 20))  # grown once, reused afterwards
        self._parts = sections.encode(cap.sections)
        self._size = sections.encoded_size(self._parts)
        self._rec["pages"] = cap.dirty_pages
        if self.options.verify_every and self._seq % self.options.verify_every == 0:
            hashes = vmstate.state_hashes(m, self.host)
            for i, image in enumerate(m.disk_images):
                hashes[f"disk.{i}"] = file_hash(image.path)
            self.status.hashes[self._seq] = hashes
            while len(self.status.hashes) > 20:
                self.status.hashes.pop(min(self.status.hashes))

    def _stall_marker(self, sent: int, total: int) -> None:
        if sent < 0:
            self.status.phase = "sending-stalled"

    def _finish_record(self) -> None:
        r = self._rec
        now = time.perf_counter()
        resumed = r.get("resumed", now)
        self.status.record(CheckpointRecord(
            seq=self._seq, reason=r["reason"], pause_ms=(resumed - r["paused"]) * 1e3, dirty_pages=r["pages"],
            bytes=self._size, transfer_ms=(r["received"] - r["send"]) * 1e3, load_ms=(now - r["received"]) * 1e3,
        ))  # fmt: skip
        self.status.phase = "idle"
