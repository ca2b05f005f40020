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
