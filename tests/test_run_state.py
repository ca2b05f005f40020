"""The one owner of the guest's run state (kvmcolo.run_state): holds for
any reason compose in any order and from any thread."""

from __future__ import annotations

import random
import threading

import pytest

from kvmcolo.run_state import RunState


class Guest:
    """Records the stop/go actions; checks they alternate."""

    def __init__(self):
        self.running = True
        self.actions = []

    def stop(self):
        assert self.running, "stopped twice"
        self.running = False
        self.actions.append("stop")

    def go(self):
        assert not self.running, "let run twice"
        self.running = True
        self.actions.append("go")


def test_guest_runs_only_when_no_hold_is_left():
    g = Guest()
    rs = RunState(g.stop, g.go)
    rs.hold("checkpoint")
    rs.set_operator(True)
    rs.release("checkpoint")
    assert not g.running and rs.operator_stopped and rs.holds() == {"operator": 1}
    rs.hold("snapshot")
    assert rs.set_operator(False) and not g.running  # the snapshot still has it
    rs.release("snapshot")
    assert g.running and g.actions == ["stop", "go"] and rs.holds() == {}


def test_operator_hold_is_idempotent():
    g = Guest()
    rs = RunState(g.stop, g.go)
    assert not rs.set_operator(False)  # cont without stop: nothing
    assert rs.set_operator(True) and not rs.set_operator(True)
    assert rs.set_operator(False) and g.running and g.actions == ["stop", "go"]


def test_counted_holds_nest_and_bad_release_changes_nothing():
    g = Guest()
    rs = RunState(g.stop, g.go)
    with rs.held("snapshot"):
        with rs.held("snapshot"):
            assert rs.holds() == {"snapshot": 2}
        assert not g.running
    assert g.running
    with pytest.raises(RuntimeError):
        rs.release("checkpoint")
    with pytest.raises(ValueError):
        rs.hold("typo")
    assert g.running and rs.holds() == {}


def test_failed_stop_takes_no_hold():
    def stop():
        raise TimeoutError("vcpu did not park")

    rs = RunState(stop, lambda: None)
    with pytest.raises(TimeoutError):
        rs.hold("checkpoint")
    assert rs.holds() == {} and not rs.stopped


def test_many_threads_in_any_order():
    g = Guest()
    rs = RunState(g.stop, g.go)
    errors = []

    def worker(seed):
        rnd = random.Random(seed)
        try:
            for _ in range(500):
                if rnd.random() < 0.3:
                    rs.set_operator(rnd.random() < 0.5)
                else:
                    with rs.held(rnd.choice(["checkpoint", "snapshot", "failover"])):
                        assert not g.running
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    rs.set_operator(False)
    assert g.running and rs.holds() == {}
