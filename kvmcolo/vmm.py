"""Layer 5: one running VMM process — a Machine, its snapshots and its
control socket — as `kvmcolo run` and `kvmcolo restore` start it."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from kvmcolo import switchover, vmstate, wire
from kvmcolo.argtypes import address
from kvmcolo.colo_disk import DiskViews
from kvmcolo.colo_session import ColoOptions
from kvmcolo.control import CommandError, ControlServer, QuitAfterReply
from kvmcolo.errors import UserError
from kvmcolo.snapshot import Snapshotter
from kvmcolo.threads import Periodic, guarded
from kvmcolo.vm import VmExit
from kvmcolo.wire import ChannelError

log = logging.getLogger(__name__)

# A COLO side whose peer is gone and which runs the guest by itself: the
# primary's survivor, or a secondary that took over.  Only these (or a VMM
# that never had a peer) can be protected again.
SURVIVOR_STATES = ("alone", "active")
STANDBY_BACKOFF_S = (1, 2, 4, 8, 10)
MIGRATED_LINGER_S = 1.0  # a migrated source answers 'migrated' this long before it ends  # between tries of the --standby hosts, then every 10 s


class Vmm:
    def __init__(self, machine, control_path: str, colo=None, standby: list[tuple[str, int]] = (),
                 disks: DiskViews | None = None):  # fmt: skip
        """`standby`: hosts (secondaries waiting there) to protect the guest
        with again, tried in turn with backoff, whenever it runs alone;
        `disks`: how the guest sees its disks (the caller closes it after the
        machine); by default its images, directly."""
        self.machine = machine
        self.disks = disks or DiskViews([image.path for image in machine.disk_images])
        self.colo = None  # a ColoPrimary or ColoSecondary, or None
        if colo is not None:
            self._adopt(colo)
        self.standby = list(standby)
        self._standby_tries = 0  # since the guest was last protected
        self._standby_next = 0.0
        self._standby_ticker = Periodic("standby", 0.2, self._standby_tick, self._standby_failed) if standby else None
        self._protect_lock = threading.Lock()
        self.snapshots = Snapshotter(machine)
        self.started = time.monotonic()
        self.control = ControlServer(
            control_path,
            {
                "query-status": self.query_status,
                "stop": self.stop,
                "cont": self.cont,
                "snapshot": self.snapshot,
                "query-stats": self.query_stats,
                "quit": self.quit,
                "query-state-hash": self.query_state_hash,
                "query-colo": self.query_colo,
                "colo-failover": self.colo_failover,
                "checkpoint": self.checkpoint,
                "serial-input": self.serial_input,
                "protect": self.protect,
                "migrate": self.migrate,
                "switchover": self.switchover,
            },
        )

    # ---- commands ---------------------------------------------------------

    def query_status(self) -> dict:
        m = self.machine
        run = m.run_state
        # What the operator asked for: "paused" after stop until cont.  A
        # checkpoint's own brief hold shows only in "holds".
        status = "exited" if m.vm.exit is not None else ("paused" if run.operator_stopped else "running")
        out = {"status": status, "pid": os.getpid(), "vcpus": len(m.vm.vcpus), "memory_mib": m.config.mem_size >> 20,
               "uptime_s": round(time.monotonic() - self.started, 3), "holds": run.holds()}  # fmt: skip
        if self.colo is not None:
            c = self.colo.status
            out["colo"] = {"role": c.role, "state": c.state, "peer": c.peer, "checkpoints": c.checkpoints,
                           "protected": c.protected()}  # fmt: skip
        return out

    def query_colo(self) -> dict:
        if self.colo is None:
            raise CommandError("this VMM is not running COLO")
        return self.colo.status.as_dict()

    def colo_failover(self) -> dict:
        """Declare the peer lost now (QEMU's x-colo-lost-heartbeat)."""
        if self.colo is None:
            raise CommandError("this VMM is not running COLO")
        if hasattr(self.colo, "fail_over"):
            self.colo.fail_over("failover requested on the control socket")
        else:
            self.colo.failover("failover requested on the control socket")
        return self.colo.status.as_dict()

    def checkpoint(self) -> dict:
        if self.colo is None or not hasattr(self.colo, "request_checkpoint"):
            raise CommandError("checkpoints are taken by a COLO primary")
        self.colo.request_checkpoint("requested on the control socket")
        return {"requested": True}

    def serial_input(self, data: str = "", break_first: bool = False) -> dict:
        """Type on the guest's serial line: `data` (each character one byte,
        U+0000-U+00FF), after a BREAK if asked (a Linux console's SysRq).
        On a COLO primary the secondary's UART gets the same state with the
        next checkpoint, as for anything else the primary's guest sees."""
        if not isinstance(data, str) or not isinstance(break_first, bool):
            raise CommandError("serial-input: data must be a string and break_first true or false")
        try:
            raw = data.encode("latin-1")
        except UnicodeEncodeError:
            raise CommandError("serial-input: data must be characters U+0000-U+00FF (one byte each)")
        if len(raw) > 4096:
            raise CommandError(f"serial-input: at most 4096 bytes at a time, not {len(raw)}")
        if break_first:
            self.machine.serial.send_break()
        self.machine.serial.feed(raw)
        return {"bytes": len(raw), "break": break_first}

    def protect(self, peer: str = "", key_file: str = "", options: dict | None = None) -> dict:
        """Make this guest the primary of a new pair, live (`kvmcolo protect`):
        a lone `kvmcolo run` guest, or a survivor of either side running
        alone.  Returns at once; the pre-copy's progress is in query-colo."""
        self._require_running_vm()
        self._require_alone()
        return self._start_protect(*_protect_arguments(peer, key_file, options))

    def migrate(self, peer: str = "", key_file: str = "", options: dict | None = None) -> dict:
        """Move this guest live to a `boot --incoming` VMM (`kvmcolo migrate`);
        this VMM then ends (status 0).  Refused while COLO protects the guest:
        it fails over instead (migrating a protected primary and keeping it
        protected is not built).  Returns at once; progress in query-colo."""
        self._require_running_vm()
        self._require_alone("migration is refused while COLO is {}: a protected guest fails over instead; "
                            "migrate a guest that runs alone")  # fmt: skip
        return self._start_protect(*_protect_arguments(peer, key_file, options), migrate=True)

    def switchover(self) -> dict:
        """Swap the pair's roles, planned (`kvmcolo switchover`, asked of the
        primary): one last checkpoint, then the secondary is the primary and
        this side its secondary, with nothing copied.  Returns at once; the
        outcome shows in query-colo (role, state, switchovers, last_error)."""
        self._require_running_vm()
        colo = self.colo
        if colo is None or not hasattr(colo, "switch_over"):
            raise CommandError("switchover is asked of the COLO primary" + ("" if colo is None else
                               ": this side is the secondary"))  # fmt: skip
        with self._protect_lock:
            if colo.status.state != "colo":
                raise CommandError(f"switchover needs a protected pair; COLO is {colo.status.state}")
            colo.status.set(state="switching", last_error=None)
        guarded("switchover", lambda: switchover.old_primary(self.machine, colo, self.disks, self._adopt),
                colo._internal_error)  # fmt: skip
        return colo.status.as_dict()

    def _adopt(self, colo) -> None:
        """`colo` drives this VMM's side of the pair from now on.  A secondary
        learns how to become the primary when a switchover reaches it."""
        self.colo = colo
        if hasattr(colo, "on_switchover"):
            colo.on_switchover = self._switched_to_primary

    def _switched_to_primary(self, secondary) -> None:
        guarded("switchover", lambda: switchover.old_secondary(self.machine, secondary, self._adopt),
                secondary._internal_error)  # fmt: skip

    def _migrate(self, colo) -> None:
        try:
            colo.migrate()
        except (UserError, ChannelError, OSError, vmstate.IncompatibleState) as e:
            colo.abandon(str(e))
            return
        # The guest runs on the destination now; this VMM lingers a moment so
        # `kvmcolo migrate` can read the result, then ends.
        time.sleep(MIGRATED_LINGER_S)
        self.machine.vm.request_exit(0, f"migrated to {colo.status.peer}")

    def _require_alone(self, refusal: str = "protection is already {}: only a guest that runs alone can be "
                       "protected") -> None:  # fmt: skip
        state = self.colo.status.state if self.colo is not None else None
        if state is not None and state not in SURVIVOR_STATES:
            raise CommandError(refusal.format(state))

    def _start_protect(self, address: tuple[str, int], key: bytes, options: ColoOptions,
                       migrate: bool = False) -> dict:  # fmt: skip
        """A new ColoPrimary takes over from the survivor's (if any) and
        protects the guest (or migrates it) on its own guarded thread."""
        from kvmcolo.colo_link import MODE_COLO, MODE_MIGRATE
        from kvmcolo.colo_primary import ColoPrimary

        with self._protect_lock:  # the operator and the standby thread may both try
            self._require_alone()
            current = self.colo
            colo = ColoPrimary(self.machine, address, key, options, current.status if current else None,
                               MODE_MIGRATE if migrate else MODE_COLO)  # fmt: skip
            colo.status.set(state="connecting", precopy=None, last_error=None)
            if current is not None:
                current.retire()  # the old pair's ports, disk forwarding and RAM cache go; new ones take over
            self.colo = colo
        if migrate:
            guarded("migrate", lambda: self._migrate(colo), colo._internal_error)
        else:
            guarded("protect", lambda: self._protect(colo), colo._internal_error)
        return colo.status.as_dict()

    def _standby_tick(self) -> None:
        """Heal by itself: a survivor tries its --standby hosts in turn, with
        backoff, until one accepts (a refusal or no answer is one log line
        per try, from the attempt)."""
        colo = self.colo
        if colo is None or self.machine.vm.exit is not None:
            return
        if colo.status.state == "colo":
            self._standby_tries = 0
            return
        if colo.status.state not in SURVIVOR_STATES or time.monotonic() < self._standby_next:
            return
        address = self.standby[self._standby_tries % len(self.standby)]
        delay = STANDBY_BACKOFF_S[min(self._standby_tries, len(STANDBY_BACKOFF_S) - 1)]
        self._standby_tries += 1
        self._standby_next = time.monotonic() + delay
        log.info("running alone: trying standby %s:%d for protection", *address)
        try:
            self._start_protect(address, colo.key, colo.options)
        except CommandError as e:  # protected meanwhile by the operator, say
            log.info("standby: %s", e)

    def _standby_failed(self, thread: str, exc: BaseException) -> None:
        log.error("internal error in %s: automatic re-protection stops", thread, exc_info=exc)

    def _protect(self, colo) -> None:
        try:
            colo.protect()
        except (UserError, ChannelError, OSError, vmstate.IncompatibleState) as e:
            colo.abandon(str(e))

    def stop(self) -> dict:
        """Stop the guest (idempotent).  A protected primary stays protected:
        checkpoints go on (cheaply: nothing runs), and the secondary stops
        with it at the next one."""
        self._require_own_guest("stop")
        if self.machine.run_state.set_operator(True):
            self._tell_colo("operator stop")
        return self.query_status()

    def cont(self) -> dict:
        self._require_own_guest("cont")
        if self.machine.run_state.set_operator(False):
            self._tell_colo("operator cont")
        return self.query_status()

    def snapshot(self, path: str, incremental: bool = False) -> dict:
        self._require_own_guest("snapshot")
        if not isinstance(path, str) or not path:
            raise CommandError("snapshot needs a file path")
        return self.snapshots.take(path, bool(incremental)).as_dict()

    def query_stats(self) -> dict:
        m = self.machine
        return {
            "vcpus": [{"index": v.index, "state": v.state.value, "exits": v.exits} for v in m.vm.vcpus],
            "devices": [{"name": t.name, "status": t.status, **getattr(t.device, "stats", {})} for t in m.virtio],
            "last_snapshot": self.snapshots.last_id,
        }

    def query_state_hash(self) -> dict:
        """Debug: hashes of all time-independent state (the guest must be stopped)."""
        self._require_running_vm()
        if not self.machine.paused:
            raise CommandError("stop the guest first: state is only stable while it is paused")
        from kvmcolo import vmstate

        return vmstate.state_hashes(self.machine, self.snapshots.host_caps())

    def quit(self) -> QuitAfterReply:
        return QuitAfterReply(None, lambda: self.machine.vm.request_exit(0, "quit requested on the control socket"))

    def _require_running_vm(self) -> None:
        if self.machine.vm.exit is not None:
            raise CommandError("the guest has already ended")

    def _require_own_guest(self, command: str) -> None:
        """A COLO secondary's guest follows the primary until it takes over."""
        self._require_running_vm()
        if self.colo is not None and self.colo.follows_peer():
            raise CommandError(f"this is a COLO secondary: its guest follows the primary; {command} it there")

    def _tell_colo(self, reason: str) -> None:
        """A primary checkpoints at once, so the secondary adopts the new run state."""
        if self.colo is not None and hasattr(self.colo, "request_checkpoint") and self.colo.status.protected():
            self.colo.request_checkpoint(reason)

    # ---- life ---------------------------------------------------------------

    @contextlib.contextmanager
    def _serving(self):
        """The control socket is up for the whole life of the guest; the COLO
        link (if any) and the socket are closed however the run ends."""
        self.control.start()
        log.info("control socket: %s", self.control.path)
        if self._standby_ticker is not None:
            self._standby_ticker.start()
        try:
            yield
        finally:
            if self._standby_ticker is not None:
                self._standby_ticker.stop()
            if self.colo is not None:
                self.colo.close()
            self.control.close()

    def run(self, paused: bool = False) -> VmExit:
        """Serve the control socket and run the guest until it ends
        (paused: built and served, but held until 'cont')."""
        if paused:
            # Held before the socket answers anyone: a client's first command
            # must find the guest paused, not race the hold.
            self.machine.start_paused()
        with self._serving():
            if not paused:
                self.machine.start()
            return self._wait_and_say_goodbye()

    def run_colo_primary(self) -> VmExit:
        """Boot, then protect: the guest is built and held while the live
        pre-copy (which converges at once on a guest that does not run)
        makes the secondary's copy, then runs with checkpoints."""
        with self._serving():
            self.machine.start_paused("start")
            self.colo.protect()
            self.machine.release("start")
            return self._wait_and_say_goodbye()

    def _wait_and_say_goodbye(self) -> VmExit:
        """Run until the guest ends; a primary (booted as one, or protected
        later) tells its secondary to end too."""
        result = self.machine.wait()
        if self.colo is not None and hasattr(self.colo, "goodbye"):
            self.colo.goodbye(result.status, result.reason)
        return result

    def run_incoming(self) -> VmExit:
        """A migration's destination: wait for the source's copy, then run
        the guest as this host's own."""
        with self._serving():
            self.colo.wait_for_primary()
            self.colo.run_incoming()
            self.machine.start()
            return self._wait_and_say_goodbye()  # (protected later, it is a primary)

    def run_colo_secondary(self) -> VmExit:
        """Wait for the primary, adopt its initial copy, run the SVM under checkpoints."""
        with self._serving():
            self.colo.wait_for_primary()
            self.machine.start()
            self.colo.start()
            return self._wait_and_say_goodbye()  # (after a switchover, it is the primary)


def _protect_arguments(peer, key_file, options) -> tuple[tuple[str, int], bytes, ColoOptions]:
    """The protect command's arguments, checked: each mistake one CommandError."""
    import dataclasses

    try:
        peer_address = address(peer, "protect: peer")
    except UserError as e:
        raise CommandError(str(e))
    if not isinstance(key_file, str) or not key_file:
        raise CommandError("protect: key_file must name the shared key file")
    try:
        key = wire.load_key(key_file)
    except UserError as e:
        raise CommandError(f"protect: {e}")
    fields = {f.name: f for f in dataclasses.fields(ColoOptions)}
    options = options if isinstance(options, dict) else {}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise CommandError(f"protect: unknown options {', '.join(unknown)}")
    for name, value in options.items():
        if value is not None and not isinstance(value, (int, float, str, bool)):
            raise CommandError(f"protect: option {name} must be a number, a string or true/false")
    try:
        colo_options = ColoOptions(**options)
    except (TypeError, ValueError) as e:
        raise CommandError(f"protect: {e}")
    if colo_options.heartbeat_timeout <= colo_options.heartbeat_interval:
        raise CommandError("protect: the heartbeat timeout must be longer than the heartbeat interval")
    return peer_address, key, colo_options
