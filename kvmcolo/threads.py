"""Threads that cannot fail silently.

A COLO thread that dies of an unexpected exception must not leave the
status saying "colo" while nothing replicates.  Every such thread runs
through `guarded()`: an exception is handed to `on_error` (which logs it
with its traceback once, counts it, and ends protection in a defined way),
never swallowed, never repeated.
"""

from __future__ import annotations

import threading
from typing import Callable

ErrorHandler = Callable[[str, BaseException], None]  # (thread name, exception)


def guarded(name: str, target: Callable[[], None], on_error: ErrorHandler) -> threading.Thread:
    """A started daemon thread running `target`; an exception goes to `on_error`."""

    def run() -> None:
        try:
            target()
        except Exception as e:  # noqa: BLE001 - handed on, never swallowed
            on_error(name, e)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


class Periodic:
    """Calls `fn` every `interval` seconds on its own guarded thread until
    stopped (or until `fn` raises: then `on_error`, and no more calls)."""

    def __init__(self, name: str, interval: float, fn: Callable[[], None], on_error: ErrorHandler):
        self.name = name
        self._interval = interval
        self._fn = fn
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = guarded(self.name, self._run, self._on_error)

    def stop(self) -> None:
        self._stop.set()

    def stop_and_wait(self, timeout: float = 5.0) -> None:
        """Stop, and return only once a call under way has finished (never
        from `fn` itself): after it, `fn` has done its last thing."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._fn()
