"""Layer 4: the COLO protocol cores — pure state machines, no I/O.

The checkpoint transaction follows QEMU's migration/colo.c:

    primary                                   secondary
    CHECKPOINT_REQUEST  ------------------->  stop the SVM
                        <-------------------  CHECKPOINT_REPLY
    stop the PVM, capture state + dirty pages
    (resume the PVM now if resume_early)
    VMSTATE_SEND, VMSTATE_SIZE(n), VMSTATE_DATA(n bytes)  ->  receive it whole, verify
                        <-------------------  VMSTATE_RECEIVED
    release held output (network comparator)
                                              copy into the SVM every page the PVM
                                              or the SVM dirtied; load the state;
                                              resume the SVM
                        <-------------------  VMSTATE_LOADED
    resume the PVM (if not already)

The rules (each one is data below, read the tables first):
1. Each core takes an event — a peer's message (Msg) or a local happening
   (Event) — and returns the actions for its driver to carry out, in order.
   The driver carries out exactly those; its dispatch ends in `else: raise`.
2. Anything that does not fit a table is a ProtocolError: the driver drops
   the connection, applies nothing, and fails over.
3. One checkpoint at a time: the primary starts one only from IDLE, and the
   secondary takes a request only while RUNNING.
4. The primary's output is released only at VMSTATE_RECEIVED (the
   secondary holds the whole checkpoint, so it can fail over to it), never
   earlier; with resume_early the PVM runs again right after its capture.
5. The secondary applies a checkpoint only after all of it arrived with the
   announced size and was verified; a load always finishes (Event.LOADED)
   before anything else of the primary's is taken.
6. Heartbeats are liveness only: every core ignores them in every state.

Switchover (a planned role swap, operator-asked on the primary): the
primary, its guest already held, sends SWITCHOVER and at once the request
for one last checkpoint this way round; the secondary holds its SVM from
SWITCHOVER on.  Both stop their heartbeats there, so once that checkpoint
is loaded neither sends anything more on this channel: both cores end in
SWITCHED and both drivers stop reading, leaving the connection to the new
pair (the old secondary now the primary), which handshakes on it afresh.
Nothing of a switchover depends on timing: SWITCHOVER precedes the last
request on the channel, and the last VMSTATE_LOADED is the last frame.

Failover (both sides): NONE -> REQUIRE -> ACTIVE -> COMPLETED.  A request
that arrives while the secondary is loading a checkpoint is RELAUNCH: the
load finishes first (it was received whole and verified), then failover
proceeds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Msg(enum.IntEnum):
    CONFIG = 1  # primary -> secondary: machine shape, host caps, parameters
    CONFIG_OK = 2
    CONFIG_REFUSED = 3  # with the reason
    INITIAL_STATE = 4  # the end of the initial copy: vCPU, VM and device state with the last pages
    PRECOPY_PAGES = 9  # primary -> secondary, before INITIAL_STATE: a RAM section of pages sent while the
    #                    guest ran (a later one or INITIAL_STATE overwrites any page that changed since)
    DISK_HASHES = 5  # secondary -> primary: per-MiB hashes of each base disk (initial sync)
    DISK_WRITE = 6  # primary -> secondary: u16 disk, u64 offset, data (outside the transaction table:
    #                 kept pending, applied at the next checkpoint's load)
    NET_INBOUND = 7  # primary -> secondary: u16 NIC, u64 epoch, a frame the PVM received (mirror)
    NET_OUTPUT = 8  # secondary -> primary: u16 NIC, u64 epoch, a frame the SVM sent (for comparison)
    CHECKPOINT_READY = 10  # secondary -> primary: running, ready for checkpoints
    CHECKPOINT_REQUEST = 11
    CHECKPOINT_REPLY = 12
    VMSTATE_SEND = 13
    VMSTATE_SIZE = 14
    VMSTATE_DATA = 15
    VMSTATE_RECEIVED = 16
    VMSTATE_LOADED = 17
    HEARTBEAT = 20
    GOODBYE = 21  # orderly end (the guest exited); payload: JSON reason/status
    HISTORY = 22  # primary -> secondary once protection began: JSON failovers and protections so far (the
    #               pair's history lives on in whichever side survives; outside the transaction table)
    SWITCHOVER = 23  # primary -> secondary: the next checkpoint is the last one before the roles swap


class ProtocolError(Exception):
    pass


class Act(enum.Enum):
    """Actions a core asks its driver to perform."""

    PAUSE_VM = "pause the local VM"
    RESUME_VM = "resume the local VM"
    CAPTURE = "capture state + dirty pages"
    SEND_STATE = "send VMSTATE_SEND, VMSTATE_SIZE, VMSTATE_DATA"
    RELEASE_OUTPUT = "release held primary output"
    SEND_REPLY = "send CHECKPOINT_REPLY"
    VERIFY_STATE = "check the whole received state"
    SEND_RECEIVED = "send VMSTATE_RECEIVED"
    LOAD_STATE = "apply the state to the SVM"
    SEND_LOADED = "send VMSTATE_LOADED"
    SEND_REQUEST = "send CHECKPOINT_REQUEST"
    CHECKPOINT_DONE = "record the finished checkpoint"
    STOP_HEARTBEAT = "send no more heartbeats on this channel"
    SEND_SWITCHOVER = "send SWITCHOVER"
    HOLD_FOR_SWITCH = "hold the local VM until the new pair runs"
    SWITCH_ROLES = "hand the channel to the new pair, roles swapped"


# ---- primary ---------------------------------------------------------------------------


class PState(enum.Enum):
    IDLE = "idle"  # both VMs running
    REQUESTED = "requested"  # waiting for CHECKPOINT_REPLY
    SENT = "sent"  # state sent, waiting for VMSTATE_RECEIVED
    RECEIVED = "received"  # waiting for VMSTATE_LOADED
    SWITCHED = "switched"  # the last checkpoint before a switchover is loaded: nothing more on this channel


class Event(enum.Enum):
    """Local happenings a core is told about (the peer's are Msg)."""

    START = "a checkpoint is due (timer, comparator, operator)"
    LOADED = "the secondary driver finished loading a checkpoint"
    SWITCH = "a switchover is due (the primary's guest is held): one last checkpoint, then the roles swap"


def _primary_table(resume_early: bool) -> dict:
    # With resume_early the PVM runs again as soon as its state is captured;
    # otherwise only once the secondary has loaded it.
    after_capture = [Act.RESUME_VM] if resume_early else []
    at_loaded = [] if resume_early else [Act.RESUME_VM]
    return {
        (PState.IDLE, Event.START): (PState.REQUESTED, [Act.SEND_REQUEST]),
        (PState.REQUESTED, Msg.CHECKPOINT_REPLY): (
            PState.SENT, [Act.PAUSE_VM, Act.CAPTURE, *after_capture, Act.SEND_STATE]),
        (PState.SENT, Msg.VMSTATE_RECEIVED): (PState.RECEIVED, [Act.RELEASE_OUTPUT]),
        (PState.RECEIVED, Msg.VMSTATE_LOADED): (PState.IDLE, [*at_loaded, Act.CHECKPOINT_DONE]),
        (PState.IDLE, Event.SWITCH): (PState.REQUESTED, [Act.STOP_HEARTBEAT, Act.SEND_SWITCHOVER, Act.SEND_REQUEST]),
    }  # fmt: skip


def _primary_last(resume_early: bool) -> dict:
    """Where the last checkpoint before a switchover ends differently (the
    rows above hold for it otherwise)."""
    at_loaded = [] if resume_early else [Act.RESUME_VM]
    return {(PState.RECEIVED, Msg.VMSTATE_LOADED): (PState.SWITCHED, [*at_loaded, Act.CHECKPOINT_DONE,
                                                                      Act.SWITCH_ROLES])}  # fmt: skip


# The events after which the checkpoint in the making is the last one.
_STARTS_LAST = frozenset({Event.SWITCH, Msg.SWITCHOVER})


def _step(table: dict, last_table: dict, state, event, last: bool):
    step = (last_table.get((state, event)) if last else None) or table.get((state, event))
    if step is None:
        raise ProtocolError(f"unexpected {event.name} while {state.value}")
    return step


class PrimaryCore:
    def __init__(self, resume_early: bool = True):
        self.state = PState.IDLE
        self.resume_early = resume_early
        self.last = False  # the checkpoint under way (or next) is the last before a switchover
        self._table = _primary_table(resume_early)
        self._last_table = _primary_last(resume_early)

    def on_event(self, event: Msg | Event) -> list[Act]:
        if event is Msg.HEARTBEAT:
            return []
        self.state, acts = _step(self._table, self._last_table, self.state, event, self.last)
        self.last = self.last or event in _STARTS_LAST
        return list(acts)

    def switch(self) -> list[Act]:
        return self.on_event(Event.SWITCH)

    def start_checkpoint(self) -> list[Act]:
        return self.on_event(Event.START)

    def on_message(self, msg: Msg) -> list[Act]:
        return self.on_event(msg)


# ---- secondary ---------------------------------------------------------------------------


class SState(enum.Enum):
    RUNNING = "running"  # SVM running between checkpoints
    STOPPED = "stopped"  # SVM stopped for a checkpoint
    EXPECT_SIZE = "expect-size"
    EXPECT_DATA = "expect-data"
    LOADING = "loading"
    SWITCHED = "switched"  # the last checkpoint before a switchover is loaded: nothing more on this channel


_SECONDARY = {
    (SState.RUNNING, Msg.CHECKPOINT_REQUEST): (SState.STOPPED, [Act.PAUSE_VM, Act.SEND_REPLY]),
    (SState.STOPPED, Msg.VMSTATE_SEND): (SState.EXPECT_SIZE, []),
    (SState.EXPECT_SIZE, Msg.VMSTATE_SIZE): (SState.EXPECT_DATA, []),
    (SState.EXPECT_DATA, Msg.VMSTATE_DATA): (
        SState.LOADING,
        [Act.VERIFY_STATE, Act.SEND_RECEIVED, Act.LOAD_STATE, Act.RESUME_VM, Act.SEND_LOADED, Act.CHECKPOINT_DONE],
    ),
    (SState.LOADING, Event.LOADED): (SState.RUNNING, []),
    (SState.RUNNING, Msg.SWITCHOVER): (SState.RUNNING, [Act.HOLD_FOR_SWITCH, Act.STOP_HEARTBEAT]),
}
_SECONDARY_LAST = {
    (SState.LOADING, Event.LOADED): (SState.SWITCHED, [Act.SWITCH_ROLES]),
}


class SecondaryCore:
    def __init__(self):
        self.state = SState.RUNNING
        self.expected_size: int | None = None
        self.last = False  # SWITCHOVER came: the next checkpoint is the last before the roles swap

    def on_event(self, event: Msg | Event, size: int | None = None) -> list[Act]:
        """`size`: the VMSTATE_SIZE value, or the VMSTATE_DATA length."""
        if event is Msg.HEARTBEAT:
            return []
        step = _step(_SECONDARY, _SECONDARY_LAST, self.state, event, self.last)
        if event is Msg.SWITCHOVER and self.last:
            raise ProtocolError("a second SWITCHOVER")
        if event is Msg.VMSTATE_SIZE:
            self.expected_size = size
        elif event is Msg.VMSTATE_DATA and size != self.expected_size:
            raise ProtocolError(f"VMSTATE_DATA of {size} bytes after VMSTATE_SIZE {self.expected_size}")
        elif event is Event.LOADED:
            self.expected_size = None
        self.state, acts = step
        self.last = self.last or event in _STARTS_LAST
        return list(acts)

    def on_message(self, msg: Msg, size: int | None = None) -> list[Act]:
        return self.on_event(msg, size)

    def loaded(self) -> list[Act]:
        """The driver finished LOAD_STATE .. SEND_LOADED."""
        return self.on_event(Event.LOADED)


# ---- failover ----------------------------------------------------------------------------


class FState(enum.Enum):
    NONE = "none"
    REQUIRE = "require"
    RELAUNCH = "relaunch"  # asked while loading a checkpoint: finish the load first
    ACTIVE = "active"
    COMPLETED = "completed"


@dataclass
class Failover:
    state: FState = FState.NONE
    reason: str = ""

    def require(self, reason: str, loading: bool = False) -> bool:
        """Ask for failover.  Returns True if the caller should carry it out
        now; False if it is already under way, or (RELAUNCH) must wait until
        the checkpoint being loaded is in."""
        if self.state is not FState.NONE:
            return False
        self.reason = reason
        self.state = FState.RELAUNCH if loading else FState.REQUIRE
        return not loading

    def load_finished(self) -> bool:
        """After a load: True if a RELAUNCHed failover must now be carried out."""
        if self.state is FState.RELAUNCH:
            self.state = FState.REQUIRE
            return True
        return False

    def activate(self) -> None:
        if self.state is not FState.REQUIRE:
            raise ProtocolError(f"failover activated from {self.state.value}")
        self.state = FState.ACTIVE

    def complete(self) -> None:
        if self.state is not FState.ACTIVE:
            raise ProtocolError(f"failover completed from {self.state.value}")
        self.state = FState.COMPLETED
