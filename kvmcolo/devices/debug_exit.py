"""The debug-exit port (as QEMU's isa-debug-exit, at port 0xf4).

A guest write ends the VM; the VMM process exits with the low byte of the
value written.  (QEMU exits with (value << 1) | 1 so that status 0 can mean
"QEMU itself"; kvmcolo passes the guest's status through unchanged.)
"""

from __future__ import annotations

from typing import Callable

DEBUG_EXIT_PORT = 0xF4


class DebugExit:
    def __init__(self, request_exit: Callable[[int, str], None]):
        self._request_exit = request_exit

    def io_read(self, offset: int, size: int) -> int:
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        status = value & 0xFF
        self._request_exit(status, f"guest wrote {status} to the debug-exit port")
