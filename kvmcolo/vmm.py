"""Layer 5: one running VMM process — a Machine, its snapshots and its
control socket — as `kvmcolo run` and `kvmcolo restore` start it."""

from __future__ import annotations

import contextlib
import logging
import os
import time

from kvmcolo.control import CommandError, ControlServer, QuitAfterReply
from kvmcolo.snapshot import Snapshotter
from kvmcolo.vm import VmExit

log = logging.getLogger(__name__)


class Vmm:
    def __init__(self, machine, control_path: str, colo=None):
        self.machine = machine
        self.colo = colo  # a ColoPrimary or ColoSecondary, or None
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
        try:
            yield
        finally:
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
            return self.machine.wait()

    def run_colo_primary(self) -> VmExit:
        """Connect, make the initial copy, then run the guest with checkpoints."""
        with self._serving():
            self.colo.connect()
            self.colo.initial_copy()
            self.colo.start()
            self.machine.start()
            result = self.machine.wait()
            self.colo.goodbye(result.status, result.reason)
            return result

    def run_colo_secondary(self) -> VmExit:
        """Wait for the primary, adopt its initial copy, run the SVM under checkpoints."""
        with self._serving():
            self.colo.wait_for_primary()
            self.machine.start()
            self.colo.start()
            return self.machine.wait()
