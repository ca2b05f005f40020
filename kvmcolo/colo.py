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

Each core takes an event (a message or a local happening) and returns the
list of actions for its driver to carry out, in order.  Anything that does
not fit the table is a ProtocolError: the driver drops the connection,
applies nothing, and fails over.  The transition tables are the rules; read
them first.

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
    INITIAL_STATE = 4  # the first full copy
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


# ---- primary ---------------------------------------------------------------------------


class PState(enum.Enum):
    IDLE = "idle"  # both VMs running
    REQUESTED = "requested"  # waiting for CHECKPOINT_REPLY
    SENT = "sent"  # state sent, waiting for VMSTATE_RECEIVED
    RECEIVED = "received"  # waiting for VMSTATE_LOADED


class PrimaryCore:
    def __init__(self, resume_early: bool = True):
        self.state = PState.IDLE
        self.resume_early = resume_early

    def start_checkpoint(self) -> list[Act]:
        if self.state is not PState.IDLE:
            raise ProtocolError(f"checkpoint started while {self.state.value}")
        self.state = PState.REQUESTED
        return [Act.SEND_REQUEST]

    def on_message(self, msg: Msg) -> list[Act]:
        if msg is Msg.HEARTBEAT:
            return []
        if self.state is PState.REQUESTED and msg is Msg.CHECKPOINT_REPLY:
            self.state = PState.SENT
            acts = [Act.PAUSE_VM, Act.CAPTURE]
            if self.resume_early:
                acts.append(Act.RESUME_VM)  # output stays held until RECEIVED
            return acts + [Act.SEND_STATE]
        if self.state is PState.SENT and msg is Msg.VMSTATE_RECEIVED:
            self.state = PState.RECEIVED
            return [Act.RELEASE_OUTPUT]
        if self.state is PState.RECEIVED and msg is Msg.VMSTATE_LOADED:
            self.state = PState.IDLE
            return ([] if self.resume_early else [Act.RESUME_VM]) + [Act.CHECKPOINT_DONE]
        raise ProtocolError(f"unexpected {msg.name} while {self.state.value}")


# ---- secondary ---------------------------------------------------------------------------


class SState(enum.Enum):
    RUNNING = "running"  # SVM running between checkpoints
    STOPPED = "stopped"  # SVM stopped for a checkpoint
    EXPECT_SIZE = "expect-size"
    EXPECT_DATA = "expect-data"
    LOADING = "loading"


_SECONDARY = {
    (SState.RUNNING, Msg.CHECKPOINT_REQUEST): (SState.STOPPED, [Act.PAUSE_VM, Act.SEND_REPLY]),
    (SState.STOPPED, Msg.VMSTATE_SEND): (SState.EXPECT_SIZE, []),
    (SState.EXPECT_SIZE, Msg.VMSTATE_SIZE): (SState.EXPECT_DATA, []),
    (SState.EXPECT_DATA, Msg.VMSTATE_DATA): (
        SState.LOADING,
        [Act.VERIFY_STATE, Act.SEND_RECEIVED, Act.LOAD_STATE, Act.RESUME_VM, Act.SEND_LOADED, Act.CHECKPOINT_DONE],
    ),
}


class SecondaryCore:
    def __init__(self):
        self.state = SState.RUNNING
        self.expected_size: int | None = None

    def on_message(self, msg: Msg, size: int | None = None) -> list[Act]:
        """`size`: the VMSTATE_SIZE value, or the VMSTATE_DATA length."""
        if msg is Msg.HEARTBEAT:
            return []
        step = _SECONDARY.get((self.state, msg))
        if step is None:
            raise ProtocolError(f"unexpected {msg.name} while {self.state.value}")
        if msg is Msg.VMSTATE_SIZE:
            self.expected_size = size
        elif msg is Msg.VMSTATE_DATA and size != self.expected_size:
            raise ProtocolError(f"VMSTATE_DATA of {size} bytes after VMSTATE_SIZE {self.expected_size}")
        self.state, acts = step
        return list(acts)

    def loaded(self) -> None:
        """The driver finished LOAD_STATE .. SEND_LOADED."""
        if self.state is not SState.LOADING:
            raise ProtocolError(f"load finished while {self.state.value}")
        self.state = SState.RUNNING
        self.expected_size = None


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
