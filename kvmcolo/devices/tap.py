"""Layer 2: a tap interface as a packet backend for virtio-net.

The tap is attached with TUNSETIFF (IFF_TAP | IFF_NO_PI).  A name that does
not exist yet creates a tap owned by this process, which the kernel removes
when the VMM exits — even after SIGKILL, so a crash leaves nothing behind.
pyroute2 looks the interface up and brings it up.  An existing tap (made by
the user, e.g. `ip tuntap add mode tap NAME` and added to a bridge) is
attached as it is and left in place at exit.

A backend moves whole frames between the tap and scatter lists of guest
memory (readv/writev), so frames are never copied through Python buffers.
"""

from __future__ import annotations

import errno
import itertools
import os
import re

from pyroute2 import IPRoute

from kvmcolo.errors import UserError
from kvmcolo.kvm_ffi import lib

TUN_DEVICE = "/dev/net/tun"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def _link_index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


class TapBackend:
    def __init__(self, name: str | None = None):
        with IPRoute() as ipr:
            if name is None:
                name = next(f"kvmcolo{i}" for i in itertools.count() if _link_index(ipr, f"kvmcolo{i}") is None)
            elif not _NAME_RE.match(name):
                raise UserError(f"bad tap name {name!r}: 1-15 letters, digits, '_', '-' or '.'")
            self.existed = _link_index(ipr, name) is not None
            try:
                self.fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                raise UserError(f"{TUN_DEVICE} does not exist: load the tun module (modprobe tun)")
            except PermissionError:
                raise UserError(f"no permission to open {TUN_DEVICE}: run as root or with CAP_NET_ADMIN")
            r = lib.kvmcolo_tap_attach(self.fd, name.encode(), 0)
            if r < 0:
                os.close(self.fd)
                why = os.strerror(-r)
                if -r == errno.EBUSY:
                    why = "it is in use by another process"
                elif -r == errno.EINVAL and self.existed:
                    why = "it exists but is not a tap"
                raise UserError(f"cannot attach tap {name!r}: {why}")
            index = _link_index(ipr, name)
            ipr.link("set", index=index, state="up")
        self.name = name

    def join_bridge(self, bridge: str) -> None:
        """Make the tap a port of `bridge` (the host's way to the LAN)."""
        with IPRoute() as ipr:
            master = _link_index(ipr, bridge)
            if master is None:
                raise UserError(f"bridge {bridge!r} does not exist (create it: ip link add {bridge} type bridge)")
            try:
                ipr.link("set", index=_link_index(ipr, self.name), master=master)
            except Exception as e:  # noqa: BLE001 - pyroute2 raises NetlinkError with the errno
                raise UserError(f"cannot add tap {self.name!r} to bridge {bridge!r}: {e}")

    def leave_bridge(self) -> None:
        """Take the tap off whatever bridge it is a port of (a primary that
        becomes a secondary: its guest must not meet the LAN)."""
        with IPRoute() as ipr:
            try:
                ipr.link("set", index=_link_index(ipr, self.name), master=0)
            except Exception as e:  # noqa: BLE001 - pyroute2 raises NetlinkError with the errno
                raise UserError(f"cannot take tap {self.name!r} off its bridge: {e}")

    def drain(self) -> int:
        """Throw away every frame queued on the tap; returns how many."""
        n = 0
        while True:
            try:
                os.read(self.fd, 65536)
            except BlockingIOError:
                return n
            n += 1

    def fileno(self) -> int:
        return self.fd

    def recv_into(self, views: list[memoryview]) -> int:
        """Read one frame into `views`; BlockingIOError when none is queued."""
        return os.readv(self.fd, views)

    def send(self, views: list[memoryview]) -> int:
        """Send one frame gathered from `views`."""
        return os.writev(self.fd, views)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # a tap we created disappears with its last fd
            self.fd = -1
