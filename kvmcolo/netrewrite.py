"""Layer 4: the secondary's TCP sequence rewriter (QEMU's filter-rewriter) as
a pure core.

Under COLO the secondary VM (SVM) runs the same guest as the primary (PVM)
and gets a copy of every frame the PVM receives, but the peers on the LAN
only ever talk to the PVM.  A guest picks a random initial sequence number
(ISN) for every connection it opens or accepts, so on a connection opened
since the last checkpoint the PVM and the SVM number their bytes
differently.  The rewriter sits between the SVM and the outside and
translates:

    inbound  (peer -> SVM):  ack (and SACK blocks) - offset   PVM space -> SVM space
    outbound (SVM -> peer):  seq + offset                     SVM space -> PVM space

with offset = PVM_ISN - SVM_ISN (mod 2**32).  Only the guest's own sequence
space differs; the peer's numbers are the same on both sides and are never
touched.  Checksums are updated incrementally (RFC 1624).  Sans-IO: frames
and `now` in, frames out; no sockets, threads or clocks.

Rules
-----
Connection key: the guest's view (proto, guest ip, guest port, peer ip,
peer port): `flow()` of an outbound frame, `reverse_flow()` of an inbound one.

1. Not TCP (ARP, UDP, ICMP, IP fragments, anything `packets.parse` does not
   see as TCP): passed through untouched.
2. A connection the rewriter does not know passes unmodified: it was opened
   before the last checkpoint load, and since then the SVM *is* the PVM
   (offset 0).  `reset()` (after every checkpoint load) forgets every
   connection for the same reason.
3. Learning, guest as server (a peer's SYN came in): the SVM's ISN is the
   seq of the SVM's SYN-ACK; the PVM's ISN is ack - 1 of the first inbound
   segment with ACK (and without SYN/RST) after the peer's SYN: the
   handshake ACK (the PVM sends no data before it, so every early ACK
   acknowledges exactly the SYN).  The SVM's SYN-ACK goes out in the SVM's
   own space while the PVM's ISN is unknown (the comparator matches
   SYN-ACKs by flags only), shifted when it is known.
   An SVM SYN-ACK on an unknown connection starts learning too: the peer's
   SYN reached the guest before the last checkpoint but the guest answered
   after it, so PVM and SVM may have picked different ISNs after all.  If
   they did not (a SYN-ACK retransmission), the same rule learns offset 0.
4. Learning, guest as client (the SVM sent a SYN): the SVM's ISN is that
   SYN's seq; the PVM's ISN is ack - 1 of the peer's SYN-ACK (or RST-ACK:
   "connection refused" must reach the SVM with an ack it accepts).  The
   comparator releases the PVM's SYN only after the SVM's, so the peer's
   answer can never come before the SVM's SYN; an answer on an unknown
   connection belongs to one from before the last checkpoint (rule 2).
5. Deferral (guest as server): inbound segments that arrive once the PVM's
   ISN is known but before the SVM's SYN-ACK came out (the SVM is behind)
   are held, in order, with their opaque tags.  The SVM's SYN-ACK releases
   them, rewritten, through `ready()` (and at the start of whatever the
   next `inbound()`/`tick()` returns, so a connection's frames never pass
   each other).  After `defer_timeout` (`tick`) they go out unmodified and
   the connection is forgotten (`defer_timeouts`).  `reset()` returns them
   unmodified, with their tags, for the driver to keep or drop by epoch.
   Bounded: beyond `max_deferred` frames in all, the connection that
   overflows gives up the same way (`defer_overflows`).
6. A peer's SYN with a new ISN on a known 4-tuple starts a new connection
   (learning restarts; deferred frames of the old one go out unmodified),
   unless the known connection is alive (offset known, no RST, not FIN'd
   both ways): a guest answers a SYN on a live connection with a challenge
   ACK (RFC 5961) and keeps the connection, so its offset must stay.  A
   repeated SYN (same ISN) is a retransmission and changes nothing.  A
   guest SYN with a new ISN always starts a new connection (a guest does
   not reuse the 4-tuple of a live socket).
7. The state of a connection ends `close_grace` after its last frame once
   it saw an RST (either way) or FINs both ways -- not at once, so the
   final ACK, retransmitted FINs and frames the guest had queued behind the
   RST are still rewritten; a new SYN ends it at once (rule 6).  Idle
   states go after `idle_timeout` if their offset is 0 or unknown, and
   only after `live_idle_timeout` (a day) if the offset is nonzero: after
   a failover the SVM keeps its ISN for those connections for good, and a
   TCP connection may idle for hours (Linux keepalive: 2 h), so dropping
   the state early would break a live connection.
8. At most `max_learning` connections may be learning at once (a SYN
   flood must not grow the table without bound): the oldest one is
   forgotten (`evicted`).  Learned connections are never evicted.

Inbound SACK blocks (and D-SACK) name the guest's sequence numbers and are
shifted like the ack.  Outbound ack/SACK name the peer's numbers: untouched.

Limitations: frames must carry complete checksums (the virtio-net device
offers no checksum offload; a partial checksum would be corrupted by the
incremental update); IP fragments and IPv6 extension headers are not TCP to
`packets.parse` and pass unmodified; TCP Fast Open server data before the
handshake ACK would make rule 3 learn a wrong PVM ISN; a simultaneous open
is not modelled.

Frames are bytearrays changed in place; deferred frames are kept by
reference (the caller must not reuse their buffers) and are never modified
until handed out.
"""

from __future__ import annotations

import struct

from kvmcolo import packets
from kvmcolo.packets import PROTO_TCP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN

DEFER_TIMEOUT = 1.0  # seconds a deferred inbound frame waits for the SVM's SYN-ACK
CLOSE_GRACE = 2.0  # seconds of quiet after RST / FINs both ways before the state goes
IDLE_TIMEOUT = 120.0  # idle limit for connections whose offset is 0 or still unknown
LIVE_IDLE_TIMEOUT = 24 * 3600.0  # idle limit for connections with a nonzero offset (rule 7)
MAX_LEARNING = 4096  # connections learning at once (rule 8)
MAX_DEFERRED = 1024  # deferred inbound frames in all (rule 5)
_PRUNE_INTERVAL = 1.0  # pruning walks every connection, so not on every tick

_MASK = 0xFFFFFFFF
_SERVER, _CLIENT = 0, 1  # the guest's role on a connection
_SACK = 5  # TCP option kind
_U32 = struct.Struct("!I")


class _Conn:
    """One connection the rewriter knows (see rules 3-8)."""

    __slots__ = ("key", "role", "peer_isn", "svm_isn", "pvm_isn", "offset", "fin_in", "fin_out", "rst", "last",
                 "deferred", "defer_since")  # fmt: skip

    def __init__(self, key, role: int, now: float):
        self.key = key
        self.role = role
        self.peer_isn: int | None = None  # the peer's SYN seq (guest as server): tells retransmissions from new SYNs
        self.svm_isn: int | None = None
        self.pvm_isn: int | None = None
        self.offset: int | None = None  # PVM_ISN - SVM_ISN mod 2**32, once both are known
        self.fin_in = self.fin_out = self.rst = False
        self.last = now
        self.deferred: list[tuple[int, bytearray, object, packets.Packet]] = []  # (arrival no., frame, tag, pkt)
        self.defer_since = 0.0

    @property
    def closing(self) -> bool:
        return self.rst or (self.fin_in and self.fin_out)

    @property
    def live(self) -> bool:
        """An established connection whose offset the guest relies on."""
        return self.offset is not None and not self.closing


class SeqRewriter:
    """The rewriter for one NIC.  Not thread-safe: the driver serialises calls.

    counters: rewritten_in / rewritten_out (frames actually changed),
    learned (connections whose offset became known, 0 included), deferred
    (inbound frames held), defer_timeouts / defer_overflows / defer_abandoned
    (deferred frames handed out unmodified: timeout, bound, RST or new SYN),
    sack_rewritten (inbound frames whose SACK blocks were shifted), restarts
    (a new SYN replaced a known connection), evicted, pruned, and the gauge
    connections."""

    def __init__(self, *, defer_timeout: float = DEFER_TIMEOUT, close_grace: float = CLOSE_GRACE,
                 idle_timeout: float = IDLE_TIMEOUT, live_idle_timeout: float = LIVE_IDLE_TIMEOUT,
                 max_learning: int = MAX_LEARNING, max_deferred: int = MAX_DEFERRED):  # fmt: skip
        self.defer_timeout = defer_timeout
        self.close_grace = close_grace
        self.idle_timeout = idle_timeout
        self.live_idle_timeout = live_idle_timeout
        self.max_learning = max_learning
        self.max_deferred = max_deferred
        self._conns: dict[tuple, _Conn] = {}
        self._learning: dict[tuple, _Conn] = {}  # offset still unknown, oldest first (rule 8)
        self._deferring: dict[tuple, _Conn] = {}  # connections holding deferred frames
        self._n_deferred = 0
        # Frames released but not handed out yet: (arrival no., frame, tag, pkt, conn to rewrite with or None).
        self._ready: list[tuple[int, bytearray, object, packets.Packet, _Conn | None]] = []
        self._arrivals = 0  # numbers deferred frames, so frames of several connections come out in arrival order
        self._next_prune: float | None = None
        self.counters: dict[str, int] = dict.fromkeys(
            ("rewritten_in", "rewritten_out", "learned", "deferred", "defer_timeouts", "defer_overflows",
             "defer_abandoned", "sack_rewritten", "restarts", "evicted", "pruned", "connections"), 0)  # fmt: skip

    # ---- API ---------------------------------------------------------------------------

    def inbound(self, frame: bytearray, tag=None, now: float = 0.0) -> list[tuple[bytearray, object]]:
        """A frame for the SVM.  Returns the frames to deliver now, in order:
        released deferred frames first, then this one unless it is deferred."""
        mine = self._inbound(frame, tag, now)
        if self._ready:
            return self._take_ready() + mine
        return mine

    def outbound(self, frame: bytearray, now: float = 0.0) -> bytearray:
        """A frame the SVM sent: its seq moved into the PVM's space (in place)."""
        pkt = packets.parse(frame)
        if pkt.proto != PROTO_TCP:
            return frame
        key = pkt.flow()
        conn = self._conns.get(key)
        kind = pkt.flags & (TCP_SYN | TCP_ACK | TCP_RST)
        if kind == TCP_SYN:  # the guest opens a connection (rule 4)
            if conn is None or conn.role != _CLIENT or conn.svm_isn != pkt.seq:  # else: a retransmission
                if conn is not None:
                    self._abandon(conn)
                    self.counters["restarts"] += 1
                conn = self._new(key, _CLIENT, now)
                conn.svm_isn = pkt.seq
        elif kind == TCP_SYN | TCP_ACK:  # the guest accepts one (rule 3)
            if conn is None:
                conn = self._new(key, _SERVER, now)
            if conn.role == _SERVER and conn.offset is None:
                conn.svm_isn = pkt.seq  # the latest SYN-ACK wins while the peer has acked none
                if conn.pvm_isn is not None:
                    self._learned(conn)
                    self._release(conn)
        if conn is None:
            return frame
        conn.last = now
        if conn.offset:
            packets.set_tcp_seq(frame, pkt, (pkt.seq + conn.offset) & _MASK)
            self.counters["rewritten_out"] += 1
        if pkt.flags & TCP_FIN:
            conn.fin_out = True
        if pkt.flags & TCP_RST:
            conn.rst = True
        return frame

    def ready(self) -> list[tuple[bytearray, object]]:
        """Deferred inbound frames released (by an SVM SYN-ACK, or given up on
        by `outbound`) since the last call, rewritten, in arrival order."""
        return self._take_ready() if self._ready else []

    def tick(self, now: float) -> list[tuple[bytearray, object]]:
        """Deferred frames that waited `defer_timeout` (unmodified: their
        connection is forgotten), after any not yet handed out; pruning."""
        expired = [c for c in self._deferring.values() if now - c.defer_since >= self.defer_timeout]
        for conn in expired:
            self.counters["defer_timeouts"] += len(conn.deferred)
            self._abandon(conn, counter=None)
        if self._next_prune is None or now >= self._next_prune:
            self._next_prune = now + _PRUNE_INTERVAL
            self._prune(now)
        return self._take_ready() if self._ready else []

    def reset(self) -> list[tuple[bytearray, object]]:
        """After a checkpoint load: the SVM now shares the PVM's sequence
        space on every connection, so everything is forgotten.  Returns the
        frames still held (deferred or released but not handed out yet),
        unmodified, in arrival order."""
        held = [entry[:4] for conn in self._deferring.values() for entry in conn.deferred]
        held += [entry[:4] for entry in self._ready]  # not rewritten yet: rewriting happens at hand-out
        held.sort(key=lambda e: e[0])
        self._conns.clear()
        self._learning.clear()
        self._deferring.clear()
        self._ready.clear()
        self._n_deferred = 0
        self.counters["connections"] = 0
        return [(frame, tag) for _, frame, tag, _ in held]

    # ---- inbound -----------------------------------------------------------------------

    def _inbound(self, frame: bytearray, tag, now: float) -> list[tuple[bytearray, object]]:
        pkt = packets.parse(frame)
        if pkt.proto != PROTO_TCP:
            return [(frame, tag)]
        key = pkt.reverse_flow()
        conn = self._conns.get(key)
        flags = pkt.flags
        if flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN:  # a peer opens a connection (rules 3, 6)
            conn = self._peer_syn(conn, key, pkt.seq, now)
        if conn is None:
            return [(frame, tag)]
        conn.last = now
        if conn.deferred:
            if flags & TCP_RST:
                # The peer gives up before the SVM answered: its ISN is of no
                # use any more, and the RST must not wait behind the SYN-ACK.
                self._abandon(conn)
                return [(frame, tag)]
            self._defer(conn, frame, tag, pkt, now)
            return []
        if conn.offset is None and flags & TCP_ACK:
            if conn.role == _SERVER:
                learns = not flags & (TCP_SYN | TCP_RST)  # the handshake ACK (or the first data after it)
            else:
                learns = bool(flags & (TCP_SYN | TCP_RST))  # SYN-ACK, or RST-ACK: connection refused
            if learns and conn.pvm_isn is None:
                conn.pvm_isn = (pkt.ack - 1) & _MASK
                if conn.svm_isn is None:  # the SVM has not answered the SYN yet (rule 5)
                    self._defer(conn, frame, tag, pkt, now)
                    return []
                self._learned(conn)
        if flags & TCP_RST and conn.offset is None:
            self._drop(conn)  # nothing learned, nothing to keep
            return [(frame, tag)]
        return [self._deliver_in(conn, frame, tag, pkt)]

    def _peer_syn(self, conn: _Conn | None, key, isn: int, now: float) -> _Conn:
        if conn is not None:
            if conn.role == _SERVER and conn.peer_isn is None and conn.offset is None:
                conn.peer_isn = isn  # learning from an SVM SYN-ACK (rule 3): this SYN is the one it answers
                return conn
            if (conn.role == _SERVER and conn.peer_isn == isn) or conn.live:
                return conn  # a retransmission, or a stray SYN on a live connection (rule 6)
            self._abandon(conn)
            self.counters["restarts"] += 1
        conn = self._new(key, _SERVER, now)
        conn.peer_isn = isn
        return conn

    def _deliver_in(self, conn: _Conn, frame: bytearray, tag, pkt: packets.Packet) -> tuple[bytearray, object]:
        offset = conn.offset
        if offset and pkt.flags & TCP_ACK:
            packets.set_tcp_ack(frame, pkt, (pkt.ack - offset) & _MASK)
            self.counters["rewritten_in"] += 1
            if pkt.payload - pkt.l4 > 20 and _shift_sack(frame, pkt, offset):
                self.counters["sack_rewritten"] += 1
        if pkt.flags & TCP_FIN:
            conn.fin_in = True
        if pkt.flags & TCP_RST:
            conn.rst = True
        return frame, tag

    # ---- deferral ----------------------------------------------------------------------

    def _defer(self, conn: _Conn, frame: bytearray, tag, pkt: packets.Packet, now: float) -> None:
        if not conn.deferred:
            conn.defer_since = now
            self._deferring[conn.key] = conn
        self._arrivals += 1
        conn.deferred.append((self._arrivals, frame, tag, pkt))
        self._n_deferred += 1
        self.counters["deferred"] += 1
        if self._n_deferred > self.max_deferred:
            self._abandon(conn, counter="defer_overflows")

    def _release(self, conn: _Conn) -> None:
        """The offset is known: the deferred frames go out rewritten (at hand-out)."""
        for seqno, frame, tag, pkt in conn.deferred:
            self._ready.append((seqno, frame, tag, pkt, conn))
        self._undefer(conn)

    def _abandon(self, conn: _Conn, counter: str | None = "defer_abandoned") -> None:
        """Forget `conn`; its deferred frames go out unmodified."""
        if conn.deferred:
            if counter:
                self.counters[counter] += len(conn.deferred)
            for seqno, frame, tag, pkt in conn.deferred:
                self._ready.append((seqno, frame, tag, pkt, None))
        self._drop(conn)

    def _undefer(self, conn: _Conn) -> None:
        if conn.deferred:
            self._n_deferred -= len(conn.deferred)
            conn.deferred = []
            self._deferring.pop(conn.key, None)

    def _take_ready(self) -> list[tuple[bytearray, object]]:
        ready, self._ready = self._ready, []
        ready.sort(key=lambda e: e[0])
        return [(frame, tag) if conn is None else self._deliver_in(conn, frame, tag, pkt)
                for _, frame, tag, pkt, conn in ready]  # fmt: skip

    # ---- the table ---------------------------------------------------------------------

    def _new(self, key, role: int, now: float) -> _Conn:
        if len(self._learning) >= self.max_learning:
            self.counters["evicted"] += 1
            self._abandon(next(iter(self._learning.values())))
        conn = self._conns[key] = self._learning[key] = _Conn(key, role, now)
        self.counters["connections"] = len(self._conns)
        return conn

    def _learned(self, conn: _Conn) -> None:
        conn.offset = (conn.pvm_isn - conn.svm_isn) & _MASK
        self._learning.pop(conn.key, None)
        self.counters["learned"] += 1

    def _drop(self, conn: _Conn) -> None:
        self._undefer(conn)
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        if self._learning.get(conn.key) is conn:
            del self._learning[conn.key]
        self.counters["connections"] = len(self._conns)

    def _prune(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if conn.deferred:
                continue  # the deferral timeout decides
            if conn.closing:
                limit = self.close_grace
            elif conn.offset:
                limit = self.live_idle_timeout
            else:
                limit = self.idle_timeout
            if now - conn.last >= limit:
                self._drop(conn)
                self.counters["pruned"] += 1


# ---- SACK and checksums ----------------------------------------------------------------


def _shift_sack(frame: bytearray, pkt: packets.Packet, offset: int) -> bool:
    """Move the SACK block edges of an inbound segment by -offset.  Returns
    whether there were any.  Malformed options end the walk (the guest's
    stack will judge them)."""
    i, end = pkt.l4 + 20, pkt.payload
    found = False
    while i < end:
        kind = frame[i]
        if kind == 0:  # end of options
            break
        if kind == 1:  # NOP
            i += 1
            continue
        if i + 1 >= end:
            break
        length = frame[i + 1]
        if length < 2 or i + length > end:
            break
        if kind == _SACK and length >= 10 and (length - 2) % 8 == 0:
            for at in range(i + 2, i + length, 4):
                old = _U32.unpack_from(frame, at)[0]
                _patch(frame, pkt, at, _U32.pack((old - offset) & _MASK))
            found = True
        i += length
    return found


def _patch(frame: bytearray, pkt: packets.Packet, at: int, new: bytes) -> None:
    """Write `new` at `at` inside the TCP header and update the checksum
    incrementally (RFC 1624, eqn. 3, over every 16-bit word touched).  Words
    are aligned to the TCP header, and options need not be: a SACK block may
    start at an odd offset, so the touched words are widened to alignment."""
    base = pkt.l4
    lo = base + ((at - base) & ~1)
    hi = base + ((at + len(new) - base + 1) & ~1)
    old = bytes(frame[lo:hi])
    frame[at : at + len(new)] = new
    cur = frame[lo:hi]
    csum_at = base + 16
    s = ~((frame[csum_at] << 8) | frame[csum_at + 1]) & 0xFFFF
    for j in range(0, hi - lo, 2):
        s += (~((old[j] << 8) | old[j + 1]) & 0xFFFF) + ((cur[j] << 8) | cur[j + 1])
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    s = ~s & 0xFFFF
    frame[csum_at], frame[csum_at + 1] = s >> 8, s & 0xFF
