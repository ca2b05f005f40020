"""Layer 4: what the COLO primary and secondary drivers share — options,
the checkpoint in flight, heartbeats, fencing, statistics, failover
history."""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field

from kvmcolo import precopy, testhooks
from kvmcolo.colo import Msg
from kvmcolo.threads import Periodic
from kvmcolo.wire import Channel, ChannelError

log = logging.getLogger("kvmcolo.colo")

# Defaults: a heartbeat every 100 ms costs nothing on a replication link, and
# 1 s of silence is 10 missed beats — long enough to ride out a scheduling
# hiccup on a loaded host, short enough that clients' TCP retransmissions
# (200 ms minimum RTO, doubling) see at most a few retries.
DEFAULT_HEARTBEAT_INTERVAL = 0.1
DEFAULT_HEARTBEAT_TIMEOUT = 1.0
DEFAULT_CHECKPOINT_DELAY = 0.1
HISTORY_KEPT = 100  # failovers and protections a status remembers
# The lifecycle, as `status` shows it:
#   connecting    a protect/migrate waits for its peer (a standby host may still be coming up)
#   precopy       the first protection's live pre-copy; reprotecting: a survivor's; migrating: a migration's
#   colo          protected: checkpoints happen (the only state that claims protection)
#   alone         a primary whose secondary is gone; active: a secondary that took over (or a migration's
#                 destination); migrated: a source whose guest runs elsewhere now
#   switching     a switchover: the last checkpoint this way round, then the new pair on the same link
#   fencing / fenced-out / failed   see the failover rules
COPYING_STATES = ("connecting", "precopy", "reprotecting", "migrating")


@dataclass
class ColoOptions:
    checkpoint_delay: float = DEFAULT_CHECKPOINT_DELAY
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    resume_early: bool = True
    verify_every: int = 0  # debug: hash the whole state every Nth checkpoint on both sides
    compare_timeout: float = 0.5  # seconds a primary frame may wait for its secondary twin (netcompare)
    max_queue: int = 1024  # held primary frames per connection before a checkpoint is forced
    fence_command: str | None = None  # run when the peer is lost; exit 0 = peer fenced, go on
    fence_timeout: float = 60.0
    max_downtime: float = precopy.DEFAULT_MAX_DOWNTIME_S  # the initial copy's final stop (live pre-copy)
    max_rounds: int = precopy.DEFAULT_MAX_ROUNDS
    max_bandwidth: float | None = None  # bytes/s the pre-copy may use; None: as fast as the link goes


@dataclass
class CheckpointRecord:
    seq: int
    reason: str
    pause_ms: float  # primary: guest stopped; secondary: SVM stopped
    dirty_pages: int
    bytes: int
    transfer_ms: float
    load_ms: float
    time: float = field(default_factory=time.time)


@dataclass
class Checkpoint:
    """One checkpoint in flight: everything a driver knows of it, in one
    typed object (instead of loose driver attributes)."""

    seq: int
    reason: str
    parts: list = field(default_factory=list)  # primary: the encoded sections, ready to send
    size: int = 0  # bytes on the wire
    pages: int = 0  # dirty pages it carries
    snap: object = None  # secondary: the verified vmstate.Snapshot
    times: dict[str, float] = field(default_factory=dict)  # perf_counter() at start, paused, resumed, sent, received

    def mark(self, moment: str) -> None:
        self.times[moment] = time.perf_counter()

    def _ms(self, a: str, b: str) -> float:
        t = self.times
        return (t.get(b, t["done"]) - t[a]) * 1e3

    def record(self, role: str) -> CheckpointRecord:
        """The finished checkpoint's statistics.  Primary: the guest's pause
        is paused..resumed, the transfer sent..received; secondary: the SVM
        is stopped from the request to the end, the transfer is the wait for
        the whole state."""
        self.mark("done")
        if role == "primary":
            pause, transfer = self._ms("paused", "resumed"), self._ms("sent", "received")
        else:
            pause, transfer = self._ms("paused", "done"), self._ms("paused", "received")
        return CheckpointRecord(seq=self.seq, reason=self.reason, pause_ms=pause, dirty_pages=self.pages,
                                bytes=self.size, transfer_ms=transfer, load_ms=self._ms("received", "done"))  # fmt: skip


class ColoStatus:
    """Counters and history for `kvmcolo status` (thread-safe snapshots)."""

    def __init__(self, role: str):
        self.role = role
        self.state = "connecting"
        self.peer: str | None = None
        self.checkpoints = 0
        self.recent: collections.deque[CheckpointRecord] = collections.deque(maxlen=20)
        self.reasons: collections.Counter = collections.Counter()
        self.failovers: list[dict] = []
        self.hashes: dict[int, dict] = {}  # debug: seq -> state hashes
        self.phase = "idle"  # for tests: where in a checkpoint we are
        self.net_stats = None  # () -> dict of the network side's counters, once it runs
        self.internal_errors: list[str] = []  # unexpected exceptions that ended protection
        self.precopy: dict | None = None  # the live pre-copy's progress (precopy.PrecopyCore.status())
        self.protections: list[dict] = []  # each time protection began: when, to whom, what it cost
        self.last_error: str | None = None  # why the last attempt to protect failed
        self.migrations: list[dict] = []  # live migrations that brought the guest here
        self.switchovers: list[dict] = []  # planned role swaps: when, which way, how long the guest stopped
        self._lock = threading.Lock()

    def set(self, **fields) -> None:
        """Change state/phase/peer (the only way drivers change them)."""
        with self._lock:
            for name, value in fields.items():
                if name not in ("role", "state", "phase", "peer", "precopy", "last_error"):
                    raise AttributeError(f"ColoStatus has no settable {name!r}")
                setattr(self, name, value)

    def keep_hashes(self, seq: int, hashes: dict) -> None:
        """Debug (--verify-every): the state hashes at checkpoint `seq`."""
        with self._lock:
            self.hashes[seq] = hashes
            while len(self.hashes) > 20:
                self.hashes.pop(min(self.hashes))

    def protected(self) -> bool:
        """Replication is really happening (never claimed otherwise)."""
        return self.state == "colo"

    def internal_error(self, thread: str, exc: BaseException) -> None:
        """An unexpected exception in a COLO thread: logged once with its
        traceback, counted; the caller then ends protection."""
        with self._lock:
            self.internal_errors.append(f"{thread}: {type(exc).__name__}: {exc}")
        log.error("internal error in %s; protection ends", thread, exc_info=exc)

    def record(self, rec: CheckpointRecord) -> None:
        with self._lock:
            self.checkpoints += 1
            self.recent.append(rec)
            self.reasons[rec.reason] += 1

    def new_pair(self) -> None:
        """A survivor's status, carried into a new pair: the checkpoint
        counters start again (they describe this pair); the history stays."""
        with self._lock:
            self.checkpoints = 0
            self.recent.clear()
            self.reasons.clear()
            self.hashes.clear()

    def protected_since(self, precopy_status: dict, seconds: float) -> None:
        """Protection began (the initial copy is loaded): one history entry."""
        with self._lock:
            self.protections.append({"peer": self.peer, "time": time.time(), "seconds": round(seconds, 3),
                                     "rounds": precopy_status["round"], "sent_mib": precopy_status["sent_mib"],
                                     "downtime_ms": precopy_status["downtime_ms"]})  # fmt: skip

    def history(self) -> dict:
        with self._lock:
            return {"failovers": list(self.failovers), "protections": list(self.protections),
                    "migrations": list(self.migrations), "switchovers": list(self.switchovers)}

    def adopt_history(self, history) -> None:
        """The primary's history (a secondary keeps it, so a survivor's status
        tells every failover and protection of the guest, not only its own)."""
        if not isinstance(history, dict) or not all(
                isinstance(history.get(k), list) and all(isinstance(e, dict) for e in history[k])
                for k in ("failovers", "protections")):  # fmt: skip
            log.warning("the primary sent a malformed history (ignored)")
            return
        with self._lock:
            self.failovers = history["failovers"][-HISTORY_KEPT:]
            self.protections = history["protections"][-HISTORY_KEPT:]
            for name in ("migrations", "switchovers"):  # (absent from an older primary's history)
                entries = history.get(name, [])
                if isinstance(entries, list) and all(isinstance(e, dict) for e in entries):
                    setattr(self, name, entries[-HISTORY_KEPT:])

    def migrated_in(self, source: str | None) -> None:
        with self._lock:
            self.migrations.append({"from": source, "time": time.time()})
        log.info("migration from %s complete: the guest runs here", source)

    def switched_over(self, old_primary: str | None, pause_ms: float) -> None:
        """This side is the primary now, by a switchover (one history entry)."""
        with self._lock:
            self.switchovers.append({"from": old_primary, "time": time.time(), "pause_ms": round(pause_ms, 1)})
        log.info("switchover complete: this side is the primary; the guest stopped for %.1f ms", pause_ms)

    def failover(self, kind: str, reason: str) -> None:
        with self._lock:
            self.failovers.append({"kind": kind, "reason": reason, "time": time.time()})
        log.warning("failover: %s (%s)", kind, reason)

    def as_dict(self) -> dict:
        with self._lock:
            return {
                "role": self.role,
                "state": self.state,
                "protected": self.protected(),
                "phase": self.phase,
                "peer": self.peer,
                "checkpoints": self.checkpoints,
                "reasons": dict(self.reasons),
                "recent": [asdict(r) for r in self.recent],
                "failovers": list(self.failovers),
                "hashes": {str(k): v for k, v in self.hashes.items()},
                "net": self.net_stats() if self.net_stats else None,
                "internal_errors": list(self.internal_errors),
                "precopy": self.precopy,
                "last_error": self.last_error,
                "protections": list(self.protections),
                "migrations": list(self.migrations),
                "switchovers": list(self.switchovers),
            }


class Heartbeat:
    """Sends HEARTBEAT whenever the channel has been quiet for an interval.
    A failed send is the peer lost (`on_lost`); anything else is an internal
    error (`on_error`)."""

    def __init__(self, channel: Channel, interval: float, on_lost, on_error):
        self._channel = channel
        self._interval = interval
        self._on_lost = on_lost
        self._periodic = Periodic("heartbeat", interval / 2, self._beat, on_error)
        self._lost = False

    def start(self) -> None:
        self._periodic.start()

    def stop(self) -> None:
        self._periodic.stop()

    def stop_and_wait(self) -> None:
        """No heartbeat is sent after this returns (a switchover's channel
        must carry nothing after its last checkpoint)."""
        self._periodic.stop_and_wait()

    def _beat(self) -> None:
        testhooks.hit("heartbeat")
        if self._lost or time.monotonic() - self._channel.last_sent < self._interval:
            return
        try:
            self._channel.send(Msg.HEARTBEAT)
        except ChannelError as e:
            self._lost = True
            self.stop()
            self._on_lost(str(e))


def hang_up(heartbeat: Heartbeat | None, channel: Channel | None) -> None:
    """Stop talking to the peer: no more heartbeats, the connection closed
    (which also wakes the thread blocked reading it)."""
    if heartbeat is not None:
        heartbeat.stop()
    if channel is not None:
        channel.close()


def fence_peer(command: str | None, role: str, peer: str | None, reason: str, timeout: float) -> bool:
    """Split-brain protection: before this side goes on alone (primary) or
    takes over (secondary), the operator's fence command must confirm the
    peer can no longer act — powered off, or this side won an arbiter's
    lock.  Exit 0: go on.  Anything else (or no answer in time): do not.
    Without a command, this side goes on (a lost link is taken as a dead peer)."""
    if not command:
        return True
    env = {**os.environ, "KVMCOLO_ROLE": role, "KVMCOLO_PEER": peer or "", "KVMCOLO_REASON": reason}
    log.warning("peer lost (%s): running the fence command", reason)
    try:
        result = subprocess.run(command, shell=True, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        log.error("the fence command did not finish within %.0f s", timeout)
        return False
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
        log.error("the fence command failed (exit %d) %s", result.returncode, tail[0])
        return False
    log.warning("the fence command confirmed the peer is fenced")
    return True
