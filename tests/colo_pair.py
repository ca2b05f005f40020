"""Two hosts (network namespaces hostA and hostB joined by a veth replication
link) running a guest under COLO as two real `kvmcolo boot` processes."""

from __future__ import annotations

import os
import re
import subprocess
import time

from kvmcolo import control
from kvmcolo.netns import Namespace
from vmm_process import GuestProcess, kvmcolo_exe

ADDR_A, ADDR_B = "192.168.99.1", "192.168.99.2"
PORT = 7777


class ColoPair:
    def __init__(self, tmp_path, vm_args: list[str], guest_args: list[str] = (), primary_args: list[str] = (),
                 secondary_args: list[str] = (), start: bool = True, primary_env: dict | None = None):  # fmt: skip
        self.tmp = tmp_path
        self.key = tmp_path / "colo.key"
        self.key.write_bytes(os.urandom(24).hex().encode())
        self.a = Namespace("hostA")
        self.b = Namespace("hostB")
        self.primary: GuestProcess | None = None
        self.secondary: GuestProcess | None = None
        try:
            self.a.ip("link", "add", "repA", "type", "veth", "peer", "name", "repB", "netns", self.b.name)
            self.a.ip("addr", "add", f"{ADDR_A}/24", "dev", "repA")
            self.b.ip("addr", "add", f"{ADDR_B}/24", "dev", "repB")
            self.a.ip("link", "set", "repA", "up")
            self.b.ip("link", "set", "repB", "up")
            if start:
                self.start_secondary(vm_args, secondary_args)
                self.start_primary(vm_args, guest_args, primary_args, env=primary_env)
        except BaseException:
            self.close()
            raise

    def start_secondary(self, vm_args, extra=(), key=None, port: int = PORT, env=None, side: str = "b",
                        role: str = "secondary") -> GuestProcess:  # fmt: skip
        """A secondary on host B (or on host A, once B's survivor is to be
        protected); role="incoming": a live migration's destination."""
        ns, addr = (self.b, ADDR_B) if side == "b" else (self.a, ADDR_A)
        proc = GuestProcess(ns.cmd(
            kvmcolo_exe(), "boot", f"--{role}", "--listen", f"{addr}:{port}", "--key-file", str(key or self.key),
            "--control", str(self.tmp / f"{side}.sock"), *extra, *vm_args), env)  # fmt: skip
        self.wait_socket(proc, self.tmp / f"{side}.sock")
        if side == "b":
            self.secondary = proc
        return proc

    def start_primary(self, vm_args, guest_args=(), extra=(), key=None, port: int = PORT, wait: bool = True,
                      env=None):  # fmt: skip
        self.primary = GuestProcess(self.a.cmd(
            kvmcolo_exe(), "boot", "--primary", "--peer", f"{ADDR_B}:{port}", "--key-file", str(key or self.key),
            "--control", str(self.tmp / "a.sock"), *extra, *vm_args, "--", *guest_args), env)  # fmt: skip
        if wait:
            self.wait_socket(self.primary, self.tmp / "a.sock")
            self.wait_checkpoints(self.tmp / "a.sock", 2)
        return self.primary

    def start_alone(self, vm_args, guest_args=(), env=None) -> GuestProcess:
        """An unprotected guest on host A (`kvmcolo run`), for `protect`."""
        self.primary = GuestProcess(self.a.cmd(
            kvmcolo_exe(), "run", "--control", str(self.tmp / "a.sock"), *vm_args, "--", *guest_args), env)  # fmt: skip
        self.wait_socket(self.primary, self.tmp / "a.sock")
        return self.primary

    def protect(self, extra=(), key=None, port: int = PORT, timeout: float = 120,
                side: str = "a", command: str = "protect") -> subprocess.CompletedProcess:  # fmt: skip
        """`kvmcolo protect` (or `migrate`) host A's guest with host B as the
        secondary (or B's with A: side="b"); returns when it has."""
        peer = ADDR_B if side == "a" else ADDR_A
        return subprocess.run([kvmcolo_exe(), command, "--peer", f"{peer}:{port}", "--key-file",
                               str(key or self.key), "--control", str(self.tmp / f"{side}.sock"), *extra],
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

    @staticmethod
    def wait_socket(proc: GuestProcess, sock, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sock.exists():
                try:
                    control.call(str(sock), "query-status")
                    return
                except Exception:  # noqa: BLE001 - not up yet
                    pass
            if proc.proc.poll() is not None:
                raise AssertionError("VMM exited:\n" + "\n".join(proc.lines[-10:] + proc.stderr_lines[-15:]))
            time.sleep(0.05)
        raise AssertionError("control socket never came up")

    def colo(self, side: str) -> dict:
        return control.call(str(self.tmp / f"{side}.sock"), "query-colo")

    def wait_checkpoints(self, sock, n: int, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c = control.call(str(sock), "query-colo")["checkpoints"]
            if c >= n:
                return c
            time.sleep(0.05)
        raise AssertionError(f"fewer than {n} checkpoints within {timeout} s")

    def wait_phase(self, side: str, phase: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.colo(side)["phase"] == phase:
                return
            time.sleep(0.005)
        raise AssertionError(f"{side} never reached phase {phase!r}")

    def wait_failover(self, side: str, timeout: float = 10, before: int = 0) -> dict:
        """query-colo once `side` has recorded more than `before` failovers
        (a secondary adopts its primary's history, so count from what it had)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c = self.colo(side)
            if len(c["failovers"]) > before:
                return c
            time.sleep(0.02)
        raise AssertionError(f"{side} reported no failover within {timeout} s")

    def cut_link(self) -> None:
        self.a.ip("link", "set", "repA", "down")

    def close(self) -> None:
        for p in (self.primary, self.secondary):
            if p is not None:
                p.stop(timeout=5)
        self.a.delete()
        self.b.delete()


def passes(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.search(r"dirty: pass=(\d+) ok", line))]
