"""The live pre-copy's rules (issue 14, sans-IO): when to go on, when to
stop and copy, when to throttle, and what the status says.  Driven with the
numbers a real link and guest would give; no KVM needed."""

from __future__ import annotations

import pytest

from kvmcolo import precopy as P

MB = 10**6
PAGES_256M = (256 << 20) // P.PAGE_SIZE


def _round(core, sent_bytes, seconds, dirty):
    step = core.next_step()
    assert step.action == P.SEND
    return core.round_done(sent_bytes, seconds, dirty)


def test_an_idle_guest_stops_after_the_first_round():
    core = P.PrecopyCore(PAGES_256M)
    assert core.next_step() == P.Step(P.SEND, "all")
    assert _round(core, 256 << 20, 2.7, 50) == P.STOP_AND_COPY  # 50 pages at ~100 MB/s: 2 ms, twice for the stop
    step = core.next_step()
    assert step.action == P.STOP and "fits the downtime limit (4 ms)" in step.reason
    core.finished(0.004)
    assert core.state == P.DONE and core.status()["downtime_ms"] == 4.0 and core.next_step().action == P.NOTHING


def test_a_busy_guest_iterates_until_the_rest_fits():
    core = P.PrecopyCore(PAGES_256M)
    assert _round(core, 256 << 20, 2.7, 10_000) == P.ITERATING  # 41 MB left: ~410 ms to send, ~820 to stop
    assert core.next_step() == P.Step(P.SEND, "dirty")
    s = core.status()
    assert s["round"] == 2 and s["remaining_mib"] == pytest.approx(39.06, abs=0.01) and s["throttle_pct"] == 0
    assert 700 < s["expected_downtime_ms"] < 900 and s["dirty_pages_per_s"] == round(10_000 / 2.7)
    assert _round(core, 41 * MB, 0.41, 1_000) == P.STOP_AND_COPY  # 4 MB left: ~40 ms to send, ~80 to stop
    assert core.status()["expected_downtime_ms"] < 100


def test_a_guest_dirtying_faster_than_the_link_is_throttled_in_steps_then_stopped():
    core = P.PrecopyCore(PAGES_256M, P.Limits(max_rounds=100))
    _round(core, 256 << 20, 2.7, 60_000)  # first round: never a reason to throttle
    assert core.throttle_pct == 0
    seen = []
    while core.state == P.ITERATING:
        _round(core, 60_000 * P.PAGE_SIZE, 2.4, 60_000)  # dirties all it sends: hot every round
        seen.append(core.throttle_pct)
    # two hot rounds per step: 0, 20, 20, 30, 30, ... 99
    assert seen[:5] == [0, 20, 20, 30, 30] and max(seen) == P.THROTTLE_MAX
    assert core.state == P.STOP_AND_COPY and "still not converging" in core.stop_reason
    core.finished(2.5)
    assert core.throttle_pct == 0  # full speed after the switch


def test_a_cooling_round_resets_the_trigger():
    core = P.PrecopyCore(PAGES_256M, P.Limits(max_rounds=100))
    _round(core, 256 << 20, 2.7, 60_000)
    _round(core, 60_000 * P.PAGE_SIZE, 2.4, 60_000)  # hot
    _round(core, 60_000 * P.PAGE_SIZE, 2.4, 20_000)  # cool: the dirty set shrank below half
    _round(core, 20_000 * P.PAGE_SIZE, 0.8, 15_000)  # hot again, but only once in a row
    assert core.throttle_pct == 0 and core.state == P.ITERATING


def test_without_auto_converge_the_round_limit_stops_it():
    core = P.PrecopyCore(PAGES_256M, P.Limits(max_rounds=4, auto_converge=False))
    for _ in range(4):
        state = _round(core, 60_000 * P.PAGE_SIZE, 2.4, 60_000)
    assert state == P.STOP_AND_COPY and core.throttle_pct == 0
    assert "round limit 4 reached; expected downtime 4800 ms" in core.stop_reason


def test_events_out_of_order_and_impossible_rounds_are_refused():
    core = P.PrecopyCore(100)
    with pytest.raises(P.PrecopyError):
        core.finished(0.01)  # nothing has been stopped
    with pytest.raises(P.PrecopyError, match="impossible round"):
        core.round_done(4096, 0.1, 101)  # more dirty pages than the guest has
    core.round_done(100 * P.PAGE_SIZE, 0.01, 0)
    with pytest.raises(P.PrecopyError, match="not allowed in state stop-and-copy"):
        core.round_done(0, 0.01, 0)
    core.failed()
    assert core.state == P.FAILED and core.next_step().action == P.NOTHING


def test_limits_are_checked():
    for bad in (dict(max_downtime_s=0), dict(max_downtime_s=61), dict(max_rounds=0)):
        with pytest.raises(ValueError):
            P.Limits(**bad)
    assert P.Limits().max_downtime_s == 0.1  # below TCP's 200 ms minimum RTO


def test_every_transition_the_core_takes_is_in_the_table():
    targets = {t for rows in P.TRANSITIONS.values() for t in rows}
    assert targets == {P.ITERATING, P.STOP_AND_COPY, P.DONE, P.FAILED}
