"""Protecting a guest that already runs (`kvmcolo protect`): the live
pre-copy copies it while it runs, stops it once for about the downtime
limit, and COLO goes on from there — for a lone `kvmcolo run` guest and
for a survivor after its secondary was lost.  Real VMMs in two namespaced
hosts."""

from __future__ import annotations

import pytest

from colo_pair import ColoPair, passes
from conftest import kvmcolo_cmd, wait_until
from test_colo import assert_same_state, check_survivor, progress_mark
from test_colo_operator import DIRTY, FAST, VERIFY, VM

PROTECT = FAST  # checkpoints every 100 ms, every 2nd verified on both sides


@pytest.fixture
def hosts(images, tmp_path):
    pair = ColoPair(tmp_path, VM, start=False)
    yield pair
    pair.close()


def run_alone_for_a_while(pair: ColoPair) -> int:
    """A lone guest, running unprotected for a few progress reports."""
    guest = pair.start_alone(VM, DIRTY)
    guest.wait_line(r"dirty: pass=\d+ ok")
    guest.wait_line(r"dirty: pass=\d+ ok", start=len(guest.lines))
    return max(passes(guest.lines))


def assert_protected(pair: ColoPair) -> dict:
    a = pair.colo("a")
    assert a["state"] == "colo" and a["protected"] and not a["internal_errors"], a
    pair.wait_checkpoints(pair.tmp / "a.sock", a["checkpoints"] + 6)
    assert_same_state(pair, at_least=3)  # RAM, every register set and the devices, checkpoint after checkpoint
    return pair.colo("a")


def test_protect_a_running_guest_live(hosts):
    pair = hosts
    before = run_alone_for_a_while(pair)
    pair.start_secondary(VM, VERIFY)
    done = pair.protect(PROTECT)
    assert done.returncode == 0, done.stderr + "\n".join(pair.primary.stderr_lines[-20:])
    assert "protected by" in done.stdout
    assert any("pre-copy round 1:" in line for line in pair.primary.stderr_lines)  # progress, said as it happened
    a = assert_protected(pair)
    (protection,) = a["protections"]
    assert protection["rounds"] >= 1 and protection["sent_mib"] > 0
    # The guest ran on through the copy (it did not start over) and stopped
    # once, for about the limit: the stop is the rest of the dirty pages, not RAM.
    assert min(passes(pair.primary.lines[-3:])) > before
    assert a["precopy"]["state"] == "done" and a["precopy"]["throttle_pct"] == 0
    assert protection["downtime_ms"] < 1000, protection
    # The new secondary is a real one: it takes over when the primary dies.
    mark = progress_mark(pair)
    pair.primary.proc.kill()
    check_survivor(pair, "b", pair.secondary, mark)


def test_a_guest_that_dirties_faster_than_the_link_is_throttled_then_set_free(hosts):
    pair = hosts
    run_alone_for_a_while(pair)
    pair.start_secondary(VM, VERIFY)
    # 4 MiB/s for the pre-copy against a guest that rewrites 2 MiB flat out:
    # it never fits 100 ms by itself.
    done = pair.protect([*PROTECT, "--max-bandwidth", "4"])
    assert done.returncode == 0, done.stderr + "\n".join(pair.primary.stderr_lines[-20:])
    # The throttle was said as it happened, in the log and in the progress.
    assert any("throttling the guest" in line for line in pair.primary.stderr_lines), pair.primary.stderr_lines
    assert "guest throttled" in done.stderr, done.stderr
    a = assert_protected(pair)
    p = a["precopy"]
    assert p["state"] == "done" and p["throttle_pct"] == 0 and p["stop_reason"], p
    status = pair.primary.call("query-status")
    assert status["status"] == "running" and "throttle" not in status["holds"], status
    start = len(pair.primary.lines)
    pair.primary.wait_line(r"dirty: pass=\d+ ok", start=start)


def test_protect_with_the_wrong_key_is_refused_and_the_guest_runs_on(hosts, tmp_path):
    pair = hosts
    run_alone_for_a_while(pair)
    other = tmp_path / "other.key"
    other.write_bytes(b"another-secret-of-enough-length")
    pair.start_secondary(VM, VERIFY, key=other)
    done = pair.protect(PROTECT)
    assert done.returncode == 1
    (line,) = [x for x in done.stderr.splitlines() if x.strip()]
    assert "protect failed" in line and "Traceback" not in done.stderr
    a = pair.colo("a")
    assert a["state"] == "alone" and not a["protected"] and a["last_error"]
    assert pair.primary.call("query-status")["holds"] == {}
    start = len(pair.primary.lines)
    pair.primary.wait_line(r"dirty: pass=\d+ ok", start=start)  # untouched: it runs on
    assert pair.secondary.proc.poll() is None  # and the secondary still waits for the right primary


def test_bad_protect_arguments_are_one_line_each(hosts, tmp_path):
    pair = hosts
    pair.start_alone(VM, DIRTY)
    for extra, expected in ((["--max-downtime", "0"], "--max-downtime"), (["--heartbeat-timeout", "50"], "heartbeat")):
        done = pair.protect(extra)
        assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr, done.stderr
    done = pair.protect(key=tmp_path / "missing.key")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "colo" not in pair.primary.call("query-status")  # nothing was started


def test_switchover_where_it_cannot_happen_is_one_line(images, tmp_path):
    """`kvmcolo switchover` at the secondary, and at a survivor running
    alone: one line, exit 2, and nothing changes."""
    pair = ColoPair(tmp_path, VM, DIRTY, primary_args=PROTECT, secondary_args=VERIFY)
    try:
        done = kvmcolo_cmd("switchover", "--control", str(pair.tmp / "b.sock"))
        assert done.returncode == 2 and "this side is the secondary" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and not done.stdout, done.stderr
        pair.secondary.proc.kill()
        pair.wait_failover("a")
        done = kvmcolo_cmd("switchover", "--control", str(pair.tmp / "a.sock"))
        assert done.returncode == 2 and "needs a protected pair; COLO is alone" in done.stderr, done.stderr
        assert pair.colo("a")["state"] == "alone" and pair.primary.call("query-status")["holds"] == {}
    finally:
        pair.close()


def test_a_survivor_is_protected_again_by_a_new_secondary(images, tmp_path):
    pair = ColoPair(tmp_path, VM, DIRTY, primary_args=PROTECT, secondary_args=VERIFY)
    try:
        pair.secondary.proc.kill()  # host B dies; A goes on alone
        a = pair.wait_failover("a")
        assert a["state"] == "alone" and not a["protected"], a
        pair.secondary.proc.wait(10)
        pair.start_secondary(VM, VERIFY)  # host B is back, as a new secondary
        done = pair.protect(PROTECT)
        assert done.returncode == 0, done.stderr + "\n".join(pair.primary.stderr_lines[-20:])
        a = assert_protected(pair)
        assert len(a["protections"]) == 2 and len(a["failovers"]) == 1, a  # the history survives
        shown = kvmcolo_cmd("status", "--control", str(pair.tmp / "a.sock")).stdout
        assert shown.count(" protected by ") == 2 and shown.count(" failover: ") == 1, shown  # in time order
        mark = progress_mark(pair)
        pair.primary.proc.kill()
        check_survivor(pair, "b", pair.secondary, mark, before=1)  # B knew of A's earlier failover
    finally:
        pair.close()


def test_protect_is_refused_while_protected(images, tmp_path):
    pair = ColoPair(tmp_path, VM, DIRTY, primary_args=PROTECT, secondary_args=VERIFY)
    try:
        done = pair.protect(PROTECT)
        assert done.returncode == 2 and "already colo" in done.stderr, done.stderr
        wait_until(lambda: pair.colo("a")["checkpoints"] > 3, "checkpoints go on")
        assert pair.colo("a")["state"] == "colo"
    finally:
        pair.close()


def test_a_secondarys_survivor_is_protected_by_the_host_that_came_back(images, tmp_path):
    pair = ColoPair(tmp_path, VM, DIRTY, primary_args=PROTECT, secondary_args=VERIFY)
    try:
        old_primary = pair.primary
        mark = progress_mark(pair)
        old_primary.proc.kill()  # host A dies; B takes over
        check_survivor(pair, "b", pair.secondary, mark)
        old_primary.proc.wait(10)
        new_secondary = pair.start_secondary(VM, VERIFY, side="a")  # host A is back, as B's secondary
        done = pair.protect(PROTECT, side="b")
        assert done.returncode == 0, done.stderr + "\n".join(pair.secondary.stderr_lines[-20:])
        b = pair.colo("b")
        assert b["role"] == "primary" and b["state"] == "colo" and b["protected"], b
        pair.wait_checkpoints(pair.tmp / "b.sock", b["checkpoints"] + 6)
        p, s = pair.colo("b")["hashes"], pair.colo("a")["hashes"]  # B is the primary now
        common = sorted(set(p) & set(s), key=int)
        assert len(common) >= 3 and all(p[k] == s[k] for k in common), (p, s)
        # And the pair works the other way round: B dies, A takes over.
        pair.primary, pair.secondary = pair.secondary, new_secondary
        mark = max(passes(pair.primary.lines), default=0)
        pair.wait_checkpoints(pair.tmp / "b.sock", pair.colo("b")["checkpoints"] + 2)
        pair.primary.proc.kill()
        check_survivor(pair, "a", new_secondary, mark, before=1)
    finally:
        pair.close()


def test_a_migration_destination_refuses_protect_then_takes_the_migration(hosts):
    pair = hosts
    run_alone_for_a_while(pair)
    destination = pair.start_secondary(VM, role="incoming")
    done = pair.protect(PROTECT)
    assert done.returncode == 1 and "waits for a migration" in done.stderr, done.stderr
    assert destination.proc.poll() is None  # the operator's mistake: the destination waits on
    assert pair.colo("a")["state"] == "alone"
    done = pair.protect(command="migrate")
    assert done.returncode == 0, done.stderr + "\n".join(pair.primary.stderr_lines[-20:])
    assert pair.primary.proc.wait(10) == 0  # the source ends once the guest runs there
    b = pair.colo("b")
    assert b["state"] == "active" and b["migrations"] and not b["protected"], b
    last_there = max(passes(pair.primary.lines))
    start = len(destination.lines)
    m = destination.wait_line(r"dirty: pass=(\d+) ok", start=start)  # the guest goes on there, its checks passing
    assert int(m.group(1)) >= last_there  # on, not over
    assert not any("FAIL" in line for line in destination.lines)
