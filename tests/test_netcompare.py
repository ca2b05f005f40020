"""The network comparator core (netcompare.Comparator): pure, no KVM, no taps.

Frames are built with packets.build_tcp/build_udp as the guest would send
them; the primary's (PVM) and the secondary's (SVM) copies differ only
where the real guests may: IP ID, TTL, window, timestamp values,
checksums, segmentation, timing."""

from __future__ import annotations

import random
import struct

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmcolo import packets
from kvmcolo.netcompare import (
    DEFAULT_COMPARE_TIMEOUT,
    DEFAULT_MAX_QUEUE,
    Comparator,
    Release,
    RequestCheckpoint,
)
from kvmcolo.packets import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN

GUEST_MAC = bytes.fromhex("525400123456")
PEER_MAC = bytes.fromhex("020000000001")
GUEST, PEER = bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1])
P_ISN, S_ISN, C_ISN = 1_000_000, 77_777_777, 5_000  # PVM's, SVM's and client's initial sequence numbers


def tcp(seq, ack, flags, payload=b"", *, sport=80, dport=40000, **kw):
    """A segment the guest sends to the peer."""
    return bytes(packets.build_tcp(GUEST_MAC, PEER_MAC, GUEST, PEER, sport, dport, seq & 0xFFFFFFFF,
                                   ack & 0xFFFFFFFF, flags, payload, **kw))  # fmt: skip


def noisy(frame, ip_id=0x4242, ttl=17, window=1234, options=None):
    """The same segment with the header fields that differ between two
    guests changed: IP ID, TTL, window, TCP options, checksums."""
    pkt = packets.parse(frame)
    payload = bytes(frame[pkt.payload : pkt.end])
    return tcp(pkt.seq, pkt.ack, pkt.flags, payload, sport=pkt.sport, dport=pkt.dport, ip_id=ip_id, ttl=ttl,
               window=window, options=options if options is not None else b"")  # fmt: skip


def udp(payload, *, ip_id=0, ttl=64, sport=53, dport=3333):
    return bytes(packets.build_udp(GUEST_MAC, PEER_MAC, GUEST, PEER, sport, dport, payload, ip_id=ip_id, ttl=ttl))


def ipv4(proto, body, *, ip_id=0, ttl=64, frag=0):
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ip_id, frag, ttl, proto, 0, GUEST, PEER))
    struct.pack_into("!H", ip, 10, packets.internet_checksum(bytes(ip)))
    return PEER_MAC + GUEST_MAC + struct.pack("!H", packets.ETH_P_IPV4) + bytes(ip) + body


def icmp_echo(ident, seq, data, **kw):
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    body = body[:2] + struct.pack("!H", packets.internet_checksum(body)) + body[4:]
    return ipv4(packets.PROTO_ICMP, body, **kw)


def released(actions):
    return [a.frame for a in actions if isinstance(a, Release)]


def requests(actions):
    return [a.reason for a in actions if isinstance(a, RequestCheckpoint)]


class Run:
    """Feeds a comparator and records everything it asks for."""

    def __init__(self, **kw):
        self.c = Comparator(**kw)
        self.now = 0.0
        self.actions = []

    def _record(self, actions):
        self.actions += actions
        return actions

    def p(self, frame, epoch=0):
        self.now += 0.001
        return self._record(self.c.primary(frame, epoch, self.now))

    def s(self, frame, epoch=0):
        self.now += 0.001
        return self._record(self.c.secondary(frame, epoch, self.now))

    def checkpoint(self, epoch):
        return self._record(self.c.checkpoint(epoch, self.now))

    def tick(self, dt=0.0):
        self.now += dt
        return self._record(self.c.tick(self.now))

    @property
    def out(self):
        return released(self.actions)

    @property
    def asked(self):
        return requests(self.actions)


def handshake(r):
    """The client's SYN reached both guests; both answer, each with its own ISN."""
    r.p(tcp(P_ISN, C_ISN + 1, TCP_SYN | TCP_ACK))
    r.s(noisy(tcp(S_ISN, C_ISN + 1, TCP_SYN | TCP_ACK)))


# ---- TCP: identical output -------------------------------------------------------------------


def test_identical_streams_release_everything_in_order():
    r = Run()
    pvm = []
    svm = []
    pvm.append(tcp(P_ISN, C_ISN + 1, TCP_SYN | TCP_ACK))
    svm.append(tcp(S_ISN, C_ISN + 1, TCP_SYN | TCP_ACK))
    seq, ack = P_ISN + 1, C_ISN + 1
    for request, reply in [(b"GET / HTTP/1.0\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\nhello"), (b"x" * 300, b"y" * 3000)]:
        ack += len(request)
        pvm.append(tcp(seq, ack, TCP_ACK))  # the guest acknowledges the request
        svm.append(tcp(seq, ack, TCP_ACK))
        for i in range(0, len(reply), 1448):
            chunk = reply[i : i + 1448]
            pvm.append(tcp(seq, ack, TCP_ACK | TCP_PSH, chunk))
            svm.append(tcp(seq, ack, TCP_ACK | TCP_PSH, chunk))
            seq += len(chunk)
    pvm.append(tcp(seq, ack, TCP_ACK | TCP_FIN))
    svm.append(tcp(seq, ack, TCP_ACK | TCP_FIN))
    # each guest's frame arrives at a different time: the SVM lags two frames behind
    for i in range(len(pvm) + 2):
        if i < len(pvm):
            r.p(pvm[i])
        if i >= 2:
            r.s(svm[i - 2])
    assert r.asked == []
    assert r.out == pvm
    st_ = r.c.stats()
    assert st_["held"] == 0 and st_["released"] == len(pvm) and st_["matched"] == len(pvm)
    assert st_["tcp_connections"] == 0  # the FIN matched and nothing is held: the state is gone


def test_primary_ahead_is_held_until_secondary_catches_up():
    r = Run()
    handshake(r)
    data = tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"hello world")
    assert r.p(data) == []
    assert r.s(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"hello ")) == []  # not all of it yet
    assert released(r.s(tcp(P_ISN + 7, C_ISN + 1, TCP_ACK, b"world"))) == [data]
    assert r.asked == []


def test_secondary_ahead_is_buffered():
    r = Run()
    handshake(r)
    r.s(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"abcdefghij"))
    a = tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"abc")
    b = tcp(P_ISN + 4, C_ISN + 1, TCP_ACK, b"defghij")
    assert released(r.p(a)) == [a]
    assert released(r.p(b)) == [b]
    assert r.asked == []


def test_header_only_differences_do_not_matter():
    r = Run()
    ts = lambda v, e: b"\x01\x01\x08\x0a" + struct.pack("!II", v, e)  # NOP NOP timestamp  # noqa: E731
    p_frames = [
        tcp(P_ISN, C_ISN + 1, TCP_SYN | TCP_ACK, options=ts(100, 5), window=29200, ip_id=1),
        tcp(P_ISN + 1, C_ISN + 1, TCP_ACK | TCP_PSH, b"payload one", options=ts(101, 6), ip_id=2),
        tcp(P_ISN + 12, C_ISN + 1, TCP_ACK | TCP_PSH, b"payload two", options=ts(102, 7), ip_id=3),
    ]
    s_frames = [
        tcp(S_ISN, C_ISN + 1, TCP_SYN | TCP_ACK, options=ts(9100, 5), window=28960, ip_id=900, ttl=63),
        tcp(P_ISN + 1, C_ISN + 1, TCP_ACK | TCP_PSH, b"payload one", options=ts(9101, 6), ip_id=901, ttl=3,
            window=7),
        bytearray(tcp(P_ISN + 12, C_ISN + 1, TCP_ACK | TCP_PSH, b"payload two", options=ts(9102, 7), ip_id=902)),
    ]  # fmt: skip
    s_frames[2][14 + 10] ^= 0xFF  # a wrong IP checksum
    s_frames[2][14 + 20 + 16] ^= 0xFF  # and a wrong TCP checksum
    for p_frame, s_frame in zip(p_frames, s_frames):
        r.s(bytes(s_frame))
        r.p(p_frame)
    assert r.asked == []
    assert r.out == p_frames


def test_retransmission_below_the_compared_mark_needs_no_counterpart():
    r = Run()
    handshake(r)
    seg = tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"0123456789")
    r.p(seg)
    r.s(seg)
    again = noisy(seg, ip_id=7)
    assert released(r.p(again)) == [again]
    # a retransmission that coalesces old and new data compares the new part only
    more = tcp(P_ISN + 6, C_ISN + 1, TCP_ACK, b"56789ABC")
    assert r.p(more) == []
    assert released(r.s(tcp(P_ISN + 11, C_ISN + 1, TCP_ACK, b"ABC"))) == [more]
    assert r.asked == []


def test_sequence_numbers_wrap_around():
    r = Run()
    isn = 0xFFFFFFF0
    r.p(tcp(isn, C_ISN + 1, TCP_SYN | TCP_ACK))
    r.s(tcp(S_ISN, C_ISN + 1, TCP_SYN | TCP_ACK))
    data = bytes(range(40))
    p_seg = tcp(isn + 1, C_ISN + 1, TCP_ACK, data)
    r.p(p_seg)
    r.s(tcp(isn + 1, C_ISN + 1, TCP_ACK, data[:20]))
    r.s(tcp(isn + 21, C_ISN + 1, TCP_ACK, data[20:]))  # crosses 2**32
    assert r.out[-1] == p_seg
    p_fin = tcp(isn + 41, C_ISN + 1, TCP_ACK | TCP_FIN)
    r.p(p_fin)
    r.s(tcp(isn + 41, C_ISN + 1, TCP_ACK | TCP_FIN))
    assert r.out[-1] == p_fin and r.asked == []


# ---- TCP: the same bytes, any segmentation, any interleaving --------------------------------------


@st.composite
def two_segmentations(draw, flip=False):
    # a length drawn on its own (st.binary keeps to a few bytes) and bytes
    # from a seeded PRNG, so streams are realistic sizes yet shrink well
    n = draw(st.integers(1, 5000))
    data = random.Random(draw(st.integers(0, 2**32))).randbytes(n)

    def segments(retransmit):
        cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=20)) if n > 1 else set())
        bounds = [0, *cuts, n]
        segs = [(a, b) for a, b in zip(bounds, bounds[1:])]
        if retransmit:
            # a retransmission repeats sent bytes later (possibly a range
            # spanning several segments, as TCP coalesces when it resends)
            for _ in range(draw(st.integers(0, 3))):
                i = draw(st.integers(0, len(segs) - 1))
                hi = segs[i][1]
                lo = draw(st.integers(0, hi - 1))
                segs.insert(draw(st.integers(i + 1, len(segs))), (lo, hi))
        return segs

    p_segs = segments(True)
    s_segs = segments(True)
    flipped = draw(st.integers(0, n - 1)) if flip else None
    fin = draw(st.booleans())
    order = draw(st.lists(st.booleans(), min_size=len(p_segs) + len(s_segs) + 4, max_size=len(p_segs) + len(s_segs) + 4))
    return data, p_segs, s_segs, flipped, fin, order


def build_streams(data, p_segs, s_segs, flipped, fin):
    ack = C_ISN + 1
    s_data = bytearray(data)
    if flipped is not None:
        s_data[flipped] ^= 0x5A
    pvm = [tcp(P_ISN, ack, TCP_SYN | TCP_ACK)]
    svm = [noisy(tcp(S_ISN, ack, TCP_SYN | TCP_ACK))]
    pvm += [tcp(P_ISN + 1 + a, ack, TCP_ACK | TCP_PSH, data[a:b]) for a, b in p_segs]
    svm += [noisy(tcp(P_ISN + 1 + a, ack, TCP_ACK | TCP_PSH, bytes(s_data[a:b])), ip_id=a) for a, b in s_segs]
    if fin:
        pvm.append(tcp(P_ISN + 1 + len(data), ack, TCP_ACK | TCP_FIN))
        svm.append(noisy(tcp(P_ISN + 1 + len(data), ack, TCP_ACK | TCP_FIN)))
    return pvm, svm


def interleave(r, pvm, svm, order):
    """Feed both streams, each in its own order, merged as `order` says."""
    i = j = 0
    for take_primary in order:
        if take_primary and i < len(pvm):
            r.p(pvm[i])
            i += 1
        elif j < len(svm):
            r.s(svm[j])
            j += 1
    for frame in pvm[i:]:
        r.p(frame)
    for frame in svm[j:]:
        r.s(frame)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(two_segmentations())
def test_any_segmentation_and_interleaving_matches(case):
    data, p_segs, s_segs, _, fin, order = case
    pvm, svm = build_streams(data, p_segs, s_segs, None, fin)
    r = Run()
    interleave(r, pvm, svm, order)
    assert r.asked == []
    assert r.out == pvm
    assert r.c.stats()["held"] == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(two_segmentations(flip=True))
def test_one_flipped_byte_is_a_mismatch(case):
    data, p_segs, s_segs, flipped, fin, order = case
    pvm, svm = build_streams(data, p_segs, s_segs, flipped, fin)
    r = Run()
    interleave(r, pvm, svm, order)
    assert r.asked == ["net-mismatch tcp"]
    assert r.c.counters["mismatch_tcp"] == 1
    # the first segment (in send order) that carries the flipped byte, and
    # everything the PVM sent after it, is still held
    culprit = 1 + next(i for i, (a, b) in enumerate(p_segs) if a <= flipped < b)
    assert pvm[culprit] not in r.out
    assert r.out == pvm[: len(r.out)] and len(r.out) < culprit + 1
    # the checkpoint covers all of it: out it goes, in order, and nothing more is asked
    r.c.checkpoint_started()
    r.checkpoint(1)
    assert r.out == pvm
    assert r.asked == ["net-mismatch tcp"]
    assert r.c.stats()["held"] == 0


@st.composite
def a_checkpoint_mid_stream(draw):
    data, p_segs, s_segs, _, fin, order = draw(two_segmentations())
    pvm, svm = build_streams(data, p_segs, s_segs, None, fin)
    capture = draw(st.integers(1, len(pvm)))  # pvm[:capture] were sent before checkpoint 1's capture
    stopped = draw(st.integers(0, len(svm)))  # the SVM was stopped after svm[:stopped]
    garbage = draw(st.booleans())  # and had gone wrong past the capture point
    early = draw(st.integers(0, len(pvm) - capture))  # PVM frames sent before the secondary had checkpoint 1
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=8))
    return data, pvm, svm, fin, order, capture, stopped, garbage, early, cuts


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a_checkpoint_mid_stream())
def test_checkpoint_mid_stream(case):
    data, pvm, svm, fin, order, capture, stopped, garbage, early, cuts = case
    # where the PVM's stream was at the capture: the SVM goes on from there
    pos = max(packets.seq_diff(packets.parse(f).seq, P_ISN) + packets.parse(f).payload_len for f in pvm[:capture])
    pos = max(pos, 1)
    svm0 = []
    for frame in svm[:stopped]:
        pkt = packets.parse(frame)
        start = packets.seq_diff(pkt.seq, P_ISN)
        if garbage and pkt.payload_len and start + pkt.payload_len > pos:
            keep = max(0, pos - start)
            junk = bytes(frame[pkt.payload : pkt.payload + keep]) + b"\xee" * (pkt.payload_len - keep)
            frame = tcp(pkt.seq, pkt.ack, pkt.flags, junk)
        svm0.append(frame)
    # after loading checkpoint 1 the SVM sends the rest, segmented its own way
    rest = data[pos - 1 :]
    bounds = sorted({0, len(rest), *(c for c in cuts if c < len(rest))})
    svm1 = [tcp(P_ISN + pos + a, C_ISN + 1, TCP_ACK, rest[a:b]) for a, b in zip(bounds, bounds[1:])]
    if fin and capture < len(pvm):
        svm1.append(tcp(P_ISN + 1 + len(data), C_ISN + 1, TCP_ACK | TCP_FIN))
    r = Run()
    interleave(r, pvm[:capture], svm0, order)
    for frame in pvm[capture : capture + early]:
        r.p(frame, epoch=1)
    r.c.checkpoint_started()
    r.checkpoint(1)
    assert r.out == pvm[: len(r.out)] and len(r.out) >= capture
    i = j = 0
    for take_primary in order:
        if take_primary and capture + early + i < len(pvm):
            r.p(pvm[capture + early + i], epoch=1)
            i += 1
        elif j < len(svm1):
            r.s(svm1[j], epoch=1)
            j += 1
    for frame in pvm[capture + early + i :]:
        r.p(frame, epoch=1)
    for frame in svm1[j:]:
        r.s(frame, epoch=1)
    assert r.out == pvm
    assert r.asked == []


def test_mismatch_holds_the_connection_until_the_checkpoint():
    r = Run()
    handshake(r)
    bad = tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"pvm-says-this")
    r.p(bad)
    assert requests(r.s(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"svm-says-that"))) == ["net-mismatch tcp"]
    later = tcp(P_ISN + 14, C_ISN + 1, TCP_ACK, b"more")
    r.p(later)
    r.s(tcp(P_ISN + 14, C_ISN + 1, TCP_ACK, b"more"))  # would match, but the connection is held
    pure_ack = tcp(P_ISN + 18, C_ISN + 1, TCP_ACK)
    r.p(pure_ack)
    assert bad not in r.out and later not in r.out and pure_ack not in r.out
    assert released(r.checkpoint(1)) == [bad, later, pure_ack]
    assert r.asked == ["net-mismatch tcp"]


def test_svm_closing_early_or_sending_past_the_pvm_fin_is_a_mismatch():
    r = Run()
    handshake(r)
    r.s(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK | TCP_FIN, b"ab"))  # the SVM says less and closes
    r.p(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"abcd"))
    assert r.asked == ["net-mismatch tcp"]

    r = Run()
    handshake(r)
    r.s(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"abcd"))  # the SVM says more
    r.p(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK | TCP_FIN, b"ab"))
    assert r.asked == ["net-mismatch tcp"]


# ---- TCP: handshake, RST, ACKs -----------------------------------------------------------------


def test_syn_ack_matches_by_flags_and_its_retransmission_needs_no_counterpart():
    r = Run()
    syn_ack = tcp(P_ISN, C_ISN + 1, TCP_SYN | TCP_ACK)
    assert r.p(syn_ack) == []  # waits for the SVM's
    assert released(r.s(tcp(S_ISN, C_ISN + 1, TCP_SYN | TCP_ACK))) == [syn_ack]
    assert released(r.p(syn_ack)) == [syn_ack]
    assert r.asked == []


def test_guest_as_client():
    r = Run()
    syn = tcp(P_ISN, 0, TCP_SYN, sport=45000, dport=443)
    r.s(tcp(S_ISN, 0, TCP_SYN, sport=45000, dport=443))
    assert released(r.p(syn)) == [syn]
    ack = tcp(P_ISN + 1, 9001, TCP_ACK, sport=45000, dport=443)  # acknowledges the server's SYN-ACK
    assert r.p(ack) == []  # the SVM has not acknowledged it yet
    hello = tcp(P_ISN + 1, 9001, TCP_ACK | TCP_PSH, b"client hello", sport=45000, dport=443)
    r.p(hello)
    r.s(tcp(P_ISN + 1, 9001, TCP_ACK, sport=45000, dport=443))
    assert r.out[-1] == ack
    r.s(tcp(P_ISN + 1, 9001, TCP_ACK | TCP_PSH, b"client hello", sport=45000, dport=443))
    assert r.out[-1] == hello and r.asked == []


def test_syn_with_other_flags_is_a_mismatch():
    r = Run()
    r.s(tcp(S_ISN, 0, TCP_SYN))
    r.p(tcp(P_ISN, C_ISN + 1, TCP_SYN | TCP_ACK))
    assert r.asked == ["net-mismatch tcp"]


def test_rst_matches_an_svm_rst_and_ends_the_connection():
    r = Run()
    handshake(r)
    rst = tcp(P_ISN + 1, C_ISN + 1, TCP_RST | TCP_ACK)
    assert r.p(rst) == []
    assert released(r.s(tcp(P_ISN + 1, C_ISN + 1, TCP_RST | TCP_ACK))) == [rst]
    assert r.c.stats()["tcp_connections"] == 0


def test_ack_aware_release():
    r = Run()
    handshake(r)
    # the PVM has received 100 more bytes of the request than the SVM has
    seg = tcp(P_ISN + 1, C_ISN + 101, TCP_ACK, b"reply")
    r.p(seg)
    assert r.s(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"reply")) == []  # same bytes, smaller ack: held
    assert r.s(tcp(P_ISN + 6, C_ISN + 51, TCP_ACK)) == []  # not yet
    assert released(r.s(tcp(P_ISN + 6, C_ISN + 101, TCP_ACK))) == [seg]
    assert r.asked == []


def test_held_frame_blocks_later_frames_of_its_connection_only():
    r = Run()
    handshake(r)
    first = tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"first")
    ack = tcp(P_ISN + 6, C_ISN + 1, TCP_ACK)
    r.p(first)
    assert r.p(ack) == []  # a pure ACK, but behind a held segment
    other = tcp(P_ISN, C_ISN + 1, TCP_ACK, sport=22)  # another connection
    r.s(tcp(P_ISN, C_ISN + 1, TCP_ACK, sport=22))
    assert released(r.p(other)) == [other]
    assert released(r.s(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"first"))) == [first, ack]


def test_pure_ack_needs_no_counterpart_once_acknowledged():
    r = Run()
    handshake(r)
    r.s(tcp(P_ISN + 1, C_ISN + 500, TCP_ACK))
    ack = tcp(P_ISN + 1, C_ISN + 400, TCP_ACK, window=1)  # a window update, say
    assert released(r.p(ack)) == [ack]
    ahead = tcp(P_ISN + 1, C_ISN + 600, TCP_ACK)
    assert r.p(ahead) == []
    assert released(r.s(tcp(P_ISN + 1, C_ISN + 700, TCP_ACK))) == [ahead]
    assert r.asked == []


# ---- UDP, ICMP, other, not IP -----------------------------------------------------------------


def test_udp_fifo_match_ignores_ip_header():
    r = Run()
    a, b = udp(b"query one", ip_id=1), udp(b"query two", ip_id=2)
    r.p(a)
    r.p(b)
    assert released(r.s(udp(b"query one", ip_id=99, ttl=3))) == [a]
    assert released(r.s(udp(b"query two", ip_id=98))) == [b]
    assert r.asked == []


def test_udp_mismatch():
    r = Run()
    a = udp(b"random 1234")
    r.p(a)
    assert requests(r.s(udp(b"random 9876"))) == ["net-mismatch udp"]
    b = udp(b"next")
    r.p(b)
    r.s(udp(b"next"))
    assert r.out == []
    assert released(r.checkpoint(1)) == [a, b]
    assert r.c.counters["mismatch_udp"] == 1


def test_udp_length_difference_is_a_mismatch():
    r = Run()
    r.p(udp(b"abc"))
    r.s(udp(b"abcd"))
    assert r.asked == ["net-mismatch udp"]


def test_icmp_match_and_mismatch():
    r = Run()
    ping = icmp_echo(1, 1, b"x" * 56, ip_id=5)
    r.p(ping)
    assert released(r.s(icmp_echo(1, 1, b"x" * 56, ip_id=500, ttl=1))) == [ping]
    r.p(icmp_echo(1, 2, b"x" * 56))
    assert requests(r.s(icmp_echo(1, 3, b"x" * 56))) == ["net-mismatch icmp"]


def test_other_ip_protocols_and_fragments_compare_the_whole_payload():
    r = Run()
    gre = ipv4(47, b"\x00\x00\x08\x00inner", ip_id=1)
    frag = ipv4(packets.PROTO_UDP, b"second fragment", frag=0x0010, ip_id=2)  # offset 128: proto 0
    assert packets.parse(frag).proto == 0
    r.p(gre)
    r.p(frag)
    assert released(r.s(ipv4(47, b"\x00\x00\x08\x00inner", ip_id=77, ttl=9))) == [gre]
    assert requests(r.s(ipv4(packets.PROTO_UDP, b"SECOND fragment", frag=0x0010))) == ["net-mismatch other"]


def test_non_ip_passes_through_and_svm_copies_are_dropped():
    r = Run()
    arp = packets.gratuitous_arp(GUEST_MAC, GUEST)
    assert released(r.p(arp)) == [arp]
    assert r.s(arp) == []
    assert r.c.counters["passthrough"] == 1 and r.c.counters["dropped_secondary"] == 1


# ---- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_releases_older_frames_and_compares_newer_ones_after_it():
    r = Run()
    handshake(r)
    a = tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"before the capture")  # epoch 0, never matched
    r.p(a)
    r.s(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"BEFORE the capture and then some"))  # diverged
    assert r.asked == ["net-mismatch tcp"]
    # The PVM captured checkpoint 1 and resumed at once: its next frames are epoch 1.
    b = tcp(P_ISN + 19, C_ISN + 1, TCP_ACK, b" after")
    r.p(b, epoch=1)
    u = udp(b"after too")
    r.p(u, epoch=1)
    assert released(r.checkpoint(1)) == [a]
    # The SVM loaded checkpoint 1: it goes on from where the PVM was at capture.
    assert released(r.s(tcp(P_ISN + 19, C_ISN + 1, TCP_ACK, b" after"), epoch=1)) == [b]
    assert released(r.s(udp(b"after too"), epoch=1)) == [u]
    assert r.asked == ["net-mismatch tcp"]
    # stale SVM output from before the checkpoint is dropped
    assert r.s(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"BEFORE"), epoch=0) == []


def test_checkpoint_rebases_the_svm_ack_mark():
    r = Run()
    handshake(r)
    r.p(tcp(P_ISN + 1, C_ISN + 301, TCP_ACK))  # the PVM acks 300 bytes the SVM has not acked
    seg = tcp(P_ISN + 1, C_ISN + 301, TCP_ACK, b"data")
    r.p(seg, epoch=1)
    r.checkpoint(1)  # the SVM now has the PVM's state: it has received those 300 bytes
    assert released(r.s(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"data"), epoch=1)) == [seg]


def test_frames_after_a_capture_are_not_compared_with_output_from_before_it():
    r = Run()
    handshake(r)
    r.s(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"old guess"))  # epoch 0 SVM output
    seg = tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"new truth")
    assert r.p(seg, epoch=1) == []  # not compared before checkpoint 1: no mismatch
    assert r.asked == []
    r.checkpoint(1)
    assert released(r.s(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"new truth"), epoch=1)) == [seg]
    assert r.asked == []


def test_svm_output_of_a_checkpoint_not_yet_received_waits_for_it():
    r = Run()
    handshake(r)
    seg = tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"xyz")
    r.p(seg, epoch=1)
    assert r.s(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"xyz"), epoch=1) == []  # RECEIVED is still on its way
    assert released(r.checkpoint(1)) == [seg]


def test_late_primary_frame_of_an_older_epoch_goes_out_and_moves_the_mark():
    r = Run()
    handshake(r)
    r.checkpoint(1)
    late = tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"sent before the capture")
    assert released(r.p(late, epoch=0)) == [late]
    nxt = tcp(P_ISN + 24, C_ISN + 1, TCP_ACK, b"next")
    r.p(nxt, epoch=1)
    assert released(r.s(tcp(P_ISN + 24, C_ISN + 1, TCP_ACK, b"next"), epoch=1)) == [nxt]


def test_fin_retransmission():
    r = Run()
    handshake(r)
    fin = tcp(P_ISN + 1, C_ISN + 1, TCP_ACK | TCP_FIN)
    r.p(fin)
    assert released(r.checkpoint(1)) == [fin]  # the SVM never sent its FIN before the checkpoint
    again = noisy(fin)
    assert released(r.p(again, epoch=1)) == [again]  # the checkpoint had it: no counterpart needed
    assert r.c.stats()["tcp_connections"] == 0
    # after a matched FIN the state is gone; if the peer's ACK was lost, both guests send it again
    r.p(again, epoch=1)
    r.s(again, epoch=1)
    assert r.out[-1] == again and r.asked == []


def test_repeated_checkpoint_number_changes_nothing():
    r = Run()
    handshake(r)
    r.checkpoint(1)
    r.s(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"abc"), epoch=1)
    assert r.checkpoint(1) == []
    seg = tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"abc")
    assert released(r.p(seg, epoch=1)) == [seg]


# ---- timeouts, queues, one request at a time ----------------------------------------------------


def test_timeout_requests_once():
    r = Run()
    handshake(r)
    r.p(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"no answer"))
    assert r.tick(DEFAULT_COMPARE_TIMEOUT / 2) == []
    assert requests(r.tick(DEFAULT_COMPARE_TIMEOUT)) == ["net-timeout"]
    assert r.tick(0.01) == [] and r.tick(5.0) == []
    r.p(udp(b"lost"))
    r.s(udp(b"LOST"))  # a mismatch now asks nothing more: one request at a time
    assert r.asked == ["net-timeout"] and r.c.counters["mismatch_udp"] == 1
    r.c.checkpoint_started()
    out = r.checkpoint(1)
    assert len(released(out)) == 2
    assert r.c.counters["timeouts"] == 1


def test_hold_clock_restarts_at_checkpoint_and_timeout_can_ask_again():
    r = Run()
    handshake(r)
    seg = tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"after capture")
    r.p(seg, epoch=1)
    r.c.checkpoint_started()
    assert r.tick(2.0) == []  # a checkpoint is under way
    r.checkpoint(1)
    assert r.tick(DEFAULT_COMPARE_TIMEOUT - 0.01) == []
    assert requests(r.tick(0.02)) == ["net-timeout"]


def test_queue_full_requests_once_then_drops():
    r = Run(max_queue=4)
    handshake(r)
    frames = [tcp(P_ISN + 1 + i, C_ISN + 1, TCP_ACK, b"x") for i in range(10)]
    for f in frames:
        r.p(f)
    assert r.asked == ["net-queue-full"]
    assert r.c.counters["queue_full"] == 1
    assert r.c.counters["held"] == 8 and r.c.counters["dropped_primary"] == 2
    assert released(r.checkpoint(1)) == frames[:8]


def test_secondary_buffer_is_bounded():
    r = Run(max_secondary_bytes=1000)
    handshake(r)
    for i in range(5):
        r.s(tcp(P_ISN + 1 + 500 * i, C_ISN + 1, TCP_ACK, b"s" * 500))
    assert r.c.counters["dropped_secondary_bytes"] == 1500
    # the PVM's first bytes are gone from the SVM's copy: no match, no false mismatch
    seg = tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"s" * 500)
    assert r.p(seg) == []
    assert requests(r.tick(1.0)) == ["net-timeout"]


def test_defaults():
    c = Comparator()
    assert c.timeout == DEFAULT_COMPARE_TIMEOUT == 0.5
    assert c.max_queue == DEFAULT_MAX_QUEUE == 1024


# ---- alone, pruning -------------------------------------------------------------------------------


def test_alone_releases_everything_then_passes_through():
    r = Run()
    handshake(r)
    a = tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"held")
    u = udp(b"held too")
    r.p(a)
    r.p(u)
    assert released(r.c.alone()) == [a, u]
    b = tcp(P_ISN + 5, C_ISN + 1, TCP_ACK, b"direct")
    assert released(r.p(b)) == [b]
    assert r.s(tcp(P_ISN + 5, C_ISN + 1, TCP_ACK, b"direct")) == []
    assert r.c.counters["dropped_secondary"] == 1
    assert r.c.tick(100.0) == [] and r.c.stats()["held"] == 0


def test_idle_connections_are_pruned():
    r = Run()
    handshake(r)
    r.s(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"svm only"))
    r.p(udp(b"q"))
    r.s(udp(b"q"))
    assert r.c.stats()["connections"] == 2
    r.tick(30.0)
    assert r.c.stats()["connections"] == 2
    r.tick(31.0)
    assert r.c.stats()["connections"] == 0 and r.c.counters["pruned"] == 2


def test_new_connection_on_a_reused_four_tuple():
    r = Run()
    handshake(r)
    fin = tcp(P_ISN + 1, C_ISN + 2, TCP_ACK | TCP_FIN)
    r.p(fin)
    r.s(tcp(P_ISN + 1, C_ISN + 2, TCP_ACK | TCP_FIN))
    assert r.out[-1] == fin and r.c.stats()["tcp_connections"] == 0
    last_ack = tcp(P_ISN + 2, C_ISN + 3, TCP_ACK)
    r.s(last_ack)
    assert released(r.p(last_ack)) == [last_ack]
    # the client reuses its port; the guests pick new ISNs
    syn_ack = tcp(P_ISN + 999, 123, TCP_SYN | TCP_ACK)
    r.p(syn_ack)
    r.s(tcp(S_ISN + 999, 123, TCP_SYN | TCP_ACK))
    data = tcp(P_ISN + 1000, 124, TCP_ACK, b"second life")
    r.p(data)
    r.s(tcp(P_ISN + 1000, 124, TCP_ACK, b"second life"))
    assert r.out[-2:] == [syn_ack, data] and r.asked == []


def test_many_small_svm_segments_against_one_large_pvm_segment():
    # a 60 KB GSO frame from the PVM, 10-byte segments from the SVM: each
    # SVM byte is compared once (the mark moves as bytes are verified)
    r = Run()
    handshake(r)
    data = bytes(i % 251 for i in range(60000))
    big = tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, data)
    r.p(big)
    for i in range(0, 60000, 10):
        assert r.s(tcp(P_ISN + 1 + i, C_ISN + 1, TCP_ACK, data[i : i + 10])) == ([] if i < 59990 else [Release(big)])
    assert r.asked == []


def test_mismatch_inside_a_partly_compared_segment():
    r = Run()
    handshake(r)
    big = tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"a" * 100)
    r.p(big)
    r.s(tcp(P_ISN + 1, C_ISN + 1, TCP_ACK, b"a" * 50))
    assert requests(r.s(tcp(P_ISN + 51, C_ISN + 1, TCP_ACK, b"a" * 49 + b"b"))) == ["net-mismatch tcp"]
    assert big not in r.out


def test_hold_times_are_reported():
    """stats() says how long released frames waited for the secondary's twin."""
    c = Comparator(epoch=1)
    assert c.stats()["hold_ms_p50"] is None
    gm, cm = b"\x52\x54\x00\x12\x34\x56", b"\x02" * 6
    g, cl = bytes([10, 0, 0, 2]), bytes([10, 0, 0, 9])
    frame = packets.build_udp(gm, cm, g, cl, 7, 4000, b"ping")
    assert c.primary(frame, 1, now=10.0) == []
    assert c.secondary(bytes(frame), 1, now=10.004) == [Release(frame)]
    s = c.stats()
    assert s["hold_ms_p50"] == pytest.approx(4.0, abs=0.01) and s["hold_ms_p99"] == pytest.approx(4.0, abs=0.01)


def _icmpv6(src_mac: bytes, icmp_type: int, body: bytes = b"\0" * 20) -> bytes:
    src = bytes.fromhex("fe80000000000000505400fffe123456")
    dst = bytes.fromhex("ff0200000000000000000001ff123456")
    payload = bytes([icmp_type, 0, 0, 0]) + body
    ip6 = bytes([0x60, 0, 0, 0]) + struct.pack("!HBB", len(payload), packets.PROTO_ICMPV6, 255) + src + dst
    return b"\x33\x33\xff\x12\x34\x56" + src_mac + b"\x86\xdd" + ip6 + payload


def test_ipv6_neighbour_discovery_passes_like_arp_but_echo_is_compared():
    c = Comparator(epoch=1)
    mac = b"\x52\x54\x00\x12\x34\x56"
    ns = _icmpv6(mac, 135)  # neighbour solicitation: each guest's own timing
    assert c.primary(ns, 1, now=0.0) == [Release(ns)]
    assert c.secondary(_icmpv6(mac, 135, b"\1" * 20), 1, now=0.0) == []
    echo = _icmpv6(mac, 129, b"ping")  # echo reply: a service's answer, compared
    assert c.primary(echo, 1, now=0.0) == []
    assert c.secondary(_icmpv6(mac, 129, b"pong"), 1, now=0.0) == [RequestCheckpoint("net-mismatch icmp")]
