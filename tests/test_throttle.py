"""The vCPU throttle (issue 14's auto-converge) on a real RunState: it holds
the guest in slices, composes with an operator's stop, and leaves nothing
held when it ends."""

from __future__ import annotations

import threading

import pytest

from conftest import wait_until
from kvmcolo.run_state import OPERATOR, RunState
from kvmcolo.throttle import REASON, Throttle


class Guest:
    """What RunState's stop/go callbacks do to a guest: here, a flag."""

    def __init__(self):
        self.running = True
        self.stops = 0
        self.lock = threading.Lock()

    def stop(self):
        with self.lock:
            self.running = False
            self.stops += 1

    def go(self):
        with self.lock:
            self.running = True


@pytest.fixture
def throttled():
    guest = Guest()
    rs = RunState(guest.stop, guest.go)
    return guest, rs, Throttle(rs)


def test_throttle_holds_the_guest_in_slices_and_lets_it_go_at_the_end(throttled):
    guest, rs, t = throttled
    t.set(50)
    wait_until(lambda: t.slices >= 3, "three throttle slices", timeout=5)
    assert guest.stops >= 3
    t.set(80)
    assert t.pct == 80
    t.stop()
    assert REASON not in rs.holds() and guest.running


def test_an_operator_stop_outlasts_the_throttle(throttled):
    guest, rs, t = throttled
    t.set(90)
    wait_until(lambda: t.slices >= 1, "a throttle slice", timeout=5)
    rs.set_operator(True)
    t.stop()
    assert rs.holds() == {OPERATOR: 1} and not guest.running  # still the operator's stop
    rs.set_operator(False)
    assert guest.running


def test_zero_means_not_at_all_and_the_range_is_checked(throttled):
    guest, _, t = throttled
    t.set(0)
    assert t.slices == 0 and guest.stops == 0  # no thread was even started
    for bad in (-1, 100):
        with pytest.raises(ValueError):
            t.set(bad)
    t.stop()
