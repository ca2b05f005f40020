"""Network namespaces as stand-in hosts, for tests, benchmarks and the demo.

One machine plays several hosts: each Namespace is a host with its own
interfaces, addresses and routes.  Namespaces are created with iproute2 and
always removed again (deleting a namespace deletes its interfaces); names
carry the creating process's pid so parallel runs never collide and a
leftover from a killed run is recognisable.

Sockets are opened inside a namespace with `with ns.entered():` — the
socket keeps the namespace it was created in after the block ends.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Iterator

from pyroute2 import netns as _pyroute2_netns


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Namespace:
    def __init__(self, role: str):
        self.name = f"kvmcolo-{role}-{os.getpid()}"
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)  # a leftover
        _ip("netns", "add", self.name)
        self.ip("link", "set", "lo", "up")

    def ip(self, *args: str) -> None:
        _ip("-n", self.name, *args)

    def cmd(self, *argv: str) -> list[str]:
        """argv prefixed to run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(*argv), capture_output=True, text=True, timeout=timeout, check=check)

    def popen(self, *argv: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*argv), **kw)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the block (this thread) inside the namespace."""
        _pyroute2_netns.pushns(self.name)
        try:
            yield
        finally:
            _pyroute2_netns.popns()

    def add_tap(self, name: str, cidr: str) -> None:
        """A persistent tap with a host-side address, for a VMM to attach to."""
        self.ip("tuntap", "add", "mode", "tap", "name", name)
        self.ip("addr", "add", cidr, "dev", name)
        self.ip("link", "set", name, "up")

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)

    def __enter__(self) -> Namespace:
        return self

    def __exit__(self, *exc) -> None:
        self.delete()
