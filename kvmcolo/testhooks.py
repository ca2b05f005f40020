"""Fault injection for tests: the one switch that lets a test break a
production path on purpose.

`KVMCOLO_TEST_HOOKS` holds comma-separated `point[:n]` items; the n-th time
(default 1st) the code passes `hit(point)`, the fault happens:
- `crash:<point>`   the process exits at once with status 70 (a power cut);
- any other point   InjectedFault is raised there (a bug in that thread);
- a value point     read with value(): `stall-transfer-ms:600` makes the
  primary stall 600 ms halfway through each checkpoint transfer.

Unset (as in production), `hit()` is one dictionary look-up.  Points in use:
`colo-checkpoints`, `colo-recv`, `heartbeat`, `colo-net-tick` (primary and
secondary), `colo-secondary`, and `crash:disk-apply` (inside the journaled
disk apply, after the journal is durable).
"""

from __future__ import annotations

import os
import threading


class InjectedFault(RuntimeError):
    """Raised where a test asked for a fault."""


def _parse(spec: str) -> dict[str, int]:
    points = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, count = item.rpartition(":") if item.rsplit(":", 1)[-1].isdigit() else (item, "", "1")
        points[name] = int(count or 1)
    return points


_armed = _parse(os.environ.get("KVMCOLO_TEST_HOOKS", ""))
_lock = threading.Lock()


def armed(point: str) -> bool:
    return point in _armed


def value(point: str, default: int = 0) -> int:
    """A number a test set for `point` (`point:n`), e.g. `stall-transfer-ms:600`."""
    return _armed.get(point, default)


def hit(point: str) -> None:
    """Pass the point named `point`; fault here if a test asked for it."""
    if point not in _armed:
        return
    with _lock:
        _armed[point] -= 1
        due = _armed[point] == 0
    if not due:
        return
    if point.startswith("crash:"):
        os._exit(70)
    raise InjectedFault(f"fault injected at {point}")
