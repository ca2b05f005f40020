"""A real COLO primary and secondary in this process, over a socketpair:
real KVM machines and the real drivers and Vmm (its operator commands
called directly), no namespaces, no subprocesses — so the transaction,
failover and operator actions are tested in seconds."""

from __future__ import annotations

import os
import socket
import threading

from conftest import ConsoleSink, wait_until
from kvmcolo.colo_primary import ColoPrimary
from kvmcolo.colo_secondary import ColoSecondary
from kvmcolo.colo_session import ColoOptions
from kvmcolo.machine import Machine, MachineConfig
from kvmcolo.vmm import Vmm


class InProcessPair:
    def __init__(self, tmp_path, kernel: str, cmdline: str, mem: int = 64 << 20, **options):
        self.options = ColoOptions(**{"checkpoint_delay": 0.05, "verify_every": 2, **options})
        key = os.urandom(32)
        self.console_a, self.console_b = ConsoleSink(), ConsoleSink()
        self.pm = Machine(MachineConfig(kernel=kernel, cmdline=cmdline, mem_size=mem, serial_output=self.console_a))
        self.sm = Machine(MachineConfig(kernel="", mem_size=mem, serial_output=self.console_b), boot_kernel=False)
        self.primary = ColoPrimary(self.pm, ("socketpair", 0), key, self.options)
        self.secondary = ColoSecondary(self.sm, None, key, self.options)
        self.vmm_a = Vmm(self.pm, str(tmp_path / "a.sock"), self.primary)
        self.vmm_b = Vmm(self.sm, str(tmp_path / "b.sock"), self.secondary)
        sa, sb = socket.socketpair()
        self._sockets = (sa, sb)
        errors = []

        def secondary_side():
            try:
                self.secondary.wait_for_primary(sock=sb)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        t = threading.Thread(target=secondary_side)
        t.start()
        self.pm.start_paused("start")  # boot, then protect (as `kvmcolo boot --primary` does)
        try:
            self.primary.protect(sock=sa)
        finally:
            t.join(60)
        if errors:
            raise errors[0]
        self.pm.release("start")
        self.sm.start()
        self.secondary.start()

    def checkpoints(self) -> int:
        return self.primary.status.checkpoints

    def wait_checkpoints(self, n: int, timeout: float = 30) -> int:
        return wait_until(lambda: self.checkpoints() >= n and self.checkpoints(), f"{n} checkpoints", timeout)

    def cut(self) -> None:
        """The link dies under both (shutdown: both receivers see it at once)."""
        for s in self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        for colo in (self.vmm_a.colo, self.vmm_b.colo):  # (after a switchover, not the ones made here)
            colo.close()
        for m in (self.pm, self.sm):
            m.vm.request_exit(0, "test over")
            m.close()
        for s in self._sockets:
            s.close()
