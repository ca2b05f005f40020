"""The bit of the i8042 keyboard controller guests use to reset the machine.

Writing 0xFE (pulse the reset line) to the command port 0x64 ends the VM
cleanly; kvmcolo does not reboot guests.  Status reads say "no data, input
buffer empty" so a guest waiting for the controller never spins.
"""

from __future__ import annotations

from typing import Callable

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
CMD_RESET = 0xFE


class I8042:
    """Registered over ports 0x60-0x64 (offset 0 = data, offset 4 = command/status)."""

    def __init__(self, request_exit: Callable[[int, str], None]):
        self._request_exit = request_exit

    def io_read(self, offset: int, size: int) -> int:
        return 0  # data: nothing; status: output and input buffers empty

    def io_write(self, offset: int, size: int, value: int) -> None:
        if offset == I8042_COMMAND_PORT - I8042_DATA_PORT and value & 0xFF == CMD_RESET:
            self._request_exit(0, "guest requested a reset through the i8042")
