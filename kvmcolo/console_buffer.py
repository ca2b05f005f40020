"""A serial-console sink that keeps what the guest printed and lets a caller
wait for a line matching a pattern.  Used by tests, benchmarks and tools that
drive a Machine in-process (the UART writes to any binary stream)."""

from __future__ import annotations

import re
import sys
import threading
import time


class ConsoleBuffer:
    """A binary stream for the guest's serial output that tests can wait on."""

    def __init__(self, echo: bool = False):
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._echo = echo

    def write(self, data: bytes) -> int:
        with self._cond:
            self._buf += data
            if b"\n" in data:  # waiters only look at complete lines
                self._cond.notify_all()
        if self._echo:
            sys.stderr.buffer.write(data)
        return len(data)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        with self._cond:
            return self._buf.decode(errors="replace")

    def lines(self) -> list[str]:
        return self.text.splitlines()

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match:
        """Wait until `pattern` (a regex) appears in a complete line at or
        after character `start` (the console arrives byte by byte: matching a
        line still being written would see half a number)."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                complete = self._buf[: self._buf.rfind(b"\n") + 1]
                m = rx.search(complete.decode(errors="replace"), start)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out waiting for {pattern!r}; console so far:\n{self.text[-3000:]}")
                self._cond.wait(min(left, 0.5))
