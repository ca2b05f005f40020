"""The secondary's TCP sequence rewriter (kvmcolo.netrewrite), as a pure core.

A client talks to the PVM; the SVM, behind the rewriter, sees the same
inbound frames and answers in its own sequence space.  Every frame the SVM
receives must carry acks in the SVM's space, and every frame it sends must
come out byte for byte as the PVM's corresponding frame (so seq, checksum
and all are exactly what a fresh build in the PVM's space gives).  No KVM.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmcolo import packets
from kvmcolo.netrewrite import (_PRUNE_INTERVAL, CLOSE_GRACE, DEFER_TIMEOUT, IDLE_TIMEOUT, LIVE_IDLE_TIMEOUT,
                                SeqRewriter, _shift_sack)  # fmt: skip
from kvmcolo.packets import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, build_tcp, parse, seq_add

CMAC, GMAC = b"\x02\x00\x00\x00\x00\x01", b"\x52\x54\x00\x12\x34\x56"
CIP, GIP = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
GPORT = 80
M32 = 1 << 32


def c2g(seq, ack, flags, payload=b"", cport=40000, options=b"", gport=GPORT) -> bytearray:
    """A frame from the client to the guest."""
    return build_tcp(CMAC, GMAC, CIP, GIP, cport, gport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags, payload,
                     options=options)  # fmt: skip


def g2c(seq, ack, flags, payload=b"", cport=40000, gport=GPORT) -> bytearray:
    """A frame from the guest to the client."""
    return build_tcp(GMAC, CMAC, GIP, CIP, gport, cport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags, payload)


def fresh_checksum(frame) -> int:
    """The TCP checksum computed from scratch (field zeroed)."""
    pkt = parse(frame)
    seg = bytearray(frame[pkt.l4 : pkt.end])
    seg[16:18] = b"\0\0"
    if len(pkt.src) == 4:
        pseudo = pkt.src + pkt.dst + struct.pack("!BBH", 0, packets.PROTO_TCP, len(seg))
    else:
        pseudo = pkt.src + pkt.dst + struct.pack("!IxxxB", len(seg), packets.PROTO_TCP)
    return packets.internet_checksum(pseudo + bytes(seg))


def assert_checksum(frame) -> None:
    pkt = parse(frame)
    assert packets.tcp_checksum_ok(frame, pkt)
    assert struct.unpack_from("!H", frame, pkt.l4 + 16)[0] == fresh_checksum(frame)


def deliver(rw: SeqRewriter, frame, tag=None, now=0.0) -> bytearray:
    """Feed one inbound frame that must come straight out (and be the same object)."""
    out = rw.inbound(frame, tag, now)
    assert len(out) == 1 and out[0][0] is frame and out[0][1] is tag
    return frame


class Session:
    """One TCP connection: client <-> PVM (ISN P) mirrored to the SVM (ISN S)."""

    def __init__(self, rw: SeqRewriter, c_isn: int, p_isn: int, s_isn: int, cport: int = 40000):
        self.rw, self.cport = rw, cport
        self.c_isn, self.p_isn, self.s_isn = c_isn, p_isn, s_isn
        self.c_next = seq_add(c_isn, 1)  # the client's next seq
        self.p_next = seq_add(p_isn, 1)  # the PVM's next seq (what the client acks)
        self.s_next = seq_add(s_isn, 1)  # the SVM's next seq

    def c2g(self, seq, ack, flags, payload=b"", **kw):
        return c2g(seq, ack, flags, payload, cport=self.cport, **kw)

    def g2c(self, seq, ack, flags, payload=b""):
        return g2c(seq, ack, flags, payload, cport=self.cport)

    def syn(self, now=0.0):
        frame = deliver(self.rw, self.c2g(self.c_isn, 0, TCP_SYN), now=now)
        assert frame == self.c2g(self.c_isn, 0, TCP_SYN)

    def svm_synack(self, now=0.0, p_known=False):
        out = self.rw.outbound(self.g2c(self.s_isn, self.c_next, TCP_SYN | TCP_ACK), now)
        # In the SVM's own space while the PVM's ISN is unknown, shifted once it is.
        assert out == self.g2c(self.p_isn if p_known else self.s_isn, self.c_next, TCP_SYN | TCP_ACK)
        assert_checksum(out)

    def client_ack(self, now=0.0):
        frame = deliver(self.rw, self.c2g(self.c_next, self.p_next, TCP_ACK), now=now)
        assert frame == self.c2g(self.c_next, self.s_next, TCP_ACK)

    def handshake(self, now=0.0):
        self.syn(now)
        self.svm_synack(now)
        self.client_ack(now)

    def request(self, data: bytes, now=0.0, flags=TCP_ACK | TCP_PSH):
        frame = deliver(self.rw, self.c2g(self.c_next, self.p_next, flags, data), now=now)
        assert frame == self.c2g(self.c_next, self.s_next, flags, data), "ack not in the SVM's space"
        assert_checksum(frame)
        self.c_next = seq_add(self.c_next, len(data) + (1 if flags & TCP_FIN else 0))

    def reply(self, data: bytes, now=0.0, flags=TCP_ACK | TCP_PSH):
        out = self.rw.outbound(self.g2c(self.s_next, self.c_next, flags, data), now)
        assert out == self.g2c(self.p_next, self.c_next, flags, data), "seq not in the PVM's space"
        assert_checksum(out)
        n = len(data) + (1 if flags & TCP_FIN else 0)
        self.s_next, self.p_next = seq_add(self.s_next, n), seq_add(self.p_next, n)


def payload(rnd: random.Random, n: int) -> bytes:
    return rnd.randbytes(n)


# ---- the whole exchange --------------------------------------------------------------------


def test_handshake_and_rounds():
    rw = SeqRewriter()
    s = Session(rw, c_isn=1000, p_isn=0x12345678, s_isn=0x9ABCDEF0)
    s.handshake()
    for i in range(50):
        s.request(b"GET /%d\r\n" % i)
        s.reply(b"x" * (i * 30))
    assert rw.counters["learned"] == 1
    assert rw.counters["connections"] == 1
    assert rw.counters["rewritten_in"] == 51 and rw.counters["rewritten_out"] == 50
    assert rw.counters["deferred"] == 0


def test_thousands_of_requests_across_the_wrap():
    """Both ISNs near 2**32: the PVM's stream wraps early, the SVM's late."""
    rw = SeqRewriter()
    rnd = random.Random(1)
    s = Session(rw, c_isn=M32 - 10, p_isn=M32 - 5000, s_isn=M32 - 3_000_000)
    s.handshake()
    for _ in range(3000):
        s.request(payload(rnd, rnd.randrange(0, 200)))
        s.reply(payload(rnd, rnd.randrange(0, 1461)))
    assert s.p_next < 1 << 31  # wrapped
    assert rw.counters["rewritten_out"] == 3000


isns = st.one_of(st.integers(0, M32 - 1), st.integers(M32 - 4000, M32 - 1), st.integers(0, 4000))


@settings(max_examples=200, deadline=None)
@given(c=isns, p1=isns, s1=isns, p2=isns, s2=isns, seed=st.integers(0, 2**32), rounds=st.integers(1, 40),
       late_svm=st.booleans())  # fmt: skip
def test_random_isns_zero_mismatches(c, p1, s1, p2, s2, seed, rounds, late_svm):
    """Two interleaved connections with random ISNs (wraparound included) and
    random payload sizes: after the handshake every ack the SVM sees and
    every seq it sends are exactly right, with valid checksums."""
    rw = SeqRewriter()
    rnd = random.Random(seed)
    a = Session(rw, c, p1, s1, cport=40000)
    b = Session(rw, seq_add(c, 77777), p2, s2, cport=40001)
    a.handshake()
    if late_svm:  # b: the client's ACK and first request reach the SVM before its SYN-ACK
        b.syn()
        assert rw.inbound(b.c2g(b.c_next, b.p_next, TCP_ACK), "ack") == []
        first = payload(rnd, 100)
        assert rw.inbound(b.c2g(b.c_next, b.p_next, TCP_ACK | TCP_PSH, first), "req") == []
        b.svm_synack(p_known=True)
        released = rw.ready()
        assert [t for _, t in released] == ["ack", "req"]
        assert released[0][0] == b.c2g(b.c_next, b.s_next, TCP_ACK)
        assert released[1][0] == b.c2g(b.c_next, b.s_next, TCP_ACK | TCP_PSH, first)
        b.c_next = seq_add(b.c_next, len(first))
    else:
        b.handshake()
    for _ in range(rounds):
        for sess in (a, b) if rnd.random() < 0.5 else (b, a):
            sess.request(payload(rnd, rnd.choice((0, 1, rnd.randrange(1461)))))
            for _ in range(rnd.randrange(3)):
                sess.reply(payload(rnd, rnd.choice((0, 1, 1460, rnd.randrange(1461)))))
    a.request(b"", flags=TCP_FIN | TCP_ACK)
    a.reply(b"", flags=TCP_FIN | TCP_ACK)
    a.request(b"", flags=TCP_ACK)  # the last ACK still rewritten
    assert rw.counters["learned"] == 2


# ---- deferral --------------------------------------------------------------------------------


def test_ack_before_synack_is_deferred_then_released():
    rw = SeqRewriter()
    s = Session(rw, 5000, p_isn=0xFFFFFFF0, s_isn=0x10)
    s.syn(now=0.0)
    ack = s.c2g(s.c_next, s.p_next, TCP_ACK)
    req = s.c2g(s.c_next, s.p_next, TCP_ACK | TCP_PSH, b"hello")
    assert rw.inbound(ack, 7, now=0.1) == []
    assert rw.inbound(req, 8, now=0.2) == []
    assert rw.counters["deferred"] == 2
    # Other connections are not held up.
    other = c2g(1, 2, TCP_ACK, b"zz", cport=50000)
    assert rw.inbound(other, 9, 0.3) == [(other, 9)]
    assert rw.tick(0.5) == []  # not timed out yet
    s.svm_synack(now=0.6, p_known=True)  # the PVM's ISN is known: the SYN-ACK is shifted too
    released = rw.ready()
    assert [t for _, t in released] == [7, 8] and released[0][0] is ack and released[1][0] is req
    assert released[0][0] == s.c2g(s.c_next, s.s_next, TCP_ACK)
    assert released[1][0] == s.c2g(s.c_next, s.s_next, TCP_ACK | TCP_PSH, b"hello")
    for frame, _ in released:
        assert_checksum(frame)
    assert rw.ready() == []
    s.c_next = seq_add(s.c_next, 5)
    s.reply(b"world")
    s.request(b"more")
    assert rw.tick(5.0) == []  # nothing left to time out


def test_released_frames_come_before_the_next_inbound_frame():
    """If the driver does not call ready() after the SYN-ACK, the next
    inbound() hands the released frames out first, in order."""
    rw = SeqRewriter()
    s = Session(rw, 5000, 1000, 2000)
    s.syn()
    ack = s.c2g(s.c_next, s.p_next, TCP_ACK)
    assert rw.inbound(ack, "a") == []
    s.svm_synack(p_known=True)
    req = s.c2g(s.c_next, s.p_next, TCP_ACK | TCP_PSH, b"x")
    out = rw.inbound(req, "b")
    assert [t for _, t in out] == ["a", "b"]
    assert out[1][0] == s.c2g(s.c_next, s.s_next, TCP_ACK | TCP_PSH, b"x")
    assert rw.ready() == []


def test_deferral_times_out_unmodified():
    rw = SeqRewriter()
    s = Session(rw, 5000, 1000, 2000)
    s.syn(now=10.0)
    ack = s.c2g(s.c_next, s.p_next, TCP_ACK)
    req = s.c2g(s.c_next, s.p_next, TCP_ACK | TCP_PSH, b"x")
    assert rw.inbound(ack, "a", 10.0) == [] and rw.inbound(req, "b", 10.5) == []
    assert rw.tick(10.0 + DEFER_TIMEOUT - 0.01) == []
    out = rw.tick(10.0 + DEFER_TIMEOUT)
    assert [(f, t) for f, t in out] == [(ack, "a"), (req, "b")]
    assert ack == s.c2g(s.c_next, s.p_next, TCP_ACK)  # unmodified
    assert rw.counters["defer_timeouts"] == 2
    assert rw.counters["connections"] == 0  # forgotten
    later = s.c2g(s.c_next, s.p_next, TCP_ACK)
    assert deliver(rw, later, now=12.0) == s.c2g(s.c_next, s.p_next, TCP_ACK)


def test_rst_while_deferred_lets_everything_through_unmodified():
    rw = SeqRewriter()
    s = Session(rw, 5000, 1000, 2000)
    s.syn()
    ack = s.c2g(s.c_next, s.p_next, TCP_ACK)
    assert rw.inbound(ack, "a") == []
    rst = s.c2g(s.c_next, s.p_next, TCP_RST | TCP_ACK)
    out = rw.inbound(rst, "r")
    assert out == [(ack, "a"), (rst, "r")]
    assert rst == s.c2g(s.c_next, s.p_next, TCP_RST | TCP_ACK)
    assert rw.counters["defer_abandoned"] == 1 and rw.counters["connections"] == 0


def test_deferral_is_bounded():
    rw = SeqRewriter(max_deferred=3)
    s = Session(rw, 5000, 1000, 2000)
    s.syn()
    frames = [s.c2g(s.c_next, s.p_next, TCP_ACK | TCP_PSH, bytes([i])) for i in range(4)]
    assert [rw.inbound(f, i) for i, f in enumerate(frames[:3])] == [[], [], []]
    out = rw.inbound(frames[3], 3)
    assert [t for _, t in out] == [0, 1, 2, 3]
    assert rw.counters["defer_overflows"] == 4 and rw.counters["connections"] == 0


# ---- reset, restarts, end of state -------------------------------------------------------------


def test_reset_makes_everything_pass_unmodified_and_returns_deferred():
    rw = SeqRewriter()
    a = Session(rw, 100, 0x11111111, 0x22222222, cport=40000)
    a.handshake()
    a.request(b"q")
    b = Session(rw, 200, 0x33333333, 0x44444444, cport=40001)
    b.syn()
    d1 = b.c2g(b.c_next, b.p_next, TCP_ACK)
    d2 = b.c2g(b.c_next, b.p_next, TCP_ACK | TCP_PSH, b"later")
    assert rw.inbound(d1, ("epoch", 3)) == [] and rw.inbound(d2, ("epoch", 4)) == []
    held = rw.reset()
    assert held == [(d1, ("epoch", 3)), (d2, ("epoch", 4))]
    assert held[0][0] is d1 and d1 == b.c2g(b.c_next, b.p_next, TCP_ACK)  # untouched
    assert rw.counters["connections"] == 0
    assert rw.tick(100.0) == [] and rw.ready() == []
    # After the load the SVM shares the PVM's numbers: offset 0 everywhere.
    for frame in (a.c2g(a.c_next, a.p_next, TCP_ACK, b"x"), b.c2g(b.c_next, b.p_next, TCP_ACK)):
        copy = bytearray(frame)
        assert deliver(rw, frame) == copy
    out = a.g2c(a.p_next, a.c_next, TCP_ACK, b"y")
    copy = bytearray(out)
    assert rw.outbound(out) is out and out == copy
    assert rw.counters["connections"] == 0


def test_reset_returns_released_frames_not_handed_out_unmodified():
    rw = SeqRewriter()
    s = Session(rw, 5000, 1000, 2000)
    s.syn()
    ack = s.c2g(s.c_next, s.p_next, TCP_ACK)
    assert rw.inbound(ack, "a") == []
    s.svm_synack(p_known=True)  # released, but the driver has not called ready()
    assert rw.reset() == [(ack, "a")]
    assert ack == s.c2g(s.c_next, s.p_next, TCP_ACK)


def test_synack_after_reset_learns():
    """The client's SYN reached the guest before the checkpoint but was
    answered after it: PVM and SVM picked different ISNs, unknown to the
    rewriter.  The SVM's SYN-ACK starts learning."""
    rw = SeqRewriter()
    s = Session(rw, 5000, 0xAAAA0000, 0x5555)
    s.syn()
    rw.reset()
    s.svm_synack()
    s.client_ack()
    s.request(b"abc")
    s.reply(b"defg")
    # A retransmitted SYN of the same connection changes nothing.
    deliver(rw, s.c2g(s.c_isn, 0, TCP_SYN))
    s.reply(b"h")


def test_synack_retransmission_after_reset_learns_offset_zero():
    rw = SeqRewriter()
    s = Session(rw, 5000, 777, 777)  # after the load the SVM's ISN is the PVM's
    s.svm_synack()
    s.client_ack()
    assert rw.counters["learned"] == 1
    s.request(b"x")
    s.reply(b"y")
    assert rw.counters["rewritten_in"] == rw.counters["rewritten_out"] == 0


def test_rst_ends_state_and_a_new_syn_restarts_learning():
    rw = SeqRewriter()
    s = Session(rw, 5000, 1000, 900000)
    s.handshake()
    s.request(b"a")
    s.reply(b"b")
    # The client resets: the RST still carries an ack for the SVM.
    s.request(b"", flags=TCP_RST | TCP_ACK)
    # Frames the guest had queued behind the RST are still shifted.
    s.reply(b"late")
    # A new connection on the same 4-tuple, new ISNs everywhere.
    n = Session(rw, 777777, 0xDEAD0000, 0x0000BEEF)
    n.handshake()
    n.request(b"c")
    n.reply(b"d")
    assert rw.counters["restarts"] == 1 and rw.counters["learned"] == 2


def test_guest_rst_then_new_syn():
    rw = SeqRewriter()
    s = Session(rw, 5000, 1000, 900000)
    s.handshake()
    s.reply(b"", flags=TCP_RST | TCP_ACK)  # shifted like any segment
    n = Session(rw, 123, 456, 789)
    n.handshake()
    n.request(b"x")
    n.reply(b"y")


def test_rst_state_goes_after_grace():
    rw = SeqRewriter()
    s = Session(rw, 5000, 1000, 900000)
    s.handshake(now=1.0)
    s.request(b"", now=1.0, flags=TCP_RST | TCP_ACK)
    rw.tick(1.0 + CLOSE_GRACE - 0.1)
    assert rw.counters["connections"] == 1
    rw.tick(1.0 + CLOSE_GRACE + _PRUNE_INTERVAL)  # pruning runs at most once per interval
    assert rw.counters["connections"] == 0 and rw.counters["pruned"] == 1


def test_new_syn_after_fins_restarts_learning():
    rw = SeqRewriter()
    s = Session(rw, 5000, 1000, 900000)
    s.handshake()
    s.request(b"bye", flags=TCP_FIN | TCP_ACK)
    s.reply(b"", flags=TCP_FIN | TCP_ACK)
    s.request(b"", flags=TCP_ACK)
    n = Session(rw, 9000, 0x70000000, 0x10)
    n.handshake()
    n.request(b"again")
    n.reply(b"ok")
    assert rw.counters["restarts"] == 1


def test_new_syn_while_learning_restarts():
    rw = SeqRewriter()
    s = Session(rw, 5000, 1000, 2000)
    s.syn()
    s.svm_synack()
    n = Session(rw, 6000, 3000, 4000)  # the client gave up and reconnects from the same port
    n.handshake()
    n.request(b"x")
    n.reply(b"y")


def test_syn_retransmission_keeps_learning_state():
    rw = SeqRewriter()
    s = Session(rw, 5000, 1000, 2000)
    s.syn()
    s.svm_synack()
    s.syn()  # the PVM's SYN-ACK was lost: the client retransmits
    s.svm_synack()  # the SVM retransmits its SYN-ACK (same ISN)
    s.client_ack()
    s.request(b"x")
    s.reply(b"y")
    assert rw.counters["restarts"] == 0


def test_stray_syn_on_live_connection_keeps_the_offset():
    """A SYN with another ISN on an established connection gets a challenge
    ACK from the guest, which keeps the connection: so does the rewriter."""
    rw = SeqRewriter()
    s = Session(rw, 5000, 1000, 900000)
    s.handshake()
    stray = deliver(rw, s.c2g(424242, 0, TCP_SYN))
    assert stray == s.c2g(424242, 0, TCP_SYN)
    s.reply(b"", flags=TCP_ACK)  # the challenge ACK, in the PVM's space
    s.request(b"still here")
    s.reply(b"yes")
    assert rw.counters["restarts"] == 0


def test_fin_state_goes_after_grace_not_before():
    rw = SeqRewriter()
    s = Session(rw, 5000, 1000, 900000)
    s.handshake(now=0.0)
    s.reply(b"", now=1.0, flags=TCP_FIN | TCP_ACK)
    s.request(b"", now=1.0, flags=TCP_FIN | TCP_ACK)
    rw.tick(1.0 + CLOSE_GRACE - 0.5)
    s.reply(b"", now=1.0 + CLOSE_GRACE - 0.5, flags=TCP_ACK)  # the last ACK: still shifted
    rw.tick(1.0 + 2 * CLOSE_GRACE - 0.6)
    assert rw.counters["connections"] == 1
    rw.tick(1.0 + 2 * CLOSE_GRACE + _PRUNE_INTERVAL)  # pruning runs at most once per interval
    assert rw.counters["connections"] == 0


def test_idle_pruning_spares_live_offsets():
    rw = SeqRewriter()
    live = Session(rw, 1, 1000, 900000, cport=40000)
    live.handshake(now=0.0)
    zero = Session(rw, 2, 5555, 5555, cport=40001)
    zero.handshake(now=0.0)
    learning = Session(rw, 3, 10, 20, cport=40002)
    learning.syn(now=0.0)
    rw.tick(IDLE_TIMEOUT)
    assert rw.counters["connections"] == 1  # offset 0 and unfinished handshakes go
    rw.tick(3600.0)  # an hour idle: a live connection keeps its offset (failover: for good)
    live.request(b"still", now=3600.0)
    live.reply(b"here", now=3600.0)
    rw.tick(3600.0 + LIVE_IDLE_TIMEOUT)
    assert rw.counters["connections"] == 0


def test_learning_states_are_bounded():
    rw = SeqRewriter(max_learning=4)
    for port in range(10):
        deliver(rw, c2g(port, 0, TCP_SYN, cport=30000 + port))
    assert rw.counters["connections"] == 4 and rw.counters["evicted"] == 6
    # Learned connections do not count and are never evicted.
    s = Session(rw, 1, 1000, 900000, cport=40000)
    s.handshake()
    for port in range(10, 20):
        deliver(rw, c2g(port, 0, TCP_SYN, cport=30000 + port))
    s.request(b"x")
    s.reply(b"y")


def test_unknown_connections_pass_unmodified():
    rw = SeqRewriter()
    for frame in (c2g(1, 2, TCP_ACK, b"data"), c2g(1, 2, TCP_RST), c2g(1, 2, TCP_FIN | TCP_ACK)):
        copy = bytearray(frame)
        assert deliver(rw, frame) == copy
    for frame in (g2c(5, 6, TCP_ACK, b"data"), g2c(5, 6, TCP_RST | TCP_ACK)):
        copy = bytearray(frame)
        assert rw.outbound(frame) is frame and frame == copy
    assert rw.counters["connections"] == 0


# ---- the guest as a client ------------------------------------------------------------------


def guest_client(rw, s_isn, p_isn, r_isn, cport=40000):
    """The guest (port 33333) connects to a server (the "client" address, port cport)."""
    g = dict(gport=33333, cport=cport)
    out = rw.outbound(g2c(s_isn, 0, TCP_SYN, **g))
    assert out == g2c(s_isn, 0, TCP_SYN, **g)  # the comparator matches SYNs by flags
    synack = c2g(r_isn, p_isn + 1, TCP_SYN | TCP_ACK, **g)
    assert deliver(rw, synack) == c2g(r_isn, s_isn + 1, TCP_SYN | TCP_ACK, **g)
    return g


def test_guest_as_client():
    rw = SeqRewriter()
    s_isn, p_isn, r_isn = 0xFFFFFF00, 0x1234, 777
    g = guest_client(rw, s_isn, p_isn, r_isn)
    out = rw.outbound(g2c(s_isn + 1, r_isn + 1, TCP_ACK | TCP_PSH, b"GET /", **g))
    assert out == g2c(p_isn + 1, r_isn + 1, TCP_ACK | TCP_PSH, b"GET /", **g)
    resp = c2g(r_isn + 1, p_isn + 6, TCP_ACK | TCP_PSH, b"200 OK", **g)
    assert deliver(rw, resp) == c2g(r_isn + 1, s_isn + 6, TCP_ACK | TCP_PSH, b"200 OK", **g)
    assert_checksum(resp)
    assert rw.counters["learned"] == 1


def test_guest_as_client_connection_refused():
    rw = SeqRewriter()
    g = dict(gport=33333, cport=40000)
    rw.outbound(g2c(500, 0, TCP_SYN, **g))
    rst = c2g(0, 9001, TCP_RST | TCP_ACK, **g)
    assert deliver(rw, rst) == c2g(0, 501, TCP_RST | TCP_ACK, **g)


def test_guest_syn_retransmission_keeps_state_new_isn_restarts():
    rw = SeqRewriter()
    g = dict(gport=33333, cport=40000)
    rw.outbound(g2c(500, 0, TCP_SYN, **g))
    rw.outbound(g2c(500, 0, TCP_SYN, **g))
    assert rw.counters["restarts"] == 0
    guest_client(rw, 8000, 9000, 10)
    assert rw.counters["restarts"] == 1


# ---- SACK, checksums, non-TCP, IPv6 ----------------------------------------------------------


def sack(*edges, lead=b"\x01\x01") -> bytes:
    opt = lead + bytes([5, 2 + 4 * len(edges)]) + b"".join(struct.pack("!I", e & 0xFFFFFFFF) for e in edges)
    return opt + b"\0" * (-len(opt) % 4)


@pytest.mark.parametrize("lead", [b"\x01\x01", b"\x01", b"", b"\x01\x01\x01"])
def test_sack_blocks_are_shifted(lead):
    """Aligned (NOP NOP SACK) and odd-aligned option layouts."""
    rw = SeqRewriter()
    s = Session(rw, 5000, 0xFFFFFF00, 0x100)
    s.handshake()
    p, sv = s.p_next, s.s_next
    frame = s.c2g(s.c_next, p, TCP_ACK, options=sack(p + 100, p + 200, p + 300, p + 400, lead=lead))
    deliver(rw, frame)
    assert frame == s.c2g(s.c_next, sv, TCP_ACK, options=sack(sv + 100, sv + 200, sv + 300, sv + 400, lead=lead))
    assert_checksum(frame)
    assert rw.counters["sack_rewritten"] == 1


def test_other_options_and_malformed_options_are_left_alone():
    rw = SeqRewriter()
    s = Session(rw, 5000, 1000, 900000)
    s.handshake()
    ts = b"\x01\x01\x08\x0a" + struct.pack("!II", 1, 2)
    frame = s.c2g(s.c_next, s.p_next, TCP_ACK, options=ts)
    deliver(rw, frame)
    assert frame == s.c2g(s.c_next, s.s_next, TCP_ACK, options=ts)
    bad = b"\x05\x30\x00\x00"  # a SACK option longer than the header: not touched
    frame = s.c2g(s.c_next, s.p_next, TCP_ACK, options=bad)
    deliver(rw, frame)
    assert frame == s.c2g(s.c_next, s.s_next, TCP_ACK, options=bad)
    assert rw.counters["sack_rewritten"] == 0


@settings(max_examples=200, deadline=None)
@given(word=st.integers(0, M32 - 1), new=st.integers(0, M32 - 1), lead=st.integers(0, 3),
       data=st.binary(max_size=64), edges=st.lists(st.integers(0, M32 - 1), min_size=2, max_size=8).filter(
           lambda e: len(e) % 2 == 0))  # fmt: skip
def test_incremental_checksums_equal_a_fresh_computation(word, new, lead, data, edges):
    frame = c2g(word, word ^ 0x5A5A5A5A, TCP_ACK, data, options=sack(*edges, lead=b"\x01" * lead))
    pkt = parse(frame)
    packets.set_tcp_seq(frame, pkt, new)
    packets.set_tcp_ack(frame, pkt, new ^ 0xFFFF)
    assert _shift_sack(frame, pkt, new)
    assert_checksum(frame)


def test_non_tcp_passes_untouched():
    rw = SeqRewriter()
    udp = packets.build_udp(CMAC, GMAC, CIP, GIP, 53, 53, b"dns")
    arp = bytearray(packets.gratuitous_arp(CMAC, CIP))
    rarp = bytearray(packets.rarp_announce(CMAC))
    short = bytearray(b"\x01\x02")
    truncated_tcp = c2g(1, 2, TCP_ACK)[:40]
    for frame in (udp, arp, rarp, short, truncated_tcp):
        copy = bytearray(frame)
        assert rw.inbound(frame, "t") == [(frame, "t")] and frame == copy
        assert rw.outbound(frame) is frame and frame == copy
    assert rw.counters["connections"] == 0


def build_tcp6(src, dst, sport, dport, seq, ack, flags, data=b"") -> bytearray:
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags,
                                65535, 0, 0)) + data  # fmt: skip
    pseudo = src + dst + struct.pack("!IxxxB", len(tcp), packets.PROTO_TCP)
    struct.pack_into("!H", tcp, 16, packets.internet_checksum(pseudo + bytes(tcp)))
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), packets.PROTO_TCP, 64, src, dst)
    return bytearray(GMAC + CMAC + struct.pack("!H", packets.ETH_P_IPV6) + ip + tcp)


def test_ipv6():
    rw = SeqRewriter()
    c6, g6 = bytes(15) + b"\x01", bytes(15) + b"\x02"
    C, P, S = 10, 0xFFFFFFFE, 0x7FFFFFFF
    deliver(rw, build_tcp6(c6, g6, 5000, 443, C, 0, TCP_SYN))
    assert rw.outbound(build_tcp6(g6, c6, 443, 5000, S, C + 1, TCP_SYN | TCP_ACK)) == \
        build_tcp6(g6, c6, 443, 5000, S, C + 1, TCP_SYN | TCP_ACK)  # fmt: skip
    ack = deliver(rw, build_tcp6(c6, g6, 5000, 443, C + 1, P + 1, TCP_ACK, b"hi"))
    assert ack == build_tcp6(c6, g6, 5000, 443, C + 1, S + 1, TCP_ACK, b"hi")
    assert_checksum(ack)
    out = rw.outbound(build_tcp6(g6, c6, 443, 5000, S + 1, C + 3, TCP_ACK, b"hello"))
    assert out == build_tcp6(g6, c6, 443, 5000, P + 1, C + 3, TCP_ACK, b"hello")
    assert_checksum(out)
