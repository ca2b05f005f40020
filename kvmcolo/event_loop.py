"""Layer 2: the VMM's I/O thread.

One thread waits on every fd the devices care about (ioeventfds for queue
notifications, tap fds for received frames) and runs their callbacks, so no
device work ever runs on — or blocks — a vCPU thread.  A misbehaving
callback is logged once and removed; the VMM stays up.

Other threads hand work to the loop with call_soon(); pause()/resume() hold
the loop between callbacks (the checkpoint engine quiesces devices that way:
when pause() returns, no device request is half done).
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import threading
from typing import Callable

log = logging.getLogger(__name__)


class EventLoop:
    def __init__(self, name: str = "io"):
        self._selector = selectors.DefaultSelector()
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wakeup, selectors.EVENT_READ, None)
        self._pending: collections.deque[Callable[[], None]] = collections.deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._paused = threading.Event()
        self._resume = threading.Event()
        self._pause_lock = threading.Lock()

    # ---- registration (any thread) ----------------------------------------

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.call_soon(lambda: self._selector.register(fd, selectors.EVENT_READ, callback))
        if not self._thread.is_alive():  # before start(): register directly
            self._drain_pending()

    def remove_reader(self, fd: int) -> None:
        def remove():
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError):
                pass

        self.call_soon(remove)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run fn on the loop thread, soon.  Safe from any thread."""
        self._pending.append(fn)
        os.eventfd_write(self._wakeup, 1)

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # ---- life cycle ---------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._wakeup < 0:
            return
        self._stopping = True
        self._resume.set()
        os.eventfd_write(self._wakeup, 1)
        if self._thread.is_alive() and not self.in_loop_thread():
            self._thread.join(5)
        self._selector.close()
        os.close(self._wakeup)
        self._wakeup = -1

    def pause(self) -> None:
        """Hold the loop between callbacks; returns when it is held."""
        if not self._thread.is_alive():
            return
        self._pause_lock.acquire()
        self._paused.clear()
        self._resume.clear()

        def hold():
            self._paused.set()
            self._resume.wait()

        self.call_soon(hold)
        self._paused.wait()

    def resume(self) -> None:
        if self._pause_lock.locked():
            self._resume.set()
            self._pause_lock.release()

    # ---- the loop -----------------------------------------------------------

    def _drain_pending(self) -> None:
        while self._pending:
            fn = self._pending.popleft()
            self._guarded(fn)

    def _guarded(self, fn: Callable[[], None], fd: int | None = None) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a device bug must not kill the VMM
            log.error("I/O callback %s failed: %s%s", getattr(fn, "__qualname__", fn), exc,
                      f" (fd {fd} no longer watched)" if fd is not None else "")  # fmt: skip
            log.debug("callback failure", exc_info=True)
            if fd is not None:
                try:
                    self._selector.unregister(fd)
                except (KeyError, ValueError):
                    pass

    def _run(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select():
                if key.data is None:
                    try:
                        os.eventfd_read(self._wakeup)
                    except BlockingIOError:
                        pass
                    continue
                self._guarded(key.data, key.fd)
            self._drain_pending()
