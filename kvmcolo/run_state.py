"""Layer 2: the one owner of whether the guest runs.

Everyone who needs the guest stopped takes a *hold* for a reason, and gives
it back when done; the guest runs exactly when no hold is left.  So an
operator's `stop`, a checkpoint, a snapshot and a failover compose in any
order, from any thread: a checkpoint taken while the operator has the guest
stopped leaves it stopped, and an operator's `cont` during a checkpoint
does not let the guest run before the checkpoint is done with it.

Rules:
- reasons are a fixed set (REASONS), so a typo cannot create a hold that is
  never released;
- counted holds (`hold`/`release`, or `held()` as a context manager) nest:
  two snapshots at once are two holds;
- the operator's hold is a flag (`set_operator`): `stop` twice is one hold,
  `cont` without a `stop` is a no-op — operators repeat themselves;
- releasing a hold that is not held is a bug in the caller: RuntimeError,
  and nothing changes;
- the stop and go actions run under the owner's lock, so a second holder
  waits until the guest is really stopped before it goes on.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from typing import Callable

OPERATOR = "operator"
REASONS = frozenset({OPERATOR, "checkpoint", "snapshot", "failover", "load", "start", "throttle", "precopy", "migrated",
                       "switchover"})


class RunState:
    def __init__(self, stop: Callable[[], None], go: Callable[[], None]):
        """`stop()` parks the guest completely; `go()` lets it run again."""
        self._stop = stop
        self._go = go
        self._lock = threading.Lock()
        self._holds: Counter[str] = Counter()
        self._stopped = False

    def hold(self, reason: str) -> None:
        _check(reason)
        with self._lock:
            self._hold_locked(reason)

    def release(self, reason: str) -> None:
        _check(reason)
        with self._lock:
            if self._holds[reason] <= 0:
                raise RuntimeError(f"no {reason!r} hold to release")
            self._release_locked(reason)

    @contextlib.contextmanager
    def held(self, reason: str):
        self.hold(reason)
        try:
            yield
        finally:
            self.release(reason)

    def set_operator(self, stopped: bool) -> bool:
        """The operator's stop (True) or cont (False); idempotent.  Returns
        whether anything changed."""
        with self._lock:
            if stopped == bool(self._holds[OPERATOR]):
                return False
            if stopped:
                self._hold_locked(OPERATOR)
            else:
                self._release_locked(OPERATOR)
            return True

    @property
    def stopped(self) -> bool:
        """The guest is parked (for whatever reason)."""
        return self._stopped

    @property
    def operator_stopped(self) -> bool:
        return bool(self._holds[OPERATOR])

    def holds(self) -> dict[str, int]:
        with self._lock:
            return {r: n for r, n in self._holds.items() if n}

    def _hold_locked(self, reason: str) -> None:
        if not self._stopped:
            self._stop()
            self._stopped = True
        self._holds[reason] += 1

    def _release_locked(self, reason: str) -> None:
        self._holds[reason] -= 1
        if not self._holds[reason]:
            del self._holds[reason]
        if not self._holds and self._stopped:
            self._go()
            self._stopped = False


def _check(reason: str) -> None:
    if reason not in REASONS:
        raise ValueError(f"unknown hold reason {reason!r}")
