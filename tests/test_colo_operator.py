"""Operator actions on a protected VM: stop/cont, snapshots, checkpoints and
failover in any order, and faults inside COLO threads.  After each, the
SVM's state equals the PVM's at the next verified checkpoint and the
survivor of a later failover keeps its invariants."""

from __future__ import annotations

import pytest

from colo_pair import ColoPair, passes
from conftest import wait_until
from kvmcolo.errors import UserError
from test_colo import assert_same_state, check_survivor, progress_mark

VM = ["--image", "dirty", "--mem", "64M"]
DIRTY = ["pages=500", "report=500"]
VERIFY = ["--verify-every", "2"]
FAST = ["--checkpoint-delay", "100", *VERIFY]


@pytest.fixture
def pair_of(images, tmp_path):
    """pair_of(**ColoPair options): a dirty-guest pair, closed after the test."""
    made = []

    def make(**kw) -> ColoPair:
        made.append(ColoPair(tmp_path, VM, DIRTY, primary_args=kw.pop("primary_args", FAST),
                             secondary_args=kw.pop("secondary_args", VERIFY), **kw))  # fmt: skip
        return made[-1]

    yield make
    for pair in made:
        pair.close()


def checkpoints(pair: ColoPair) -> int:
    return pair.colo("a")["checkpoints"]


def kill_primary_and_check(pair: ColoPair) -> None:
    mark = progress_mark(pair)
    pair.primary.proc.kill()
    check_survivor(pair, "b", pair.secondary, mark)


def assert_healthy(pair: ColoPair) -> None:
    for side in ("a", "b"):
        c = pair.colo(side)
        assert c["state"] == "colo" and c["protected"] and not c["internal_errors"], c
    n = checkpoints(pair)
    pair.wait_checkpoints(pair.tmp / "a.sock", n + 6)  # and checkpoints go on (>= 2 verified ones)
    assert_same_state(pair, at_least=3)
    assert not any("FAIL" in line or "Traceback" in line for line in pair.primary.all_lines() + pair.secondary.all_lines())


def test_stop_keeps_protection_and_the_secondary_stops_with_it(pair_of, tmp_path):
    pair = pair_of()
    for _ in range(3):
        pair.primary.call("stop")
        status = pair.primary.call("query-status")
        assert status["status"] == "paused" and status["colo"]["protected"]
        before = checkpoints(pair)
        # The SVM mirrors the primary's run state from the next checkpoint on.
        wait_until(lambda: pair.secondary.call("query-status")["holds"].get("operator"), "the SVM stopped too")
        frozen = max(passes(pair.primary.lines), default=0)
        pair.wait_checkpoints(tmp_path / "a.sock", before + 5)  # 5 intervals: checkpoints go on ...
        assert pair.primary.call("query-status")["status"] == "paused"  # ... and no checkpoint undid the stop
        assert max(passes(pair.primary.lines), default=0) <= frozen + 1  # (a line may still be in flight)
        assert_same_state(pair, at_least=2)
        pair.primary.call("cont")
        assert pair.primary.call("query-status")["status"] == "running"
        wait_until(lambda: max(passes(pair.primary.lines), default=0) > frozen, "the guest ran again")
    wait_until(lambda: not pair.secondary.call("query-status")["holds"], "the SVM running again")
    assert_healthy(pair)
    kill_primary_and_check(pair)


@pytest.mark.parametrize("commands", [("cont",), ("stop", "cont")], ids=["cont-hammered", "stop-cont-racing"])
def test_operator_commands_racing_checkpoints(pair_of, commands):
    """Operator commands as fast as the control socket takes them, for 30
    checkpoints; the last command is cont."""
    pair = pair_of(primary_args=["--checkpoint-delay", "50", *VERIFY])
    start, i = checkpoints(pair), 0
    while checkpoints(pair) < start + 30:
        pair.primary.call(commands[i % len(commands)])
        i += 1
    pair.primary.call("cont")
    assert pair.primary.call("query-status")["status"] == "running"
    assert_healthy(pair)
    kill_primary_and_check(pair)


def test_snapshots_on_the_primary_leave_checkpoints_complete(pair_of, tmp_path):
    pair = pair_of()
    files = [tmp_path / f"s{i}.snap" for i in range(4)]
    pair.primary.call("snapshot", path=str(files[0]))
    for f in files[1:]:
        pair.wait_checkpoints(tmp_path / "a.sock", checkpoints(pair) + 2)
        assert pair.primary.call("snapshot", path=str(f), incremental=True)["kind"] == "incremental"
    assert_healthy(pair)
    kill_primary_and_check(pair)


def test_checkpoint_and_failover_while_stopped(pair_of, tmp_path):
    pair = pair_of()
    pair.primary.call("stop")
    before = checkpoints(pair)
    for _ in range(3):
        pair.primary.call("checkpoint")
    pair.wait_checkpoints(tmp_path / "a.sock", before + 3)
    assert_same_state(pair, at_least=2)
    wait_until(lambda: pair.secondary.call("query-status")["holds"].get("operator"), "the SVM stopped too")
    # The primary gives up its secondary while stopped: it stays stopped.
    pair.primary.call("colo-failover")
    status = pair.primary.call("query-status")
    assert status["status"] == "paused" and not status["colo"]["protected"]
    assert status["colo"]["state"] == "alone"
    mark = max(passes(pair.primary.lines), default=0)
    pair.primary.call("cont")
    check_survivor(pair, "a", pair.primary, mark)


def test_secondary_takes_over_a_stopped_guest_stopped(pair_of, tmp_path):
    pair = pair_of()
    pair.primary.call("stop")
    wait_until(lambda: pair.secondary.call("query-status")["holds"].get("operator"), "the SVM stopped too")
    mark = max(passes(pair.primary.lines), default=0)
    pair.primary.proc.kill()
    pair.wait_failover("b")
    status = pair.secondary.call("query-status")
    assert status["status"] == "paused" and status["colo"]["state"] == "active"
    pair.secondary.call("cont")  # now its own guest
    check_survivor(pair, "b", pair.secondary, mark)


def test_secondary_refuses_operator_actions_on_the_primarys_guest(pair_of, tmp_path):
    pair = pair_of()
    for command, args in (("stop", {}), ("cont", {}), ("snapshot", {"path": str(tmp_path / "x.snap")})):
        with pytest.raises(UserError, match="COLO secondary: its guest follows the primary"):
            pair.secondary.call(command, **args)
    assert not (tmp_path / "x.snap").exists()
    assert_healthy(pair)


# ---- faults inside COLO threads: a defined end, never zombie protection ---------------


@pytest.mark.parametrize("point", ["colo-checkpoints:3", "colo-recv:20", "heartbeat:3"])
def test_internal_error_on_the_primary_ends_protection(pair_of, tmp_path, point):
    pair = pair_of(start=False)
    pair.start_secondary(VM, VERIFY)
    env = {"KVMCOLO_TEST_HOOKS": point}
    pair.start_primary(VM, DIRTY, FAST, wait=False, env=env)
    pair.wait_socket(pair.primary, tmp_path / "a.sock")
    a = wait_until(lambda: (c := pair.colo("a"))["internal_errors"] and c, "the fault was reported")
    assert a["state"] == "alone" and not a["protected"]
    assert "InjectedFault" in a["internal_errors"][0] and a["failovers"]
    # The secondary was told to end rather than take over a guest that runs on.
    assert pair.secondary.proc.wait(15) == 4
    start = len(pair.primary.lines)
    pair.primary.wait_line(r"dirty: pass=\d+ ok", start=start)
    assert pair.primary.proc.poll() is None
    assert any("internal error in" in line for line in pair.primary.stderr_lines)


@pytest.mark.parametrize("point", ["colo-secondary:30", "heartbeat:3"])
def test_internal_error_on_the_secondary_ends_it(pair_of, tmp_path, point):
    pair = pair_of(start=False)
    pair.start_secondary(VM, VERIFY, env={"KVMCOLO_TEST_HOOKS": point})
    pair.start_primary(VM, DIRTY, FAST, wait=False)
    assert pair.secondary.proc.wait(30) == 4
    assert any("internal error in" in line for line in pair.secondary.stderr_lines)
    a = pair.wait_failover("a")
    assert a["state"] == "alone" and not a["protected"]
    start = len(pair.primary.lines)
    pair.primary.wait_line(r"dirty: pass=\d+ ok", start=start)
