"""Layer 4 core (sans-IO): the rules of a live pre-copy (issue 14).

One engine for protecting a running guest, live migration and
re-protection: while the guest runs, send all of RAM, then again and again
the pages dirtied meanwhile, until what is left fits the downtime limit;
then stop the guest and send the rest with the vCPU, VM and device state.
A guest that dirties faster than the link is throttled in steps, as QEMU's
auto-converge does.  This module decides; a driver does the sending, reads
the dirty log (through its one owner) and applies the throttle.

    core = PrecopyCore(total_pages, limits)
    while (step := core.next_step()).action is SEND:     # step.pages: which set to send
        ... send those pages, then:
        core.round_done(sent_bytes, seconds, dirty_pages_now)
    # step.action is STOP_AND_COPY: stop the guest, send the rest, resume elsewhere
    core.finished(downtime_s)

Every decision and its inputs are in `status()` for the log and `kvmcolo
status`.  The transitions are the table below; the numbers only choose
between the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PAGE_SIZE = 4096

# Why 100 ms: below Linux's minimum TCP retransmission timeout (200 ms), so a
# client's connection never times out a segment during the stop; QEMU's
# default is 300 ms for a general VM, but a protected service's clients are
# what kvmcolo exists for.
DEFAULT_MAX_DOWNTIME_S = 0.100
DEFAULT_MAX_ROUNDS = 30
# Auto-converge (QEMU's cpu-throttle-initial / -increment / -max): a round in
# which the guest dirtied more than half of what the link moved, twice in a
# row, takes the throttle a step up.
THROTTLE_INITIAL, THROTTLE_STEP, THROTTLE_MAX = 20, 10, 99
DIRTY_TO_SENT_TRIGGER = 0.5
TRIGGER_ROUNDS = 2
# The stop costs more than sending the rest: capture (copying the pages out
# of the held guest), the transfer, and the peer verifying, applying and
# loading it run one after the other, while a round's sends overlap the
# peer's work.  Measured here (benchmarks/bench_precopy.py, 256 MiB-1 GiB,
# 1,000-10,000 dirty pages per 100 ms) the stop took 1.5-2.1 times the rest's
# transfer time at the rounds' bandwidth; the core plans with twice.
STOP_COST_FACTOR = 2.0

# states
FULL, ITERATING, STOP_AND_COPY, DONE, FAILED = "full", "iterating", "stop-and-copy", "done", "failed"
# what the driver does next
SEND, STOP, NOTHING = "send", "stop", "nothing"

# (state, event) -> next state; `round_done` picks between its rows by the numbers
TRANSITIONS: dict[tuple[str, str], tuple[str, ...]] = {
    (FULL, "round_done"): (ITERATING, STOP_AND_COPY),
    (ITERATING, "round_done"): (ITERATING, STOP_AND_COPY),
    (STOP_AND_COPY, "finished"): (DONE,),
    (FULL, "failed"): (FAILED,),
    (ITERATING, "failed"): (FAILED,),
    (STOP_AND_COPY, "failed"): (FAILED,),
}


class PrecopyError(Exception):
    """An event the pre-copy's state does not allow (a driver bug)."""


@dataclass(frozen=True)
class Limits:
    max_downtime_s: float = DEFAULT_MAX_DOWNTIME_S
    max_rounds: int = DEFAULT_MAX_ROUNDS
    auto_converge: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.max_downtime_s <= 60:
            raise ValueError(f"max downtime must be in (0, 60] s, got {self.max_downtime_s}")
        if self.max_rounds < 1:
            raise ValueError(f"max rounds must be at least 1, got {self.max_rounds}")


@dataclass(frozen=True)
class Step:
    action: str  # SEND, STOP or NOTHING
    pages: str = ""  # for SEND: "all" (the first round) or "dirty" (what the log holds now)
    reason: str = ""  # for STOP: why now


@dataclass
class _Round:
    sent_bytes: int
    seconds: float
    dirty_pages: int  # dirtied while this round was sent: the next round's work


@dataclass
class PrecopyCore:
    total_pages: int
    limits: Limits = Limits()
    state: str = FULL
    rounds: list[_Round] = field(default_factory=list)
    throttle_pct: int = 0
    stop_reason: str = ""
    downtime_s: float | None = None
    _hot_rounds: int = 0

    # ---- events --------------------------------------------------------------

    def next_step(self) -> Step:
        if self.state == FULL:
            return Step(SEND, "all")
        if self.state == ITERATING:
            return Step(SEND, "dirty")
        if self.state == STOP_AND_COPY:
            return Step(STOP, reason=self.stop_reason)
        return Step(NOTHING)

    def round_done(self, sent_bytes: int, seconds: float, dirty_pages: int) -> str:
        """A round was sent in `seconds`; `dirty_pages` were dirtied meanwhile.
        Returns the new state."""
        if sent_bytes < 0 or seconds < 0 or not 0 <= dirty_pages <= self.total_pages:
            raise PrecopyError(f"impossible round: {sent_bytes} bytes, {seconds} s, {dirty_pages} dirty pages")
        self.rounds.append(_Round(sent_bytes, seconds, dirty_pages))
        expected = self.expected_downtime_s()
        if expected is not None and expected <= self.limits.max_downtime_s:
            return self._go(STOP_AND_COPY, "round_done", f"the rest fits the downtime limit ({expected * 1e3:.0f} ms)")
        if len(self.rounds) >= self.limits.max_rounds:
            reason = f"round limit {self.limits.max_rounds} reached; expected downtime {_ms(expected)}"
            return self._go(STOP_AND_COPY, "round_done", reason)
        if self.throttle_pct >= THROTTLE_MAX and self._hot(self.rounds[-1]):
            return self._go(STOP_AND_COPY, "round_done", f"throttled to {THROTTLE_MAX}% and still not converging; "
                                                         f"expected downtime {_ms(expected)}")  # fmt: skip
        self._converge(self.rounds[-1])
        return self._go(ITERATING, "round_done")

    def finished(self, downtime_s: float) -> None:
        self.downtime_s = downtime_s
        self.throttle_pct = 0  # the guest runs at full speed after the switch
        self._go(DONE, "finished")

    def failed(self) -> None:
        self.throttle_pct = 0
        self._go(FAILED, "failed")

    # ---- estimates -----------------------------------------------------------

    def bandwidth(self) -> float | None:
        """Bytes per second, over the last rounds that moved enough to measure."""
        recent = [r for r in self.rounds[-3:] if r.seconds > 0 and r.sent_bytes > 0]
        if not recent:
            return None
        return sum(r.sent_bytes for r in recent) / sum(r.seconds for r in recent)

    def remaining_bytes(self) -> int:
        if not self.rounds:
            return self.total_pages * PAGE_SIZE
        return self.rounds[-1].dirty_pages * PAGE_SIZE

    def expected_downtime_s(self) -> float | None:
        bw = self.bandwidth()
        if bw is None:
            return None
        return STOP_COST_FACTOR * self.remaining_bytes() / bw

    def dirty_rate(self) -> float | None:
        """Pages dirtied per second during the last round."""
        if not self.rounds or self.rounds[-1].seconds <= 0:
            return None
        return self.rounds[-1].dirty_pages / self.rounds[-1].seconds

    def status(self) -> dict:
        bw, expected, rate = self.bandwidth(), self.expected_downtime_s(), self.dirty_rate()
        return {
            "state": self.state, "round": len(self.rounds) + (1 if self.state in (FULL, ITERATING) else 0),
            "sent_mib": round(sum(r.sent_bytes for r in self.rounds) / 2**20, 2),
            "remaining_mib": round(self.remaining_bytes() / 2**20, 2),
            "dirty_pages_per_s": None if rate is None else round(rate),
            "expected_downtime_ms": None if expected is None else round(expected * 1e3, 1),
            "eta_s": None if bw is None else round(self.remaining_bytes() / bw, 2),
            "throttle_pct": self.throttle_pct, "stop_reason": self.stop_reason,
            "downtime_ms": None if self.downtime_s is None else round(self.downtime_s * 1e3, 1),
        }  # fmt: skip

    # ---- internals -----------------------------------------------------------

    def _hot(self, r: _Round) -> bool:
        return r.dirty_pages * PAGE_SIZE > DIRTY_TO_SENT_TRIGGER * r.sent_bytes

    def _converge(self, r: _Round) -> None:
        if not self.limits.auto_converge or self.state == FULL:
            return  # the first round sends everything: its dirty count says nothing of the link yet
        self._hot_rounds = self._hot_rounds + 1 if self._hot(r) else 0
        if self._hot_rounds >= TRIGGER_ROUNDS:
            self._hot_rounds = 0
            self.throttle_pct = THROTTLE_INITIAL if self.throttle_pct == 0 else min(THROTTLE_MAX, self.throttle_pct + THROTTLE_STEP)

    def _go(self, target: str, event: str, reason: str = "") -> str:
        allowed = TRANSITIONS.get((self.state, event))
        if allowed is None or target not in allowed:
            raise PrecopyError(f"pre-copy: {event} is not allowed in state {self.state}")
        self.state = target
        if target == STOP_AND_COPY:
            self.stop_reason = reason
        return target


def _ms(seconds: float | None) -> str:
    return "unknown" if seconds is None else f"{seconds * 1e3:.0f} ms"
