"""The COLO transaction, operator actions, failover and internal faults,
driven in-process (tests/colo_inprocess.py): seconds, not namespaces."""

from __future__ import annotations

import re

import pytest

from colo_inprocess import InProcessPair
from conftest import wait_until
from kvmcolo import testhooks


@pytest.fixture
def pair(images, tmp_path):
    p = InProcessPair(tmp_path, str(images / "dirty.elf"), "pages=300 report=200")
    yield p
    p.close()


def same_state(pair: InProcessPair, at_least: int = 2) -> None:
    wait_until(lambda: len(set(pair.primary.status.hashes) & set(pair.secondary.status.hashes)) >= at_least,
               f"{at_least} verified checkpoints on both sides")  # fmt: skip
    p, s = pair.primary.status.hashes, pair.secondary.status.hashes
    for seq in set(p) & set(s):
        differing = sorted(k for k in p[seq] if p[seq][k] != s[seq].get(k))
        assert not differing, f"checkpoint {seq}: SVM differs in {differing}"


def dirty_pass(console) -> int:
    return max((int(m.group(1)) for m in re.finditer(r"dirty: pass=(\d+) ok", console.text)), default=0)


def test_lockstep_and_operator_actions(pair, tmp_path):
    pair.wait_checkpoints(6)
    same_state(pair)
    # stop: protected, checkpoints go on, the SVM stops with it
    pair.vmm_a.stop()
    n = pair.checkpoints()
    pair.wait_checkpoints(n + 5)
    assert pair.vmm_a.query_status()["colo"]["protected"]
    wait_until(lambda: pair.sm.run_state.operator_stopped, "the SVM stopped with the PVM")
    pair.vmm_a.checkpoint()
    pair.vmm_a.snapshot(str(tmp_path / "s0.snap"))
    pair.vmm_a.snapshot(str(tmp_path / "s1.snap"), incremental=True)
    pair.vmm_a.cont()
    wait_until(lambda: not pair.sm.run_state.operator_stopped, "the SVM running again")
    for _ in range(100):
        pair.vmm_a.cont()
    before = len(pair.secondary.status.hashes)
    wait_until(lambda: len(pair.secondary.status.hashes) > before + 2 or len(pair.secondary.status.hashes) == 20,
               "more verified checkpoints")  # fmt: skip
    same_state(pair)
    assert pair.primary.status.state == "colo" and not pair.primary.status.internal_errors
    # the secondary's guest is the primary's
    from kvmcolo.control import CommandError

    with pytest.raises(CommandError):
        pair.vmm_b.stop()


def test_failover_while_stopped_keeps_the_guest_stopped(pair):
    pair.wait_checkpoints(4)
    pair.vmm_a.stop()
    wait_until(lambda: pair.sm.run_state.operator_stopped, "the SVM stopped with the PVM")
    pair.cut()
    wait_until(lambda: pair.secondary.status.state == "active", "the secondary took over")
    wait_until(lambda: pair.primary.status.state == "alone", "the primary alone")
    assert pair.vmm_b.query_status()["status"] == "paused"
    mark = dirty_pass(pair.console_b)
    pair.vmm_b.cont()  # its own guest now
    wait_until(lambda: dirty_pass(pair.console_b) > mark, "the survivor runs on")
    assert "FAIL" not in pair.console_b.text


def test_injected_fault_in_the_checkpoint_thread_ends_protection(pair, monkeypatch):
    pair.wait_checkpoints(3)
    monkeypatch.setattr(testhooks, "_armed", {"colo-checkpoints": 1})
    wait_until(lambda: pair.primary.status.internal_errors, "the fault reported")
    assert pair.primary.status.state == "alone" and not pair.primary.status.protected()
    # The secondary was told to end: its VMM exits 4 rather than take over.
    assert wait_until(lambda: pair.sm.vm.exit, "the secondary ending").status == 4
    mark = dirty_pass(pair.console_a)
    wait_until(lambda: dirty_pass(pair.console_a) > mark, "the primary runs on alone")


def _same_hashes(primary_status, secondary_status, at_least: int = 2) -> None:
    wait_until(lambda: len(set(primary_status.hashes) & set(secondary_status.hashes)) >= at_least,
               f"{at_least} verified checkpoints on both sides")  # fmt: skip
    p, s = primary_status.hashes, secondary_status.hashes
    for seq in set(p) & set(s):
        differing = sorted(k for k in p[seq] if p[seq][k] != s[seq].get(k))
        assert not differing, f"checkpoint {seq}: the secondary differs in {differing}"


def _switch(old_primary_vmm, old_secondary_vmm) -> None:
    old = old_primary_vmm.colo
    old_primary_vmm.switchover()
    wait_until(lambda: old_primary_vmm.colo is not old and old_primary_vmm.colo.status.state == "colo"
               and old_secondary_vmm.colo.status.state == "colo", "the roles swapped")  # fmt: skip
    assert old_primary_vmm.colo.status.role == "secondary" and old_secondary_vmm.colo.status.role == "primary"


def test_switchover_swaps_roles_without_a_copy_and_back(pair):
    """The roles swap on the same link; checkpoints then go the other way,
    with verified-equal state; the guest never goes back (its own progress
    counter only grows); and back again."""
    pair.wait_checkpoints(4)
    _same_hashes(pair.primary.status, pair.secondary.status)
    for a, b, console in ((pair.vmm_a, pair.vmm_b, pair.console_b), (pair.vmm_b, pair.vmm_a, pair.console_a)):
        mark = dirty_pass(console)
        _switch(a, b)
        primary, secondary = b.colo, a.colo
        wait_until(lambda: primary.status.checkpoints >= 4, "checkpoints from the new primary")
        _same_hashes(primary.status, secondary.status)
        wait_until(lambda: dirty_pass(console) > mark, "the guest runs on at the new primary")
        assert not primary.status.internal_errors and not secondary.status.internal_errors
        assert [len(primary.status.switchovers)] == [len(secondary.status.switchovers)]
        assert "switchover" not in {**primary.machine.run_state.holds(), **secondary.machine.run_state.holds()}
    assert len(pair.vmm_a.colo.status.switchovers) == 2  # the history travels with the pair
    assert "FAIL" not in pair.console_a.text + pair.console_b.text


def test_switchover_is_refused_where_it_cannot_happen(pair):
    from kvmcolo.control import CommandError

    pair.wait_checkpoints(2)
    with pytest.raises(CommandError, match="this side is the secondary"):
        pair.vmm_b.switchover()
    pair.cut()
    wait_until(lambda: pair.primary.status.state == "alone", "the primary alone")
    with pytest.raises(CommandError, match="needs a protected pair; COLO is alone"):
        pair.vmm_a.switchover()
