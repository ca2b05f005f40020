"""Running the `netsrv` guest on a tap inside a network namespace, for tests
and benchmarks: the VMM is a real `kvmcolo run` process in the namespace,
and clients (Python sockets, ping, curl, nc) run there too."""

from __future__ import annotations

from kvmcolo.netns import Namespace
from vmm_process import GuestProcess, kvmcolo_exe

HOST_ADDR = "192.168.77.1"
GUEST_ADDR = "192.168.77.2"
ECHO_PORT, UDP_PORT, COUNTER_PORT, HTTP_PORT = 7, 7, 9000, 80


class NetsrvGuest:
    """A namespace with a tap (host side HOST_ADDR/24) and netsrv behind it."""

    def __init__(self, role: str = "net", extra_args: list[str] = (), guest_args: list[str] = ()):
        self.ns = Namespace(role)
        try:
            self.ns.add_tap("tap0", f"{HOST_ADDR}/24")
            self.vmm = GuestProcess(self.ns.cmd(kvmcolo_exe(), "run", *extra_args, "--image", "netsrv", "--net",
                                                "tap=tap0", "--", f"ip={GUEST_ADDR}", *guest_args))  # fmt: skip
            self.ready = self.vmm.wait_line(r"netsrv: ready ip=(\S+) mac=(\S+)", timeout=60)
        except BaseException:
            self.ns.delete()
            raise

    def close(self) -> None:
        try:
            self.vmm.stop()
        finally:
            self.ns.delete()
