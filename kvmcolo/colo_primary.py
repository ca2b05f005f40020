"""Layer 4: the COLO primary — runs the guest, takes checkpoints, sends them.

Threads (each guarded: an unexpected exception ends protection, see
_internal_error):
- the checkpoint thread: a timer or a request (comparator, operator) starts
  a checkpoint; it carries out the core's actions for it;
- the receiver: reads every frame from the secondary.  Heartbeats only
  refresh liveness; the SVM's network output goes to the comparator;
  transaction messages are fed to the core here, in channel order.  The
  actions that must happen in channel order (RELEASE_OUTPUT) run here, the
  rest go to the checkpoint thread;
- the heartbeat sender.

Losing the secondary at any point — silence past the heartbeat timeout, a
closed or broken connection, a frame that fails authentication — means:
stop taking checkpoints, fence the secondary if a fence command is set
(network output stays held until it succeeds), and go on alone.  The
checkpoint thread gives its hold on the guest back however its checkpoint
ends; an operator's hold stays.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time

from kvmcolo import colo_link, dirty_log, sections, testhooks, vmstate
from kvmcolo.colo import Act, Msg, PrimaryCore, ProtocolError, PState
from kvmcolo.colo_disk import PrimaryDisks
from kvmcolo.colo_net import PrimaryNetwork, lan_ends
from kvmcolo.colo_session import Checkpoint, ColoOptions, ColoStatus, Heartbeat, fence_peer, hang_up
from kvmcolo.dirty_log import DirtyReader
from kvmcolo.errors import UserError
from kvmcolo.live_copy import LiveCopy
from kvmcolo.precopy import Limits
from kvmcolo.threads import guarded
from kvmcolo.wire import Channel, ChannelError

log = logging.getLogger("kvmcolo.colo")

# Actions the receiver thread carries out itself, as the message arrives:
# the SVM's frames sent before it loaded a checkpoint come before its
# VMSTATE_RECEIVED on the channel, every later one after, so releasing the
# PVM's output anywhere else would be too late or too early.
_ON_RECEIVER = frozenset({Act.RELEASE_OUTPUT})


class SecondaryLost(Exception):
    pass


class ColoPrimary:
    def __init__(self, machine, peer: tuple[str, int], key: bytes, options: ColoOptions,
                 status: ColoStatus | None = None, mode: str = colo_link.MODE_COLO):  # fmt: skip
        """`status`: a survivor's, to keep its history when it is protected
        again; `mode`: MODE_MIGRATE for a migration's source."""
        self.mode = mode
        self.machine = machine
        self.peer = peer
        self.key = key
        self.options = options
        self.status = status or ColoStatus("primary")
        self.status.new_pair()
        self.status.set(role="primary", peer=f"{peer[0]}:{peer[1]}")  # a secondary's survivor is a primary now
        self.core = PrimaryCore(options.resume_early)
        self._core_lock = threading.Lock()  # the core is fed by the checkpoint thread and the receiver
        self.channel: Channel | None = None
        self.disks: PrimaryDisks | None = None
        self.network: PrimaryNetwork | None = None
        self.dirty: DirtyReader | None = None  # checkpoints' view of the machine's one dirty log
        self.host: vmstate.HostCaps | None = None
        self._inbox: queue.Queue = queue.Queue()  # (message, actions) for the checkpoint thread; None: lost
        self._trigger = threading.Event()
        self._reason = "timer"
        self._lost = threading.Event()
        self._stopping = threading.Event()
        self._lose_lock = threading.Lock()
        self._holding = False  # the checkpoint thread's hold on the guest (only that thread touches it)
        self._checkpoint: Checkpoint | None = None  # the one in flight (checkpoint thread)
        self._seq = 0
        self._heartbeat: Heartbeat | None = None
        self._ram_buffer = bytearray()
        self._epoch = 0  # checkpoints captured so far (the initial copy counts): tags forwarded writes
        self._switch_wanted = threading.Event()  # switch_over(): the checkpoint thread's next one is the last
        self._switched = threading.Event()  # that last checkpoint is loaded: the link is the new pair's

    # ---- start-up -------------------------------------------------------------

    def connect(self, timeout: float = 60.0, sock=None) -> None:
        """Connect, authenticate, agree on the machine, sync the disks.
        `sock`: an already connected socket to use instead (test harness)."""
        m = self.machine
        with m.held("precopy"):  # a running guest's vCPU is probed only while parked
            self.host = vmstate.HostCaps.of(m)
        config = colo_link.config_message(m, self.host.as_meta(), self.options, self.mode)
        handshake = self.options.heartbeat_timeout * 5
        if sock is None:
            self.channel = colo_link.connect(self.peer, self.key, config, handshake, timeout)
        else:
            self.channel = colo_link.open_primary(sock, self.status.peer, self.key, config, handshake)
        self.disks = PrimaryDisks(m, self.channel, lambda: self._epoch, self._lose)
        if self.mode == colo_link.MODE_SWITCHOVER:
            self.disks.attach()  # equal by construction: the last checkpoint's load made them so
        else:
            self.disks.sync()

    def protect(self, sock=None) -> None:
        """Make the running (or held, not yet started) guest's copy on the
        secondary through the live pre-copy, then replicate.  The guest
        stops only for the final part: the last dirty pages with vCPU, VM
        and device state, until the secondary has loaded them."""
        t_start = time.perf_counter()
        summary = self._live_copy(sock, self._start)  # the comparator takes the NICs before the guest runs on
        self.status.set(state="colo")
        self.status.protected_since(summary, time.perf_counter() - t_start)
        self.send_history()
        log.info("initial copy done: %d rounds, %.1f MiB, downtime %.1f ms (%s); COLO is running",
                 summary["round"], summary["sent_mib"], summary["downtime_ms"], summary["stop_reason"])  # fmt: skip

    def migrate(self) -> dict:
        """Live migration: the same copy to a `boot --incoming` VMM, which
        runs the guest from then on; here the guest is left stopped for good
        (the caller ends the VMM).  Returns the pre-copy's summary."""
        summary = self._live_copy(None, self._hand_over)
        self.status.set(state="migrated")
        log.info("migrated to %s: %d rounds, %.1f MiB, downtime %.1f ms (%s); the guest runs there now",
                 self.status.peer, summary["round"], summary["sent_mib"], summary["downtime_ms"],
                 summary["stop_reason"])  # fmt: skip
        return summary

    def take_over_pair(self, sock) -> None:
        """A switchover's new primary (this side was the secondary, its guest
        held since the last checkpoint, which the peer's guest also is): the
        new pair on the old pair's connection, without any copy — the peer's
        RAM is its RAM cache, the disks are equal.  Only the vCPU, VM and
        device state (and any page touched since) travel, as the initial
        state; then checkpoints go the other way round."""
        self._live_copy(sock, self._start)
        self.status.set(state="colo")
        log.info("switchover: this side is the primary now; COLO runs towards %s", self.status.peer)

    def _live_copy(self, sock, then) -> dict:
        """Connect, pre-copy live, then the final part with the guest held:
        the last pages and the state, until the peer has loaded them, and
        `then()` (still held).  Returns the pre-copy's summary."""
        self.status.set(state="connecting")  # (until the secondary answers: a standby host may still be coming up)
        self.connect(sock=sock)
        self.status.set(state=self._copying_state())
        m = self.machine
        with m.held("precopy"):  # logging starts (and the reader is armed) with the guest parked
            self.dirty = dirty_log.of(m).reader("colo")
        o = self.options
        live = None  # a switchover's peer holds every page already: no pre-copy
        if self.mode != colo_link.MODE_SWITCHOVER:
            live = LiveCopy(m, self.channel, self.dirty, Limits(o.max_downtime, o.max_rounds), o.max_bandwidth,
                            lambda s: self.status.set(precopy=s))  # fmt: skip
        self.channel.timeout = max(self.channel.timeout, 60)
        self.channel.sock.settimeout(self.channel.timeout)
        if live is not None:
            live.run()
        self.send_history()  # the peer keeps it: it may be the one that survives (or runs on, migrated)
        t_stop = time.perf_counter()
        with m.held("checkpoint"):
            cap = vmstate.capture(m, self.dirty, vmstate.KIND_INCREMENTAL, None, self.host)
            self._epoch = 1  # guest and I/O thread parked: writes from now on belong after the initial copy
            self.channel.send(Msg.INITIAL_STATE, sections.encode(cap.sections))
            mtype, _ = self.channel.recv()
            if mtype != Msg.VMSTATE_LOADED:
                raise UserError(f"the secondary answered {mtype} to the initial copy")
            self.channel.sock.settimeout(o.heartbeat_timeout)
            self.channel.timeout = o.heartbeat_timeout
            then()
        stop_ms = (time.perf_counter() - t_stop) * 1e3
        return live.finished(stop_ms / 1e3) if live is not None else {"stop_ms": round(stop_ms, 2)}

    def _copying_state(self) -> str:
        if self.mode == colo_link.MODE_MIGRATE:
            return "migrating"
        if self.mode == colo_link.MODE_SWITCHOVER:
            return "switching"
        history = self.status.history()
        return "reprotecting" if history["failovers"] or history["protections"] else "precopy"

    def _hand_over(self) -> None:
        """Migrated: the guest stays stopped here for good (a hold nobody
        releases), and nothing more goes to the peer, which runs it now."""
        self.machine.hold("migrated")
        self._lost.set()
        if self.disks is not None:
            self.disks.detach()
        hang_up(None, self.channel)

    def send_history(self) -> None:
        try:
            self.channel.send(Msg.HISTORY, [json.dumps(self.status.history()).encode()])
        except ChannelError as e:
            self._lose(str(e))

    def _start(self) -> None:
        """Start replicating (the guest held)."""
        devices = self.machine.net_devices()
        if devices:
            self.network = PrimaryNetwork(devices, lan_ends(devices, self.machine.taps), self.channel.send,
                                          lambda: self._epoch,
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

    def switch_over(self, timeout: float) -> bool:
        """A switchover's first half (the guest already held for it): one
        last checkpoint, after SWITCHOVER; then nothing more of this pair
        goes on the link.  True once that checkpoint is loaded; False if the
        secondary was lost first (the guest is this side's alone then, as
        after any lost secondary)."""
        self.status.set(state="switching")
        self._switch_wanted.set()
        self._trigger.set()
        deadline = time.monotonic() + timeout
        while not self._switched.wait(0.05):
            if self._lost.is_set():
                return False
            if time.monotonic() > deadline:
                self._lose(f"the switchover's last checkpoint did not finish in {timeout:.0f} s")
                return False
        return True

    def hand_over_link(self):
        """After switch_over(): this pair ends without a word (the peer's new
        primary handshakes on the same connection).  The comparator stops,
        the taps leave their bridges (the guest here is about to become the
        secondary's), disk writes are no longer forwarded.  Returns the
        connected socket."""
        self._stopping.set()
        if self.network is not None:
            self.network.stop()
        for tap, net in zip(self.machine.taps, self.machine.config.nets):
            if net.bridge:
                tap.leave_bridge()
        if self.disks is not None:
            self.disks.detach()
        sock, self.channel = self.channel.sock, None
        return sock

    def failover(self, reason: str = "requested") -> None:
        """Give up the secondary and go on alone (like x-colo-lost-heartbeat)."""
        self._lose(reason)

    def goodbye(self, status: int, reason: str) -> None:
        """The guest ended: tell the secondary to end too."""
        self._stopping.set()
        self._send_goodbye(status, reason)
        self.close()

    def retire(self) -> None:
        """A new pair takes over from this one (whose secondary is gone)."""
        self.close()

    def abandon(self, reason: str) -> None:
        """A protect attempt failed before protection began (the secondary
        refused, went away, or the link failed): nothing of this attempt
        stays attached, and the guest runs on alone."""
        log.error("protect: %s; the guest runs on unprotected", reason)
        self._lost.set()
        if self.disks is not None:
            self.disks.detach()
        hang_up(None, self.channel)
        self.status.set(state="alone", phase="idle", last_error=reason)

    def close(self) -> None:
        self._stopping.set()
        if self.network is not None:
            self.network.stop()
        if self.disks is not None:
            self.disks.detach()
        hang_up(self._heartbeat, self.channel)

    def _send_goodbye(self, status: int, reason: str) -> None:
        if self.channel is not None and not self._lost.is_set():
            try:
                self.channel.send(Msg.GOODBYE, [json.dumps({"status": status, "reason": reason}).encode()])
                self.channel.drain(self.options.heartbeat_timeout)  # the close that follows must not reset it away
            except ChannelError:
                pass

    # ---- losing the secondary ----------------------------------------------------------

    def _lose(self, reason: str) -> None:
        with self._lose_lock:
            if self._lost.is_set():
                return
            self._lost.set()
        if self.disks is not None:
            self.disks.lost = True
        fencing = bool(self.options.fence_command)
        self.status.set(state="fencing" if fencing else "alone", phase="idle")
        self.status.failover("secondary lost; the primary goes on alone", reason)
        self._inbox.put(None)  # a checkpoint in progress ends at once and gives its hold back
        hang_up(self._heartbeat, self.channel)
        if fencing:  # the guest runs on meanwhile; its network output stays held
            guarded("colo-fence", lambda: self._fence_then_go_on(reason), self._internal_error)
        elif self.network is not None:
            self.network.alone()

    def _fence_then_go_on(self, reason: str) -> None:
        if fence_peer(self.options.fence_command, "primary", self.status.peer, reason, self.options.fence_timeout):
            self.status.set(state="alone")
            if self.network is not None:
                self.network.alone()
            return
        self.status.set(state="fenced-out")
        self.machine.vm.request_exit(3, "could not fence the secondary: the primary stops to avoid a split brain")

    def _internal_error(self, thread: str, exc: BaseException) -> None:
        """A bug, not a lost peer: logged once with its traceback, then the
        secondary is told to end (it must not take over a guest that is still
        running here) and the primary goes on alone."""
        self._send_goodbye(4, f"the primary ended protection after an internal error in {thread}; it goes on alone")
        self._lose(f"internal error in {thread}: {type(exc).__name__}: {exc}")
        self.status.internal_error(thread, exc)  # after the state changed: never "colo" with an error listed

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
                if mtype == Msg.HEARTBEAT:
                    continue
                msg = Msg(mtype)
                with self._core_lock:
                    actions = self.core.on_message(msg)
                    switched = self.core.state is PState.SWITCHED
                for act in actions:
                    if act in _ON_RECEIVER:
                        self._do(act)
                self._inbox.put((msg, [a for a in actions if a not in _ON_RECEIVER]))
                if switched:
                    return  # the rest of the connection is the new pair's: not a byte more is read here
        except ChannelError as e:
            if not self._stopping.is_set():
                self._lose(str(e))
        except (ProtocolError, ValueError) as e:
            self._lose(f"protocol error: {e}")

    def _loop(self) -> None:
        while not self._lost.is_set() and not self._stopping.is_set() and not self._switched.is_set():
            triggered = self._trigger.wait(self.options.checkpoint_delay)
            self._trigger.clear()
            reason = self._reason if triggered else "timer"
            self._reason = "timer"
            if self._lost.is_set() or self._stopping.is_set() or self.machine.vm.exit is not None:
                return
            last = self._switch_wanted.is_set()
            try:
                self._take_checkpoint("switchover" if last else reason, last)
            except SecondaryLost:
                return
            except ProtocolError as e:
                self._lose(f"protocol error: {e}")
                return

    def _take_checkpoint(self, reason: str, last: bool = False) -> None:
        testhooks.hit("colo-checkpoints")
        self._seq += 1
        self._checkpoint = Checkpoint(self._seq, reason)
        self._checkpoint.mark("start")
        self.status.set(phase="requested")
        if self.network is not None:
            self.network.checkpoint_started()
        timeout = self.options.heartbeat_timeout * 3
        try:
            with self._core_lock:
                actions = self.core.switch() if last else self.core.start_checkpoint()
            for act in actions:
                self._do(act)
            # REPLY -> pause, capture, (resume), send; RECEIVED; LOADED -> (resume), done
            for expected, wait in ((Msg.CHECKPOINT_REPLY, timeout), (Msg.VMSTATE_RECEIVED, timeout),
                                   (Msg.VMSTATE_LOADED, timeout * 4)):  # fmt: skip
                for act in self._wait(expected, wait):
                    self._do(act)
        finally:
            self._release_guest()  # however the checkpoint ended
            self._checkpoint = None

    def _wait(self, expected: Msg, timeout: float) -> list[Act]:
        try:
            item = self._inbox.get(timeout=timeout)
        except queue.Empty:
            self._lose(f"no {expected.name} within {timeout:.1f} s")
            raise SecondaryLost()
        if item is None or self._lost.is_set():
            raise SecondaryLost()
        msg, actions = item
        if msg is not expected:  # the core's table makes this impossible; never go on regardless
            raise ProtocolError(f"{msg.name} arrived where {expected.name} was due")
        if msg is Msg.VMSTATE_RECEIVED:
            self._checkpoint.mark("received")
        return actions

    def _release_guest(self) -> None:
        if self._holding:
            self._holding = False
            self.machine.release("checkpoint")

    def _do(self, act: Act) -> None:
        ch = self.channel
        cp = self._checkpoint
        try:
            if act is Act.SEND_REQUEST:
                ch.send(Msg.CHECKPOINT_REQUEST)
            elif act is Act.PAUSE_VM:
                self.machine.hold("checkpoint")
                self._holding = True
                cp.mark("paused")
            elif act is Act.CAPTURE:
                self._capture(cp)
            elif act is Act.RESUME_VM:
                self._release_guest()
                cp.mark("resumed")
            elif act is Act.SEND_STATE:
                self.status.set(phase="sending")
                cp.mark("sent")
                ch.send(Msg.VMSTATE_SEND)
                ch.send(Msg.VMSTATE_SIZE, [cp.size.to_bytes(8, "little")])
                stall = testhooks.value("stall-transfer-ms")
                if stall:  # a test's failure point: halfway through the transfer
                    ch.send(Msg.VMSTATE_DATA, cp.parts, self._stall_marker, stall / 1000)
                else:
                    ch.send(Msg.VMSTATE_DATA, cp.parts)
                self.status.set(phase="waiting")
            elif act is Act.RELEASE_OUTPUT:
                if self.network is not None:  # on the receiver thread, in channel order (_ON_RECEIVER)
                    self.network.checkpoint_received(self._epoch)
            elif act is Act.CHECKPOINT_DONE:
                self.status.record(cp.record("primary"))
                self.status.set(phase="idle")
            elif act is Act.STOP_HEARTBEAT:
                self._heartbeat.stop_and_wait()
            elif act is Act.SEND_SWITCHOVER:
                ch.send(Msg.SWITCHOVER)
            elif act is Act.SWITCH_ROLES:
                self._switched.set()
            else:
                raise ProtocolError(f"the primary driver has no action {act}")
        except ChannelError as e:
            self._lose(str(e))
            raise SecondaryLost()

    def _capture(self, cp: Checkpoint) -> None:
        m = self.machine
        cap = vmstate.capture(m, self.dirty, vmstate.KIND_INCREMENTAL, None, self.host, self._ram_buffer)
        self._epoch += 1  # guest held, I/O thread parked: no write is being forwarded right now
        ram = cap.sections[-1].payload
        if len(self._ram_buffer) < len(ram):
            self._ram_buffer = bytearray(len(ram) + (1 << 20))  # grown once, reused afterwards
        cp.parts = sections.encode(cap.sections)
        cp.size = sections.encoded_size(cp.parts)
        cp.pages = cap.dirty_pages
        if self.options.verify_every and cp.seq % self.options.verify_every == 0:
            self.status.keep_hashes(cp.seq, {**vmstate.state_hashes(m, self.host, cap), **self.disks.hashes()})

    def _stall_marker(self, sent: int, total: int) -> None:
        if sent < 0:
            self.status.set(phase="sending-stalled")
