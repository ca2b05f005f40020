"""Port 0x80, the PC's POST-code port: writes are accepted and counted.

Guests (and old firmware) write here as an I/O delay; the tiny `pio` guest
uses it to measure the cost of a port-I/O exit through the Python run loop.
"""

POST_CODE_PORT = 0x80


class PostCode:
    def __init__(self):
        self.writes = 0
        self.last = 0

    def io_read(self, offset: int, size: int) -> int:
        return self.last

    def io_write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1
        self.last = value
