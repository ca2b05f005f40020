"""Layer 0: logging refusals without letting a flood of them flood the log.

A stranger can open connections faster than an operator can read log lines.
The first refusal in a window is logged in full; the rest are counted, and
the count is logged with the next refusal after the window (or by flush(),
when something worth saying happens, such as the real peer pairing).  The
operator sees that refusals happen, how many, and an example of why.
"""

from __future__ import annotations

import logging
import threading
import time

WINDOW_S = 10.0


class RefusalLog:
    def __init__(self, logger: logging.Logger, what: str, window: float = WINDOW_S):
        self._log = logger
        self._what = what  # "replication port", "control socket"
        self._window = window
        self._lock = threading.Lock()  # refusals come from several handshake threads
        self._next = 0.0  # when the next refusal may be logged in full
        self._counted = 0  # refusals not logged since the last line
        self.total = 0

    def refused(self, who: str, reason: str) -> None:
        with self._lock:
            self.total += 1
            now = time.monotonic()
            if now < self._next:
                self._counted += 1
                return
            self._flush_locked()
            self._log.warning("%s: refused %s: %s", self._what, who, reason)
            self._next = now + self._window

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._counted:
            self._log.warning("%s: refused %d more connection(s) in the last %.0f s (not logged one by one)",
                              self._what, self._counted, self._window)  # fmt: skip
            self._counted = 0
