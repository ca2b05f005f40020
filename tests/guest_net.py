"""Running the `netsrv` guest on a tap inside a network namespace, for tests
and benchmarks: the VMM is a real `kvmcolo run` process in the namespace,
and clients (Python sockets, ping, curl, nc) run there too."""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from kvmcolo.netns import Namespace

HOST_ADDR = "192.168.77.1"
GUEST_ADDR = "192.168.77.2"
ECHO_PORT, UDP_PORT, COUNTER_PORT, HTTP_PORT = 7, 7, 9000, 80


class GuestProcess:
    """A `kvmcolo run` subprocess whose console lines can be awaited."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: list[str] = []
        self._new = queue.Queue()
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr_lines, False), daemon=True).start()

    def _pump(self, stream, into: list[str], notify: bool) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))
            if notify:
                self._new.put(None)
        if notify:
            self._new.put(None)

    def wait_line(self, pattern: str, timeout: float = 30.0) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if m := rx.search(line):
                    return m
            seen = len(self.lines)
            if self.proc.poll() is not None and self._new.empty():
                raise AssertionError(f"VMM exited ({self.proc.returncode}) before {pattern!r}:\n"
                                     + "\n".join(self.lines[-20:] + self.stderr_lines[-20:]))  # fmt: skip
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}:\n" + "\n".join(self.lines[-20:]))
            try:
                self._new.get(timeout=min(left, 0.5))
            except queue.Empty:
                pass

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def kvmcolo_exe() -> str:
    return str(Path(sys.executable).parent / "kvmcolo")


class NetsrvGuest:
    """A namespace with a tap (host side HOST_ADDR/24) and netsrv behind it."""

    def __init__(self, role: str = "net", extra_args: list[str] = (), guest_args: list[str] = ()):
        self.ns = Namespace(role)
        try:
            self.ns.add_tap("tap0", f"{HOST_ADDR}/24")
            self.vmm = GuestProcess(self.ns.cmd(kvmcolo_exe(), "run", "--image", "netsrv", "--net", "tap=tap0",
                                                *extra_args, "--", f"ip={GUEST_ADDR}", *guest_args))  # fmt: skip
            self.ready = self.vmm.wait_line(r"netsrv: ready ip=(\S+) mac=(\S+)", timeout=60)
        except BaseException:
            self.ns.delete()
            raise

    def close(self) -> None:
        try:
            self.vmm.stop()
        finally:
            self.ns.delete()
