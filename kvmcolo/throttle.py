"""Layer 3: slowing a guest's vCPUs down (the pre-copy's auto-converge).

At `pct` percent the guest is held for pct% of every PERIOD_S, through the
run-state owner with the reason "throttle", so it composes with everything
else that stops the guest: an operator's stop stays a stop, a checkpoint
during a throttle slice waits for no one.  QEMU sleeps each vCPU thread for
its share of a 10 ms timeslice; here a stop costs a kick of every vCPU (an
exit each), so the slice is longer.  precopy.py decides the percentage;
this only applies it.
"""

from __future__ import annotations

import logging
import threading

from kvmcolo.run_state import RunState
from kvmcolo.threads import guarded

log = logging.getLogger(__name__)

PERIOD_S = 0.050
REASON = "throttle"


class Throttle:
    def __init__(self, run_state: RunState, on_error=None):
        self._run_state = run_state
        self._on_error = on_error or (lambda name, e: log.error("%s failed: %s", name, e))
        self._pct = 0
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.slices = 0  # how many times the guest was held (for status and tests)

    @property
    def pct(self) -> int:
        return self._pct

    def set(self, pct: int) -> None:
        """Hold the guest pct% of the time from now on (0: not at all)."""
        if not 0 <= pct < 100:
            raise ValueError(f"throttle must be 0-99 %, got {pct}")
        with self._changed:
            if pct and self._pct == 0:
                log.info("throttling the guest to %d%% of its CPU time so the pre-copy converges", 100 - pct)
            elif pct != self._pct:
                log.info("guest throttle: %d%% -> %d%%", self._pct, pct)
            self._pct = pct
            if pct and self._thread is None:
                self._thread = guarded("throttle", self._run, self._on_error)
            self._changed.notify_all()

    def stop(self) -> None:
        """Throttle no more; returns when no throttle hold is left."""
        with self._changed:
            self._stopping = True
            self._pct = 0
            self._changed.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._pct == 0 and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return
                held = PERIOD_S * self._pct / 100
            with self._run_state.held(REASON):
                self.slices += 1
                with self._changed:  # a set() or stop() ends the slice early
                    self._changed.wait(held)
            with self._changed:
                if not self._stopping:
                    self._changed.wait(PERIOD_S - held)
