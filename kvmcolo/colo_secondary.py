"""Layer 4: the COLO secondary — runs the SVM and adopts every checkpoint.

The secondary keeps a RAM cache: a full copy of the primary's RAM as of the
last checkpoint.  A checkpoint is received whole into a buffer and verified
(frame MAC, then every section CRC) before anything is touched; only then
are its pages written into the cache, and every page dirtied by the PVM (in
the checkpoint) or by the SVM (its own dirty log, VMM writes included) is
copied from the cache into SVM RAM, and the vCPU/VM/device state loaded.  A
checkpoint that is cut off or corrupt is discarded whole: the SVM keeps its
own consistent state.

Losing the primary (silence past the heartbeat timeout, a closed or broken
connection, a frame that fails authentication) means failover: finish a
load in progress, fence the primary if a fence command is set, take the
network over (taps onto their bridges, the guest announced), resume the SVM
and go on alone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time

from kvmcolo import dirty_log, sections, testhooks, vmstate
from kvmcolo.colo import Act, Failover, FState, Msg, ProtocolError, SecondaryCore, SState
from kvmcolo.colo_net import SecondaryNetwork
from kvmcolo.colo_session import (CheckpointRecord, ColoOptions, ColoStatus, Heartbeat, config_message,
                                  config_mismatch, fence_peer, hang_up)  # fmt: skip
from kvmcolo.devices.virtio_net import parse_mac
from kvmcolo.dirty_log import DirtyReader, merge_and_copy, scatter_pages
from kvmcolo.disk_replication import PendingWrites, apply_writes, chunk_hashes, file_hash
from kvmcolo.errors import UserError
from kvmcolo.memory import GuestMemory
from kvmcolo.threads import guarded
from kvmcolo.wire import AuthenticationError, Channel, ChannelError, server_handshake

log = logging.getLogger("kvmcolo.colo")


class ColoSecondary:
    def __init__(self, machine, listen: tuple[str, int], key: bytes, options: ColoOptions,
                 disk_bases: list[str] = (), overlays: list = ()):  # fmt: skip
        """`disk_bases`: the real images; `overlays`: the OverlayMount each one
        is seen through by the SVM (same order as the machine's disks)."""
        self.machine = machine
        self.disk_bases = list(disk_bases)
        self.overlays = list(overlays)
        self.pending = [PendingWrites(os.path.dirname(os.path.abspath(b))) for b in self.disk_bases]
        self._loads = 0
        self.listen_addr = listen
        self.key = key
        self.options = options
        self.status = ColoStatus("secondary")
        self.core = SecondaryCore()
        self.failover_state = Failover()
        self.channel: Channel | None = None
        self.cache = GuestMemory(machine.config.mem_size)
        self.dirty: DirtyReader | None = None  # the SVM's own writes, through the machine's one dirty log
        self.host = vmstate.HostCaps.probe(machine.kvm, machine.vm.vcpus[0])
        self._heartbeat: Heartbeat | None = None
        self._snap: vmstate.Snapshot | None = None
        self._seq = 0
        self._ended = threading.Event()
        self._lock = threading.Lock()
        self._holding = False  # the SVM is held for a checkpoint (under _lock)
        self.goodbye: dict | None = None
        self.network: SecondaryNetwork | None = None
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._server.bind(listen)
        except OSError as e:
            raise UserError(f"cannot listen on {listen[0]}:{listen[1]}: {e.strerror}")
        self._server.listen(4)

    # ---- start-up ------------------------------------------------------------------

    def wait_for_primary(self) -> None:
        """Accept primaries until one authenticates and brings a matching VM;
        load its initial copy and start the SVM."""
        log.info("secondary: waiting for the primary on %s:%d", *self.listen_addr)
        while True:
            sock, addr = self._server.accept()
            peer = f"{addr[0]}:{addr[1]}"
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                ch = server_handshake(sock, self.key, "secondary", peer, 10)
            except ChannelError as e:
                log.warning("refused %s: %s", peer, e)  # nothing it sent is used
                sock.close()
                continue
            break
        self.channel = ch
        self.status.peer = peer
        mtype, payload = ch.recv()
        if mtype != Msg.CONFIG:
            raise UserError(f"the primary at {peer} sent {mtype} instead of its configuration")
        ours = json.loads(config_message(self.machine, self.host.as_meta(), self.options))
        problem = config_mismatch(ours, json.loads(bytes(payload)))
        if problem:
            ch.send(Msg.CONFIG_REFUSED, [problem.encode()])
            ch.close()
            raise UserError(f"refused the primary at {peer}: {problem}")
        ch.send(Msg.CONFIG_OK)
        ch.timeout = 120
        ch.sock.settimeout(120)
        ch.send(Msg.DISK_HASHES, [json.dumps([chunk_hashes(b) for b in self.disk_bases]).encode()])
        while True:  # the initial disk sync: differing chunks, then the initial copy
            mtype, payload = ch.recv()
            if mtype == Msg.DISK_WRITE:
                self._pending_write(payload)
            elif mtype == Msg.INITIAL_STATE:
                break
            else:
                raise UserError(f"the primary sent {mtype} instead of the initial copy")
        self._apply_disks()
        try:
            snap = vmstate.parse(payload)
        except sections.StateFormatError as e:
            raise UserError(f"the primary's initial copy is unusable: {e}")
        vmstate.apply_ram(self.cache, snap)
        vmstate.apply_ram(self.machine.vm.memory, snap)
        vmstate.apply(self.machine, snap)
        self.dirty = dirty_log.of(self.machine).reader("colo")
        self.dirty.collect()  # arm: from here on, the SVM's own writes are tracked
        ch.timeout = self.options.heartbeat_timeout
        ch.sock.settimeout(self.options.heartbeat_timeout)
        self._setup_network()
        ch.send(Msg.VMSTATE_LOADED)
        self.status.state = "colo"
        log.info("initial copy from %s loaded (%d pages); COLO is running", peer, sum(r[3] for r in snap.ram))

    def _setup_network(self) -> None:
        """The SVM's NICs take mirrored input and send to the primary; the
        taps stay off their bridges until a failover."""
        devices = self.machine.net_devices()
        if not devices:
            return
        nets = self.machine.config.nets
        self.network = SecondaryNetwork(devices, self.machine.taps, [n.bridge for n in nets],
                                        [parse_mac(n.mac) for n in nets], self.channel.send,
                                        lambda: self._loads, lambda: self.machine.paused,
                                        self._internal_error)  # fmt: skip
        self.status.net_stats = self.network.stats

    def start(self) -> None:
        if self.network is not None:
            self.network.start()
        self._heartbeat = Heartbeat(self.channel, self.options.heartbeat_interval,
                                    lambda why: self.fail_over(f"heartbeat send failed: {why}"),
                                    self._internal_error)  # fmt: skip
        self._heartbeat.start()
        guarded("colo-secondary", self._loop, self._internal_error)

    def follows_peer(self) -> bool:
        """The SVM belongs to the primary until this side takes over."""
        return self.failover_state.state is FState.NONE and not self._ended.is_set()

    def _internal_error(self, thread: str, exc: BaseException) -> None:
        """A bug, not a lost primary: taking over could run a second copy of a
        guest that is still running there, so this side ends instead (exit 4)
        and the primary goes on alone."""
        self.status.internal_error(thread, exc)
        if self._ended.is_set():
            return
        self._ended.set()
        self.status.state = "failed"
        hang_up(self._heartbeat, self.channel)
        self.machine.vm.request_exit(4, f"internal error in {thread}: the secondary ends; the primary goes on alone")

    # ---- the receive loop -----------------------------------------------------------

    def _loop(self) -> None:
        ch = self.channel
        while not self._ended.is_set():
            try:
                mtype, payload = ch.recv()
                testhooks.hit("colo-secondary")
                msg = Msg(mtype)
                if msg is Msg.GOODBYE:
                    self.goodbye = json.loads(bytes(payload))
                    self._end_with_primary()
                    return
                if msg is Msg.DISK_WRITE:
                    self._pending_write(payload)
                    continue
                if msg is Msg.NET_INBOUND:
                    if self.network is not None:
                        self.network.from_primary(payload)
                    continue
                size = int.from_bytes(payload, "little") if msg is Msg.VMSTATE_SIZE else len(payload)
                with self._lock:  # atomic with fail_over()'s look at the core's state
                    if self.failover_state.state is not FState.NONE:
                        return  # failing over: nothing more of the primary's is adopted
                    actions = self.core.on_message(msg, size)
                for act in actions:
                    self._do(act, payload)
            except AuthenticationError as e:
                log.error("checkpoint rejected: %s; nothing of it was applied", e)
                self.fail_over(f"authentication failed: {e}")
                return
            except (ChannelError, ValueError) as e:
                self.fail_over(str(e))
                return
            except sections.StateFormatError as e:
                log.error("checkpoint %d rejected: %s; nothing of it was applied", self._seq + 1, e)
                self.fail_over(f"corrupt checkpoint: {e}")
                return
            except ProtocolError as e:
                self.fail_over(f"protocol error: {e}")
                return

    def _do(self, act: Act, payload) -> None:
        ch = self.channel
        if act is Act.PAUSE_VM:
            self._t_pause = time.perf_counter()
            self._hold_svm()
            self.status.phase = "stopped"
        elif act is Act.SEND_REPLY:
            ch.send(Msg.CHECKPOINT_REPLY)
            self.status.phase = "receiving"
        elif act is Act.VERIFY_STATE:
            self._snap = vmstate.parse(payload)  # every CRC, before anything is applied
            self._t_received = time.perf_counter()
        elif act is Act.SEND_RECEIVED:
            ch.send(Msg.VMSTATE_RECEIVED)
            self.status.phase = "loading"
        elif act is Act.LOAD_STATE:
            self._load(self._snap)
        elif act is Act.RESUME_VM:
            self._release_svm()
        elif act is Act.SEND_LOADED:
            try:
                ch.send(Msg.VMSTATE_LOADED)
            finally:
                self.core.loaded()
                self.status.phase = "idle"
                if self.failover_state.load_finished():
                    self._complete_failover()
        elif act is Act.CHECKPOINT_DONE:
            now = time.perf_counter()
            self.status.record(CheckpointRecord(
                seq=self._seq, reason="checkpoint", pause_ms=(now - self._t_pause) * 1e3,
                dirty_pages=sum(r[3] for r in self._snap.ram), bytes=len(payload),
                transfer_ms=(self._t_received - self._t_pause) * 1e3, load_ms=(now - self._t_received) * 1e3,
            ))  # fmt: skip
            self._snap = None
        else:
            raise ProtocolError(f"the secondary driver has no action {act}")

    def _hold_svm(self) -> None:
        with self._lock:
            if not self._holding:
                self.machine.hold("checkpoint")
                self._holding = True

    def _release_svm(self) -> None:
        """Give back the checkpoint's hold (the receive thread after a load, or
        a failover that ends a checkpoint half received); idempotent."""
        with self._lock:
            if self._holding:
                self._holding = False
                self.machine.release("checkpoint")

    def _load(self, snap: vmstate.Snapshot) -> None:
        """Adopt a verified checkpoint: cache <- PVM pages; SVM <- cache for every
        page either side dirtied; then vCPU, VM and device state."""
        self._seq += 1
        svm_dirty = self.dirty.collect()
        cache = {r.slot: r for r in self.cache.regions}
        for (slot, _size, pages, count, data), dirty in zip(snap.ram, svm_dirty):
            if count:
                scatter_pages(cache[slot], pages, count, data)
            merge_and_copy(dirty, pages, count, dirty.region, cache[slot].host_addr)
        self._apply_disks()
        vmstate.apply(self.machine, snap)
        # The SVM runs exactly when the PVM does: an operator's stop on the
        # primary holds it here too, from this checkpoint until one without.
        self.machine.run_state.set_operator(bool(snap.meta.get("operator_stopped")))
        if self.network is not None:
            self.network.checkpoint_loaded(self._loads)
        if self.options.verify_every and self._seq % self.options.verify_every == 0:
            hashes = vmstate.state_hashes(self.machine, self.host)
            for i, base in enumerate(self.disk_bases):
                hashes[f"disk.{i}"] = file_hash(base)
            self.status.hashes[self._seq] = hashes
            while len(self.status.hashes) > 20:
                self.status.hashes.pop(min(self.status.hashes))

    # ---- disks -------------------------------------------------------------------------

    _DISK_WRITE = struct.Struct("<HQQ")  # disk, epoch, offset

    def _pending_write(self, payload) -> None:
        index, epoch, offset = self._DISK_WRITE.unpack_from(payload)
        if index >= len(self.pending):
            raise ProtocolError(f"write to disk {index}, but there are {len(self.pending)}")
        self.pending[index].add(offset, bytes(payload[self._DISK_WRITE.size :]), epoch)

    def _apply_disks(self) -> None:
        """At a load (SVM paused): the primary's writes made before that
        state's capture into the base images (journaled), then the SVM's own
        writes thrown away."""
        self._loads += 1  # the initial copy is load 1: it takes the epoch-0 (initial sync) writes
        crash = (lambda: testhooks.hit("crash:disk-apply")) if testhooks.armed("crash:disk-apply") else None
        for base, pending in zip(self.disk_bases, self.pending):
            batch = pending.before(self._loads)
            if batch:
                apply_writes(base, batch, crash_hook=crash)
                pending.drop_before(self._loads)
        for overlay in self.overlays:
            overlay.drop()

    # ---- failover and the end ------------------------------------------------------------

    def fail_over(self, reason: str) -> None:
        """Primary lost (or failover asked for): go on running the SVM alone."""
        with self._lock:
            loading = self.core.state is SState.LOADING
            if not self.failover_state.require(reason, loading=loading):
                return
        self._complete_failover()

    def _complete_failover(self) -> None:
        self.failover_state.activate()
        self._ended.set()
        hang_up(self._heartbeat, self.channel)
        if not fence_peer(self.options.fence_command, "secondary", self.status.peer, self.failover_state.reason,
                          self.options.fence_timeout):  # fmt: skip
            self.status.state = "fenced-out"
            self.machine.vm.request_exit(3, "could not fence the primary: the secondary does not take over")
            return
        # The SVM's own disk writes match its own state: they become the disk.
        # The primary's writes since the last checkpoint are dropped with it.
        for pending in self.pending:
            pending.clear()
        for overlay in self.overlays:
            overlay.commit()
        if self.network is not None:
            self.network.take_over()
        # Stopped for a checkpoint that never completed: the SVM's own state is
        # consistent (nothing of the checkpoint was applied), so it just goes on
        # (unless the primary's operator had it stopped: then it stays so).
        self._release_svm()
        self.failover_state.complete()
        self.status.state = "active"
        self.status.phase = "idle"
        self.status.failover("primary lost; the secondary took over", self.failover_state.reason)

    def _end_with_primary(self) -> None:
        self._ended.set()
        hang_up(self._heartbeat, self.channel)
        status = int(self.goodbye.get("status", 0))
        self.machine.vm.request_exit(status, f"the primary ended: {self.goodbye.get('reason', '')}")

    def close(self) -> None:
        self._ended.set()
        if self.network is not None:
            self.network.stop()
        hang_up(self._heartbeat, self.channel)
        self._server.close()
        self.cache.close()
        for pending in self.pending:
            pending.clear()
