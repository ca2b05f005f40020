"""Layer 4: the COLO secondary — runs the SVM and adopts every checkpoint.

A checkpoint is received whole into a buffer and verified (frame MAC, then
every section CRC) before anything is touched; only then does the RAM
cache (ram_cache.py) take its pages and give the SVM every page either
side dirtied, and the vCPU/VM/device state is loaded, then the disks
(colo_disk.py).  A checkpoint that is cut off or corrupt is discarded whole:
the SVM keeps its own consistent state.  The SVM runs exactly when the PVM
does: an operator's stop on the primary reaches it with the next checkpoint.

Threads (each guarded): the receive loop (every message of the primary, in
order) and the heartbeat sender.  Losing the primary (silence past the
heartbeat timeout, a closed or broken connection, a frame that fails
authentication) means failover: finish a load in progress, fence the
primary if a fence command is set, take the disks and the network over
(taps onto their bridges, the guest announced), let the SVM run and go on
alone.  An internal error (a bug here) ends this side instead, exit 4: the
primary, still running, goes on alone.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from kvmcolo import colo_link, dirty_log, jsonsafe, sections, testhooks, vmstate
from kvmcolo.colo import Act, Failover, FState, Msg, ProtocolError, SecondaryCore, SState
from kvmcolo.colo_disk import SecondaryDisks
from kvmcolo.colo_net import SecondaryNetwork
from kvmcolo.colo_session import Checkpoint, ColoOptions, ColoStatus, Heartbeat, fence_peer, hang_up
from kvmcolo.devices.virtio_net import parse_mac
from kvmcolo.dirty_log import DirtyReader
from kvmcolo.errors import UserError
from kvmcolo.ram_cache import RamCache
from kvmcolo.threads import guarded
from kvmcolo.wire import AuthenticationError, Channel, ChannelError

log = logging.getLogger("kvmcolo.colo")


class ColoSecondary:
    def __init__(self, machine, listen: tuple[str, int], key: bytes, options: ColoOptions,
                 disk_bases: list[str] = (), overlays: list = (), incoming: bool = False,
                 switchover: bool = False, status: ColoStatus | None = None,
                 cache: RamCache | None = None):  # fmt: skip
        """`disk_bases`: the real images; `overlays`: the OverlayMount each one
        is seen through by the SVM (same order as the machine's disks);
        `incoming`: a live migration's destination (`boot --incoming`),
        which runs the guest itself as soon as the copy is loaded;
        `switchover`: a switchover's new secondary (this side's guest, held,
        was the primary's: its RAM is the `cache`, nothing is copied), with
        the old primary's `status` (its history goes on)."""
        self.machine = machine
        self.incoming = incoming
        self.switchover = switchover
        # Called (on the receive thread) once a switchover's last checkpoint
        # is loaded: the owner makes this side the primary of the new pair.
        self.on_switchover = None
        self.disks = SecondaryDisks(disk_bases, overlays)
        self.listen_addr = listen
        self.key = key
        self.options = options
        self.status = status or ColoStatus("secondary")
        self.status.new_pair()
        self.status.set(role="secondary")
        self.core = SecondaryCore()
        self.failover_state = Failover()
        self.channel: Channel | None = None
        self.cache = cache or RamCache(machine.config.mem_size)
        self.dirty: DirtyReader | None = None  # the SVM's own writes, through the machine's one dirty log
        self.host = vmstate.HostCaps.of(machine)
        self._heartbeat: Heartbeat | None = None
        self._checkpoint: Checkpoint | None = None  # the one being received or loaded
        self._seq = 0
        self._after_load: list[Act] = []
        self._ended = threading.Event()
        self._receive_ended = threading.Event()
        self._lock = threading.Lock()  # the core's state as failover sees it, and the SVM hold
        self._holding = False  # the SVM is held for a checkpoint (under _lock)
        self._switch_held_at: float | None = None  # perf_counter() when a switchover's hold began (under _lock)
        self.last_words: dict | None = None  # the primary's GOODBYE
        self.network: SecondaryNetwork | None = None
        self._server: socket.socket | None = None
        if listen is None:
            return  # the test harness hands wait_for_primary() a connected socket
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._server.bind(listen)
        except OSError as e:
            raise UserError(f"cannot listen on {listen[0]}:{listen[1]}: {e.strerror}")
        self._server.listen(4)

    # ---- start-up ------------------------------------------------------------------

    def wait_for_primary(self, sock: socket.socket | None = None) -> None:
        """Accept primaries until one authenticates and brings a matching VM;
        sync the disks and load its initial copy.  `sock`: a connected socket
        to the primary instead (test harness)."""
        mode = (colo_link.MODE_MIGRATE if self.incoming else colo_link.MODE_SWITCHOVER if self.switchover
                else colo_link.MODE_COLO)  # fmt: skip
        config = colo_link.config_message(self.machine, self.host.as_meta(), self.options, mode)
        if sock is None:
            log.info("secondary: waiting for the primary on %s:%d", *self.listen_addr)
            ch, peer = colo_link.accept(self._server, self.key, config)
        else:
            peer = "{}:{}".format(*colo_link.peer_address(sock))
            ch = colo_link.open_secondary(sock, peer, self.key, config)
        self.channel = ch
        self.status.set(peer=peer)
        ch.timeout = 120
        ch.sock.settimeout(120)
        if self.switchover:
            self._setup_network()  # first: a failover from here on must find the taps' way back to the LAN
        else:
            ch.send(Msg.DISK_HASHES, [self.disks.hashes_message()])
        precopied = 0
        while True:  # the disk sync and the live pre-copy (interleaved), then the final state
            mtype, payload = ch.recv()
            if mtype == Msg.DISK_WRITE:
                self.disks.on_write(payload)
            elif mtype == Msg.PRECOPY_PAGES:
                precopied += self._adopt_precopy(payload)
            elif mtype == Msg.HISTORY:
                self.status.adopt_history(jsonsafe.loads(bytes(payload)))
            elif mtype == Msg.INITIAL_STATE:
                break
            else:
                raise UserError(f"the primary sent {mtype} instead of the initial copy")
        self.disks.load()
        try:
            snap = vmstate.parse(payload)
        except sections.StateFormatError as e:
            raise UserError(f"the primary's initial copy is unusable: {e}")
        self.cache.adopt_initial(snap)
        vmstate.apply_ram(self.machine.vm.memory, snap)
        vmstate.apply(self.machine, snap)
        self.dirty = dirty_log.of(self.machine).reader("colo")
        self.dirty.collect()  # arm: from here on, the SVM's own writes are tracked
        ch.timeout = self.options.heartbeat_timeout
        ch.sock.settimeout(self.options.heartbeat_timeout)
        if self.network is None:
            self._setup_network()
        ch.send(Msg.VMSTATE_LOADED)
        if self.incoming:
            log.info("migration from %s loaded (%d pages pre-copied, %d with the final state)", peer, precopied,
                     snap.pages)  # fmt: skip
            return
        self.status.set(state="colo")
        log.info("initial copy from %s loaded (%d pages pre-copied, %d with the final state); COLO is running", peer,
                 precopied, snap.pages)

    def _adopt_precopy(self, payload) -> int:
        """Pages the primary sent while its guest ran: into the RAM cache and
        the SVM (which does not run yet), all checked before any is written."""
        try:
            parts = vmstate.parse_ram(payload)
            self.cache.adopt_precopy(parts)
            vmstate.apply_ram_parts(self.machine.vm.memory, parts)
        except (sections.StateFormatError, vmstate.IncompatibleState) as e:
            raise UserError(f"the primary's pre-copy is unusable: {e}")
        return sum(p.count for p in parts)

    def _setup_network(self) -> None:
        """The SVM's NICs take mirrored input and send to the primary; the
        taps stay off their bridges until a failover."""
        devices = self.machine.net_devices()
        if not devices:
            return
        nets = self.machine.config.nets
        self.network = SecondaryNetwork(devices, self.machine.taps, [n.bridge for n in nets],
                                        [parse_mac(n.mac) for n in nets], lambda *a: self.channel.send(*a),
                                        lambda: self.disks.loads, lambda: self.machine.paused,
                                        self._internal_error)  # fmt: skip
        self.status.net_stats = self.network.stats

    def start(self) -> None:
        if self.network is not None:
            self.network.start()
        self._heartbeat = Heartbeat(self.channel, self.options.heartbeat_interval, self._heartbeat_failed,
                                    self._internal_error)  # fmt: skip
        self._heartbeat.start()
        guarded("colo-secondary", self._receive, self._internal_error)

    def _heartbeat_failed(self, why: str) -> None:
        """The link broke under a send.  The primary's last words (a GOODBYE
        saying this side must end rather than take over) may still be queued
        here unread: the receive loop reads them first, then meets the same
        broken link and fails over itself.  Only if it does not end within
        the heartbeat timeout does this side fail over from here."""
        if not self._receive_ended.wait(self.options.heartbeat_timeout):
            self.fail_over(f"heartbeat send failed: {why}")

    def follows_peer(self) -> bool:
        """The SVM belongs to the primary until this side takes over."""
        return self.failover_state.state is FState.NONE and not self._ended.is_set()

    def _internal_error(self, thread: str, exc: BaseException) -> None:
        """A bug, not a lost primary: taking over could run a second copy of a
        guest that is still running there, so this side ends instead (exit 4)
        and the primary goes on alone."""
        if not self._ended.is_set():
            self.status.set(state="failed", phase="idle")
        self.status.internal_error(thread, exc)  # after the state changed: never "colo" with an error listed
        if self._ended.is_set():
            return
        self._ended.set()
        hang_up(self._heartbeat, self.channel)
        self.machine.vm.request_exit(4, f"internal error in {thread}: the secondary ends; the primary goes on alone")

    # ---- the receive loop -----------------------------------------------------------

    def _receive(self) -> None:
        try:
            self._loop()
        finally:
            self._receive_ended.set()

    def _loop(self) -> None:
        ch = self.channel
        while not self._ended.is_set():
            try:
                mtype, payload = ch.recv()
                testhooks.hit("colo-secondary")
                msg = Msg(mtype)
                if msg is Msg.GOODBYE:
                    self.last_words = jsonsafe.loads(bytes(payload))
                    self._end_with_primary()
                    return
                if msg is Msg.DISK_WRITE:
                    self.disks.on_write(payload)
                    continue
                if msg is Msg.HISTORY:
                    self.status.adopt_history(jsonsafe.loads(bytes(payload)))
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
            except sections.StateFormatError as e:  # (a ValueError: before the clause below)
                log.error("checkpoint %d rejected: %s; nothing of it was applied", self._seq + 1, e)
                self.fail_over(f"corrupt checkpoint: {e}")
                return
            except ChannelError as e:
                if self._goodbye_queued():  # the link broke under a send, after the primary's last words
                    self._end_with_primary()
                else:
                    self.fail_over(str(e))
                return
            except ValueError as e:
                self.fail_over(str(e))
                return
            except ProtocolError as e:
                self.fail_over(f"protocol error: {e}")
                return

    def _do(self, act: Act, payload) -> None:
        ch = self.channel
        cp = self._checkpoint
        if act is Act.PAUSE_VM:
            self._checkpoint = cp = Checkpoint(self._seq + 1, "checkpoint")
            cp.mark("paused")
            self._hold_svm()
            self.status.set(phase="stopped")
        elif act is Act.SEND_REPLY:
            ch.send(Msg.CHECKPOINT_REPLY)
            self.status.set(phase="receiving")
        elif act is Act.VERIFY_STATE:
            cp.snap = vmstate.parse(payload)  # every CRC, before anything is applied
            cp.size, cp.pages = len(payload), cp.snap.pages
            cp.mark("received")
        elif act is Act.SEND_RECEIVED:
            ch.send(Msg.VMSTATE_RECEIVED)
            self.status.set(phase="loading")
        elif act is Act.LOAD_STATE:
            self._load(cp)
        elif act is Act.RESUME_VM:
            self._release_svm()
        elif act is Act.SEND_LOADED:
            try:
                ch.send(Msg.VMSTATE_LOADED)
            finally:
                with self._lock:
                    self._after_load = self.core.loaded()
                self.status.set(phase="idle")
                if self.failover_state.load_finished():
                    self._complete_failover()
        elif act is Act.CHECKPOINT_DONE:
            self.status.record(cp.record("secondary"))
            self._checkpoint = None
            for later in self._after_load:  # (the core's actions at LOADED: a switchover's SWITCH_ROLES)
                self._do(later, payload)
            self._after_load = []
        elif act is Act.HOLD_FOR_SWITCH:
            if self.on_switchover is None:
                raise ProtocolError("SWITCHOVER at a secondary that cannot become a primary here")
            with self._lock:
                self.machine.hold("switchover")
                self._switch_held_at = time.perf_counter()
            self.status.set(state="switching")
            log.info("switchover: the primary's last checkpoint comes next; then this side is the primary")
        elif act is Act.STOP_HEARTBEAT:
            self._heartbeat.stop_and_wait()
        elif act is Act.SWITCH_ROLES:
            self._ended.set()  # this receive loop reads no more: the rest of the link is the new pair's
            self.on_switchover(self)
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

    def _load(self, cp: Checkpoint) -> None:
        """Adopt a verified checkpoint: RAM through the cache, then vCPU, VM
        and device state, then the disks."""
        self._seq = cp.seq
        self.cache.load(cp.snap, self.dirty.collect())
        self.disks.load()
        vmstate.apply(self.machine, cp.snap)
        # The SVM runs exactly when the PVM does: an operator's stop on the
        # primary holds it here too, from this checkpoint until one without.
        self.machine.run_state.set_operator(bool(cp.snap.meta.get("operator_stopped")))
        if self.network is not None:
            self.network.checkpoint_loaded(self.disks.loads)
        if self.options.verify_every and cp.seq % self.options.verify_every == 0:
            self.status.keep_hashes(cp.seq, {**vmstate.state_hashes(self.machine, self.host), **self.disks.hashes()})

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
            self.status.set(state="fenced-out")
            self.machine.vm.request_exit(3, "could not fence the primary: the secondary does not take over")
            return
        self.disks.take_over()
        if self.network is not None:
            self.network.take_over()
        # Stopped for a checkpoint that never completed: the SVM's own state is
        # consistent (nothing of the checkpoint was applied), so it just goes on
        # (unless the primary's operator had it stopped: then it stays so).
        self._release_svm()
        self.release_switch_hold()  # a switchover cut short by the lost primary: the guest is this side's
        self.failover_state.complete()
        self.status.set(state="active", phase="idle")
        self.status.failover("primary lost; the secondary took over", self.failover_state.reason)

    def release_switch_hold(self) -> float | None:
        """Give back a switchover's hold on the guest (idempotent); returns
        how long it was held, in ms, or None if it was not."""
        with self._lock:
            held_at, self._switch_held_at = self._switch_held_at, None
            if held_at is None:
                return None
            self.machine.release("switchover")
        return (time.perf_counter() - held_at) * 1e3

    def hand_over_link(self):
        """A switchover's last checkpoint is loaded (its guest still held):
        this side's guest is the pair's from now on — the disks' overlays
        (emptied by that load) pass writes through, the taps join their
        bridges and the guest is announced, as at a takeover but with no
        lost peer (no fencing: the old primary becomes this side's
        secondary).  Returns the connected socket, for the new pair."""
        self._take_over_unfenced("switchover")
        if self._server is not None:
            self._server.close()  # a primary now: nobody connects here
            self._server = None
        sock, self.channel = self.channel.sock, None
        return sock

    def release_cache(self) -> None:
        """After hand_over_link(), once the guest runs again: the RAM cache
        goes (unmapping a guest-sized mapping took 80 ms for 1 GiB, too long
        to do while the guest is held; nothing reads it any more)."""
        self.cache.close()

    def run_incoming(self) -> None:
        """A migration's destination, its copy loaded: the guest is this
        host's from now on.  The disks' overlays (empty: the SVM has not run)
        become the disks, the taps join their bridges and the guest is
        announced — a takeover, without a lost peer (no fencing: the source
        is alive, and keeps its guest stopped for good)."""
        self._take_over_unfenced("incoming migration complete")
        hang_up(None, self.channel)
        self.status.set(state="active", phase="idle")
        self.status.migrated_in(self.status.peer)

    def _take_over_unfenced(self, reason: str) -> None:
        """The guest is this side's, its peer alive and handing it over: the
        overlays become the disks, the taps join their bridges and the guest
        is announced; no fencing, and nothing more of the peer is adopted."""
        with self._lock:
            self.failover_state.require(reason)
        self.failover_state.activate()
        self._ended.set()
        self.disks.take_over()
        if self.network is not None:
            self.network.take_over()
        self.failover_state.complete()

    def _goodbye_queued(self) -> bool:
        """Whether a GOODBYE already waits, unread, behind the frames queued
        here.  A primary that ends protection sends GOODBYE and closes; a send
        of ours that meets the closed socket fails before the receive loop has
        read that far, and taking over then would run a second copy of a
        guest that goes on there.  Only what has already arrived is read
        (no waiting: a partitioned link must fail over without delay); the
        frames before the GOODBYE belong to a checkpoint that is not applied."""
        ch = self.channel
        try:
            ch.sock.settimeout(0)
            while True:
                mtype, payload = ch.recv()
                if mtype == Msg.GOODBYE:
                    self.last_words = jsonsafe.loads(bytes(payload))
                    return True
        except (ChannelError, OSError, ValueError):
            return False

    def _end_with_primary(self) -> None:
        self._ended.set()
        hang_up(self._heartbeat, self.channel)
        status = int(self.last_words.get("status", 0))
        self.machine.vm.request_exit(status, f"the primary ended: {self.last_words.get('reason', '')}")

    def retire(self) -> None:
        """This survivor becomes the primary of a new pair: the old link's
        leftovers go, and so does the RAM cache (a guest-sized mapping that
        nothing reads once the receive loop has ended)."""
        if self.failover_state.state is not FState.COMPLETED:
            raise RuntimeError(f"retire() of a secondary that has not taken over ({self.failover_state.state})")
        self.close()
        if self._receive_ended.wait(10):  # (it ends at once: its link was closed at the takeover)
            self.cache.close()

    def close(self) -> None:
        self._ended.set()
        if self.network is not None:
            self.network.stop()
        hang_up(self._heartbeat, self.channel)
        if self._server is not None:
            self._server.close()
        self.cache.close()
        self.disks.close()
