"""The COLO protocol cores (pure state machines) and the authenticated
channel, without VMs."""

from __future__ import annotations

import socket
import threading

import pytest

from kvmcolo.colo import Act, Failover, FState, Msg, PrimaryCore, ProtocolError, PState, SecondaryCore, SState
from kvmcolo.errors import UserError
from kvmcolo.wire import AuthenticationError, PeerLost, client_handshake, load_key, server_handshake


def test_primary_transaction_resume_early():
    p = PrimaryCore(resume_early=True)
    assert p.start_checkpoint() == [Act.SEND_REQUEST]
    assert p.on_message(Msg.HEARTBEAT) == []
    assert p.on_message(Msg.CHECKPOINT_REPLY) == [Act.PAUSE_VM, Act.CAPTURE, Act.RESUME_VM, Act.SEND_STATE]
    assert p.on_message(Msg.VMSTATE_RECEIVED) == [Act.RELEASE_OUTPUT]
    assert p.on_message(Msg.VMSTATE_LOADED) == [Act.CHECKPOINT_DONE]


def test_primary_transaction_resume_after_load():
    p = PrimaryCore(resume_early=False)
    p.start_checkpoint()
    assert Act.RESUME_VM not in p.on_message(Msg.CHECKPOINT_REPLY)
    p.on_message(Msg.VMSTATE_RECEIVED)
    assert p.on_message(Msg.VMSTATE_LOADED) == [Act.RESUME_VM, Act.CHECKPOINT_DONE]


@pytest.mark.parametrize("msg", [Msg.VMSTATE_RECEIVED, Msg.VMSTATE_LOADED, Msg.CHECKPOINT_REQUEST])
def test_primary_rejects_out_of_order_messages(msg):
    p = PrimaryCore()
    p.start_checkpoint()
    with pytest.raises(ProtocolError):
        p.on_message(msg)
    with pytest.raises(ProtocolError):
        PrimaryCore().on_message(Msg.CHECKPOINT_REPLY)  # nothing was asked


def test_secondary_transaction():
    s = SecondaryCore()
    assert s.on_message(Msg.CHECKPOINT_REQUEST) == [Act.PAUSE_VM, Act.SEND_REPLY]
    assert s.on_message(Msg.VMSTATE_SEND) == []
    assert s.on_message(Msg.VMSTATE_SIZE, 1234) == []
    acts = s.on_message(Msg.VMSTATE_DATA, 1234)
    assert acts.index(Act.VERIFY_STATE) < acts.index(Act.SEND_RECEIVED) < acts.index(Act.LOAD_STATE)
    assert s.state is SState.LOADING
    s.loaded()
    assert s.state is SState.RUNNING


def test_secondary_rejects_wrong_size_and_order():
    s = SecondaryCore()
    s.on_message(Msg.CHECKPOINT_REQUEST)
    s.on_message(Msg.VMSTATE_SEND)
    s.on_message(Msg.VMSTATE_SIZE, 100)
    with pytest.raises(ProtocolError, match="after VMSTATE_SIZE 100"):
        s.on_message(Msg.VMSTATE_DATA, 99)
    with pytest.raises(ProtocolError):
        SecondaryCore().on_message(Msg.VMSTATE_DATA, 0)


def test_failover_state_machine_and_relaunch():
    f = Failover()
    assert f.require("lost") and f.state is FState.REQUIRE
    assert not f.require("again")  # only once
    f.activate()
    f.complete()
    assert f.state is FState.COMPLETED

    g = Failover()
    assert not g.require("lost while loading", loading=True) and g.state is FState.RELAUNCH
    assert g.load_finished() and g.state is FState.REQUIRE  # now carry it out
    g.activate()
    with pytest.raises(ProtocolError):
        Failover().activate()


# ---- the channel ----------------------------------------------------------------------

KEY = b"a shared key of enough bytes"


def handshake_pair(client_key=KEY, server_key=KEY):
    a, b = socket.socketpair()
    result = {}

    def server():
        try:
            result["server"] = server_handshake(b, server_key, "secondary", "client", 5)
        except Exception as e:  # noqa: BLE001
            result["server"] = e

    t = threading.Thread(target=server)
    t.start()
    try:
        client = client_handshake(a, client_key, "primary", "server", 5)
    except Exception as e:  # noqa: BLE001
        client = e
    t.join()
    return client, result["server"]


def test_channel_round_trip_zero_copy_payloads():
    c, s = handshake_pair()
    c.send(Msg.VMSTATE_DATA, [b"abc", memoryview(b"defgh"), bytearray(100000)])
    mtype, payload = s.recv()
    assert mtype == Msg.VMSTATE_DATA and bytes(payload[:8]) == b"abcdefgh" and len(payload) == 100008
    s.send(Msg.VMSTATE_LOADED)
    assert c.recv()[0] == Msg.VMSTATE_LOADED


def test_wrong_key_is_refused_both_ways():
    c, s = handshake_pair(client_key=b"another key of enough bytes")
    assert isinstance(c, AuthenticationError) or isinstance(s, AuthenticationError)
    assert isinstance(c, (AuthenticationError, PeerLost)) and isinstance(s, (AuthenticationError, PeerLost))


def test_tampered_frame_is_never_returned():
    c, s = handshake_pair()
    c.send(Msg.HEARTBEAT, [b"x" * 64])
    raw = bytearray(s.sock.recv(1024))
    raw[30] ^= 1  # damage the payload in flight, then replay it to a fresh reader
    c2, s2 = handshake_pair()
    s2.sock, other = socket.socketpair()
    other.sendall(raw)
    with pytest.raises(AuthenticationError):
        s2.recv()


def test_reflected_frames_fail():
    """A frame sent by one side cannot be played back to it (per-direction keys)."""
    c, s = handshake_pair()
    c.send(Msg.HEARTBEAT)
    raw = s.sock.recv(1024)
    back, here = socket.socketpair()
    c.sock = here
    back.sendall(raw)
    with pytest.raises(AuthenticationError):
        c.recv()


def test_silence_is_peer_lost():
    c, s = handshake_pair()
    s.sock.settimeout(0.2)
    s.timeout = 0.2
    with pytest.raises(PeerLost):
        s.recv()


def test_key_file_checks(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_key(str(tmp_path / "none"))
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    with pytest.raises(UserError, match="at least 16"):
        load_key(str(short))


def _secondary_checkpoint(s: SecondaryCore, size: int = 10) -> list[Act]:
    assert s.on_message(Msg.CHECKPOINT_REQUEST) == [Act.PAUSE_VM, Act.SEND_REPLY]
    s.on_message(Msg.VMSTATE_SEND)
    s.on_message(Msg.VMSTATE_SIZE, size)
    s.on_message(Msg.VMSTATE_DATA, size)
    return s.loaded()


@pytest.mark.parametrize("resume_early", [True, False])
def test_primary_switchover_is_one_last_checkpoint_then_nothing(resume_early):
    p = PrimaryCore(resume_early)
    assert p.switch() == [Act.STOP_HEARTBEAT, Act.SEND_SWITCHOVER, Act.SEND_REQUEST]
    p.on_message(Msg.CHECKPOINT_REPLY)
    p.on_message(Msg.VMSTATE_RECEIVED)
    acts = p.on_message(Msg.VMSTATE_LOADED)
    assert acts[-2:] == [Act.CHECKPOINT_DONE, Act.SWITCH_ROLES]
    assert (Act.RESUME_VM in acts) is (not resume_early)
    assert p.state is PState.SWITCHED
    for event in (Msg.CHECKPOINT_REPLY, Msg.VMSTATE_LOADED):  # the link is the new pair's: nothing fits
        with pytest.raises(ProtocolError):
            p.on_message(event)
    with pytest.raises(ProtocolError):
        p.start_checkpoint()
    assert p.on_message(Msg.HEARTBEAT) == []


def test_primary_switchover_only_between_checkpoints():
    p = PrimaryCore()
    p.start_checkpoint()
    with pytest.raises(ProtocolError):
        p.switch()


def test_secondary_switchover_holds_then_ends_after_the_next_checkpoint():
    s = SecondaryCore()
    assert _secondary_checkpoint(s) == []  # an ordinary one
    assert s.on_message(Msg.SWITCHOVER) == [Act.HOLD_FOR_SWITCH, Act.STOP_HEARTBEAT]
    assert s.state is SState.RUNNING
    with pytest.raises(ProtocolError):
        s.on_message(Msg.SWITCHOVER)  # once
    assert _secondary_checkpoint(s) == [Act.SWITCH_ROLES]
    assert s.state is SState.SWITCHED
    with pytest.raises(ProtocolError):
        s.on_message(Msg.CHECKPOINT_REQUEST)


def test_secondary_switchover_mid_checkpoint_is_a_protocol_error():
    s = SecondaryCore()
    s.on_message(Msg.CHECKPOINT_REQUEST)
    with pytest.raises(ProtocolError):
        s.on_message(Msg.SWITCHOVER)
